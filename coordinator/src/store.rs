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
//! devices is revoked).
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

/// A version committed before the origin had all its chunks (see `api::PendingVersion`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRec {
    pub path: SyncPath,
    pub device: DeviceId,
    pub since_ms: u64,
    /// Distinct chunks missing: as stored, the count at commit time; as read through
    /// [`Store::pending`], the count still missing. The record goes when none is left.
    pub missing: u64,
    pub withdrawn: bool,
}

/// How long, after a rotation, the user's previous LAN key still counts: running devices fetch the
/// new one within a minute (at once, when the coordinator tells them their device list changed);
/// after this the revoked device's key opens nothing.
pub const PREVIOUS_LAN_KEY_MS: u64 = 10 * 60 * 1000;

/// The user's LAN keys as stored: the current one, the one before it and when it was replaced.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LanKeyRec {
    current: LanKey,
    previous: Option<LanKey>,
    rotated_ms: u64,
}

/// A pending version as appended with its commit: the record and the chunks it waits for.
pub type NewPending = (Seq, PendingRec, Vec<ChunkId>);

/// A pending version as listed: its record (with the count of chunks still missing) and when it
/// last made progress (its commit, a chunk of it arriving, or the store opening).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingState {
    pub rec: PendingRec,
    pub progress_ms: u64,
}

/// How many pending versions, and chunks awaited, a user and one of its devices have: what the
/// limits on them are checked against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingLoad {
    pub user_versions: u64,
    /// Distinct chunks the user's pending versions wait for.
    pub user_chunks: u64,
    pub device_versions: u64,
    /// Chunks the device's pending versions wait for (a chunk two of them wait for counts twice).
    pub device_chunks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRec {
    pub id: UserId,
    pub name: String,
    pub created_ms: u64,
    /// The user's CA certificate and private key (DER), which sign device certificates.
    pub ca_cert: Vec<u8>,
    pub ca_key: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InviteRec {
    pub user: UserId,
    pub created_ms: u64,
    /// After this instant the invite no longer enrolls anything.
    pub expires_ms: u64,
}

/// Invites written before they carried an expiry (format version 1).
#[derive(Deserialize)]
struct InviteRecV1 {
    user: UserId,
    created_ms: u64,
}

/// Format version of invite records: 2 added `expires_ms`.
const INVITE_VERSION: u8 = 2;

/// How long an invite stored before invites carried an expiry stays valid, counted from its
/// creation: the default expiry of new invites.
pub const DEFAULT_INVITE_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

impl InviteRec {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![INVITE_VERSION];
        out.extend(postcard::to_stdvec(self).expect("postcard serializes store records"));
        out
    }

    fn decode(key: &[u8], bytes: &[u8]) -> Result<InviteRec, StoreError> {
        let corrupt = || StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned() };
        match bytes.split_first() {
            Some((&INVITE_VERSION, rest)) => postcard::from_bytes(rest).map_err(|_| corrupt()),
            Some((&VALUE_VERSION, rest)) => {
                let old: InviteRecV1 = postcard::from_bytes(rest).map_err(|_| corrupt())?;
                Ok(InviteRec {
                    user: old.user,
                    created_ms: old.created_ms,
                    expires_ms: old.created_ms.saturating_add(DEFAULT_INVITE_TTL_MS),
                })
            }
            _ => Err(corrupt()),
        }
    }
}

/// Why an invite did not enroll a device. Every variant is answered the same way on the wire, so
/// the API reveals neither which users exist nor which invites did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteRefusal {
    Unknown,
    Expired,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRec {
    pub id: DeviceId,
    pub user: UserId,
    pub name: String,
    pub token_hash: [u8; 32],
    pub enrolled_ms: u64,
    pub last_seen_ms: u64,
    pub cursor: Seq,
    pub revoked: bool,
    /// The device certificate (DER) signed by the user's CA at enrollment.
    pub cert: Vec<u8>,
}

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

/// The chunk records in memory and the state of their log.
#[derive(Default)]
struct ChunkLog {
    recs: ChunkRecords,
    /// The number of the next `y/` record.
    next: u64,
    /// Changes in the log's records that count.
    ops: usize,
}

impl ChunkLog {
    /// Adds `ops` to `batch` as new log records. Their change to memory follows once the batch
    /// is applied ([`ChunkLog::applied`]).
    fn append(&mut self, batch: &mut sled::Batch, ops: &[Op]) {
        for rec in ops.chunks(LOG_RECORD_OPS) {
            batch.insert(log_key(self.next), encode_ops(rec));
            self.next += 1;
        }
    }

    fn applied(&mut self, ops: &[Op]) {
        for op in ops {
            self.recs.apply(op);
        }
        self.ops += ops.len();
    }
}

fn log_key(n: u64) -> Vec<u8> {
    key(b"y/", &[&n.to_be_bytes()])
}

/// One user's pending versions and the chunks each still waits for, derived from the store on
/// first use after start ([`Store::load_waits`]) and from then on changed together with the
/// records: by commits that add pending versions and uploads that count chunks off them. Held
/// locked across each such change, so a derivation never sees half of one. Its size follows the
/// chunks awaited (~50 bytes each), which the uploads of the versions' authors pay off.
#[derive(Default)]
struct Waits {
    loaded: bool,
    /// The first pending version waiting for each chunk; any others in `more`.
    first: HashMap<ChunkId, Seq>,
    more: HashMap<ChunkId, Vec<Seq>>,
    /// Every pending version (withdrawn ones too): its author, how many distinct chunks it still
    /// lacks, and when it last made progress.
    versions: HashMap<Seq, Waiting>,
}

