//! Offline work, catching up from a durable cursor, coordinator restarts, and an agent killed
//! with SIGKILL in the middle of a download (of a large file, and of many small ones).

use std::time::Duration;

use crate::harness::*;

#[test]
fn offline_device_catches_up_after_fifty_commits() {
    let (_tmp, _coord, devices) = world("gus", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    b.write("before.txt", b"b was here");
    sync_all(&[&a, &b]);
    // b is offline (not running) while a makes 50 commits.
    for i in 0..50 {
        a.write(&format!("log/{}.txt", i % 7), format!("entry {i}").as_bytes());
        if i % 5 == 0 {
            let _ = std::fs::remove_file(a.path(&format!("log/{}.txt", (i + 3) % 7)));
        }
        a.sync();
    }
    b.sync();
    converge(&[&a, &b], Duration::from_secs(10));
    let h = a.shoal(&["history", "log/0.txt", "--json"]);
    let versions: Vec<serde_json::Value> = serde_json::from_slice(&h.stdout).unwrap();
    assert!(versions.len() >= 7, "every version is kept: {}", versions.len());
}

#[test]
fn agents_ride_out_a_coordinator_restart() {
    let (_tmp, mut coord, devices) = world("hal", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.start();
    b.start();
    for i in 0..40 {
        a.write(&format!("batch1/{i}.txt"), &noise(i, 50_000));
    }
    std::thread::sleep(Duration::from_millis(300));
    coord.restart(true);
    for i in 0..40 {
        b.write(&format!("batch2/{i}.txt"), &noise(100 + i, 50_000));
    }
    coord.restart(false);
    let t = converge(&[&a, &b], SETTLE);
    assert_eq!(t.keys().filter(|k| k.starts_with("batch")).count(), 82);
    // While the coordinator is down, local work goes on and is sent when it returns.
    coord.stop(false);
    a.write("offline.txt", b"written while the coordinator was down");
    std::thread::sleep(Duration::from_millis(500));
    coord.restart(false);
    let t = converge(&[&a, &b], SETTLE);
    assert!(t.contains_key("offline.txt"));
    a.stop(false);
    b.stop(false);
}

#[test]
fn sigkill_mid_download_leaves_no_partial_file() {
    let (_tmp, _coord, devices) = world("ivy", &["a", "b"]);
    let [a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    let big = noise(77, 200 * 1024 * 1024);
    a.write("big.bin", &big);
    a.sync();
    b.start();
    // Kill b as soon as a partial download exists in its temp dir.
    let tmpdir = b.path(".shoal/tmp");
    let seen = wait_for(Duration::from_secs(60), || {
        let n = std::fs::read_dir(&tmpdir).ok()?.flatten().filter(|e| e.metadata().is_ok_and(|m| m.len() > 0)).count();
        (n > 0).then_some(())
    });
    b.stop(true);
    assert!(seen.is_some(), "the download never started");
    match b.read("big.bin") {
        None => {}
        Some(data) => assert_eq!(file_hash(&data), file_hash(&big), "a visible file is never partial"),
    }
    b.start();
    converge(&[&a, &b], SETTLE);
    assert_eq!(std::fs::read_dir(&tmpdir).unwrap().count(), 0, "temp files are cleaned up");
    b.stop(false);
}

#[test]
fn sigkill_between_small_file_installs_keeps_every_file_once() {
    // Small files are installed in groups and recorded in the store once their renames are
    // synced: a kill in between leaves files on disk that the store does not know, which the
    // restarted agent must take as they are (no conflict copy). And the journal entries pulled
    // but not yet fetched are queued in memory only: the restarted agent must find them.
    let (_tmp, _coord, devices) = world("jo", &["a", "b"]);
    let [a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    const FILES: usize = 6000;
    for i in 0..FILES {
        a.write(&format!("s/d{}/f{i}", i / 100), &noise(i as u64, 600));
    }
    a.sync();
    b.start();
    let folder = b.path("s");
    let installed = || {
        let Ok(dirs) = std::fs::read_dir(&folder) else { return 0 };
        dirs.flatten().map(|d| std::fs::read_dir(d.path()).map_or(0, |f| f.count())).sum::<usize>()
    };
    let seen = wait_for(Duration::from_secs(60), || (installed() >= 2000).then_some(()));
    b.stop(true);
    assert!(seen.is_some(), "the first group was never installed");
    let before = installed();
    assert!(before < FILES, "b was killed only after installing everything; the test proves nothing");
    b.start();
    let tree = converge(&[&a, &b], SETTLE);
    let files: Vec<&String> = tree.iter().filter(|(_, n)| matches!(n, Node::File(..))).map(|(p, _)| p).collect();
    assert_eq!(files.len(), FILES, "every file once");
    assert!(files.iter().all(|p| !p.contains("conflicted copy")), "no conflict copies");
    b.stop(false);
}

#[test]
fn missing_root_marker_stops_sync_and_deletes_nothing() {
    let (tmp, _coord, devices) = world("jay", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.write("precious.txt", b"keep me");
    sync_all(&[&a, &b]);
    // Simulate an unmounted disk: the mount point is an empty folder, marker included.
    let mounted = tmp.path().join("b-disk");
    std::fs::rename(b.path(""), &mounted).unwrap();
    std::fs::create_dir_all(b.path("")).unwrap();
    let out = b.shoal(&["sync", "--once"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("marker"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(a.remote_tree().contains_key("precious.txt"), "nothing was deleted");
    // Once the disk is back, syncing resumes as if nothing happened.
    std::fs::remove_dir(b.path("")).unwrap();
    std::fs::rename(&mounted, b.path("")).unwrap();
    let t = sync_all(&[&a, &b]);
    assert!(t.contains_key("precious.txt"));
}
