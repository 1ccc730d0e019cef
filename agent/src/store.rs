//! The agent's internal database: the only module that touches sled. For every path it holds
//! three records side by side: the scan index (what the local file looked like when last
//! hashed), the synced entry (the last state this device and the coordinator agreed on, the
//! planner's merge base) and the remote entry (the journal head seen so far). Beside them: the
//! outbox of commits not yet acknowledged and the journal cursor. All updates go through an
//! atomic `Batch`; the engine is the store's only writer.
//!
//! Layout (layout 2). sled keeps roughly 700 bytes of RAM per key whatever its cache size, so
//! paths are not keys: the records of one directory's entries live in *pages*, each holding up to
//! [`PAGE_MAX_SLOTS`] consecutive names (or [`PAGE_MAX_BYTES`]), so a folder of N files costs
//! about N / 128 keys.
//! - `p/<dir>\0<first name>` → page: `[2]` + postcard `Vec<StoredSlot>` sorted by name. `<dir>` is
//!   the parent directory's path (empty at the top); a page holds names from its key's name up to
//!   the next page's. A page that grows past its limits splits in two; an empty page is removed.
//!   A slot stores each distinct manifest once (index, synced and remote usually share one).
//! - `c/<bucket u16 BE>` → chunk map bucket: `[2]` + records sorted by (id, path), each `id (32)
//!   · offset (u64 LE) · len (u32 LE) · path length (u16 LE) · path`: where each chunk of each
//!   indexed file lies (first offset per file). The bucket is the top 14 bits of the chunk id: at
//!   most 16,384 keys, ~60 locations each at a million chunks. Buckets in the first form
//!   (`[1]` + postcard `Vec<ChunkLoc>`) are converted when read and rewritten in this form when
//!   next edited. A damaged bucket keeps the records before the damage; one out of order may
//!   keep a stale record or miss a lookup until its records are replaced: the map is a hint.
//! - `d/<seq u64 BE>` → chunk map delta record: `[1]` + the changes one batch made to the map,
//!   in order, each a tag (0 remove, 1 add) and a record in the bucket form. Written in the same
//!   atomic batch as the index records it is derived from, merged into the buckets in bulk and
//!   then removed (see `chunk_map`), so an edit's writes do not grow with the folder.
//! - `o/<id u64 BE>` → `[1]` + postcard `OutboxItem`.
//! - `q/<id u64 BE>` → empty: outbox item `id` was sent as a commit that may be recorded pending
//!   (written before it is sent, removed with the item), so a retry after a lost answer or a
//!   crash sends the commit again first and learns what it owes, rather than uploading first.
//! - `u/<version u64 BE>` → `[1]` + postcard `Owed`: a version this device committed before the
//!   origin had its chunks (pending), whose upload it still owes.
//! - `m/cursor` → journal cursor (u64 BE); `m/layout` → `[2]`.
//!
//! Layout 1 (one key per path and tree: `i/`, `s/`, `r/` + path → `[1]` + postcard record) is
//! migrated on open, in atomic steps that can resume after a crash.

mod chunk_map;

#[cfg(test)]
use chunk_map::{BUCKET_RECORD_HEAD, bucket_records, edit_bucket};
use chunk_map::{Delta, MapEdit, chunk_key, current_bucket, locations};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use shoal_protocol::{Change, ChunkId, CommitId, DeviceId, Entry, EntryKind, Manifest, Seq, SyncPath};

/// Format version of outbox items (and of layout-1 records).
const RECORD_VERSION: u8 = 1;
/// Format version of chunk map buckets.
const BUCKET_VERSION: u8 = 2;
/// Format version of pages.
const PAGE_VERSION: u8 = 2;
/// The current layout, stored under `m/layout`.
const LAYOUT: u8 = 2;
/// Most slots in one page: a change rewrites one page, so pages stay small; a folder of a
/// million files still needs only ~8,000 keys.
pub const PAGE_MAX_SLOTS: usize = 256;
/// Most encoded bytes in one page (a page with a single slot may exceed it: a file with a huge
/// manifest).
pub const PAGE_MAX_BYTES: usize = 64 * 1024;
/// Layout-1 records moved per atomic migration step.
const MIGRATE_STEP: usize = 20_000;
/// sled's page cache. Records are read per directory page, but chunk map buckets are touched at
/// random (by content hash): the cache holds a million-file folder's map (~65 MB) with room for
/// the pages around it. 16 MiB paged buckets in and out on nearly every edit; at 64 MiB, paging
/// in was still ~3 % of the sending agent's CPU in a million-file initial sync, whose peak
/// memory 128 MiB takes from 227 to 269 MiB (100,000 files: unchanged, the store fits either).
const CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// What a local path looked like when it was last scanned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRec {
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    /// Changes on every write and cannot be set back by tools like `touch -r`.
    pub ctime_ns: i64,
    pub inode: u64,
    pub mode: u32,
    /// `Some` for files.
    pub manifest: Option<Manifest>,
    /// When the content was last read, for spotting writes within one mtime tick.
    pub hashed_ns: i64,
}

