//! The agent's care for the device it runs on: a private home whatever the umask, local file
//! modes respected, control characters in names kept off the terminal, a full disk reported and
//! survived, and one unobtainable chunk failing only the file that needs it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::harness::*;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Every directory under `dir` (itself included) and every file, as (path, mode), skipping
/// symbolic links.
fn modes_under(dir: &Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut out = vec![(dir.to_path_buf(), mode(dir))];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = e.path().symlink_metadata().unwrap();
        if md.is_dir() {
            out.extend(modes_under(&e.path()));
        } else if md.is_file() {
            out.push((e.path(), md.permissions().mode() & 0o7777));
        }
    }
    out
}

#[test]
fn agent_home_is_private_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let mut a = Device::enroll_with_umask(tmp.path(), &coord, "alice", "laptop", Some(0o000));
    a.write("notes.txt", b"hello");
    a.sync();
    // The daemon writes status.json.
    a.start();
    wait_for(SETTLE, || a.home.join("status.json").exists().then_some(())).expect("daemon wrote its status");
    a.stop(false);

    for name in ["config.toml", "device.key", "device.crt", "user-ca.crt", "status.json"] {
        assert_eq!(mode(&a.home.join(name)), 0o600, "{name}");
    }
    for (p, m) in modes_under(&a.home) {
        if p.file_name().is_some_and(|n| n == "run.log") {
            continue; // written by this test, not by the agent
        }
        assert_eq!(m & 0o077, 0, "{} is open to group or others: {m:o}", p.display());
    }
    assert_eq!(mode(&a.home), 0o700);
    assert_eq!(mode(&a.home.join("db")), 0o700);
    assert_eq!(mode(&a.root.join(".shoal")), 0o700);
    assert_eq!(mode(&a.root.join(".shoal/tmp")), 0o700);

    // A home left open (by an older version, or by hand) is closed again by any command, with a
    // warning.
    chmod(&a.home, 0o755);
    chmod(&a.home.join("db"), 0o755);
    chmod(&a.home.join("device.crt"), 0o644);
    chmod(&a.root.join(".shoal"), 0o755);
    let out = a.shoal(&["status"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("restricted it to its owner"), "no warning: {stderr}");
    assert_eq!(mode(&a.home), 0o700);
    assert_eq!(mode(&a.home.join("db")), 0o700);
    assert_eq!(mode(&a.home.join("device.crt")), 0o600);
    a.sync();
    assert_eq!(mode(&a.root.join(".shoal")), 0o700);
    // The synced folder itself is the user's: made with their umask (000 here), never tightened.
    assert_eq!(mode(&a.root), 0o777);
    let b = Device::enroll_with_umask(tmp.path(), &coord, "alice", "desktop", Some(0o022));
    assert_eq!(mode(&b.home), 0o700);
    assert_eq!(mode(&b.home.join("device.crt")), 0o600);
    b.sync();
    assert_eq!(mode(&b.home.join("db")), 0o700);
    sync_all(&[&a, &b]);
}
