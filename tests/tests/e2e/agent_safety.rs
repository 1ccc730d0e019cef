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

/// A tmpfs mounted over a directory for the life of the guard (needs root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (run it as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "remount failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn status_json(d: &Device) -> serde_json::Value {
    serde_json::from_slice(&d.shoal(&["status", "--json"]).stdout).unwrap()
}

fn last_error(d: &Device) -> String {
    status_json(d)["status"]["last_error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_full_disk_is_named_backed_off_and_resumed_without_refetching() {
    const SIZE: usize = 40 * 1024 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let a = Device::enroll(tmp.path(), &coord, "alice", "laptop");
    // B's folder lives on a file system with room for about half of the file.
    let disk = Tmpfs::mount(&tmp.path().join("desktop"), "24m");
    let mut b = Device::enroll(tmp.path(), &coord, "alice", "desktop");
    let big = noise(11, SIZE);
    a.write("big.bin", &big);
    a.sync();

    let out = || coord.metric("shoal_chunk_bytes_out_total");
    b.start();
    let err = wait_for(SETTLE, || Some(last_error(&b)).filter(|e| e.contains("no space left")))
        .unwrap_or_else(|| panic!("B's status does not name the full disk: {:?}", last_error(&b)));
    assert!(err.contains("big.bin") && err.contains("desktop"), "{err}");
    let human = String::from_utf8(b.shoal(&["status"]).stdout).unwrap();
    assert!(human.contains("no space left"), "{human}");
    assert!(b.read("big.bin").is_none());

    // While the disk stays full, retries are spaced out and fetch nothing.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let full = out();
    std::thread::sleep(std::time::Duration::from_secs(7));
    assert_eq!(out(), full, "bytes fetched again while the disk is still full");
    let log = std::fs::read_to_string(b.home.join("run.log")).unwrap();
    let tries = log.matches("download failed").count();
    assert!((2..=4).contains(&tries), "{tries} tries in ~10 s: {log}");

    // Room again: the download continues from the verified bytes it kept.
    disk.resize("128m");
    converge(&[&a, &b], SETTLE);
    assert_eq!(b.read("big.bin").unwrap(), big);
    let again = out() - full;
    // A fresh download would fetch the whole file again; the kept part (~20 MiB) is not.
    assert!(again < (SIZE as u64) * 3 / 4, "fetched {again} bytes after space was freed, for a {SIZE}-byte file");
    b.stop(false);
    drop(b);
    drop(disk);
}

/// Flips a byte inside the stored bytes of chunk `id` (`len` bytes) in the coordinator's packs.
fn corrupt_chunk(data: &Path, id: &[u8; 32], len: usize) {
    use std::os::unix::fs::FileExt;
    let mut header = id.to_vec();
    header.extend_from_slice(&(len as u32).to_be_bytes());
    let mut hits = 0;
    for e in std::fs::read_dir(data.join("chunks")).unwrap().flatten() {
        if e.path().extension().is_none_or(|x| x != "pack") {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap();
        for (at, _) in bytes.windows(header.len()).enumerate().filter(|(_, w)| *w == header.as_slice()) {
            let target = (at + header.len() + len / 2) as u64;
            let f = std::fs::OpenOptions::new().write(true).open(e.path()).unwrap();
            let byte = bytes[target as usize] ^ 0x5a;
            f.write_all_at(&[byte], target).unwrap();
            f.sync_all().unwrap();
            hits += 1;
        }
    }
    assert_eq!(hits, 1, "chunk frame not found exactly once in the packs");
}

#[test]
fn a_corrupt_chunk_fails_only_the_file_that_needs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::start(&tmp.path().join("coord"));
    let a = Device::enroll(tmp.path(), &coord, "alice", "laptop");
    let small: Vec<(String, Vec<u8>)> =
        (0..60).map(|i| (format!("notes/{i:02}.txt"), format!("small file number {i}\n").into_bytes())).collect();
    for (p, d) in &small {
        a.write(p, d);
    }
    let victim = b"the one chunk of this file is damaged on the coordinator's disk".repeat(20);
    a.write("victim.txt", &victim);
    a.sync();
    // A small file is one chunk, named by the BLAKE3 of its bytes.
    coord.stop(false);
    corrupt_chunk(&coord.data, blake3::hash(&victim).as_bytes(), victim.len());
    coord.restart(false);

    let mut b = Device::enroll(tmp.path(), &coord, "alice", "desktop");
    b.start();
    wait_for(SETTLE, || small.iter().all(|(p, d)| b.read(p).as_ref() == Some(d)).then_some(()))
        .unwrap_or_else(|| panic!("the intact files did not all arrive; B's last error: {}", last_error(&b)));
    let err = wait_for(SETTLE, || Some(last_error(&b)).filter(|e| e.contains("victim.txt")))
        .unwrap_or_else(|| panic!("B's status does not name the failed file: {:?}", last_error(&b)));
    assert!(err.contains("unavailable"), "{err}");
    let human = String::from_utf8(b.shoal(&["status"]).stdout).unwrap();
    assert!(human.contains("victim.txt"), "{human}");
    assert!(b.read("victim.txt").is_none(), "a file with a damaged chunk was installed");
    assert_eq!(status_json(&b)["status"]["in_sync"], false);
    let mut want = b.remote_tree();
    want.remove("victim.txt");
    assert_eq!(b.local_tree(), want, "B holds everything but the damaged file");
    b.stop(false);
}

/// A broken config file's error reads as the parser wrote it, over several lines, with the
/// offending line quoted: not one line of literal `\n`s.
#[test]
fn a_config_error_is_shown_as_the_parser_wrote_it() {
    let (_tmp, _coord, devices) = world("quinn", &["a"]);
    let a = &devices[0];
    let path = a.home.join("config.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("rescan_interval = [\n");
    std::fs::write(&path, text).unwrap();
    let out = a.shoal(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid config file"), "{err}");
    assert!(err.lines().count() > 2 && !err.contains("\\n"), "{err}");
    assert!(err.contains("rescan_interval = ["), "the offending line is quoted: {err}");
}
