//! Large folders: the work a change causes follows the change, not the size of the folder.

use std::time::Duration;

use crate::harness::*;

/// `shoal status --json`'s daemon status of `d`.
#[test]
fn applying_other_devices_changes_does_not_wake_the_watcher() {
    let (_tmp, _coord, devices) = world("wendy", &["a", "b"]);
    let [a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    b.start();
    wait_for(SETTLE, || (daemon_status(&b).in_sync).then_some(())).expect("b in sync");

    // Creates in new directories, a large (streamed) file, then removals and a rename: B
    // installs, creates directories and removes, all of which the watcher sees.
    for i in 0..60 {
        a.write(&format!("d{}/f{i}.txt", i % 6), format!("file {i}").as_bytes());
    }
    a.write("big.bin", &noise(7, 3 * 1024 * 1024));
    a.sync();
    converge(&[&a, &b], SETTLE);
    // Where B's bytes came from: all from the origin so far (no peers or relays here).
    let origin = wait_for(SETTLE, || match by_source(&b) {
        [0, 0, 0, origin] if origin >= 3 * 1024 * 1024 => Some(origin),
        _ => None,
    })
    .unwrap_or_else(|| panic!("bytes by source: {:?}", by_source(&b)));
    std::fs::remove_file(a.path("d0/f0.txt")).unwrap();
    std::fs::remove_dir_all(a.path("d5")).unwrap();
    std::fs::rename(a.path("d1/f1.txt"), a.path("d2/moved.txt")).unwrap();
    std::fs::create_dir(a.path("copies")).unwrap();
    std::fs::copy(a.path("big.bin"), a.path("copies/big.bin")).unwrap();
    a.sync();
    converge(&[&a, &b], SETTLE);
    // The copy (and the moved file, unless its old copy went first) is built from B's own files.
    wait_for(SETTLE, || {
        let [local, peer, relay, now] = by_source(&b);
        (local >= 3 * 1024 * 1024 && peer == 0 && relay == 0 && now - origin < 64 * 1024).then_some(())
    })
    .unwrap_or_else(|| panic!("bytes by source after a copy: {:?} (origin was {origin})", by_source(&b)));
    std::thread::sleep(Duration::from_secs(1));
    // (The directories B made are still looked at once, for files someone else may have written
    // into them before their watches existed; that is no change, and not counted.)
    assert_eq!(daemon_status(&b).watcher_hints, 0, "B's own writes woke its watcher");

    // A change by B's user is still noticed.
    b.write("mine.txt", b"written on b");
    wait_for(SETTLE, || (Some(daemon_status(&b).watcher_hints) >= Some(1)).then_some(()))
        .expect("a local write wakes the watcher");
    a.sync();
    converge(&[&a, &b], SETTLE);
    b.stop(false);
}

/// Files in the large-folder test: enough that reloading the trees would dwarf one change's work.
const FILES: usize = 20_000;

#[test]
fn one_change_in_a_large_folder_reads_what_it_touches() {
    let (_tmp, _coord, devices) = world("lars", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    for i in 0..FILES {
        a.write(&format!("dir{:03}/file{i:05}.txt", i % 200), format!("content of file {i}").as_bytes());
    }
    a.start();
    b.start();
    let in_sync = |d: &Device| {
        wait_for(Duration::from_secs(600), || (daemon_status(d).in_sync).then_some(()))
            .unwrap_or_else(|| panic!("{} never reached in sync", d.name))
    };
    in_sync(&a);
    wait_for(Duration::from_secs(600), || (count_files(&b.root) == FILES).then_some(())).expect("B got every file");
    in_sync(&b);
    let reads = |d: &Device| daemon_status(d).reads_total;
    let (a0, b0) = (reads(&a), reads(&b));
    assert!(b0 >= FILES as u64, "the initial sync read every record at least once ({b0})");

    // One new file, one edit, one removal: each converges, reading a bounded number of records.
    a.write("dir007/new.txt", b"a new file in a large folder");
    wait_for(SETTLE, || {
        (b.read("dir007/new.txt").as_deref() == Some(&b"a new file in a large folder"[..])).then_some(())
    })
    .expect("the new file arrives");
    b.write("dir100/file00100.txt", b"edited on b");
    wait_for(SETTLE, || (a.read("dir100/file00100.txt").as_deref() == Some(&b"edited on b"[..])).then_some(()))
        .expect("the edit arrives");
    std::fs::remove_file(a.path("dir199/file19999.txt")).unwrap();
    wait_for(SETTLE, || b.read("dir199/file19999.txt").is_none().then_some(())).expect("the removal arrives");
    in_sync(&a);
    in_sync(&b);
    let (da, db) = (reads(&a) - a0, reads(&b) - b0);
    // Each change touches a page of its directory (100 files) and the top level (200 entries) a
    // few times; reloading the trees would read all 20,000 records on every cycle.
    let bound = (FILES / 4) as u64;
    eprintln!("records read for three changes: A {da}, B {db}");
    assert!(da < bound && db < bound, "records read for three changes: A {da}, B {db} (bound {bound})");
    let last = daemon_status(&b);
    assert!(last.last_cycle_scope < 10, "last cycle's scope: {last:?}");
    a.stop(false);
    b.stop(false);
    converge(&[&a, &b], SETTLE);
}

fn count_files(root: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() && e.file_name() != ".shoal" {
                stack.push(e.path());
            } else if t.is_file() {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn a_copy_anywhere_in_the_folder_is_built_from_local_bytes() {
    let (_tmp, coord, devices) = world("cora", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    let data = noise(11, 3 * 1024 * 1024 + 5);
    a.write("photos/2025/big.raw", &data);
    a.write("notes.txt", b"small");
    sync_all(&[&a, &b]);
    let served = coord.metric("shoal_chunk_bytes_out_total");

    // A copy far from the original: B's cycle looks only at the new path, and finds the bytes
    // through its chunk map.
    std::fs::create_dir_all(a.path("backup/deep/er")).unwrap();
    std::fs::copy(a.path("photos/2025/big.raw"), a.path("backup/deep/er/big copy.raw")).unwrap();
    std::fs::copy(a.path("notes.txt"), a.path("backup/notes.txt")).unwrap();
    sync_all(&[&a, &b]);
    assert_eq!(b.read("backup/deep/er/big copy.raw").unwrap(), data);
    assert_eq!(coord.metric("shoal_chunk_bytes_out_total"), served, "B fetched bytes it already had");

    // A stale location (the original rewritten behind the agent's back) costs a fetch, never a
    // wrong byte.
    let other = noise(12, 3 * 1024 * 1024 + 5);
    std::fs::write(b.path("photos/2025/big.raw"), &other).unwrap();
    std::fs::write(b.path("backup/deep/er/big copy.raw"), &other).unwrap();
    std::fs::copy(a.path("photos/2025/big.raw"), a.path("third.raw")).unwrap();
    a.sync();
    b.shoal(&["sync", "--once"]);
    assert_eq!(b.read("third.raw").unwrap(), data);
    assert!(coord.metric("shoal_chunk_bytes_out_total") > served, "the stale copy was not used");
    sync_all(&[&a, &b]);
}
