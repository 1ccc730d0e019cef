//! Chunks in S3: a coordinator whose chunks live in a bucket of a real S3 implementation
//! (s3s-fs, in this process, signatures checked), with devices syncing through it. What the tests
//! count on is the S3 API, not this server: objects are found by scanning the server's files
//! only to damage one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_packs::testing::{ACCESS_KEY, S3TestServer, SECRET_KEY};
use shoal_protocol::ChunkId;

use crate::harness::*;

const BUCKET: &str = "shoal-e2e";
const PREFIX: &str = "alpha/";

/// A coordinator config file for `s3`, with `secret` as the secret key, and `extra` lines in
/// its `[s3]` table.
fn s3_config(dir: &Path, s3: &S3TestServer, bucket: &str, secret: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("coordinator-{bucket}.toml"));
    let text = format!(
        "[s3]\nbucket = {bucket:?}\nprefix = {PREFIX:?}\nendpoint = {:?}\npath_style = true\n\
         access_key_id = {ACCESS_KEY:?}\nsecret_access_key = {secret:?}\n{extra}",
        s3.endpoint()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn s3_coordinator(dir: &Path, s3: &S3TestServer) -> Coordinator {
    let cfg = s3_config(dir, s3, BUCKET, SECRET_KEY, "");
    Coordinator::start_with(&dir.join("coord"), &["--config", cfg.to_str().unwrap()])
}

/// A device with LAN sync off, so every byte goes through the coordinator (and S3).
fn device(dir: &Path, coord: &Coordinator, name: &str) -> Device {
    let d = Device::enroll(dir, coord, "sam", name);
    d.configure(|c| c.lan_sync = false);
    d
}

/// The pack objects in the bucket, as the server's files.
fn pack_objects(s3: &S3TestServer) -> Vec<PathBuf> {
    let dir = s3.object_path(BUCKET, &format!("{PREFIX}packs"));
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pack")).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn devices_sync_through_s3_and_no_chunk_lands_on_the_coordinators_disk() {
    let tmp = test_dir();
    let s3 = S3TestServer::start(BUCKET);
    let mut coord = s3_coordinator(tmp.path(), &s3);
    let a = device(tmp.path(), &coord, "a");
    let b = device(tmp.path(), &coord, "b");
    for i in 0..30 {
        a.write(&format!("notes/{i}.txt"), format!("note {i}\n").as_bytes());
    }
    // Larger than a pack (8 MiB): several objects.
    let big = random_bytes(20 * 1024 * 1024, 7);
    a.write("big.bin", &big);
    let tree = sync_all(&[&a, &b]);
    assert_eq!(tree.len(), 32, "30 notes, their directory and big.bin");
    assert_eq!(b.read("big.bin").unwrap(), big);
    assert!(!pack_objects(&s3).is_empty(), "no pack object in the bucket");
    let local_packs = std::fs::read_dir(coord.data.join("chunks")).map(|rd| rd.count()).unwrap_or(0);
    assert_eq!(local_packs, 0, "chunks were written to the coordinator's disk");
    assert!(coord.metric("shoal_storage_requests_total{op=\"put\"}") >= 2);
    // B fetched what A had just uploaded: from the coordinator's cache of recent packs.
    assert!(coord.metric("shoal_storage_cache_reads_total{result=\"hit\"}") >= 1);

    // After a restart (which empties the cache), a new device reads everything back from the
    // bucket.
    coord.restart(false);
    let c = device(tmp.path(), &coord, "c");
    c.sync();
    assert_eq!(c.local_tree(), tree);
    assert!(coord.metric("shoal_storage_requests_total{op=\"get\"}") >= 2);
    // A start with other storage settings is refused: the index would lose every chunk.
    coord.stop(false);
    let out = std::process::Command::new(bin("shoal-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data"])
        .arg(&coord.data)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("chunks are in s3://shoal-e2e/alpha/, not local"), "{err}");
}