impl IndexRec {
    /// `true` when `other` has the same size, mtime, ctime, inode and mode.
    pub fn same_stat(&self, other: &IndexRec) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
            && self.inode == other.inode
            && self.mode == other.mode
    }
}

/// A commit waiting to be sent. Durable before anything is sent; removed in the same batch that
/// records its acknowledgement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owed {
    pub path: SyncPath,
    pub manifest: Manifest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxItem {
    pub commit_id: CommitId,
    pub changes: Vec<Change>,
}

/// Everything the store knows of one path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    pub index: Option<IndexRec>,
    pub synced: Option<Entry>,
    pub remote: Option<Entry>,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.index.is_none() && self.synced.is_none() && self.remote.is_none()
    }
}

/// An index record as stored in a page: its manifest is a position in the slot's manifests.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct StoredIndex {
    kind: EntryKind,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
    mode: u32,
    manifest: Option<u32>,
    hashed_ns: i64,
}

/// An entry as stored in a page: no path (the page and name give it), manifest by position.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct StoredEntry {
    kind: EntryKind,
    manifest: Option<u32>,
    exec: bool,
    mtime_ns: i64,
    deleted: bool,
    version: Seq,
    base: Option<Seq>,
    device: DeviceId,
    time_ms: u64,
}

/// One name's records in a page.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct StoredSlot {
    name: String,
    index: Option<StoredIndex>,
    synced: Option<StoredEntry>,
    remote: Option<StoredEntry>,
    /// The distinct manifests the three records use.
    manifests: Vec<Manifest>,
}

fn intern(manifests: &mut Vec<Manifest>, m: &Option<Manifest>) -> Option<u32> {
    let m = m.as_ref()?;
    let i = match manifests.iter().position(|x| x == m) {
        Some(i) => i,
        None => {
            manifests.push(m.clone());
            manifests.len() - 1
        }
    };
    Some(i as u32)
}

impl StoredSlot {
    fn new(name: &str, slot: &Slot) -> StoredSlot {
        let mut manifests = Vec::new();
        let mut entry = |e: &Option<Entry>| {
            e.as_ref().map(|e| StoredEntry {
                kind: e.kind,
                manifest: intern(&mut manifests, &e.manifest),
                exec: e.exec,
                mtime_ns: e.mtime_ns,
                deleted: e.deleted,
                version: e.version,
                base: e.base,
                device: e.device,
                time_ms: e.time_ms,
            })
        };
        let synced = entry(&slot.synced);
        let remote = entry(&slot.remote);
        let index = slot.index.as_ref().map(|r| StoredIndex {
            kind: r.kind,
            size: r.size,
            mtime_ns: r.mtime_ns,
            ctime_ns: r.ctime_ns,
            inode: r.inode,
            mode: r.mode,
            manifest: intern(&mut manifests, &r.manifest),
            hashed_ns: r.hashed_ns,
        });
        StoredSlot { name: name.to_string(), index, synced, remote, manifests }
    }

