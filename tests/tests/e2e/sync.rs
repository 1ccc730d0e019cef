//! Everyday sync between running daemons: creates, edits, deletes, renames, nested and empty
//! directories, empty files, exec bits, many files, large files, conflicts, edit vs delete.

use crate::harness::*;

#[test]
fn two_devices_follow_every_kind_of_change() {
    let (_tmp, _coord, devices) = world("alice", &["laptop", "desktop"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // Each device holds its own key and a certificate from the user's CA; the coordinator lists
    // both devices with their certificate fingerprints.
    for d in [&a, &b] {
        assert!(std::fs::read_to_string(d.home.join("device.crt")).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(d.home.join("device.key").exists() && d.home.join("user-ca.crt").exists());
    }
    let out = a.shoal(&["devices", "--json"]);
    let devices: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(devices.len(), 2);
    assert_ne!(devices[0]["cert_fingerprint"], devices[1]["cert_fingerprint"]);
    a.start();
    b.start();

    a.write("notes.txt", b"hello");
    a.write("docs/deep/er/report.md", b"# report");
    a.write("empty.txt", b"");
    std::fs::create_dir_all(a.path("empty-dir/inner")).unwrap();
    a.write("bin/tool.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(a.path("bin/tool.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let t = converge(&[&a, &b], SETTLE);
    assert_eq!(t["bin/tool.sh"], Node::File(file_hash(b"#!/bin/sh\necho hi\n"), true), "exec bit synced");
    assert_eq!(t["empty-dir/inner"], Node::Dir);
    assert_eq!(b.read("empty.txt").unwrap(), b"");

    // Edit on the other side, delete a file, delete a whole tree, rename a directory.
    b.write("notes.txt", b"hello again");
    std::fs::remove_file(b.path("empty.txt")).unwrap();
    std::fs::remove_dir_all(b.path("empty-dir")).unwrap();
    std::fs::rename(b.path("docs"), b.path("documents")).unwrap();
    let t = converge(&[&a, &b], SETTLE);
    assert_eq!(a.read("notes.txt").unwrap(), b"hello again");
    assert!(!t.contains_key("empty.txt") && !t.contains_key("empty-dir") && !t.contains_key("docs"));
    assert_eq!(a.read("documents/deep/er/report.md").unwrap(), b"# report");

    // A file replaced by a directory of the same name, and back.
    std::fs::remove_file(a.path("notes.txt")).unwrap();
    a.write("notes.txt/inside", b"now a dir");
    converge(&[&a, &b], SETTLE);
    assert_eq!(b.read("notes.txt/inside").unwrap(), b"now a dir");

    // The mtime of a synced file is preserved.
    let ma = std::fs::metadata(a.path("documents/deep/er/report.md")).unwrap().modified().unwrap();
    let mb = std::fs::metadata(b.path("documents/deep/er/report.md")).unwrap().modified().unwrap();
    assert_eq!(ma, mb);
    a.stop(false);
    b.stop(false);
}

#[test]
fn three_devices_converge_and_renames_move_no_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let mut devs: Vec<Device> =
        ["one", "two", "three"].iter().map(|n| Device::enroll(tmp.path(), &coord, "bob", n)).collect();
    for d in &mut devs {
        d.start();
    }
    let big = noise(3, 3 * 1024 * 1024);
    devs[0].write("media/video.bin", &big);
    devs[1].write("b.txt", b"from two");
    devs[2].write("c/d/e.txt", b"from three");
    let refs: Vec<&Device> = devs.iter().collect();
    converge(&refs, SETTLE);
    // Devices that took a file from its author as a LAN peer converge before the author's upload
    // is done: measure from when every version is durable.
    wait_for(SETTLE, || (coord.metric("shoal_pending_versions") == 0).then_some(()))
        .unwrap_or_else(|| panic!("versions still pending: {}", coord.metric("shoal_pending_versions")));

    let bytes_in = || coord.metric("shoal_chunk_bytes_in_total");
    let before = bytes_in();
    std::fs::rename(devs[1].path("media/video.bin"), devs[1].path("media/renamed.bin")).unwrap();
    std::fs::rename(devs[2].path("c"), devs[2].path("moved-c")).unwrap();
    let t = converge(&refs, SETTLE);
    assert!(t.contains_key("media/renamed.bin") && t.contains_key("moved-c/d/e.txt"));
    assert_eq!(bytes_in(), before, "a rename uploads no chunk bytes");
    for d in &mut devs {
        d.stop(false);
    }
}

#[test]
fn thousands_of_small_files_and_a_large_one() {
    let (_tmp, _coord, devices) = world("carol", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.start();
    b.start();
    for i in 0..2000 {
        a.write(&format!("many/d{}/f{i}.txt", i % 20), format!("file number {i}").as_bytes());
    }
    let big = noise(9, 200 * 1024 * 1024);
    a.write("large.bin", &big);
    let t = converge(&[&a, &b], Duration::from_secs(180));
    assert_eq!(t.len(), 2000 + 20 + 1 + 1);
    assert_eq!(t["large.bin"], Node::File(file_hash(&big), false));
    a.stop(false);
    b.stop(false);
}

#[test]
fn concurrent_offline_edits_keep_both_versions() {
    let (_tmp, _coord, devices) = world("dave", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.write("plan.txt", b"original");
    sync_all(&[&a, &b]);

    // Both devices edit while offline from each other, then sync.
    a.write("plan.txt", b"edited on a");
    b.write("plan.txt", b"edited on b, longer");
    a.sync();
    b.sync();
    let t = sync_all(&[&a, &b]);
    let copies: Vec<&String> = t.keys().filter(|k| k.starts_with("plan (conflicted copy b ")).collect();
    assert_eq!(copies.len(), 1, "one conflicted copy: {t:?}");
    assert!(copies[0].ends_with(").txt"));
    assert_eq!(a.read("plan.txt").unwrap(), b"edited on a", "the first commit keeps the name");
    assert_eq!(a.read(copies[0]).unwrap(), b"edited on b, longer", "the other version survives");
}

#[test]
fn edit_beats_delete_on_either_side() {
    let (_tmp, _coord, devices) = world("erin", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.write("x.txt", b"v1");
    a.write("y.txt", b"v1");
    sync_all(&[&a, &b]);

    // x: deleted on a (synced first), edited on b. y: edited on a (first), deleted on b.
    std::fs::remove_file(a.path("x.txt")).unwrap();
    b.write("x.txt", b"b's edit");
    a.write("y.txt", b"a's edit");
    std::fs::remove_file(b.path("y.txt")).unwrap();
    a.sync();
    b.sync();
    sync_all(&[&a, &b]);
    assert_eq!(a.read("x.txt").unwrap(), b"b's edit");
    assert_eq!(b.read("y.txt").unwrap(), b"a's edit");
}

#[test]
fn ignored_and_junk_files_stay_local() {
    let (_tmp, _coord, devices) = world("fay", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.write(".shoalignore", b"*.log\nbuild/\n");
    a.write("keep.txt", b"k");
    a.write("debug.log", b"noise");
    a.write("build/out.o", b"obj");
    a.write(".DS_Store", b"junk");
    a.write("doc.txt.swp", b"swap");
    a.sync();
    b.sync();
    let remote: Vec<String> = a.remote_tree().into_keys().collect();
    assert_eq!(remote, [".shoalignore", "keep.txt"]);
    assert_eq!(b.local_tree(), a.remote_tree());
    // A rule added later hides an already-synced file from new syncing, without deleting it.
    a.write(".shoalignore", b"*.log\nbuild/\nkeep.txt\n");
    b.write("keep.txt", b"changed on b");
    a.sync();
    b.sync();
    a.sync();
    // b uploaded its edit before it saw the new rule; a ignores the path, so leaves its copy alone.
    assert_eq!(a.read("keep.txt").unwrap(), b"k");
    assert_eq!(a.remote_tree()["keep.txt"], Node::File(file_hash(b"changed on b"), false));
}

use std::time::Duration;

#[test]
fn deleted_directories_take_os_junk_but_keep_new_files() {
    let (_tmp, _coord, devices) = world("gil", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.write("photos/one.jpg", b"1");
    a.write("work/report.txt", b"r");
    sync_all(&[&a, &b]);
    // b's file browser left metadata in one folder; b added a new file in the other, offline.
    b.write("photos/.DS_Store", b"finder junk");
    b.write("work/new.txt", b"new on b");
    std::fs::remove_dir_all(a.path("photos")).unwrap();
    std::fs::remove_dir_all(a.path("work")).unwrap();
    a.sync();
    b.sync();
    let t = sync_all(&[&a, &b]);
    assert!(!b.path("photos").exists(), "the deleted folder went, with its OS junk");
    assert_eq!(t.get("work/new.txt"), Some(&Node::File(file_hash(b"new on b"), false)), "new work survives");
    assert!(!t.contains_key("work/report.txt"));
}

#[test]
fn directory_replaced_by_a_file_while_another_device_adds_to_it() {
    let (_tmp, _coord, devices) = world("hank", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.write("x/old.txt", b"old");
    sync_all(&[&a, &b]);
    std::fs::remove_dir_all(a.path("x")).unwrap();
    a.write("x", b"now a file");
    b.write("x/new.txt", b"added on b");
    a.sync();
    b.sync();
    let t = sync_all(&[&a, &b]);
    assert_eq!(t["x"], Node::File(file_hash(b"now a file"), false));
    let kept: Vec<&String> =
        t.keys().filter(|k| k.starts_with("x (conflicted copy b ") && k.ends_with("/new.txt")).collect();
    assert_eq!(kept.len(), 1, "b's addition survives in a conflicted copy of the folder: {t:?}");
}

/// Two devices edit the same file while they cannot see each other: stopped (SIGTERM) and
/// started two seconds apart, then paused (SIGSTOP). The second keeps its edit as a conflicted
/// copy, which reaches the coordinator and the other device long before the periodic rescan,
/// and it never reports in sync while the copy is uncommitted.
#[test]
fn a_conflicted_copy_is_committed_before_anyone_reports_in_sync() {
    let (_tmp, _coord, devices) = world("olga", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.start();
    b.start();
    a.write("hello.txt", b"hello");
    converge(&[&a, &b], SETTLE);

    a.stop(false);
    b.stop(false);
    a.write("hello.txt", b"a's edit");
    b.write("hello.txt", b"b's edit, while stopped");
    a.start();
    wait_for_head(&a, "hello.txt", b"a's edit");
    std::thread::sleep(Duration::from_secs(2));
    let since = shoal_sys::clock::now_ms();
    b.start();
    expect_conflicted_copy(&a, &b, b"b's edit, while stopped", since);

    b.signal_daemon("STOP");
    a.write("hello.txt", b"a's second edit");
    wait_for_head(&a, "hello.txt", b"a's second edit");
    b.write("hello.txt", b"b's edit, while paused");
    let since = shoal_sys::clock::now_ms();
    b.signal_daemon("CONT");
    expect_conflicted_copy(&a, &b, b"b's edit, while paused", since);
    a.stop(false);
    b.stop(false);
}

/// While the daemon is paused (its watch events queue up), a top-level directory is moved into
/// another and made again under its name, and a file is made and renamed in the new one. When it
/// resumes, every one of those changes reaches the coordinator before it reports in sync.
#[test]
fn a_top_level_directory_moved_away_and_made_again_while_paused_is_synced_whole() {
    let (_tmp, _coord, devices) = world("pia", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.start();
    b.start();
    a.write("a/keep.txt", b"in a");
    a.write("b/f0", b"in the first b");
    converge(&[&a, &b], SETTLE);

    for round in 0..3 {
        a.signal_daemon("STOP");
        std::fs::rename(a.path("b"), a.path(&format!("a/b{round}"))).unwrap();
        std::fs::create_dir(a.path("b")).unwrap();
        a.write("b/f1", format!("round {round}").as_bytes());
        std::fs::rename(a.path("b/f1"), a.path("b/f2")).unwrap();
        let since = shoal_sys::clock::now_ms();
        a.signal_daemon("CONT");
        let want = Node::File(file_hash(format!("round {round}").as_bytes()), false);
        let done = wait_for(Duration::from_secs(30), || {
            let status = daemon_status(&a);
            let remote = a.remote_tree();
            let whole = remote.get("b/f2") == Some(&want) && remote.contains_key(&format!("a/b{round}/f0"));
            if status.in_sync && status.cycle_started_ms > since && !whole {
                panic!("round {round}: a reports in sync with its changes not all committed: {remote:?}");
            }
            whole.then_some(())
        });
        done.unwrap_or_else(|| {
            panic!("round {round}: the changes never reached the coordinator: {:?}", a.remote_tree())
        });
        let tree = converge(&[&a, &b], SETTLE);
        assert!(!tree.contains_key("b/f1") && !tree.contains_key("b/f0"), "{tree:?}");
        // The next round moves the b made in this one: put a file back in it.
        a.write("b/f0", b"in the first b");
        converge(&[&a, &b], SETTLE);
    }
    a.stop(false);
    b.stop(false);
}

fn wait_for_head(d: &Device, path: &str, content: &[u8]) {
    let want = Node::File(file_hash(content), false);
    wait_for(SETTLE, || (d.remote_tree().get(path) == Some(&want)).then_some(()))
        .unwrap_or_else(|| panic!("{path} never reached the coordinator from {}", d.name));
}

/// Waits until `content` is in a conflicted copy of hello.txt on the coordinator and on both
/// devices; until then, `b` must not report in sync for a cycle started after `since_ms`.
fn expect_conflicted_copy(a: &Device, b: &Device, content: &[u8], since_ms: u64) {
    let want = Node::File(file_hash(content), false);
    let is_copy = |t: &Tree| t.iter().any(|(p, n)| p.starts_with("hello (conflicted copy b ") && *n == want);
    // Far below the periodic rescan (10 minutes), which used to be the only thing to commit it.
    let found = wait_for(Duration::from_secs(30), || {
        let status = daemon_status(b);
        let remote = a.remote_tree();
        if status.in_sync && status.cycle_started_ms > since_ms && !is_copy(&remote) {
            panic!("b reports in sync while its conflicted copy is not committed: {remote:?}");
        }
        (is_copy(&remote) && is_copy(&a.local_tree()) && is_copy(&b.local_tree())).then_some(())
    });
    found.unwrap_or_else(|| panic!("the conflicted copy never reached both devices: {:?}", a.remote_tree()));
    converge(&[a, b], SETTLE);
}

/// A device in the middle of a long download says it is syncing, not the "in sync" of the cycle
/// before it.
#[test]
fn a_device_mid_download_does_not_report_in_sync() {
    let (_tmp, _coord, devices) = world("pavel", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // Through the origin, at 8 MiB/s: 64 MiB take about eight seconds.
    a.configure(|c| c.lan_sync = false);
    b.configure(|c| {
        c.lan_sync = false;
        c.download_limit = Some(shoal_agent::limit::Rate::parse("8MiB").unwrap());
    });
    a.start();
    b.start();
    wait_for(SETTLE, || (daemon_status(&b).in_sync).then_some(())).expect("B never in sync");
    let data = noise(75, 64 * 1024 * 1024);
    a.write("big.bin", &data);
    wait_for(SETTLE, || a.remote_tree().contains_key("big.bin").then_some(())).expect("A never committed it");
    let committed = std::time::Instant::now();
    let mut checked = 0;
    while !b.path("big.bin").exists() {
        assert!(committed.elapsed() < SETTLE, "B never got the file");
        let status = daemon_status(&b);
        if committed.elapsed() > Duration::from_secs(2) && !b.path("big.bin").exists() {
            assert!(!status.in_sync, "B says in sync while it downloads: {status:?}");
            checked += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(checked > 5, "the download was too quick to watch ({checked} looks)");
    converge(&[&a, &b], SETTLE);
    a.stop(false);
    b.stop(false);
}

/// A directory the agent made, removed and made again at the same path (often with the same
/// inode) while the agent was paused, with a file written in it before any watch could cover it:
/// the file reaches the other device without waiting for the periodic rescan.
#[test]
fn a_directory_made_again_keeps_what_was_written_in_it() {
    let (_tmp, _coord, devices) = world("raul", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.start();
    b.start();
    a.write("docs/old.txt", b"old");
    converge(&[&a, &b], SETTLE);
    // B's agent made docs/ when it installed docs/old.txt.
    b.signal_daemon("STOP");
    std::fs::remove_dir_all(b.path("docs")).unwrap();
    b.write("docs/new.txt", b"written while the agent was paused");
    b.signal_daemon("CONT");
    wait_for(Duration::from_secs(30), || a.read("docs/new.txt").is_some().then_some(()))
        .unwrap_or_else(|| panic!("docs/new.txt never reached A:\n{}", b.log()));
    let t = converge(&[&a, &b], SETTLE);
    assert!(!t.contains_key("docs/old.txt"), "{t:?}");
    a.stop(false);
    b.stop(false);
}