/// Flips one byte of chunk `id` inside the pack objects (found by scanning for its frame).
fn corrupt_object(s3: &S3TestServer, id: &ChunkId) {
    for path in pack_objects(s3) {
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(32).position(|w| w == id.as_bytes()) {
            bytes[at + 36] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("chunk {id} is in no pack object");
}

#[test]
fn a_corrupted_object_is_detected_and_no_device_installs_its_bytes() {
    let tmp = test_dir();
    let s3 = S3TestServer::start(BUCKET);
    // No local cache of recent packs: every read goes to the bucket, where the damage is.
    let cfg = s3_config(tmp.path(), &s3, BUCKET, SECRET_KEY, "cache_size = \"0\"\n");
    let coord = Coordinator::start_with(&tmp.path().join("coord"), &["--config", cfg.to_str().unwrap()]);
    let a = device(tmp.path(), &coord, "a");
    let victim = b"these bytes will rot in the bucket".to_vec();
    a.write("victim.txt", &victim);
    for i in 0..10 {
        a.write(&format!("small/{i}.txt"), format!("file {i}").as_bytes());
    }
    a.sync();
    let id = ChunkId::of(&victim);
    corrupt_object(&s3, &id);

    let b = device(tmp.path(), &coord, "b");
    let _ = b.shoal(&["sync", "--once"]);
    assert!(b.read("victim.txt").is_none(), "a file whose chunk is corrupt in the bucket was installed");
    for i in 0..10 {
        assert!(b.read(&format!("small/{i}.txt")).is_some(), "small/{i}.txt did not arrive");
    }
    assert!(coord.metric("shoal_chunks_corrupt_total") >= 1);
    // A device holding the bytes uploads them again, and the store is whole.
    let copy = tmp.path().join("victim-copy");
    std::fs::write(&copy, &victim).unwrap();
    let out = a.shoal(&["put", copy.to_str().unwrap(), "victim-again.txt"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    sync_all(&[&a, &b]);
    assert_eq!(b.read("victim.txt").unwrap(), victim);
}

#[test]
fn with_s3_down_commits_wait_and_resume_and_nothing_is_lost() {
    let tmp = test_dir();
    let mut s3 = S3TestServer::start(BUCKET);
    let coord = s3_coordinator(tmp.path(), &s3);
    let mut a = device(tmp.path(), &coord, "a");
    let mut b = device(tmp.path(), &coord, "b");
    a.write("before.txt", b"written while S3 was up");
    sync_all(&[&a, &b]);
    a.start();
    b.start();
    s3.pause();
    let during = random_bytes(3 * 1024 * 1024, 11);
    a.write("during.bin", &during);
    a.write("notes/during.txt", b"small, during the outage");
    std::thread::sleep(Duration::from_secs(4));
    assert!(b.read("during.bin").is_none(), "B got a file whose chunks were never stored");
    assert!(!daemon_status(&a).in_sync, "A says in sync while its commit cannot be stored");
    s3.resume();
    let tree = converge(&[&a, &b], SETTLE);
    assert_eq!(b.read("during.bin").unwrap(), during);
    assert_eq!(tree.len(), 4, "before.txt, during.bin, notes/ and notes/during.txt");
    a.stop(false);
    b.stop(false);
}

#[test]
fn a_coordinator_killed_while_writing_to_s3_restarts_and_converges() {
    let tmp = test_dir();
    let s3 = S3TestServer::start(BUCKET);
    let mut coord = s3_coordinator(tmp.path(), &s3);
    let mut a = device(tmp.path(), &coord, "a");
    let mut b = device(tmp.path(), &coord, "b");
    a.start();
    let big = random_bytes(40 * 1024 * 1024, 13);
    a.write("big.bin", &big);
    // Kill it once the first pack is in the bucket, before the commit: chunks of the pack it
    // was filling are lost with it, and asked for again.
    wait_for(Duration::from_secs(60), || (!pack_objects(&s3).is_empty()).then_some(()))
        .expect("no pack object was ever written");
    coord.restart(true);
    b.start();
    converge(&[&a, &b], SETTLE);
    assert_eq!(b.read("big.bin").unwrap(), big);
    a.stop(false);
    b.stop(false);
}

#[test]
fn wrong_credentials_or_a_missing_bucket_stop_the_start_with_one_clear_line() {
    let tmp = test_dir();
    let s3 = S3TestServer::start(BUCKET);
    let start = |cfg: &Path| {
        let out = std::process::Command::new(bin("shoal-coordinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--config"])
            .arg(cfg)
            .arg("--data")
            .arg(tmp.path().join("coord"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = start(&s3_config(tmp.path(), &s3, BUCKET, "not-the-secret", ""));
    assert!(!ok);
    assert!(err.contains("opening S3 storage") && err.contains("check the access key"), "{err}");
    let (ok, err) = start(&s3_config(tmp.path(), &s3, "no-such-bucket", SECRET_KEY, ""));
    assert!(!ok);
    assert!(err.contains("\"no-such-bucket\" does not exist"), "{err}");
    // Neither pinned the data directory to the wrong storage: the right settings start.
    let coord = s3_coordinator(tmp.path(), &s3);
    let a = device(tmp.path(), &coord, "a");
    a.write("x.txt", b"x");
    a.sync();
}