    /// The slot, or `None` when a manifest position is out of range (a damaged page).
    fn to_slot(&self, path: &SyncPath) -> Option<Slot> {
        let manifest = |i: Option<u32>| -> Option<Option<Manifest>> {
            match i {
                None => Some(None),
                Some(i) => self.manifests.get(i as usize).cloned().map(Some),
            }
        };
        let entry = |e: &Option<StoredEntry>| -> Option<Option<Entry>> {
            let Some(e) = e else { return Some(None) };
            Some(Some(Entry {
                path: path.clone(),
                kind: e.kind,
                manifest: manifest(e.manifest)?,
                exec: e.exec,
                mtime_ns: e.mtime_ns,
                deleted: e.deleted,
                version: e.version,
                base: e.base,
                device: e.device,
                time_ms: e.time_ms,
            }))
        };
        let index = match &self.index {
            None => None,
            Some(r) => Some(IndexRec {
                kind: r.kind,
                size: r.size,
                mtime_ns: r.mtime_ns,
                ctime_ns: r.ctime_ns,
                inode: r.inode,
                mode: r.mode,
                manifest: manifest(r.manifest)?,
                hashed_ns: r.hashed_ns,
            }),
        };
        Some(Slot { index, synced: entry(&self.synced)?, remote: entry(&self.remote)? })
    }
}

/// What a batch does to one field of a slot.
#[derive(Debug, Clone, Default)]
enum Set<T> {
    #[default]
    Keep,
    To(Option<T>),
}

impl<T> Set<T> {
    fn apply(self, field: &mut Option<T>) {
        if let Set::To(v) = self {
            *field = v;
        }
    }
}

/// The changes a batch makes to one path's slot.
#[derive(Debug, Default)]
struct Edit {
    index: Set<IndexRec>,
    synced: Set<Entry>,
    remote: Set<Entry>,
    /// Set the remote entry only if it is newer than the stored one.
    remote_if_newer: Option<Entry>,
}

/// A set of updates applied atomically. Later updates of the same record win.
#[derive(Default)]
pub struct Batch {
    slots: BTreeMap<SyncPath, Edit>,
    raw: sled::Batch,
    raw_used: bool,
}

impl Batch {
    fn edit(&mut self, p: &SyncPath) -> &mut Edit {
        self.slots.entry(p.clone()).or_default()
    }
    pub fn put_index(&mut self, p: &SyncPath, rec: &IndexRec) {
        self.edit(p).index = Set::To(Some(rec.clone()));
    }
    pub fn del_index(&mut self, p: &SyncPath) {
        self.edit(p).index = Set::To(None);
    }
    pub fn put_synced(&mut self, e: &Entry) {
        self.edit(&e.path).synced = Set::To(Some(e.clone()));
    }
    pub fn del_synced(&mut self, p: &SyncPath) {
        self.edit(p).synced = Set::To(None);
    }
    pub fn put_remote(&mut self, e: &Entry) {
        let ed = self.edit(&e.path);
        ed.remote = Set::To(Some(e.clone()));
        ed.remote_if_newer = None;
    }
    /// Records `e` as the remote head unless a newer version is already known (a replayed
    /// commit's entries may be older than what the journal already showed).
    pub fn put_remote_if_newer(&mut self, e: &Entry) {
        self.edit(&e.path).remote_if_newer = Some(e.clone());
    }
    pub fn set_cursor(&mut self, seq: Seq) {
        self.raw.insert(b"m/cursor".to_vec(), seq.to_be_bytes().to_vec());
        self.raw_used = true;
    }
    pub fn put_outbox(&mut self, id: u64, item: &OutboxItem) {
        self.raw.insert(outbox_key(id), encode(item));
        self.raw_used = true;
    }
    pub fn put_owed(&mut self, version: Seq, owed: &Owed) {
        self.raw.insert(owed_key(version), encode(owed));
        self.raw_used = true;
    }
    pub fn del_owed(&mut self, version: Seq) {
        self.raw.remove(owed_key(version));
        self.raw_used = true;
    }
    pub fn del_outbox(&mut self, id: u64) {
        self.raw.remove(outbox_key(id));
        self.raw.remove(sent_pending_key(id));
        self.raw_used = true;
    }
    /// Clears the mark of an item whose peer-first commit was refused outright (so it cannot be
    /// pending): it may be sent upload-first.
    pub fn unmark_sent_pending(&mut self, id: u64) {
        self.raw.remove(sent_pending_key(id));
        self.raw_used = true;
    }

