//! Retention and garbage collection, on both backends: a replaced version stays restorable for
//! the retention period and then expires; what nothing retained references is condemned by one
//! collection and deleted by a later one past the grace period; emptied packs are deleted a grace
//! period after that; the heads always survive.

use std::path::Path;
use std::time::{Duration, Instant};

use shoal_packs::testing::{ACCESS_KEY, S3TestServer, SECRET_KEY};

use shoal_protocol::status::SyncState;

use crate::harness::*;

const KEEP: Duration = Duration::from_secs(5);
const RETENTION_ARGS: [&str; 6] = ["--keep-versions", "5s", "--gc-interval", "off", "--gc-grace", "1s"];

/// Runs `shoal-coordinator gc [--dry-run]` and returns its report.
fn gc(coord: &Coordinator, dry: bool) -> String {
    let args: &[&str] = if dry { &["gc", "--dry-run"] } else { &["gc"] };
    let (ok, out) = coord.admin(args);
    assert!(ok, "gc failed: {out}");
    out
}

/// The number after `label` in a gc report.
fn number(report: &str, label: &str) -> u64 {
    let at = report.find(label).unwrap_or_else(|| panic!("{label:?} not in {report}")) + label.len();
    report[at..].trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

fn history_states(d: &Device, path: &str) -> Vec<(u64, String)> {
    let out = d.shoal(&["history", path, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["version"].as_u64().unwrap(), e["state"].as_str().unwrap().to_string()))
        .collect()
}

fn retention_and_collection(dir: &Path, coord: &Coordinator) {
    let a = Device::enroll(dir, coord, "rita", "a");
    let old = random_bytes(1024 * 1024, 3);
    let new = b"the new, much smaller version".to_vec();
    a.write("f.bin", &old);
    a.write("gone.txt", b"deleted below");
    a.sync();
    a.write("f.bin", &new);
    std::fs::remove_file(a.path("gone.txt")).unwrap();
    a.sync();
    let replaced = Instant::now();

    // Within retention: the old version and the deleted file are restorable.
    let states = history_states(&a, "f.bin");
    assert!(states.iter().all(|(_, s)| s == "durable"), "{states:?}");
    let old_version = states[0].0;
    let copy = dir.join("old-copy");
    let out = a.shoal(&["get", "f.bin", copy.to_str().unwrap(), "--version", &old_version.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&copy).unwrap(), old);
    let report = gc(coord, false);
    assert_eq!(number(&report, "unreferenced:"), 0, "{report}");

    // Past it: expired, refused, then collected in two steps.
    std::thread::sleep((replaced + KEEP + Duration::from_millis(500)).saturating_duration_since(Instant::now()));
    let states = history_states(&a, "f.bin");
    assert_eq!(states[0].1, "expired", "{states:?}");
    assert_eq!(states.last().unwrap().1, "durable", "the head never expires: {states:?}");
    // The deleted file's content expired; its deletion stays as the head.
    let gone = history_states(&a, "gone.txt");
    assert_eq!(gone.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(), ["expired", "durable"], "{gone:?}");
    let out = a.shoal(&["get", "f.bin", copy.to_str().unwrap(), "--version", &old_version.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has expired"), "{}", String::from_utf8_lossy(&out.stderr));

    let dry = gc(coord, true);
    assert!(dry.contains("dry run, nothing changed"), "{dry}");
    assert!(number(&dry, "unreferenced:") >= 2, "{dry}");
    let first = gc(coord, false);
    assert!(number(&first, "chunks condemned now:") >= 2, "{first}");
    assert_eq!(number(&first, "chunks deleted:"), 0, "nothing is deleted by the collection that condemns it: {first}");
    std::thread::sleep(Duration::from_millis(1200));
    let second = gc(coord, false);
    assert!(number(&second, "chunks deleted:") >= 2, "{second}");
    assert!(number(&second, "packs retired:") >= 1, "{second}");
    std::thread::sleep(Duration::from_millis(1200));
    let third = gc(coord, false);
    assert!(number(&third, "packs deleted:") >= 1, "{third}");
    assert!(coord.metric("shoal_gc_runs_total") >= 4);
    assert!(coord.metric("shoal_gc_chunks_deleted_total") >= 2);
    assert!(coord.metric("shoal_gc_bytes_reclaimed_total") >= 1024 * 1024);

    // What is retained reads back whole on a new device.
    let b = Device::enroll(dir, coord, "rita", "b");
    b.sync();
    assert_eq!(b.read("f.bin").unwrap(), new);
    assert!(b.read("gone.txt").is_none());
    a.write("after.txt", b"written after the collections");
    sync_all(&[&a, &b]);
    assert_eq!(b.read("after.txt").unwrap(), b"written after the collections");
}

#[test]
fn replaced_versions_expire_and_are_collected_on_local_disk() {
    let tmp = test_dir();
    let coord = Coordinator::start_with(&tmp.path().join("coord"), &RETENTION_ARGS);
    retention_and_collection(tmp.path(), &coord);
    let packs = std::fs::read_dir(coord.data.join("chunks")).unwrap().count();
    assert!(packs >= 1, "the packs holding the heads stay");
}

#[test]
fn replaced_versions_expire_and_are_collected_in_s3() {
    let tmp = test_dir();
    let s3 = S3TestServer::start("shoal-gc");
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "[s3]\nbucket = \"shoal-gc\"\nendpoint = {:?}\npath_style = true\naccess_key_id = {ACCESS_KEY:?}\n\
             secret_access_key = {SECRET_KEY:?}\n",
            s3.endpoint()
        ),
    )
    .unwrap();
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend(RETENTION_ARGS);
    let coord = Coordinator::start_with(&tmp.path().join("coord"), &args);
    retention_and_collection(tmp.path(), &coord);
    assert!(coord.metric("shoal_storage_requests_total{op=\"delete\"}") >= 1, "a pack object was deleted");
}

#[test]
fn the_background_collector_runs_and_shows_in_metrics() {
    let tmp = test_dir();
    let coord = Coordinator::start_with(&tmp.path().join("coord"), &["--gc-interval", "1s"]);
    let a = Device::enroll(tmp.path(), &coord, "rita", "a");
    a.write("x.txt", b"x");
    a.sync();
    wait_for(Duration::from_secs(20), || (coord.metric("shoal_gc_runs_total") >= 2).then_some(()))
        .expect("the collector did not run twice in 20 s");
    assert!(coord.metric("shoal_gc_last_run_timestamp_seconds") > 0);
    assert_eq!(coord.metric("shoal_gc_failures_total"), 0);
    // The default keeps versions for 30 days: nothing a user wrote is touched.
    let (ok, out) = coord.admin(&["gc", "--dry-run"]);
    assert!(ok && out.contains("30days"), "{out}");
    assert_eq!(number(&out, "unreferenced:"), 0, "{out}");
}

#[test]
fn a_user_over_quota_keeps_its_files_and_syncs_once_there_is_room() {
    let tmp = test_dir();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let mut a = Device::enroll(tmp.path(), &coord, "quinn", "a");
    let b = Device::enroll(tmp.path(), &coord, "quinn", "b");
    let (ok, out) = coord.admin(&["user", "set-quota", "quinn", "ten"]);
    assert!(!ok && out.contains("not a size"), "{out}");
    let (ok, out) = coord.admin(&["user", "set-quota", "quinn", "100KB"]);
    assert!(ok && out.contains("97.7 KiB"), "{out}");
    a.write("small.txt", &random_bytes(10_000, 5));
    a.sync();

    a.start();
    let big = random_bytes(300_000, 6);
    a.write("big.bin", &big);
    let st = wait_for(SETTLE, || Some(daemon_status(&a)).filter(|s| s.state == SyncState::OverQuota))
        .expect("the daemon never reported over_quota");
    let quota = st.quota.unwrap_or_else(|| panic!("no quota in {st:?}"));
    assert_eq!(quota.quota, Some(100_000));
    assert!(quota.used >= 10_000, "{quota:?}");
    let human = String::from_utf8(a.shoal(&["status"]).stdout).unwrap();
    assert!(human.contains("over quota (") && human.contains("/ 97.7 KiB quota)"), "{human}");
    assert_eq!(a.read("big.bin").unwrap(), big, "the local file is kept");
    let _ = b.shoal(&["sync", "--once"]);
    assert!(b.read("big.bin").is_none());
    let (_, list) = coord.admin(&["user", "list"]);
    assert!(list.contains("quinn") && list.contains("97.7 KiB"), "{list}");

    // More room: the daemon tries again and the file goes through.
    let (ok, out) = coord.admin(&["user", "set-quota", "quinn", "none"]);
    assert!(ok, "{out}");
    wait_for(Duration::from_secs(90), || (daemon_status(&a).in_sync).then_some(()))
        .expect("the daemon did not sync once the quota was lifted");
    assert!(daemon_status(&a).quota.is_none());
    b.sync();
    assert_eq!(b.read("big.bin").unwrap(), big);
    a.stop(false);
}
