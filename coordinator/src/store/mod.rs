//! The coordinator's metadata store: the only module that touches sled. Users, invites, devices,
//! the per-user journal with its head and history indexes, commit ids for idempotency, the
//! chunk index and the per-user set of uploaded chunks. Every value starts with a format-version
//! byte.
//!
//! Layout (one sled tree, keys prefixed by a record type):
//! `u/NAME` user · `h/UID` journal head · `i/HASH` invite · `d/DEV` device · `t/HASH` token →
//! device · `j/UID SEQ` journal entry · `p/UID PATH` head seq of a path · `v/UID PATH \0 SEQ`
//! history index · `c/UID CID` the journal span a commit got (its answer, for replays) ·
//! `y/N` the chunk log's record N · `n/chunk-log` the first record of the chunk log that counts ·
//! `q/CHUNK` a chunk whose stored bytes failed their hash check (kept for inspection, never
//! served) · `n/pack` the next unused pack number · `w/UID SEQ` a pending version (committed
//! before the origin had all its chunks; its `missing` is the count at commit time) · `l/UID`
//! the user's LAN keys (current, previous and when it was replaced; replaced when one of its
//! devices is revoked) · `r/PACK` a pack retired by a repack (and when) · `e/NAME` a relay (region, token hash).
//!
//! The chunk records (where the chunk store keeps each chunk; which chunks each user uploaded)
//! are a log of changes (`y/` records, numbered in order) written in the same atomic batches as
//! the rest, and answered from memory ([`ChunkRecords`], rebuilt from the log on open; see
//! `chunk_records.rs` for why). Releases before kept them as `x/CHUNK` and `k/UID CHUNK`
//! records; those are moved into the log on open. When the log holds more than twice the live
//! records (and at least [`COMPACT_MIN`] changes), it is rewritten on open: the live records
//! restated as new log records, then `n/chunk-log` moved past the old ones, which go.
//!
//! Which chunks each pending version still waits for is kept in memory, not in records
//! ([`Waits`]): it follows from the `w/` records, their journal entries' manifests and the
//! user's chunk records, and is derived from them the first time a user's pending versions are
//! needed after start. Releases before kept it as `m/UID CHUNK SEQ` records, written at the
//! commit and removed at the upload: two more random-keyed writes and a prefix scan per chunk,
//! ~20 % of the coordinator's CPU in an initial sync. Those records are removed on open.

mod accounts;
mod chunk_log;
mod gc;
mod journal;
mod pending;
mod relays;

pub use accounts::{DEFAULT_INVITE_TTL_MS, DeviceRec, InviteRec, InviteRefusal, PREVIOUS_LAN_KEY_MS, UserRec};
use chunk_log::*;
pub use gc::{VersionRef, superseded};
pub use journal::CommitOutcome;
use pending::*;
pub use pending::{NewPending, PendingLoad, PendingRec, PendingState};
pub use relays::RelayRec;

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use crate::chunk_records::ChunkLoc;
use crate::chunk_records::{ChunkRecords, Op, decode_ops, encode_ops};
use shoal_protocol::api::{CommitResponse, Conflict, LanKey, LanKeys, MAX_PAGE_BYTES};
use shoal_protocol::{ChunkId, CommitId, DeviceId, Entry, Seq, SyncPath};

/// sled's page cache. Chunk records are keyed by random ids, so a large upload touches pages all
/// over the tree: measured over initial syncs of 100,000 and 1,000,000 files of 1 KiB, 8 MiB
/// took the coordinator's CPU from 26.4 to 19.0-19.7 s and from 375 to 297 s (2 MiB before), for
/// a peak of 94-97 MiB instead of 80 at 100,000 files; 16 MiB saved no more at 100,000 files and
/// peaked at 116 MiB.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Most chunks recorded as stored in one sled batch. sled keeps every node version a batch
/// replaces until the batch ends: one batch for a 16,384-chunk upload of small files held
/// ~60 MiB of them.
const STORED_GROUP: usize = 256;

/// Format version of every stored value.
const VALUE_VERSION: u8 = 1;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata database error: {0}")]
    Db(#[from] sled::Error),
    #[error("stored record {key} is corrupt or from an unknown format version")]
    Corrupt { key: String },
    #[error("metadata database at {path} could not be opened: {source}")]
    Open { path: String, source: sled::Error },
}

pub type UserId = u64;

/// Most records of releases before (`m/`, `x/`, `k/`) removed or moved in one batch on open.
const OLD_RECORDS_GROUP: usize = 10_000;

