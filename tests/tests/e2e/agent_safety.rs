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

/// The raw terminal control bytes in `out` (C0 controls other than newline and tab, DEL, and
/// the UTF-8 encoded C1 controls).
fn control_bytes(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    text.chars().filter(|c| c.is_control() && !matches!(c, '\n' | '\t')).map(|c| format!("{c:?}")).collect()
}

#[test]
fn control_characters_in_names_sync_but_never_reach_the_terminal() {
    use std::os::unix::ffi::OsStrExt;
    let (_tmp, _coord, devices) = world("alice", &["laptop", "desktop"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    let name = "\x1b[31mred\x07 bell\rreturn.txt";
    a.write(name, b"colourful");
    // Names that cannot sync are listed in `shoal status`: one with a byte that is not UTF-8,
    // one not in NFC, both with control characters.
    let bad = std::ffi::OsStr::from_bytes(b"\x1b]0;title\x07\xff.txt");
    std::fs::write(a.root.join(bad), b"x").unwrap();
    a.write("e\u{301}\x1b[2J.txt", b"y");
    a.start();
    b.start();
    wait_for(SETTLE, || b.read(name)).expect("the file with control characters in its name reached B");
    assert_eq!(b.read(name).unwrap(), b"colourful");
    // B holds exactly the coordinator's tree; A also holds the two names that cannot sync.
    let t = converge(&[&b], SETTLE);
    assert_eq!(t.len(), 1, "{t:?}");

    // Human output escapes the control characters; --json keeps the exact name.
    let ls = b.shoal(&["ls"]);
    assert!(ls.status.success());
    assert_eq!(control_bytes(&ls.stdout), Vec::<String>::new(), "raw control characters in `shoal ls`");
    let shown = String::from_utf8(ls.stdout).unwrap();
    assert!(shown.contains("\\u{1b}[31mred\\u{7} bell\\rreturn.txt"), "{shown}");
    let json: Vec<serde_json::Value> = serde_json::from_slice(&b.shoal(&["ls", "--json"]).stdout).unwrap();
    assert!(json.iter().any(|e| e["path"] == name));

    let st = wait_for(SETTLE, || {
        let out = a.shoal(&["status"]);
        String::from_utf8_lossy(&out.stdout).contains("skipped").then_some(out)
    })
    .expect("the status lists skipped names");
    assert_eq!(control_bytes(&st.stdout), Vec::<String>::new(), "raw control characters in `shoal status`");
    let shown = String::from_utf8(st.stdout).unwrap();
    assert!(shown.contains("\\u{1b}]0;title\\u{7}") && shown.contains("\\u{1b}[2J"), "{shown}");
    let json: serde_json::Value = serde_json::from_slice(&a.shoal(&["status", "--json"]).stdout).unwrap();
    let skipped = json["status"]["skipped"].as_array().unwrap();
    assert!(skipped.iter().any(|s| s.as_str().unwrap().contains("e\u{301}\x1b[2J.txt")), "{skipped:?}");
    a.stop(false);
    b.stop(false);
    for d in [&a, &b] {
        let log = std::fs::read(d.home.join("run.log")).unwrap();
        assert_eq!(control_bytes(&log), Vec::<String>::new(), "raw control characters in {}'s log", d.name);
    }
}

#[test]
fn local_modes_survive_updates_and_new_files_follow_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let mut a = Device::enroll_with_umask(tmp.path(), &coord, "alice", "laptop", Some(0o022));
    let mut b = Device::enroll_with_umask(tmp.path(), &coord, "alice", "desktop", Some(0o022));
    a.write("secret.txt", b"v1");
    chmod(&a.path("secret.txt"), 0o600);
    a.write("tool.sh", b"#!/bin/sh\n");
    chmod(&a.path("tool.sh"), 0o755);
    a.start();
    b.start();
    converge(&[&a, &b], SETTLE);
    // Only the exec bit syncs: a new file gets the receiving agent's umask defaults.
    assert_eq!(mode(&b.path("secret.txt")), 0o644);
    assert_eq!(mode(&b.path("tool.sh")), 0o755);

    // B's own chmod survives A's edits; the exec bit still follows A.
    chmod(&b.path("secret.txt"), 0o600);
    chmod(&b.path("tool.sh"), 0o750);
    a.write("secret.txt", b"v2, edited on the laptop");
    a.write("tool.sh", b"#!/bin/sh\necho edited\n");
    chmod(&a.path("tool.sh"), 0o644);
    converge(&[&a, &b], SETTLE);
    assert_eq!(b.read("secret.txt").unwrap(), b"v2, edited on the laptop");
    assert_eq!(mode(&b.path("secret.txt")), 0o600, "a local chmod 600 survives an update");
    assert_eq!(mode(&b.path("tool.sh")), 0o640, "the exec bit is cleared, the rest kept");
    chmod(&a.path("tool.sh"), 0o755);
    wait_for(SETTLE, || (mode(&b.path("tool.sh")) == 0o750).then_some(()))
        .unwrap_or_else(|| panic!("exec bit not set again on B: {:o}", mode(&b.path("tool.sh"))));

    // A device whose agent runs under umask 077 gets private new files.
    let c = Device::enroll_with_umask(tmp.path(), &coord, "alice", "server", Some(0o077));
    c.sync();
    assert_eq!(mode(&c.path("secret.txt")), 0o600);
    assert_eq!(mode(&c.path("tool.sh")), 0o700);
    converge(&[&a, &b, &c], SETTLE);
    a.stop(false);
    b.stop(false);
}