    /// Notes that outbox item `id` is about to be sent as a commit that may be recorded pending.
    pub fn mark_sent_pending(&mut self, id: u64) {
        self.raw.insert(sent_pending_key(id), Vec::new());
        self.raw_used = true;
    }
    fn raw_remove(&mut self, key: sled::IVec) {
        self.raw.remove(key);
        self.raw_used = true;
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && !self.raw_used
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    out.extend(postcard::to_stdvec(v).expect("postcard serializes agent records"));
    out
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

fn owed_key(version: Seq) -> Vec<u8> {
    let mut k = b"u/".to_vec();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn sent_pending_key(id: u64) -> Vec<u8> {
    let mut k = b"q/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn outbox_key(id: u64) -> Vec<u8> {
    let mut k = b"o/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// `p/<dir>\0`: the start of a directory's page keys (`None`: the top level).
fn dir_prefix(dir: Option<&SyncPath>) -> Vec<u8> {
    let mut k = b"p/".to_vec();
    if let Some(d) = dir {
        k.extend_from_slice(d.as_str().as_bytes());
    }
    k.push(0);
    k
}

/// The directory a page key belongs to.
fn key_dir(key: &[u8]) -> Option<Option<SyncPath>> {
    let rest = key.strip_prefix(b"p/")?;
    let end = rest.iter().position(|&b| b == 0)?;
    if end == 0 {
        return Some(None);
    }
    SyncPath::parse(std::str::from_utf8(&rest[..end]).ok()?).ok().map(Some)
}

fn child(dir: Option<&SyncPath>, name: &str) -> Option<SyncPath> {
    match dir {
        Some(d) => SyncPath::parse(&format!("{d}/{name}")).ok(),
        None => SyncPath::parse(name).ok(),
    }
}

fn encode_page(slots: &[StoredSlot]) -> Vec<u8> {
    let mut out = vec![PAGE_VERSION];
    out.extend(postcard::to_stdvec(slots).expect("postcard serializes pages"));
    out
}

fn decode_page(key: &[u8], bytes: &[u8]) -> Vec<StoredSlot> {
    let page = match bytes.split_first() {
        Some((&PAGE_VERSION, rest)) => postcard::from_bytes::<Vec<StoredSlot>>(rest).ok(),
        _ => None,
    };
    page.unwrap_or_else(|| {
        // Its paths read as unknown: files are hashed again, and a missing merge base turns
        // differences into conflicted copies, never overwrites.
        tracing::warn!(key = %String::from_utf8_lossy(key), "skipping an unreadable database page");
        Vec::new()
    })
}

/// Pages decoded by `Store::get_cached`, for one read-only pass (it does not see later writes).
#[derive(Default)]
pub struct PageCache(std::collections::HashMap<Vec<u8>, Vec<StoredSlot>>);

/// The agent database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    state: sled::Tree,
    dir: std::path::PathBuf,
    /// The database's files, synced after each flush.
    files: Arc<shoal_sys::dbsync::DbFiles>,
    /// Slots decoded so far (every slot of every page read), for the status's debug counters.
    reads: Arc<AtomicU64>,
    /// The chunk map's changes not merged into its buckets yet.
    delta: Arc<std::sync::Mutex<Delta>>,
    /// When the delta is merged: least pairs, records, most pairs (the defaults but in tests).
    merge_at: (usize, usize, usize),
}

/// Where one chunk lies in a file of the folder (as last scanned or written by the agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    pub id: ChunkId,
    pub path: SyncPath,
    pub offset: u64,
    pub len: u32,
}

/// The three trees in full, for a full reconciliation.
#[derive(Debug, Default)]
pub struct Trees {
    pub index: BTreeMap<SyncPath, IndexRec>,
    pub synced: BTreeMap<SyncPath, Entry>,
    pub remote: BTreeMap<SyncPath, Entry>,
}

impl Trees {
    fn add(&mut self, path: SyncPath, slot: Slot) {
        if let Some(r) = slot.index {
            self.index.insert(path.clone(), r);
        }
        if let Some(e) = slot.synced {
            self.synced.insert(path.clone(), e);
        }
        if let Some(e) = slot.remote {
            self.remote.insert(path, e);
        }
    }
}

impl Store {
    /// Opens the database, migrating an older layout. A database sled cannot read is moved aside
    /// and rebuilt: it is a cache of the disk and the coordinator, and the planner treats an
    /// empty merge base safely (differences become conflicted copies, never overwrites).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        crate::config::create_private_dir(dir)?;
        let open = || {
            shoal_sys::dbsync::open_waiting(|| {
                sled::Config::new().path(dir).flush_every_ms(Some(500)).cache_capacity(CACHE_BYTES).open()
            })
        };
        let db = match open() {
            Ok(db) => db,
            Err(sled::Error::Corruption { .. }) => {
                let aside = dir.with_extension(format!("corrupt-{}", std::process::id()));
                tracing::error!(db = %dir.display(), aside = %aside.display(), "agent database is corrupt; rebuilding it");
                std::fs::rename(dir, &aside)?;
                open()?
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("opening {} (is another shoal process using this home?)", dir.display()));
            }
        };
        // sled creates its files with the process umask; the directory is 0700 already, and what
        // sled made so far loses group and other access too.
        if let Err(e) = crate::config::tighten_tree(dir) {
            tracing::warn!(db = %dir.display(), error = %e, "cannot restrict the database's files to their owner");
        }
        let state = db.open_tree("state")?;
        let files = shoal_sys::dbsync::DbFiles::new(dir)
            .with_context(|| format!("syncing the agent database in {}", dir.display()))?;
        let delta = Arc::new(std::sync::Mutex::new(Delta::load(&state)?));
        let store = Store {
            db,
            state,
            dir: dir.to_path_buf(),
            files: Arc::new(files),
            reads: Arc::default(),
            delta,
            merge_at: (chunk_map::MERGE_PAIRS, chunk_map::MERGE_RECORDS, chunk_map::MERGE_PAIRS_MAX),
        };
        store.migrate(MIGRATE_STEP)?;
        Ok(store)
    }

