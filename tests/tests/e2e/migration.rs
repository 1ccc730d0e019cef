//! Upgrades: a coordinator data directory and two agent homes written by the previous release
//! (`tests/fixtures/v1-home.tar.gz`, see `tests/fixtures/README.md`) keep working with this
//! build: nothing is uploaded or downloaded again, no file is rewritten, and new changes sync.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::harness::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/v1-home.tar.gz");

/// Unpacks the fixture into `dest`; returns the directory holding `coord`, `A`, `A-home`, ...
fn unpack(dest: &Path) -> std::path::PathBuf {
    let out = Command::new("tar")
        .args(["--extract", "--gzip", "--preserve-permissions", "--no-same-owner", "--file", FIXTURE, "--directory"])
        .arg(dest)
        .output()
        .expect("running tar");
    assert!(out.status.success(), "unpacking {FIXTURE}: {}", String::from_utf8_lossy(&out.stderr));
    dest.join("v1-home")
}

/// Fills in the placeholders the fixture's `config.toml` holds instead of the folder's location
/// and the coordinator's address.
fn point_config(home: &Path, base: &Path, server: &str) {
    let path = home.join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"@BASE@/") && text.contains("\"@SERVER@\""), "unexpected fixture config: {text}");
    let base = base.to_str().unwrap();
    assert!(!base.contains(['"', '\\']), "{base} cannot go into a TOML string as is");
    std::fs::write(&path, text.replace("@BASE@", base).replace("@SERVER@", server)).unwrap();
}

/// Inode, mtime and mode of every file in a folder: a file the agent wrote again (a download
/// lands under a new inode) shows here, even if its bytes came from local chunks.
fn file_stats(root: &Path) -> BTreeMap<String, (u64, i64, i64, u32)> {
    local_tree(root)
        .into_iter()
        .filter(|(_, n)| matches!(n, Node::File(..)))
        .map(|(p, _)| {
            let md = std::fs::symlink_metadata(root.join(&p)).unwrap();
            (p, (md.ino(), md.mtime(), md.mtime_nsec(), md.mode()))
        })
        .collect()
}

/// `shoal sync --once`, with the engine's info log on stderr; returns that log.
fn sync_logged(d: &Device) -> String {
    let out = d.cmd().args(["sync", "--once"]).env("RUST_LOG", "shoal_agent=info").output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}: sync --once failed: {log}", d.name);
    log
}

#[test]
fn home_from_previous_release_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let base = unpack(tmp.path());
    let mut a = Device::existing("A", base.join("A-home"), base.join("A"));
    let mut b = Device::existing("B", base.join("B-home"), base.join("B"));

    // What the previous release left: two equal folders with every kind of entry.
    let before = a.local_tree();
    assert_eq!(b.local_tree(), before, "the fixture's folders differ");
    assert_eq!(before["bin/hello.sh"], Node::File(file_hash(b"#!/bin/sh\necho \"hello from shoal\"\n"), true));
    assert_eq!(before["empty-dir"], Node::Dir);
    assert_eq!(before["a/b/c"], Node::Dir);
    assert!(before.contains_key("renamed.txt") && !before.contains_key("old-name.txt"));
    assert!(!before.contains_key("doomed.txt"));
    assert!(std::fs::metadata(a.path("big.log")).unwrap().len() > 256 * 1024, "big.log spans several chunks");
    let (stats_a, stats_b) = (file_stats(&a.root), file_stats(&b.root));

    let coord = Coordinator::start(&base.join("coord"));
    for d in [&a, &b] {
        point_config(&d.home, &base, &coord.addr);
    }
    let counters = [
        "shoal_chunk_bytes_in_total",
        "shoal_chunk_bytes_out_total",
        "shoal_commits_total",
        "shoal_journal_entries_total",
    ];
    let read = |coord: &Coordinator| counters.map(|c| coord.metric(c));
    let at_start = read(&coord);

    // The coordinator still serves the old tree, tombstone and history included.
    assert_eq!(a.remote_tree(), before);
    let out = a.shoal(&["history", "doomed.txt", "--json"]);
    let history: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(history.len(), 2, "doomed.txt: {history:?}");
    assert_eq!(history[1]["deleted"], true);

    // First sync with this build: both devices find nothing to do. (Unpacking gave every file a
    // new inode and ctime, so the first scan reads each file again; equal content commits nothing.)
    for (i, d) in [&a, &b, &a, &b].into_iter().enumerate() {
        let log = sync_logged(d);
        // The first start moves the records into the current layout; later ones find it done.
        assert_eq!(log.contains("migrated the agent database"), i < 2, "{}: {log}", d.name);
        assert!(!log.contains("sync cycle"), "{}: the upgraded agent planned work in a synced folder: {log}", d.name);
    }
    assert_eq!(converge(&[&a, &b], std::time::Duration::from_secs(5)), before);
    let after = read(&coord);
    for (i, name) in counters.iter().enumerate() {
        assert_eq!(after[i], at_start[i], "{name} moved: the upgraded agents sent or fetched something");
    }
    assert_eq!(file_stats(&a.root), stats_a, "A: files were rewritten");
    assert_eq!(file_stats(&b.root), stats_b, "B: files were rewritten");

    // The upgraded homes keep syncing: a new file from A, a deletion from B.
    a.start();
    b.start();
    let fresh = noise(41, 200 * 1024);
    a.write("after-upgrade/new.bin", &fresh);
    let t = converge(&[&a, &b], SETTLE);
    assert_eq!(t["after-upgrade/new.bin"], Node::File(file_hash(&fresh), false));
    assert_eq!(b.read("after-upgrade/new.bin").unwrap(), fresh);
    // Uploaded too: B may have it from A (a LAN peer) before the origin does.
    wait_for(SETTLE, || (read(&coord)[0] >= after[0] + fresh.len() as u64).then_some(()))
        .unwrap_or_else(|| panic!("the new file was not uploaded (and counted): {:?}", read(&coord)));
    // Downloaded, from A itself (a LAN peer) or the origin, and counted.
    wait_for(SETTLE, || {
        let [_, peer, _, origin] = by_source(&b);
        (peer + origin >= fresh.len() as u64).then_some(())
    })
    .unwrap_or_else(|| panic!("the new file was not counted as downloaded: {:?}", by_source(&b)));

    std::fs::remove_file(b.path("a/b/c/c-2.txt")).unwrap();
    let t = converge(&[&a, &b], SETTLE);
    assert!(!t.contains_key("a/b/c/c-2.txt") && t.contains_key("a/b/c/c-1.txt"));
    assert!(!a.path("a/b/c/c-2.txt").exists());
    a.stop(false);
    b.stop(false);
}