/// Most chunk changes in one `y/` record (~12 KiB).
const LOG_RECORD_OPS: usize = 256;

/// Changes in the chunk log below which it is never rewritten.
const COMPACT_MIN: usize = 65_536;

/// The key of the chunk log's first record that counts.
const LOG_BASE_KEY: &[u8] = b"n/chunk-log";

/// The metadata store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    /// The store's files, synced after each flush.
    files: std::sync::Arc<shoal_sys::dbsync::DbFiles>,
    /// Pending version records (`w/`) of every user: counted once on open, then kept up to date
    /// by the writes that add and remove them, so `/metrics` does not scan them all.
    pending_count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Per user, the chunks their pending versions wait for (see [`Waits`]).
    waits: std::sync::Arc<std::sync::Mutex<HashMap<UserId, std::sync::Arc<std::sync::Mutex<Waits>>>>>,
    /// When the store was opened: the earliest a pending version found stored can have made
    /// progress as far as this process knows.
    opened_ms: u64,
    /// The chunk records and where the log goes on. Held across each log write and the change
    /// to memory that mirrors it, so memory follows the log's order; taken after a user's
    /// `Waits`, never before.
    chunks: std::sync::Arc<std::sync::Mutex<ChunkLog>>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![VALUE_VERSION];
    // Serializing our own in-memory records to a Vec cannot fail: no I/O, no unsupported types.
    out.extend(postcard::to_stdvec(v).expect("postcard serializes store records"));
    out
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&VALUE_VERSION, rest)) => postcard::from_bytes(rest)
            .map_err(|_| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned() }),
        _ => Err(StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned() }),
    }
}

fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = shoal_sys::dbsync::open_waiting(|| {
            sled::Config::new().path(dir).flush_every_ms(Some(500)).cache_capacity(CACHE_BYTES).open()
        })
        .map_err(|source| StoreError::Open { path: dir.display().to_string(), source })?;
        let meta = db.open_tree("meta")?;
        let files = shoal_sys::dbsync::DbFiles::new(dir).map_err(|e| StoreError::Db(sled::Error::Io(e)))?;
        let pending = meta.scan_prefix(b"w/").count() as u64;
        let store = Store {
            db,
            meta,
            files: std::sync::Arc::new(files),
            pending_count: std::sync::Arc::new(pending.into()),
            waits: Default::default(),
            opened_ms: shoal_sys::clock::now_ms(),
            chunks: Default::default(),
        };
        store.drop_old_waits()?;
        store.load_chunk_log()?;
        store.move_old_chunk_records()?;
        store.compact_chunk_log()?;
        Ok(store)
    }

    /// Makes everything written so far durable. Called before acknowledging anything. sled's own
    /// flush leaves the drive's cache and large values (blob files) unsynced, so the store's
    /// files are synced after it (`DbFiles`).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.sync())
            .await
            .map_err(|e| StoreError::Db(sled::Error::Io(std::io::Error::other(e.to_string()))))?
            .map_err(|e| StoreError::Db(sled::Error::Io(e)))?;
        Ok(())
    }

    /// [`Store::flush`] for blocking threads.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.files.sync().map_err(|e| StoreError::Db(sled::Error::Io(e)))?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StoreError> {
        match self.meta.get(k)? {
            Some(v) => decode(k, &v).map(Some),
            None => Ok(None),
        }
    }

    // ---- users and invites ----
}

#[cfg(test)]
pub(crate) mod tests {
    use shoal_protocol::{EntryKind, Manifest};

    use super::journal::{COMMIT_SPAN_VERSION, CommitSpan};
    use super::*;

    /// Opens the store at `dir` again once the handles before are dropped (`Store::open` waits
    /// for the lock sled's background threads let go of just after).
    pub(crate) fn reopen(dir: &Path) -> Store {
        Store::open(dir).unwrap_or_else(|e| panic!("reopening {}: {e}", dir.display()))
    }

    fn file(path: &str, version: Seq) -> Entry {
        Entry {
            path: SyncPath::parse(path).unwrap(),
            kind: EntryKind::File,
            manifest: Some(Manifest::empty()),
            exec: false,
            mtime_ns: 1,
            deleted: false,
            version,
            base: None,
            device: DeviceId([3; 16]),
            time_ms: 9,
        }
    }

