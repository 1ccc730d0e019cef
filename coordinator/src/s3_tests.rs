//! The chunk store over S3 packs: what goes up, what comes back verified, and what an outage,
//! a corrupted object or a bad cached copy do, against a real S3 server (s3s-fs on loopback).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use shoal_protocol::ChunkId;

use crate::chunks::{ChunkError, ChunkStore};
use crate::store::Store;
use shoal_packs::s3::*;
use shoal_packs::testing::S3TestServer;
use shoal_packs::{PackBackend, PackErrorKind};

const BUCKET: &str = "shoal-packs";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

fn chunks(n: usize, size: usize, seed: u8) -> Vec<(ChunkId, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let mut data: Vec<u8> = (0..size).map(|j| (j as u8).wrapping_mul(31) ^ (i as u8) ^ seed).collect();
            // Distinct for every (i, seed).
            data[..4].copy_from_slice(&(i as u32).to_le_bytes());
            data[4] = seed;
            (ChunkId::of(&data), data)
        })
        .collect()
}

fn refs(c: &[(ChunkId, Vec<u8>)]) -> Vec<(ChunkId, &[u8])> {
    c.iter().map(|(id, d)| (*id, &d[..])).collect()
}

#[test]
fn chunks_go_up_in_packs_and_come_back_verified_after_a_restart() {
    let rt = runtime();
    let s3 = S3TestServer::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let index = Store::open(&dir.path().join("meta")).unwrap();
    let backend = Arc::new(S3Packs::open(s3.config(BUCKET, "p/"), dir.path(), rt.handle().clone()).unwrap());
    let store = ChunkStore::open(backend.clone(), index.clone()).unwrap();
    // Small: one PUT at the sync. Large (20 MiB, in uploads of 2.6 MiB): a pack is closed at
    // the first upload past PACK_BYTES, the last one sealed by the next sync.
    let small = chunks(3, 1000, 1);
    let mut large = chunks(256, 64 * 1024, 2);
    large.extend(chunks(64, 64 * 1024, 12));
    store.put_many(&refs(&small)).unwrap();
    assert!(backend.list().unwrap().is_empty(), "nothing is an object before it is durable");
    store.sync().unwrap();
    assert_eq!(backend.requests().put.load(Ordering::Relaxed), 1);
    for part in large.chunks(40) {
        store.put_many(&refs(part)).unwrap();
    }
    // Reading a chunk of a pack still on its way up makes it durable first.
    assert_eq!(store.get(&large[5].0).unwrap(), large[5].1);
    assert!(!store.needs_sync());
    let packs = backend.list().unwrap();
    assert_eq!(packs.len(), 3, "{packs:?}");
    assert!(packs.iter().all(|p| p.len <= PACK_BYTES + 40 * (64 * 1024 + 36)), "{packs:?}");
    drop(store);
    let store = ChunkStore::open(backend.clone(), index).unwrap();
    for (id, data) in small.iter().chain(&large) {
        assert_eq!(&store.get(id).unwrap(), data);
    }
    let ids: Vec<ChunkId> = large.iter().map(|(id, _)| *id).collect();
    let frames = store.read_frames(&ids[100..140]);
    assert!(frames.error.is_none());
    assert_eq!(frames.chunk_bytes, 40 * 64 * 1024);
    assert_eq!(backend.requests().put.load(Ordering::Relaxed), 3, "one PUT per pack");
}

#[test]
fn a_corrupted_object_is_never_served() {
    let rt = runtime();
    let s3 = S3TestServer::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let index = Store::open(&dir.path().join("meta")).unwrap();
    let backend = Arc::new(S3Packs::open(s3.config(BUCKET, ""), dir.path(), rt.handle().clone()).unwrap());
    let store = ChunkStore::open(backend, index.clone()).unwrap();
    let c = chunks(4, 5000, 3);
    store.put_many(&refs(&c)).unwrap();
    store.sync().unwrap();
    let loc = index.chunk_loc(&c[2].0).unwrap().unwrap();
    let path = s3.object_path(BUCKET, &pack_key("", loc.pack));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc.offset as usize + 10] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let frames = store.read_frames(&c.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    assert_eq!(frames.chunk_bytes, 2 * 5000, "the frames before the bad one come back");
    assert!(matches!(frames.error, Some(ChunkError::Corrupt(id)) if id == c[2].0));
    assert_eq!(store.corrupt_count(), 1);
    assert!(!store.contains(&c[2].0).unwrap(), "quarantined: asked for again");
    // A correct upload stores it anew (in a new pack).
    store.put_many(&refs(&c[2..3])).unwrap();
    assert_eq!(store.get(&c[2].0).unwrap(), c[2].1);
}