/// One pending version in [`Waits`].
#[derive(Debug, Clone, Copy)]
struct Waiting {
    device: DeviceId,
    missing: u64,
    progress_ms: u64,
}

impl Waits {
    fn add(&mut self, seq: Seq, device: DeviceId, chunks: &[ChunkId], progress_ms: u64) {
        for c in chunks {
            match self.first.entry(*c) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(seq);
                }
                std::collections::hash_map::Entry::Occupied(_) => self.more.entry(*c).or_default().push(seq),
            }
        }
        self.versions.insert(seq, Waiting { device, missing: chunks.len() as u64, progress_ms });
    }

    fn load(&self, device: DeviceId) -> PendingLoad {
        let mine = self.versions.values().filter(|w| w.device == device);
        PendingLoad {
            user_versions: self.versions.len() as u64,
            user_chunks: self.first.len() as u64,
            device_versions: mine.clone().count() as u64,
            device_chunks: mine.map(|w| w.missing).sum(),
        }
    }

    /// The versions waiting for `id`.
    fn waiting(&self, id: &ChunkId) -> impl Iterator<Item = Seq> + '_ {
        self.first.get(id).into_iter().chain(self.more.get(id).into_iter().flatten()).copied()
    }

    fn arrived(&mut self, id: &ChunkId) {
        self.first.remove(id);
        self.more.remove(id);
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![VALUE_VERSION];
    // Serializing our own in-memory records to a Vec cannot fail: no I/O, no unsupported types.
    out.extend(postcard::to_stdvec(v).expect("postcard serializes store records"));
    out
}

/// Format version of a `c/` record that names the journal entries a commit got instead of
/// holding them: a commit of 500 files stored its ~85 KiB of entries twice, and sled rewrites a
/// node with all its values whenever it consolidates or splits one.
const COMMIT_SPAN_VERSION: u8 = 2;

/// The journal entries a commit got: `count` from `first` on.
#[derive(Serialize, Deserialize)]
struct CommitSpan {
    first: Seq,
    count: u64,
}

