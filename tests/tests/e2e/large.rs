//! Large folders: the work a change causes follows the change, not the size of the folder.

use std::time::Duration;

use crate::harness::*;

/// `shoal status --json`'s daemon status of `d`.
fn daemon_status(d: &Device) -> serde_json::Value {
    let out = d.shoal(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["status"].clone()
}

#[test]
fn applying_other_devices_changes_does_not_wake_the_watcher() {
    let (_tmp, _coord, devices) = world("wendy", &["a", "b"]);
    let [a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    b.start();
    wait_for(SETTLE, || (daemon_status(&b)["in_sync"] == true).then_some(())).expect("b in sync");

    // Creates in new directories, a large (streamed) file, then removals and a rename: B
    // installs, creates directories and removes, all of which the watcher sees.
    for i in 0..60 {
        a.write(&format!("d{}/f{i}.txt", i % 6), format!("file {i}").as_bytes());
    }
    a.write("big.bin", &noise(7, 3 * 1024 * 1024));
    a.sync();
    converge(&[&a, &b], SETTLE);
    std::fs::remove_file(a.path("d0/f0.txt")).unwrap();
    std::fs::remove_dir_all(a.path("d5")).unwrap();
    std::fs::rename(a.path("d1/f1.txt"), a.path("d2/moved.txt")).unwrap();
    a.sync();
    converge(&[&a, &b], SETTLE);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(daemon_status(&b)["watcher_hints"], 0, "B's own writes woke its watcher");

    // A change by B's user is still noticed.
    b.write("mine.txt", b"written on b");
    wait_for(SETTLE, || (daemon_status(&b)["watcher_hints"].as_u64() >= Some(1)).then_some(()))
        .expect("a local write wakes the watcher");
    a.sync();
    converge(&[&a, &b], SETTLE);
    b.stop(false);
}