    /// Moves layout-1 records (one key per path and tree) into pages, a step at a time: each
    /// step removes the old keys in the same atomic batch that writes their pages, so an
    /// interrupted migration resumes where it stopped.
    fn migrate(&self, step: usize) -> anyhow::Result<()> {
        match self.state.get(b"m/layout")?.as_deref() {
            Some([LAYOUT]) => return Ok(()),
            Some(other) => anyhow::bail!(
                "the agent database in {} has layout {other:?}, which this version of shoal does not know \
                 (was it written by a newer version?)",
                self.dir.display()
            ),
            None => {}
        }
        let started = std::time::Instant::now();
        let mut moved = 0usize;
        loop {
            let mut batch = Batch::default();
            let mut n = 0;
            for prefix in [&b"i/"[..], b"s/", b"r/"] {
                for kv in self.state.scan_prefix(prefix).take(step - n) {
                    let (k, v) = kv?;
                    n += 1;
                    let path = std::str::from_utf8(&k[2..]).ok().and_then(|s| SyncPath::parse(s).ok());
                    match (prefix, path) {
                        (b"i/", Some(p)) => match decode::<IndexRec>(&v) {
                            Some(r) => batch.put_index(&p, &r),
                            None => tracing::warn!(path = %p.escaped(), "dropping an unreadable index record"),
                        },
                        (_, Some(p)) => match decode::<Entry>(&v).filter(|e| e.path == p) {
                            Some(e) if prefix == b"s/" => batch.put_synced(&e),
                            Some(e) => batch.put_remote(&e),
                            None => tracing::warn!(path = %p.escaped(), "dropping an unreadable database record"),
                        },
                        (_, None) => {
                            tracing::warn!(key = %String::from_utf8_lossy(&k), "dropping a record with a bad path")
                        }
                    }
                    batch.raw_remove(k);
                }
            }
            if n == 0 {
                break;
            }
            self.apply(batch)?;
            moved += n;
        }
        self.state.insert(b"m/layout", &[LAYOUT])?;
        self.db.flush()?;
        if moved > 0 {
            tracing::info!(records = moved, elapsed = ?started.elapsed(), "migrated the agent database to layout 2");
        }
        Ok(())
    }

    /// Applies `batch` atomically: every page it touches is read, edited, split if it grew too
    /// large, and written back in one sled batch.
    pub fn apply(&self, batch: Batch) -> anyhow::Result<()> {
        self.apply_inner(batch).map(drop)
    }

    /// Applies `batch` and returns the paths it gave a remote entry that the synced tree does
    /// not match yet (the journal entries this device still has to act on; its own acknowledged
    /// commits are already matched).
    pub fn apply_unsynced(&self, batch: Batch) -> anyhow::Result<Vec<SyncPath>> {
        self.apply_inner(batch)
    }