/// A commit's `c/` record: its span of the journal (entries are numbered one after another and
/// never removed), or the whole response should its entries not be consecutive.
fn encode_commit(resp: &CommitResponse) -> Vec<u8> {
    match resp.entries.first().map(|e| e.version) {
        Some(first) if resp.entries.iter().zip(first..).all(|(e, seq)| e.version == seq) => {
            let mut out = vec![COMMIT_SPAN_VERSION];
            let span = CommitSpan { first, count: resp.entries.len() as u64 };
            out.extend(postcard::to_stdvec(&span).expect("postcard serializes store records"));
            out
        }
        _ => encode(resp),
    }
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

fn history_key(user: UserId, path: &SyncPath, seq: Seq) -> Vec<u8> {
    key(b"v/", &[&user.to_be_bytes(), path.as_str().as_bytes(), &[0], &seq.to_be_bytes()])
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Locks a user's [`Waits`]. Should a panic have cut a change to them short, they are derived
/// from the store again.
fn lock_waits(m: &std::sync::Mutex<Waits>) -> std::sync::MutexGuard<'_, Waits> {
    m.lock().unwrap_or_else(|p| {
        m.clear_poison();
        let mut w = p.into_inner();
        *w = Waits::default();
        w
    })
}

fn random_lan_key() -> Result<LanKey, StoreError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| StoreError::Db(sled::Error::Io(std::io::Error::other(e.to_string()))))?;
    Ok(LanKey::new(b))
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// What applying a commit produced.
pub enum CommitOutcome {
    Applied(CommitResponse),
    /// A retry of an already-applied commit: the original response.
    Replayed(CommitResponse),
    Stale(Vec<Conflict>),
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(500))
            .cache_capacity(CACHE_BYTES)
            .open()
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

    /// Rebuilds the chunk records from the log.
    fn load_chunk_log(&self) -> Result<(), StoreError> {
        let base = self.meta.get(LOG_BASE_KEY)?.map_or(Some(0), |v| be_u64(&v));
        let base = base.ok_or_else(|| StoreError::Corrupt { key: "n/chunk-log".into() })?;
        let mut log = lock(&self.chunks);
        *log = ChunkLog { next: base, ..ChunkLog::default() };
        for kv in self.meta.range(log_key(base)..key(b"y/", &[&[0xff; 9]])) {
            let (k, v) = kv?;
            let corrupt = || StoreError::Corrupt { key: format!("y/{:?}", k.get(2..).and_then(be_u64)) };
            let n = k.get(2..).and_then(be_u64).ok_or_else(corrupt)?;
            let ops = decode_ops(&v).ok_or_else(corrupt)?;
            log.applied(&ops);
            log.next = n + 1;
        }
        Ok(())
    }

    /// Moves the chunk records of releases before (`x/CHUNK`, `k/UID CHUNK`) into the log, a
    /// group at a time, each group's removal in the batch that logs it. A location that does not
    /// decode is dropped, as the chunk store's check on open would have dropped it; so is a key
    /// of the wrong length.
    fn move_old_chunk_records(&self) -> Result<(), StoreError> {
        let (mut moved, mut dropped) = (0usize, 0usize);
        for prefix in [&b"x/"[..], &b"k/"[..]] {
            loop {
                let mut batch = sled::Batch::default();
                let mut ops = Vec::new();
                let mut n = 0;
                for kv in self.meta.scan_prefix(prefix).take(OLD_RECORDS_GROUP) {
                    let (k, v) = kv?;
                    let id = |at: usize| k.get(at..).and_then(|b| <[u8; 32]>::try_from(b).ok()).map(ChunkId);
                    let op = match prefix {
                        b"x/" => id(2).zip(ChunkLoc::decode_record(&v)).map(|(id, loc)| Op::Stored(id, loc)),
                        _ => k.get(2..10).and_then(be_u64).zip(id(10)).map(|(user, id)| Op::Held(user, id)),
                    };
                    match op {
                        Some(op) => ops.push(op),
                        None => dropped += 1,
                    }
                    batch.remove(k);
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                let mut log = lock(&self.chunks);
                log.append(&mut batch, &ops);
                self.meta.apply_batch(batch)?;
                log.applied(&ops);
                moved += ops.len();
            }
        }
        if moved + dropped > 0 {
            self.flush_blocking()?;
            tracing::info!(moved, dropped, "moved the chunk records of an earlier release into the chunk log");
        }
        Ok(())
    }

    /// Rewrites the chunk log if it holds more than twice the live records (see the module doc).
    /// A rewrite cut short leaves a log that reads the same: restated records only repeat what
    /// the log before them ends with, and the old records stop counting in one write.
    fn compact_chunk_log(&self) -> Result<(), StoreError> {
        let mut log = lock(&self.chunks);
        let live = log.recs.len();
        let mut base = self.meta.get(LOG_BASE_KEY)?.and_then(|v| be_u64(&v)).unwrap_or(0);
        if log.ops > COMPACT_MIN.max(2 * live) {
            let first = log.next;
            let ops = log.recs.restated();
            for group in ops.chunks(LOG_RECORD_OPS * 64) {
                let mut batch = sled::Batch::default();
                log.append(&mut batch, group);
                self.meta.apply_batch(batch)?;
            }
            self.meta.insert(LOG_BASE_KEY, &first.to_be_bytes())?;
            base = first;
            tracing::info!(changes = log.ops, records = live, "rewrote the chunk log");
            log.ops = ops.len();
            self.flush_blocking()?;
        }
        // Records below the base no longer count; a rewrite may have been cut short removing them.
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in self.meta.range(log_key(0)..log_key(base)).take(OLD_RECORDS_GROUP) {
                batch.remove(kv?.0);
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.meta.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Removes the `m/` records of releases before (see the module doc): what they held is
    /// derived from the other records now.
    fn drop_old_waits(&self) -> Result<(), StoreError> {
        let mut removed = 0usize;
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in self.meta.scan_prefix(b"m/").take(OLD_RECORDS_GROUP) {
                batch.remove(kv?.0);
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.meta.apply_batch(batch)?;
            removed += n;
        }
        if removed > 0 {
            self.flush_blocking()?;
            tracing::info!(records = removed, "removed the chunk-wait records of an earlier release");
        }
        Ok(())
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

    pub fn user(&self, name: &str) -> Result<Option<UserRec>, StoreError> {
        self.get(&key(b"u/", &[name.as_bytes()]))
    }

    /// Creates a user; `Ok(None)` if the name is taken.
    pub fn add_user(&self, name: &str, now_ms: u64, ca: crate::ca::UserCa) -> Result<Option<UserRec>, StoreError> {
        let k = key(b"u/", &[name.as_bytes()]);
        let rec = UserRec {
            id: self.db.generate_id()? + 1,
            name: name.to_string(),
            created_ms: now_ms,
            ca_cert: ca.cert,
            ca_key: ca.key,
        };
        match self.meta.compare_and_swap(&k, None as Option<&[u8]>, Some(encode(&rec)))? {
            Ok(()) => Ok(Some(rec)),
            Err(_) => Ok(None),
        }
    }

    pub fn add_invite(&self, secret_hash: &[u8; 32], rec: &InviteRec) -> Result<(), StoreError> {
        self.meta.insert(key(b"i/", &[secret_hash]), rec.encode())?;
        Ok(())
    }

    /// The user an unused, unexpired invite enrolls into.
    pub fn invite(&self, secret_hash: &[u8; 32], now_ms: u64) -> Result<Result<UserRec, InviteRefusal>, StoreError> {
        let ik = key(b"i/", &[secret_hash]);
        let Some(v) = self.meta.get(&ik)? else {
            return Ok(Err(InviteRefusal::Unknown));
        };
        let inv = InviteRec::decode(&ik, &v)?;
        if now_ms >= inv.expires_ms {
            return Ok(Err(InviteRefusal::Expired));
        }
        match self.user_by_id(inv.user)? {
            Some(u) => Ok(Ok(u)),
            None => Ok(Err(InviteRefusal::Unknown)),
        }
    }

    fn user_by_id(&self, id: UserId) -> Result<Option<UserRec>, StoreError> {
        for kv in self.meta.scan_prefix(b"u/") {
            let (k, v) = kv?;
            let u: UserRec = decode(&k, &v)?;
            if u.id == id {
                return Ok(Some(u));
            }
        }
        Ok(None)
    }

    /// Consumes an invite and stores the new device and its token, atomically: an invite enrolls
    /// exactly one device. `false` if the invite was used meanwhile.
    pub fn enroll(&self, secret_hash: &[u8; 32], dev: &DeviceRec) -> Result<bool, StoreError> {
        let ik = key(b"i/", &[secret_hash]);
        let dk = key(b"d/", &[dev.id.as_bytes()]);
        let tk = key(b"t/", &[&dev.token_hash]);
        let res = self.meta.transaction(|t| {
            if t.remove(ik.as_slice())?.is_none() {
                return Ok(false);
            }
            t.insert(dk.as_slice(), encode(dev))?;
            t.insert(tk.as_slice(), dev.id.as_bytes().to_vec())?;
            Ok(true)
        });
        res.map_err(|e: sled::transaction::TransactionError<()>| match e {
            sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
            sled::transaction::TransactionError::Abort(()) => {
                unreachable!("the transaction never aborts")
            }
        })
    }

    // ---- devices ----

    pub fn device_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<DeviceRec>, StoreError> {
        let Some(id) = self.meta.get(key(b"t/", &[token_hash]))? else {
            return Ok(None);
        };
        self.get(&key(b"d/", &[&id]))
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRec>, StoreError> {
        self.get(&key(b"d/", &[id.as_bytes()]))
    }

    /// Changes one device record atomically (compare-and-swap): `change` edits a fresh copy and
    /// says whether to store it; it may run more than once under contention. Concurrent updates
    /// therefore never undo each other, and a revoked device stays revoked whatever `change` does
    /// (only [`Store::reinstate_device`], the operator's, clears it).
    /// Returns the stored record, or `None` when there is no such device or `change` declined.
    pub fn update_device(
        &self,
        id: &DeviceId,
        mut change: impl FnMut(&mut DeviceRec) -> bool,
    ) -> Result<Option<DeviceRec>, StoreError> {
        let k = key(b"d/", &[id.as_bytes()]);
        loop {
            let Some(old) = self.meta.get(&k)? else {
                return Ok(None);
            };
            let mut dev: DeviceRec = decode(&k, &old)?;
            let was_revoked = dev.revoked;
            if !change(&mut dev) {
                return Ok(None);
            }
            dev.revoked |= was_revoked;
            if self.meta.compare_and_swap(&k, Some(&old), Some(encode(&dev)))?.is_ok() {
                return Ok(Some(dev));
            }
        }
    }

    /// Clears a device's revocation (compare-and-swap): the operator's way to undo a revocation
    /// made by mistake, and the only update that clears `revoked`. The device's token and
    /// certificate work again. Returns the stored record, `None` if there is no such device.
    pub fn reinstate_device(&self, id: &DeviceId) -> Result<Option<DeviceRec>, StoreError> {
        let k = key(b"d/", &[id.as_bytes()]);
        loop {
            let Some(old) = self.meta.get(&k)? else {
                return Ok(None);
            };
            let mut dev: DeviceRec = decode(&k, &old)?;
            dev.revoked = false;
            if self.meta.compare_and_swap(&k, Some(&old), Some(encode(&dev)))?.is_ok() {
                return Ok(Some(dev));
            }
        }
    }

    pub fn devices(&self, user: UserId) -> Result<Vec<DeviceRec>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(b"d/") {
            let (k, v) = kv?;
            let d: DeviceRec = decode(&k, &v)?;
            if d.user == user {
                out.push(d);
            }
        }
        out.sort_by_key(|d| d.enrolled_ms);
        Ok(out)
    }

    /// The user's LAN keys (`api::LanKey`), made on first use.
    /// The previous key ends [`PREVIOUS_LAN_KEY_MS`] after the rotation that made it so.
    pub fn lan_keys(&self, user: UserId, now_ms: u64) -> Result<LanKeys, StoreError> {
        let rec = self.lan_key_rec(user)?;
        let until = rec.rotated_ms.saturating_add(PREVIOUS_LAN_KEY_MS);
        let previous = rec.previous.filter(|_| now_ms < until);
        Ok(LanKeys { current: rec.current, previous, previous_until_ms: if previous.is_some() { until } else { 0 } })
    }

    fn lan_key_rec(&self, user: UserId) -> Result<LanKeyRec, StoreError> {
        let k = key(b"l/", &[&user.to_be_bytes()]);
        loop {
            if let Some(v) = self.meta.get(&k)? {
                return decode(&k, &v);
            }
            let fresh = LanKeyRec { current: random_lan_key()?, previous: None, rotated_ms: 0 };
            if self.meta.compare_and_swap(&k, None as Option<&[u8]>, Some(encode(&fresh)))?.is_ok() {
                return Ok(fresh);
            }
        }
    }

    /// Replaces the user's LAN key (one of its devices was revoked: it knows the old one), keeping
    /// the old one as `previous` for a while, for the other devices to catch up.
    pub fn rotate_lan_key(&self, user: UserId, now_ms: u64) -> Result<(), StoreError> {
        let old = self.lan_key_rec(user)?;
        let k = key(b"l/", &[&user.to_be_bytes()]);
        let new = LanKeyRec { current: random_lan_key()?, previous: Some(old.current), rotated_ms: now_ms };
        self.meta.insert(k, encode(&new))?;
        Ok(())
    }

    pub fn user_count(&self) -> usize {
        self.meta.scan_prefix(b"u/").count()
    }

    // ---- chunks ----

    pub fn user_has_chunk(&self, user: UserId, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(lock(&self.chunks).recs.holds(user, id))
    }

    /// Where the chunk store keeps `id`.
    pub fn chunk_loc(&self, id: &ChunkId) -> Result<Option<ChunkLoc>, StoreError> {
        Ok(lock(&self.chunks).recs.loc(id))
    }

    /// Writes `ops` to the chunk log with whatever else `batch` holds, atomically.
    fn log_chunk_ops(&self, log: &mut ChunkLog, mut batch: sled::Batch, ops: &[Op]) -> Result<(), StoreError> {
        log.append(&mut batch, ops);
        self.meta.apply_batch(batch)?;
        log.applied(ops);
        Ok(())
    }

    pub fn put_chunk_locs(&self, locs: &[(ChunkId, ChunkLoc)]) -> Result<(), StoreError> {
        let ops: Vec<Op> = locs.iter().map(|(id, loc)| Op::Stored(*id, *loc)).collect();
        self.log_chunk_ops(&mut lock(&self.chunks), sled::Batch::default(), &ops)
    }

    /// Stops serving `id` from its stored copy, which failed its hash check: the location moves to
    /// `q/` (kept for inspection), so the chunk reads as absent and a correct upload stores it anew.
    /// Only if the index still points at `loc` (a repair may have raced ahead).
    pub fn quarantine_chunk(&self, id: &ChunkId, loc: ChunkLoc) -> Result<(), StoreError> {
        let mut log = lock(&self.chunks);
        if log.recs.loc(id) == Some(loc) {
            let mut batch = sled::Batch::default();
            batch.insert(key(b"q/", &[id.as_bytes()]), loc.encode_record());
            self.log_chunk_ops(&mut log, batch, &[Op::Gone(*id)])?;
        }
        Ok(())
    }

    /// The indexed chunks whose location fails `intact`, for the start-up check against the packs.
    pub fn chunks_not(&self, mut intact: impl FnMut(&ChunkLoc) -> bool) -> Vec<ChunkId> {
        let mut log = lock(&self.chunks);
        let mut out = Vec::new();
        log.recs.for_each_loc(|id, loc| {
            if !intact(loc) {
                out.push(*id);
            }
        });
        out
    }

    /// Forgets where the given chunks were stored (their bytes are gone).
    pub fn drop_chunk_locs(&self, ids: &[ChunkId]) -> Result<(), StoreError> {
        let ops: Vec<Op> = ids.iter().map(|id| Op::Gone(*id)).collect();
        self.log_chunk_ops(&mut lock(&self.chunks), sled::Batch::default(), &ops)
    }

    /// Reserves a pack number never handed out before, at least `at_least`, and makes the
    /// reservation durable before returning, so a crash can never lead to the same number naming
    /// two different packs (the index may still point into the first).
    pub fn reserve_pack(&self, at_least: u32) -> Result<u32, StoreError> {
        let k = b"n/pack";
        let mut got = at_least;
        self.meta.fetch_and_update(k, |old| {
            let next = old.and_then(|v| v.try_into().ok()).map_or(0, u32::from_be_bytes);
            got = next.max(at_least);
            Some(got.saturating_add(1).to_be_bytes().to_vec())
        })?;
        self.flush_blocking()?;
        Ok(got)
    }

    /// The user no longer holds `id` (its stored bytes are gone). Pending versions that counted
    /// it as held wait for it again: the user's waits are derived anew on their next use.
    pub fn forget_user_chunk(&self, user: UserId, id: &ChunkId) -> Result<(), StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.log_chunk_ops(&mut lock(&self.chunks), sled::Batch::default(), &[Op::Unheld(user, *id)])?;
        *w = Waits::default();
        Ok(())
    }

    // ---- pending versions ----

    /// The user's pending versions, oldest first, each with the count of chunks it still lacks
    /// and when it last made progress.
    pub fn pending(&self, user: UserId) -> Result<Vec<(Seq, PendingState)>, StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        let recs = self.pending_records(user)?;
        Ok(recs
            .into_iter()
            .map(|(seq, mut rec)| {
                let waiting = w.versions.get(&seq);
                if let Some(v) = waiting {
                    rec.missing = v.missing;
                }
                let progress_ms = waiting.map_or(rec.since_ms, |v| v.progress_ms);
                (seq, PendingState { rec, progress_ms })
            })
            .collect())
    }

    /// How many pending versions and awaited chunks `user` and its `device` have now.
    pub fn pending_load(&self, user: UserId, device: DeviceId) -> Result<PendingLoad, StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        Ok(w.load(device))
    }

    /// Pending versions of every user that made no progress since `before_ms`, or were withdrawn
    /// (for `/metrics`).
    pub fn stuck_count(&self, before_ms: u64) -> Result<u64, StoreError> {
        let mut users = Vec::new();
        let mut from = b"w/".to_vec();
        while let Some(kv) = self.meta.range(from..).next() {
            let (k, _) = kv?;
            if !k.starts_with(b"w/") {
                break;
            }
            let Some(user) = k.get(2..10).and_then(be_u64) else { break };
            users.push(user);
            match user.checked_add(1) {
                Some(next) => from = key(b"w/", &[&next.to_be_bytes()]),
                None => break,
            }
        }
        let mut n = 0;
        for user in users {
            n +=
                self.pending(user)?.iter().filter(|(_, p)| p.rec.withdrawn || p.progress_ms < before_ms).count() as u64;
        }
        Ok(n)
    }

    /// The user's `w/` records as stored, oldest first.
    fn pending_records(&self, user: UserId) -> Result<Vec<(Seq, PendingRec)>, StoreError> {
        let prefix = key(b"w/", &[&user.to_be_bytes()]);
        self.meta
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let seq = be_u64(&k[prefix.len()..]).ok_or_else(|| StoreError::Corrupt { key: "w/".into() })?;
                Ok((seq, decode(&k, &v)?))
            })
            .collect()
    }

    /// Pending versions of every user, and the oldest one's commit time (for `/metrics`). Reads
    /// one record per user with pending versions: a user's first (lowest journal number) is the
    /// oldest, commit times growing with the journal.
    pub fn pending_stats(&self) -> Result<(u64, Option<u64>), StoreError> {
        let mut oldest: Option<u64> = None;
        let mut from = b"w/".to_vec();
        while let Some(kv) = self.meta.range(from..).next() {
            let (k, v) = kv?;
            if !k.starts_with(b"w/") {
                break;
            }
            let rec: PendingRec = decode(&k, &v)?;
            oldest = Some(oldest.map_or(rec.since_ms, |o| o.min(rec.since_ms)));
            // On to the next user's records.
            match k.get(2..10).and_then(be_u64).and_then(|user| user.checked_add(1)) {
                Some(next) => from = key(b"w/", &[&next.to_be_bytes()]),
                None => break,
            }
        }
        Ok((self.pending_count.load(std::sync::atomic::Ordering::Relaxed), oldest))
    }

    /// `true` if the user has a pending version.
    pub fn has_pending(&self, user: UserId) -> Result<bool, StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        Ok(!w.versions.is_empty())
    }

    /// Those of `ids` that a pending version of the user waits for, as far as known without
    /// reading the store: none before its waits were first needed. The user lacks them (for
    /// `chunks/missing`, which then need not look them up).
    pub fn awaited(&self, user: UserId, ids: &[ChunkId]) -> std::collections::HashSet<ChunkId> {
        let cell = self.waits_of(user);
        let w = lock_waits(&cell);
        ids.iter().filter(|id| w.first.contains_key(id)).copied().collect()
    }

    /// The user's [`Waits`], not necessarily loaded yet.
    fn waits_of(&self, user: UserId) -> std::sync::Arc<std::sync::Mutex<Waits>> {
        lock(&self.waits).entry(user).or_default().clone()
    }

    /// Derives what the user's pending versions wait for, unless done already: for each `w/`
    /// record, the distinct chunks of its journal entry's manifest that the user does not hold
    /// (not recorded as the user's, or the chunk store no longer indexes the chunk: lost or quarantined). A
    /// version found waiting for nothing (not left by this release, whose uploads remove the
    /// record with the last chunk) is made durable here.
    fn load_waits(&self, user: UserId, w: &mut Waits) -> Result<(), StoreError> {
        if w.loaded {
            return Ok(());
        }
        let mut loaded = Waits { loaded: true, ..Waits::default() };
        let mut complete = Vec::new();
        for (seq, rec) in self.pending_records(user)? {
            let entry = self.entry(user, seq)?.ok_or_else(|| StoreError::Corrupt { key: format!("w/{user} {seq}") })?;
            let mut seen = std::collections::HashSet::new();
            let mut lacking = Vec::new();
            for c in entry.manifest.iter().flat_map(|m| &m.chunks) {
                if seen.insert(c.id) && !(self.user_has_chunk(user, &c.id)? && self.chunk_loc(&c.id)?.is_some()) {
                    lacking.push(c.id);
                }
            }
            if lacking.is_empty() {
                complete.push(seq);
            } else {
                loaded.add(seq, rec.device, &lacking, rec.since_ms.max(self.opened_ms));
            }
        }
        if !complete.is_empty() {
            let mut batch = sled::Batch::default();
            for seq in &complete {
                batch.remove(key(b"w/", &[&user.to_be_bytes(), &seq.to_be_bytes()]));
            }
            self.meta.apply_batch(batch)?;
            self.pending_count.fetch_sub(complete.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(user, versions = ?complete, "pending versions found complete are durable");
        }
        *w = loaded;
        Ok(())
    }

    /// Records that the origin now stores `ids` for the user and counts them off the user's
    /// pending versions waiting for them: versions left waiting for nothing become durable (their
    /// records go). When the user has pending versions, the caller has synced the chunks first.
    /// Each group of up to `STORED_GROUP` chunks is one atomic batch, so a chunk is never the
    /// user's while a version still waits for it; a crash between groups leaves the later ones
    /// unrecorded, to be uploaded again. Returns the versions that became durable. The caller
    /// holds the user's commit lock, so no commit can record a wait for a chunk between the
    /// upload and this.
    pub fn chunks_stored(&self, user: UserId, ids: &[ChunkId]) -> Result<Vec<Seq>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<ChunkId> = ids.iter().filter(|id| seen.insert(**id)).copied().collect();
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        let u = user.to_be_bytes();
        let mut durable = Vec::new();
        for group in ids.chunks(STORED_GROUP) {
            let mut batch = sled::Batch::default();
            let mut counted: std::collections::BTreeMap<Seq, u64> = Default::default();
            for id in group {
                for seq in w.waiting(id) {
                    *counted.entry(seq).or_default() += 1;
                }
            }
            let done: Vec<Seq> = counted
                .iter()
                .filter(|(seq, n)| w.versions.get(seq).is_some_and(|v| v.missing <= **n))
                .map(|(seq, _)| *seq)
                .collect();
            for seq in &done {
                batch.remove(key(b"w/", &[&u, &seq.to_be_bytes()]));
            }
            let mut log = lock(&self.chunks);
            let ops: Vec<Op> =
                group.iter().filter(|id| !log.recs.holds(user, id)).map(|id| Op::Held(user, *id)).collect();
            self.log_chunk_ops(&mut log, batch, &ops)?;
            drop(log);
            for id in group {
                w.arrived(id);
            }
            let now = shoal_sys::clock::now_ms();
            for (seq, n) in counted {
                if let Some(v) = w.versions.get_mut(&seq) {
                    v.missing = v.missing.saturating_sub(n);
                    v.progress_ms = now;
                }
            }
            for seq in &done {
                w.versions.remove(seq);
            }
            self.pending_count.fetch_sub(done.len() as u64, std::sync::atomic::Ordering::Relaxed);
            durable.extend(done);
        }
        Ok(durable)
    }

    /// Marks every pending version `device` committed as withdrawn (the device was revoked: it
    /// will upload none of them). Returns how many were marked.
    pub fn withdraw_device(&self, user: UserId, device: DeviceId) -> Result<usize, StoreError> {
        let versions: Vec<Seq> = self
            .pending_records(user)?
            .into_iter()
            .filter(|(_, r)| r.device == device && !r.withdrawn)
            .map(|(seq, _)| seq)
            .collect();
        self.withdraw(user, device, &versions)
    }

    /// Marks the given pending versions, if `device` committed them, as withdrawn. Returns how
    /// many were marked.
    pub fn withdraw(&self, user: UserId, device: DeviceId, versions: &[Seq]) -> Result<usize, StoreError> {
        let mut n = 0;
        for seq in versions {
            let wk = key(b"w/", &[&user.to_be_bytes(), &seq.to_be_bytes()]);
            let Some(mut rec) = self.get::<PendingRec>(&wk)? else { continue };
            if rec.device == device && !rec.withdrawn {
                rec.withdrawn = true;
                self.meta.insert(wk, encode(&rec))?;
                n += 1;
            }
        }
        Ok(n)
    }

    // ---- journal ----

    pub fn head_seq(&self, user: UserId) -> Result<Seq, StoreError> {
        Ok(self.meta.get(key(b"h/", &[&user.to_be_bytes()]))?.and_then(|v| be_u64(&v)).unwrap_or(0))
    }

    fn entry(&self, user: UserId, seq: Seq) -> Result<Option<Entry>, StoreError> {
        self.get(&key(b"j/", &[&user.to_be_bytes(), &seq.to_be_bytes()]))
    }

    /// A journal entry and its stored size, for pages bounded by bytes.
    fn sized_entry(&self, user: UserId, seq: Seq) -> Result<Option<(Entry, usize)>, StoreError> {
        let k = key(b"j/", &[&user.to_be_bytes(), &seq.to_be_bytes()]);
        match self.meta.get(&k)? {
            Some(v) => Ok(Some((decode(&k, &v)?, v.len()))),
            None => Ok(None),
        }
    }

    /// The current head of `path` (possibly a tombstone).
    pub fn head(&self, user: UserId, path: &SyncPath) -> Result<Option<Entry>, StoreError> {
        let Some(seq) = self.meta.get(key(b"p/", &[&user.to_be_bytes(), path.as_str().as_bytes()]))? else {
            return Ok(None);
        };
        let seq = be_u64(&seq).ok_or_else(|| StoreError::Corrupt { key: format!("p/{path}") })?;
        self.entry(user, seq)
    }

    /// The answer a commit got, for its replays: read back from the journal (the record holds
    /// where its entries start and how many there are), or as stored whole before that.
    pub fn commit_response(&self, user: UserId, id: &CommitId) -> Result<Option<CommitResponse>, StoreError> {
        let k = key(b"c/", &[&user.to_be_bytes(), id.as_bytes()]);
        let Some(v) = self.meta.get(&k)? else { return Ok(None) };
        let corrupt = || StoreError::Corrupt { key: format!("c/{user} {id}") };
        match v.split_first() {
            Some((&VALUE_VERSION, _)) => decode(&k, &v).map(Some),
            Some((&COMMIT_SPAN_VERSION, rest)) => {
                let span: CommitSpan = postcard::from_bytes(rest).map_err(|_| corrupt())?;
                let since = span.first.checked_sub(1).ok_or_else(corrupt)?;
                let upto = since.checked_add(span.count).ok_or_else(corrupt)?;
                let count = usize::try_from(span.count).map_err(|_| corrupt())?;
                let entries = self.changes(user, since, upto, count, usize::MAX)?;
                if entries.len() != count || count == 0 {
                    return Err(corrupt());
                }
                Ok(Some(CommitResponse { entries }))
            }
            _ => Err(corrupt()),
        }
    }

    /// Appends `entries` (already numbered `head+1..`, with bases checked by the caller under the
    /// commit lock) to the journal, moves the heads and records the commit id, in one atomic batch.
    /// Versions of the commit whose chunks the origin still lacks are recorded as pending in the
    /// same batch.
    pub fn append(
        &self,
        user: UserId,
        id: &CommitId,
        resp: &CommitResponse,
        pending: &[NewPending],
    ) -> Result<(), StoreError> {
        let u = user.to_be_bytes();
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        if !pending.is_empty() {
            // Derived from the records before this commit's, which are added below.
            self.load_waits(user, &mut w)?;
        }
        let mut batch = sled::Batch::default();
        for (seq, rec, _) in pending {
            batch.insert(key(b"w/", &[&u, &seq.to_be_bytes()]), encode(rec));
        }
        let mut last = None;
        for e in &resp.entries {
            let seq = e.version.to_be_bytes();
            batch.insert(key(b"j/", &[&u, &seq]), encode(e));
            batch.insert(key(b"p/", &[&u, e.path.as_str().as_bytes()]), &seq[..]);
            batch.insert(history_key(user, &e.path, e.version), &[][..]);
            last = Some(e.version);
        }
        if let Some(last) = last {
            batch.insert(key(b"h/", &[&u]), &last.to_be_bytes()[..]);
        }
        batch.insert(key(b"c/", &[&u, id.as_bytes()]), encode_commit(resp));
        self.meta.apply_batch(batch)?;
        if w.loaded {
            for (seq, rec, chunks) in pending {
                w.add(*seq, rec.device, chunks, rec.since_ms);
            }
        }
        self.pending_count.fetch_add(pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Journal entries with `since < seq <= upto`: at most `limit` of them, and no more once their
    /// stored size passes `max_bytes` (at least one entry, whatever its size).
    pub fn changes(
        &self,
        user: UserId,
        since: Seq,
        upto: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let u = user.to_be_bytes();
        if upto <= since {
            return Ok(Vec::new());
        }
        let from = key(b"j/", &[&u, &since.saturating_add(1).to_be_bytes()]);
        let to = key(b"j/", &[&u, &upto.to_be_bytes()]);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.meta.range(from..=to).take(limit) {
            let (k, v) = kv?;
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Versions of `path` after `after`, oldest first: at most `limit` (and no more once past
    /// `MAX_PAGE_BYTES` stored, at least one), plus whether more follow.
    pub fn history(
        &self,
        user: UserId,
        path: &SyncPath,
        after: Option<Seq>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), StoreError> {
        let prefix = key(b"v/", &[&user.to_be_bytes(), path.as_str().as_bytes(), &[0]]);
        let start = history_key(user, path, after.map_or(0, |a| a.saturating_add(1)));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.meta.range(start..) {
            let (k, _) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = be_u64(&k[prefix.len()..]).ok_or_else(|| StoreError::Corrupt { key: format!("v/{path}") })?;
            if let Some((e, size)) = self.sized_entry(user, seq)? {
                if out.len() == limit || (!out.is_empty() && bytes + size > MAX_PAGE_BYTES) {
                    return Ok((out, true));
                }
                bytes += size;
                out.push(e);
            }
        }
        Ok((out, false))
    }

    /// Live heads strictly under directory `dir`.
    pub fn live_under(&self, user: UserId, dir: &SyncPath) -> Result<Vec<Entry>, StoreError> {
        let mut prefix = key(b"p/", &[&user.to_be_bytes(), dir.as_str().as_bytes()]);
        prefix.push(b'/');
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(&prefix) {
            let (_, v) = kv?;
            let seq = be_u64(&v).ok_or_else(|| StoreError::Corrupt { key: "p/".into() })?;
            if let Some(e) = self.entry(user, seq)?
                && !e.deleted
            {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Live heads ordered by path, strictly after `after`, as of the current head: at most
    /// `limit` (and no more once past `MAX_PAGE_BYTES` stored, at least one), plus whether more
    /// follow.
    pub fn tree_head(
        &self,
        user: UserId,
        after: Option<&SyncPath>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), StoreError> {
        let u = user.to_be_bytes();
        let prefix = key(b"p/", &[&u]);
        let start = match after {
            Some(a) => {
                let mut k = key(b"p/", &[&u, a.as_str().as_bytes()]);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.meta.range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = be_u64(&v).ok_or_else(|| StoreError::Corrupt { key: "p/".into() })?;
            let Some((e, size)) = self.sized_entry(user, seq)? else {
                continue;
            };
            if e.deleted {
                continue;
            }
            if out.len() == limit || (!out.is_empty() && bytes + size > MAX_PAGE_BYTES) {
                return Ok((out, true));
            }
            bytes += size;
            out.push(e);
        }
        Ok((out, false))
    }

    /// Live entries as of journal seq `at`, ordered by path (reads the history index).
    pub fn tree_at(&self, user: UserId, at: Seq) -> Result<Vec<Entry>, StoreError> {
        let prefix = key(b"v/", &[&user.to_be_bytes()]);
        let mut best: std::collections::BTreeMap<Vec<u8>, Seq> = Default::default();
        for kv in self.meta.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let body = &k[prefix.len()..];
            if body.len() < 9 {
                return Err(StoreError::Corrupt { key: "v/".into() });
            }
            let (path, seq) = body.split_at(body.len() - 9);
            let seq = be_u64(&seq[1..]).unwrap_or(0);
            if seq <= at {
                best.insert(path.to_vec(), seq);
            }
        }
        let mut out = Vec::new();
        for seq in best.into_values() {
            if let Some(e) = self.entry(user, seq)?
                && !e.deleted
            {
                out.push(e);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use shoal_protocol::{EntryKind, Manifest};

    use super::*;

    /// Opens the store at `dir` again once the handles before are dropped: sled lets go of its
    /// file lock from a background thread just after the last one goes.
    pub(crate) fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(dir) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("reopening: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
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
            old.insert(key(b"x/", &[chunk(i).as_bytes()]), loc(i).encode_record());
            old.insert(key(b"k/", &[&u64::from(1 + i % 2).to_be_bytes(), chunk(i).as_bytes()]), &[][..]);
        }
        old.insert(key(b"x/", &[chunk(n).as_bytes()]), &[1, 2, 3][..]);
        old.insert(key(b"x/", &[b"short"]), loc(0).encode_record());
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