    /// Appends version 1 of user 7, a file of 10-byte `chunks`, as pending for `waits`.
    fn commit_pending_file(store: &Store, chunks: &[ChunkId], waits: &[ChunkId]) {
        let mut e = file("f", 1);
        e.manifest = Some(Manifest {
            size: 10 * chunks.len() as u64,
            hash: ChunkId::of(b"whole"),
            chunks: chunks.iter().map(|id| shoal_protocol::ChunkRef { id: *id, len: 10 }).collect(),
        });
        let rec = PendingRec {
            path: e.path.clone(),
            device: e.device,
            since_ms: 9,
            missing: waits.len() as u64,
            withdrawn: false,
        };
        store.append(7, &CommitId([1; 16]), &CommitResponse { entries: vec![e] }, &[(1, rec, waits.to_vec())]).unwrap();
    }

    fn c_key(user: UserId, id: &CommitId) -> Vec<u8> {
        key(b"c/", &[&user.to_be_bytes(), id.as_bytes()])
    }

    /// A commit's answer is kept as its span of the journal and read back from there; a record
    /// that an earlier release wrote whole still answers its replay, before and after a restart.
    #[test]
    fn commit_answers_come_back_from_the_journal_and_from_whole_records_of_before() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        let store = Store::open(&dir).unwrap();
        let first = CommitResponse { entries: vec![file("a", 1), file("b", 2), file("c", 3)] };
        let second = CommitResponse { entries: vec![file("d", 4)] };
        let (one, two, old) = (CommitId([1; 16]), CommitId([2; 16]), CommitId([8; 16]));
        store.append(7, &one, &first, &[]).unwrap();
        store.append(7, &two, &second, &[]).unwrap();
        let raw = store.meta.get(c_key(7, &one)).unwrap().unwrap();
        assert_eq!(raw[0], COMMIT_SPAN_VERSION);
        assert!(raw.len() < 8, "a span, not the entries: {} bytes", raw.len());
        store.meta.insert(c_key(7, &old), encode(&first)).unwrap();
        let entries = |id: &CommitId, s: &Store| s.commit_response(7, id).unwrap().map(|r| r.entries);
        let mut store = Some(store);
        for _restart in 0..2 {
            let s = store.take().unwrap_or_else(|| reopen(&dir));
            assert_eq!(entries(&one, &s), Some(first.entries.clone()));
            assert_eq!(entries(&two, &s), Some(second.entries.clone()));
            assert_eq!(entries(&old, &s), Some(first.entries.clone()));
            assert_eq!(s.commit_response(8, &one).unwrap().map(|r| r.entries), None, "another user's");
        }
        // A span reaching past the journal is corrupt, never a shorter answer.
        let store = reopen(&dir);
        let mut bad = vec![COMMIT_SPAN_VERSION];
        bad.extend(postcard::to_stdvec(&CommitSpan { first: 3, count: 5 }).unwrap());
        store.meta.insert(c_key(7, &CommitId([9; 16])), bad).unwrap();
        assert!(matches!(store.commit_response(7, &CommitId([9; 16])), Err(StoreError::Corrupt { .. })));
        store.meta.insert(c_key(7, &CommitId([10; 16])), vec![COMMIT_SPAN_VERSION, 1, 0]).unwrap();
        assert!(matches!(store.commit_response(7, &CommitId([10; 16])), Err(StoreError::Corrupt { .. })));
    }

    /// A store written by a release that kept chunk waits as `m/` records: they go on open
    /// (more than one removal batch of them), and the waits are derived from the other records,
    /// so the version still waits for exactly the chunks the user lacks and becomes durable
    /// when they arrive.
    #[test]
    fn chunk_wait_records_of_before_are_removed_and_the_waits_derived() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        let ids: Vec<ChunkId> = (0..3u32).map(|i| ChunkId::of(&i.to_be_bytes())).collect();
        let store = Store::open(&dir).unwrap();
        commit_pending_file(&store, &ids, &ids);
        // As the release before left them: a wait per chunk, the first chunk already counted off
        // (its `k/` record written, its wait removed, the version's count lowered).
        let mut old = sled::Batch::default();
        for id in &ids[1..] {
            old.insert(key(b"m/", &[&7u64.to_be_bytes(), id.as_bytes(), &1u64.to_be_bytes()]), &[][..]);
        }
        for i in 0..(OLD_RECORDS_GROUP as u64 + 5) {
            let other = ChunkId::of(&i.to_le_bytes());
            old.insert(key(b"m/", &[&8u64.to_be_bytes(), other.as_bytes(), &i.to_be_bytes()]), &[][..]);
        }
        old.insert(key(b"k/", &[&7u64.to_be_bytes(), ids[0].as_bytes()]), &[][..]);
        store.meta.apply_batch(old).unwrap();
        store.put_chunk_locs(&[(ids[0], ChunkLoc { pack: 1, offset: 0, len: 10 })]).unwrap();
        let w = PendingRec { missing: 2, ..store.pending_records(7).unwrap()[0].1.clone() };
        store.meta.insert(key(b"w/", &[&7u64.to_be_bytes(), &1u64.to_be_bytes()]), encode(&w)).unwrap();
        drop(store);

        let store = reopen(&dir);
        assert_eq!(store.meta.scan_prefix(b"m/").count(), 0);
        assert_eq!(
            store.pending(7).unwrap().iter().map(|(v, r)| (*v, r.rec.missing)).collect::<Vec<_>>(),
            vec![(1, 2)]
        );
        assert!(store.has_pending(7).unwrap() && !store.has_pending(8).unwrap());
        assert_eq!(store.chunks_stored(7, &ids[1..2]).unwrap(), Vec::<Seq>::new());
        assert_eq!(store.chunks_stored(7, &ids[2..]).unwrap(), vec![1]);
        assert!(store.pending(7).unwrap().is_empty() && !store.has_pending(7).unwrap());
    }

    /// A chunk the user uploaded but the chunk store no longer indexes (its bytes lost in a
    /// crash, or quarantined) is still awaited when the waits are derived after a restart.
    #[test]
    fn derived_waits_count_a_chunk_the_store_lost_as_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        let ids: Vec<ChunkId> = (0..2u32).map(|i| ChunkId::of(&i.to_be_bytes())).collect();
        let store = Store::open(&dir).unwrap();
        commit_pending_file(&store, &ids, &ids[1..]);
        // The first chunk was the user's and stored when the version was committed.
        store.put_chunk_locs(&[(ids[0], ChunkLoc { pack: 1, offset: 0, len: 10 })]).unwrap();
        assert_eq!(store.chunks_stored(7, &ids[..1]).unwrap(), Vec::<Seq>::new());
        assert_eq!(store.pending(7).unwrap()[0].1.rec.missing, 1);
        store.drop_chunk_locs(&ids[..1]).unwrap();
        drop(store);

        let store = reopen(&dir);
        assert_eq!(store.pending(7).unwrap()[0].1.rec.missing, 2);
        assert_eq!(store.chunks_stored(7, &ids[1..]).unwrap(), Vec::<Seq>::new());
        assert_eq!(store.chunks_stored(7, &ids[..1]).unwrap(), vec![1]);
    }

    fn chunk(i: u32) -> ChunkId {
        ChunkId::of(&i.to_le_bytes())
    }

    fn loc(i: u32) -> ChunkLoc {
        ChunkLoc { pack: i, offset: u64::from(i) * 10, len: 10 }
    }

    /// A store written by a release that kept chunk records as `x/` and `k/` keys: on open they
    /// move into the chunk log (more than one group of them), damaged ones are dropped, and the
    /// records answer as before, after this open and the next.
    #[test]
    fn chunk_records_of_before_move_into_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        let store = Store::open(&dir).unwrap();
        let mut old = sled::Batch::default();
        let n = OLD_RECORDS_GROUP as u32 + 5;
        for i in 0..n {
            old.insert(key(b"x/", &[chunk(i).as_bytes()]), crate::chunk_records::encode_loc_record(&loc(i)));
            old.insert(key(b"k/", &[&u64::from(1 + i % 2).to_be_bytes(), chunk(i).as_bytes()]), &[][..]);
        }
        old.insert(key(b"x/", &[chunk(n).as_bytes()]), &[1, 2, 3][..]);
        old.insert(key(b"x/", &[b"short"]), crate::chunk_records::encode_loc_record(&loc(0)));
        old.insert(key(b"k/", &[&3u64.to_be_bytes(), b"short"]), &[][..]);
        store.meta.apply_batch(old).unwrap();
        drop(store);

        for _restart in 0..2 {
            let store = reopen(&dir);
            assert_eq!(store.meta.scan_prefix(b"x/").count() + store.meta.scan_prefix(b"k/").count(), 0);
            let records = store.meta.scan_prefix(b"y/").count();
            assert!((2 * n as usize).div_ceil(LOG_RECORD_OPS) <= records && records < 2 * n as usize / 100);
            for i in [0, 1, n / 2, n - 1] {
                assert_eq!(store.chunk_loc(&chunk(i)).unwrap(), Some(loc(i)));
                let user = u64::from(1 + i % 2);
                assert!(
                    store.user_has_chunk(user, &chunk(i)).unwrap()
                        && !store.user_has_chunk(3 - user, &chunk(i)).unwrap()
                );
            }
            assert_eq!(store.chunk_loc(&chunk(n)).unwrap(), None, "undecodable: dropped");
            assert_eq!(store.chunks_not(|l| l.pack != 7), vec![chunk(7)]);
        }
    }

    /// Chunk records survive restarts through the log; a log mostly of changes undone is
    /// rewritten on open into the live records alone, and a log record below the base (left by a
    /// rewrite cut short) neither counts nor stays.
    #[test]
    fn the_chunk_log_is_replayed_and_rewritten_when_mostly_undone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        let store = Store::open(&dir).unwrap();
        let churn: Vec<(ChunkId, ChunkLoc)> = (100..100 + COMPACT_MIN as u32).map(|i| (chunk(i), loc(i))).collect();
        store.put_chunk_locs(&churn).unwrap();
        store.drop_chunk_locs(&churn.iter().map(|(id, _)| *id).collect::<Vec<_>>()).unwrap();
        store.put_chunk_locs(&(0..10).map(|i| (chunk(i), loc(i))).collect::<Vec<_>>()).unwrap();
        store.chunks_stored(4, &[chunk(0), chunk(1), chunk(2)]).unwrap();
        store.forget_user_chunk(4, &chunk(1)).unwrap();
        store.quarantine_chunk(&chunk(2), loc(3)).unwrap();
        store.quarantine_chunk(&chunk(3), loc(3)).unwrap();
        let check = |s: &Store| {
            assert!(s.user_has_chunk(4, &chunk(0)).unwrap() && s.user_has_chunk(4, &chunk(2)).unwrap());
            assert!(!s.user_has_chunk(4, &chunk(1)).unwrap() && !s.user_has_chunk(5, &chunk(0)).unwrap());
            assert_eq!(s.chunk_loc(&chunk(2)).unwrap(), Some(loc(2)), "a quarantine of another copy changes nothing");
            assert_eq!(s.chunk_loc(&chunk(3)).unwrap(), None, "quarantined");
            assert!(s.meta.contains_key(key(b"q/", &[chunk(3).as_bytes()])).unwrap());
            assert_eq!(s.chunk_loc(&chunk(100)).unwrap(), None);
            let mut kept = s.chunks_not(|_| false);
            kept.sort();
            let mut want: Vec<ChunkId> = (0..10).filter(|i| *i != 3).map(chunk).collect();
            want.sort();
            assert_eq!(kept, want);
        };
        check(&store);
        let before = store.meta.scan_prefix(b"y/").count();
        drop(store);

        let store = reopen(&dir);
        check(&store);
        let after = store.meta.scan_prefix(b"y/").count();
        assert!(before > 500 && after == 1, "{before} log records before the rewrite, {after} after");
        let base = be_u64(&store.meta.get(LOG_BASE_KEY).unwrap().unwrap()).unwrap();
        store.meta.insert(log_key(base - 1), encode_ops(&[Op::Stored(chunk(100), loc(100))])).unwrap();
        drop(store);

        let store = reopen(&dir);
        check(&store);
        assert_eq!(store.meta.scan_prefix(b"y/").count(), 1);
        store.put_chunk_locs(&[(chunk(11), loc(11))]).unwrap();
        drop(store);
        assert_eq!(reopen(&dir).chunk_loc(&chunk(11)).unwrap(), Some(loc(11)));
    }

    /// A user's LAN key is made once and kept; a rotation replaces it, and the key before it
    /// counts for `PREVIOUS_LAN_KEY_MS` more, then no longer; users have keys of their own.
    #[test]
    fn lan_keys_are_made_once_rotated_and_the_previous_one_expires() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("meta")).unwrap();
        let first = store.lan_keys(1, 0).unwrap();
        assert_eq!(store.lan_keys(1, 5).unwrap(), first);
        assert_ne!(store.lan_keys(2, 0).unwrap().current, first.current);
        store.rotate_lan_key(1, 1_000).unwrap();
        let rotated = store.lan_keys(1, 2_000).unwrap();
        assert_ne!(rotated.current, first.current);
        assert_eq!(rotated.previous, Some(first.current));
        assert_eq!(rotated.previous_until_ms, 1_000 + PREVIOUS_LAN_KEY_MS, "devices are told when it ends");
        let later = store.lan_keys(1, 1_000 + PREVIOUS_LAN_KEY_MS).unwrap();
        assert_eq!((later.current, later.previous), (rotated.current, None));
        drop(store);
        assert_eq!(reopen(&tmp.path().join("meta")).lan_keys(1, 2_000).unwrap(), rotated, "kept across a restart");
    }
}