    fn apply_inner(&self, batch: Batch) -> anyhow::Result<Vec<SyncPath>> {
        let mut unsynced = Vec::new();
        if batch.is_empty() {
            return Ok(unsynced);
        }
        let Batch { slots, raw: mut out, .. } = batch;
        // Chunk map changes: (chunk, path) pairs to drop, then locations to add.
        let mut map_edit = MapEdit::default();
        // Group the edits by the page that holds (or would hold) each path.
        type Edits = Vec<(SyncPath, Edit)>;
        let mut pages: BTreeMap<Vec<u8>, (Option<sled::IVec>, Edits)> = BTreeMap::new();
        for (path, edit) in slots {
            let (key, old) = self.page_of(&path)?;
            pages.entry(key).or_insert_with(|| (old, Vec::new())).1.push((path, edit));
        }
        for (key, (old, edits)) in pages {
            let mut page = old.map(|v| decode_page(&key, &v)).unwrap_or_default();
            self.reads.fetch_add(page.len() as u64, Ordering::Relaxed);
            let existed = !page.is_empty();
            // A page its edits leave as it was is not written (a device pulling back its own
            // commits, already recorded from their answers, changes nothing).
            let mut changed = false;
            for (path, edit) in edits {
                let name = path.file_name();
                let at = page.binary_search_by(|s| s.name.as_str().cmp(name));
                let mut slot = match at {
                    Ok(i) => page[i].to_slot(&path).unwrap_or_default(),
                    Err(_) => Slot::default(),
                };
                let remote_set = matches!(edit.remote, Set::To(Some(_)));
                let old_manifest = slot.index.as_ref().and_then(|r| r.manifest.clone());
                edit.index.apply(&mut slot.index);
                let new_manifest = slot.index.as_ref().and_then(|r| r.manifest.as_ref());
                if old_manifest.as_ref() != new_manifest {
                    map_edit.drop.extend(old_manifest.iter().flat_map(|m| locations(&path, m)).map(|l| (l.id, l.path)));
                    map_edit.add.extend(new_manifest.iter().flat_map(|m| locations(&path, m)));
                }
                edit.synced.apply(&mut slot.synced);
                edit.remote.apply(&mut slot.remote);
                if remote_set {
                    let matched = match (&slot.remote, &slot.synced) {
                        (Some(r), Some(s)) => r.version == s.version,
                        (Some(r), None) => r.deleted,
                        _ => false,
                    };
                    if !matched {
                        unsynced.push(path.clone());
                    }
                }
                if let Some(e) = edit.remote_if_newer
                    && slot.remote.as_ref().is_none_or(|r| r.version < e.version)
                {
                    slot.remote = Some(e);
                }
                match (at, slot.is_empty()) {
                    (Ok(i), true) => {
                        page.remove(i);
                        changed = true;
                    }
                    (Ok(i), false) => {
                        let new = StoredSlot::new(name, &slot);
                        if new != page[i] {
                            page[i] = new;
                            changed = true;
                        }
                    }
                    (Err(i), false) => {
                        page.insert(i, StoredSlot::new(name, &slot));
                        changed = true;
                    }
                    (Err(_), true) => {}
                }
            }
            if !changed {
                continue;
            }
            if page.is_empty() {
                if existed {
                    out.remove(key);
                }
                continue;
            }
            let prefix_len = key.iter().position(|&b| b == 0).map_or(key.len(), |i| i + 1);
            write_page(&mut out, &key[..prefix_len], key.clone(), &page);
        }
        if map_edit.is_empty() {
            self.state.apply_batch(out)?;
            return Ok(unsynced);
        }
        let seq = self.delta.lock().expect("chunk map delta lock").take_seq();
        out.insert(&chunk_map::delta_key(seq)[..], map_edit.encode());
        self.state.apply_batch(out)?;
        let full = {
            let mut delta = self.delta.lock().expect("chunk map delta lock");
            delta.applied(map_edit);
            delta.full(self.merge_at)
        };
        // The batch is applied whatever the merge does: a merge that fails leaves the delta as
        // it was (merging again reads the same), and the next batch tries again.
        if full && let Err(e) = chunk_map::merge(&self.state, &self.delta) {
            tracing::warn!(error = %e, "cannot merge the chunk map's recent changes; will retry");
        }
        Ok(unsynced)
    }