#[test]
fn a_wrong_key_or_a_missing_bucket_is_a_clear_permanent_error() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3TestServer::start(BUCKET);
    let mut cfg = s3.config(BUCKET, "");
    cfg.secret_access_key = "not-the-secret".into();
    let e = S3Packs::open(cfg, dir.path(), rt.handle().clone()).err().unwrap();
    assert_eq!(e.kind, PackErrorKind::Permanent, "{e}");
    assert!(e.message.contains("access key"), "{e}");
    let e = S3Packs::open(s3.config("no-such-bucket", ""), dir.path(), rt.handle().clone()).err().unwrap();
    assert_eq!(e.kind, PackErrorKind::Permanent, "{e}");
    assert!(e.message.contains("\"no-such-bucket\" does not exist"), "{e}");
    let e = S3Packs::open(s3.config(BUCKET, "no-slash"), dir.path(), rt.handle().clone()).err().unwrap();
    assert!(e.message.contains("must end with '/'"), "{e}");
}

#[test]
fn an_outage_fails_the_sync_and_keeps_what_it_owes_until_it_succeeds() {
    let rt = runtime();
    let mut s3 = S3TestServer::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let index = Store::open(&dir.path().join("meta")).unwrap();
    let backend = Arc::new(S3Packs::open(s3.config(BUCKET, ""), dir.path(), rt.handle().clone()).unwrap());
    let store = ChunkStore::open(backend.clone(), index).unwrap();
    let c = chunks(5, 3000, 4);
    store.put_many(&refs(&c)).unwrap();
    s3.pause();
    let e = store.sync().unwrap_err();
    assert!(matches!(&e, ChunkError::Backend(p) if p.kind == PackErrorKind::Transient), "{e}");
    assert!(store.needs_sync(), "still owed");
    assert!(backend.requests().retries.load(Ordering::Relaxed) >= 1, "transient failures are retried");
    s3.resume();
    store.sync().unwrap();
    assert!(!store.needs_sync());
    for (id, data) in &c {
        assert_eq!(&store.get(id).unwrap(), data);
    }
}

#[test]
fn packs_just_written_are_read_from_the_cache_and_a_bad_copy_is_dropped_not_served() {
    let rt = runtime();
    let s3 = S3TestServer::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let index = Store::open(&dir.path().join("meta")).unwrap();
    let mut cfg = s3.config(BUCKET, "");
    cfg.cache_bytes = 100_000;
    let stale = dir.path().join("cache").join("00000001.pack");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"left by a run before").unwrap();
    let backend = Arc::new(S3Packs::open(cfg, dir.path(), rt.handle().clone()).unwrap());
    assert!(!stale.exists(), "the cache starts empty");
    let store = ChunkStore::open(backend.clone(), index.clone()).unwrap();
    let (first, second) = (chunks(3, 20_000, 8), chunks(3, 20_000, 9));
    let written = || backend.wait_for_cache();
    store.put_many(&refs(&first)).unwrap();
    store.sync().unwrap();
    written();
    store.put_many(&refs(&second)).unwrap();
    store.sync().unwrap();
    written();
    let gets = || backend.requests().get.load(Ordering::Relaxed);
    let counts = || backend.cache_reads();
    assert_eq!(store.get(&second[1].0).unwrap(), second[1].1);
    assert_eq!((gets(), counts()), (0, vec![("hit", 1), ("miss", 0)]), "the latest pack is cached");
    // Two packs of ~60 KB do not fit in 100 KB: the older went.
    assert_eq!(store.get(&first[1].0).unwrap(), first[1].1);
    assert_eq!((gets(), counts()), (1, vec![("hit", 1), ("miss", 1)]));
    // A cached copy that went bad is dropped and the bytes come from S3, checked: the chunk
    // is not corrupt and stays stored.
    let loc = index.chunk_loc(&second[2].0).unwrap().unwrap();
    let cached = dir.path().join("cache").join(format!("{:08}.pack", loc.pack));
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[loc.offset as usize + 7] ^= 0x20;
    std::fs::write(&cached, bytes).unwrap();
    assert_eq!(store.get(&second[2].0).unwrap(), second[2].1);
    assert_eq!(store.corrupt_count(), 0);
    assert!(!cached.exists());
    assert_eq!(gets(), 2);
    assert!(store.contains(&second[2].0).unwrap());
    // Deleting a pack deletes its cached copy.
    store.put_many(&refs(&chunks(1, 5_000, 10))).unwrap();
    store.sync().unwrap();
    written();
    let newest = backend.list().unwrap().iter().map(|p| p.pack).max().unwrap();
    let path = dir.path().join("cache").join(format!("{newest:08}.pack"));
    assert!(path.exists());
    backend.delete(newest).unwrap();
    assert!(!path.exists());
    // The cap bounds the disk the files take, padding included: many small packs (a small
    // commit each) do not overrun it.
    for seed in 20..50 {
        store.put_many(&refs(&chunks(1, 5_000, seed))).unwrap();
        store.sync().unwrap();
    }
    written();
    let files: Vec<u64> =
        std::fs::read_dir(dir.path().join("cache")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).collect();
    assert!(files.len() > 5, "small packs are cached: {files:?}");
    assert!(files.iter().sum::<u64>() <= 100_000, "{} bytes in {} files", files.iter().sum::<u64>(), files.len());
}