    /// Where the folder's files hold `ids`: one location per chunk found (the first by path).
    /// Reads one bucket per distinct bucket of the ids, whatever the folder's size, with the
    /// chunk map's unmerged changes over it.
    pub fn chunk_locations<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a ChunkId>,
    ) -> anyhow::Result<std::collections::HashMap<ChunkId, ChunkLoc>> {
        let mut by_bucket: BTreeMap<[u8; 4], Vec<ChunkId>> = BTreeMap::new();
        for id in ids {
            by_bucket.entry(chunk_key(id)).or_default().push(*id);
        }
        // The delta is read before the buckets: a merge rewrites buckets before it empties the
        // delta, and a bucket read with the delta applied over it again reads the same.
        let mut delta: std::collections::HashMap<ChunkId, Vec<(SyncPath, chunk_map::Net)>> = {
            let d = self.delta.lock().expect("chunk map delta lock");
            by_bucket.values().flatten().filter_map(|id| Some((*id, d.of(id)?.to_vec()))).collect()
        };
        let mut out = std::collections::HashMap::new();
        for (key, mut ids) in by_bucket {
            let v = self.state.get(key)?;
            let v = v.as_deref().map(current_bucket);
            let records = v.as_deref().map(chunk_map::bucket_records).unwrap_or_default();
            ids.sort_unstable();
            ids.dedup();
            let mut records = records.into_iter().peekable();
            for id in ids {
                let changed = delta.remove(&id).unwrap_or_default();
                while records.next_if(|r| *r.id < id.0).is_some() {}
                // The first stored record of the chunk (records are sorted by path) that the
                // delta leaves alone and whose path still parses (a damaged value is passed
                // over: the map is only a hint), against the first the delta adds.
                let mut best: Option<ChunkLoc> = None;
                while let Some(r) = records.next_if(|r| *r.id == id.0) {
                    if best.is_none()
                        && !changed.iter().any(|(p, _)| p.as_str() == r.path)
                        && let Ok(path) = SyncPath::parse(r.path)
                    {
                        best = Some(ChunkLoc { id, path, offset: r.offset, len: r.len });
                    }
                }
                for (path, net) in changed {
                    if let Some((offset, len)) = net
                        && best.as_ref().is_none_or(|b| path < b.path)
                    {
                        best = Some(ChunkLoc { id, path, offset, len });
                    }
                }
                if let Some(l) = best {
                    out.insert(id, l);
                }
            }
        }
        Ok(out)
    }

    /// The key of the page that holds (or would hold) `path`, and its current value.
    fn page_of(&self, path: &SyncPath) -> anyhow::Result<(Vec<u8>, Option<sled::IVec>)> {
        let start = dir_prefix(path.parent().as_ref());
        let mut probe = start.clone();
        probe.extend_from_slice(path.file_name().as_bytes());
        Ok(match self.state.range(start.clone()..=probe).next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                (k.to_vec(), Some(v))
            }
            None => (start, None),
        })
    }

    /// Makes everything applied so far durable. sled's own flush leaves the drive's cache and
    /// large values (blob files) unsynced, so the database's files are synced after it
    /// (`DbFiles`): a lost record could otherwise read as a remote deletion after a power cut.
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.db.flush_async().await?;
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.sync()).await??;
        Ok(())
    }

    /// Slots decoded since the store was opened: every slot of every page read, by lookups,
    /// scans and the read half of every update.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Everything known of `path`.
    pub fn get(&self, path: &SyncPath) -> anyhow::Result<Slot> {
        self.get_cached(path, &mut PageCache::default())
    }

    /// Everything known of `path`, decoding its page only if `cache` does not hold it yet: many
    /// lookups in one directory cost one page decode.
    pub fn get_cached(&self, path: &SyncPath, cache: &mut PageCache) -> anyhow::Result<Slot> {
        let (key, page) = self.page_of(path)?;
        let Some(page) = page else { return Ok(Slot::default()) };
        let page = cache.0.entry(key).or_insert_with_key(|key| {
            let page = decode_page(key, &page);
            self.reads.fetch_add(page.len() as u64, Ordering::Relaxed);
            page
        });
        Ok(match page.binary_search_by(|s| s.name.as_str().cmp(path.file_name())) {
            Ok(i) => page[i].to_slot(path).unwrap_or_default(),
            Err(_) => Slot::default(),
        })
    }

    /// Visits every slot in the pages whose keys start with `prefix`.
    fn visit(&self, prefix: &[u8], mut f: impl FnMut(SyncPath, Slot)) -> anyhow::Result<()> {
        for kv in self.state.scan_prefix(prefix) {
            let (k, v) = kv?;
            let Some(dir) = key_dir(&k) else { continue };
            for s in decode_page(&k, &v) {
                self.reads.fetch_add(1, Ordering::Relaxed);
                let Some(path) = child(dir.as_ref(), &s.name) else { continue };
                match s.to_slot(&path) {
                    Some(slot) => f(path, slot),
                    None => tracing::warn!(path = %path.escaped(), "skipping an unreadable database record"),
                }
            }
        }
        Ok(())
    }

    /// The entries directly inside `dir` (`None`: the top level).
    pub fn children(&self, dir: Option<&SyncPath>, f: impl FnMut(SyncPath, Slot)) -> anyhow::Result<()> {
        self.visit(&dir_prefix(dir), f)
    }

    /// Every entry below `dir` (not `dir` itself).
    pub fn subtree(&self, dir: &SyncPath, mut f: impl FnMut(SyncPath, Slot)) -> anyhow::Result<()> {
        self.visit(&dir_prefix(Some(dir)), &mut f)?;
        let mut deeper = b"p/".to_vec();
        deeper.extend_from_slice(dir.as_str().as_bytes());
        deeper.push(b'/');
        self.visit(&deeper, f)
    }

    /// The three trees in full.
    pub fn trees(&self) -> anyhow::Result<Trees> {
        let mut t = Trees::default();
        self.visit(b"p/", |p, s| t.add(p, s))?;
        Ok(t)
    }

    pub fn cursor(&self) -> anyhow::Result<Seq> {
        Ok(self.state.get(b"m/cursor")?.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok()).map_or(0, u64::from_be_bytes))
    }

    pub fn outbox(&self) -> anyhow::Result<Vec<(u64, OutboxItem)>> {
        let mut out = Vec::new();
        for kv in self.state.scan_prefix(b"o/") {
            let (k, v) = kv?;
            let id = <[u8; 8]>::try_from(&k[2..]).map(u64::from_be_bytes).unwrap_or(0);
            match decode(&v) {
                Some(item) => out.push((id, item)),
                None => tracing::warn!(id, "dropping an unreadable outbox item; the next scan re-plans it"),
            }
        }
        Ok(out)
    }

    /// `true` if outbox item `id` was sent as a commit that may have been recorded pending.
    pub fn sent_pending(&self, id: u64) -> anyhow::Result<bool> {
        Ok(self.state.contains_key(sent_pending_key(id))?)
    }

    /// The uploads this device owes for its pending versions, oldest first.
    pub fn owed(&self) -> anyhow::Result<Vec<(Seq, Owed)>> {
        let mut out = Vec::new();
        for kv in self.state.scan_prefix(b"u/") {
            let (k, v) = kv?;
            let version = <[u8; 8]>::try_from(&k[2..]).map(u64::from_be_bytes).unwrap_or(0);
            match decode(&v) {
                Some(o) => out.push((version, o)),
                None => tracing::warn!(version, "dropping an unreadable owed upload"),
            }
        }
        Ok(out)
    }

    pub fn next_outbox_id(&self) -> anyhow::Result<u64> {
        Ok(self.db.generate_id()?)
    }
}

/// Writes `page` under `key`, split into halves while it is over the limits. Every half after
/// the first is keyed by its first name under the directory's `prefix`.
fn write_page(out: &mut sled::Batch, prefix: &[u8], key: Vec<u8>, page: &[StoredSlot]) {
    let bytes = encode_page(page);
    if page.len() > 1 && (page.len() > PAGE_MAX_SLOTS || bytes.len() > PAGE_MAX_BYTES) {
        let (low, high) = page.split_at(page.len() / 2);
        let mut high_key = prefix.to_vec();
        high_key.extend_from_slice(high[0].name.as_bytes());
        write_page(out, prefix, key, low);
        write_page(out, prefix, high_key, high);
    } else {
        out.insert(key, bytes);
    }
}

#[cfg(test)]
mod tests;
