//! The chunk store: chunks appended to packs on a [`PackBackend`] (local files by default), each
//! pack a sequence of frames (32-byte id, 4-byte length, bytes — the wire's batch format), with an
//! index from chunk id to (pack, offset, length) in the metadata store. One file per chunk cost
//! ~0.4 ms of file system work per chunk here (16k chunks per GiB), and one object per chunk costs
//! a request per chunk; appending a batch is one write. The coordinator never interprets chunk
//! bytes beyond checking that their BLAKE3 matches the id.
//!
//! Durability: appends are not made durable one by one. A commit that references chunks calls
//! [`ChunkStore::sync`] (for local packs, fdatasync of every pack written since the last sync; for
//! an object store, the upload of the pack, which seals it) before it is acknowledged, and
//! [`ChunkStore::start_writeback`] lets the backend catch up meanwhile. A pack is never appended
//! to across restarts, so a torn tail after a crash is never written over, and a pack number is
//! never used twice: it is reserved durably in the metadata store before the pack is created. At
//! start-up, index entries that point past the end of their pack (or into a pack that is gone)
//! are dropped, so a chunk lost in a crash reads as absent and is asked for again.
//!
//! Integrity: every read is checked against the chunk's BLAKE3 before a byte is served. A chunk
//! whose stored bytes fail the check is quarantined (it reads as absent from then on, so
//! `chunks/missing` asks devices for it again), logged and counted; a correct upload stores it
//! anew. An upload of a chunk that is already stored re-checks the stored copy the same way.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_protocol::ChunkId;
use shoal_protocol::api::FRAME_HEADER;

use crate::store::{ChunkLoc, Store, StoreError};
use shoal_packs::frames::{append_frames, first_bad, run_range};
use shoal_packs::{MakeDurable, PackBackend, PackError, PackErrorKind, PackId, PackWriter};

/// Why the chunk store could not do what was asked.
#[derive(Debug)]
pub enum ChunkError {
    /// The chunk is not stored (never was, lost in a crash, or quarantined).
    NotFound(ChunkId),
    /// The chunk's stored bytes failed their BLAKE3 check (it is quarantined now).
    Corrupt(ChunkId),
    /// The pack backend failed.
    Backend(PackError),
    /// The chunk index (in the metadata store) failed.
    Index(StoreError),
}

impl ChunkError {
    /// `true` when the chunk cannot be served intact, so a device should upload it again.
    pub fn unavailable(&self) -> bool {
        matches!(self, ChunkError::NotFound(_) | ChunkError::Corrupt(_))
            || matches!(self, ChunkError::Backend(e) if e.kind == PackErrorKind::NotFound)
    }
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkError::NotFound(id) => write!(f, "chunk {id} is not stored"),
            ChunkError::Corrupt(id) => write!(f, "stored chunk {id} failed its BLAKE3 check"),
            ChunkError::Backend(e) => write!(f, "pack backend: {e}"),
            ChunkError::Index(e) => write!(f, "chunk index: {e}"),
        }
    }
}

impl std::error::Error for ChunkError {}

impl From<PackError> for ChunkError {
    fn from(e: PackError) -> Self {
        ChunkError::Backend(e)
    }
}

impl From<StoreError> for ChunkError {
    fn from(e: StoreError) -> Self {
        ChunkError::Index(e)
    }
}

pub type ChunkResult<T> = Result<T, ChunkError>;

/// Packs owed durability (closed or sealed, and not durable yet, including those being made
/// durable) at most: an upload that finds more makes them durable first (and is refused if that
/// fails), since each may hold a pack's bytes in memory.
const MAX_OWED: usize = 4;

struct Writer {
    /// The pack appends go to, and its writer; `None` until the first append after start, after
    /// a sealing sync, or after a failed append.
    current: Option<(PackId, Box<dyn PackWriter>)>,
    /// The lowest number a new pack may take: above every pack the backend had at start.
    next_floor: PackId,
    len: u64,
    /// The current pack took appends that no durability job covers yet.
    current_dirty: bool,
    /// Durability jobs for packs closed (or sealed) and not yet durable, with their pack.
    owed: Vec<(PackId, MakeDurable)>,
    /// Jobs taken from `owed` by a sync that is running them.
    running: usize,
    /// Appends so far, and how many of them the last completed sync covered.
    appended: u64,
    synced: u64,
}

/// Durability jobs run at once, at most: packs are independent, and a remote store's latency,
/// not its bandwidth, is what one PUT waits for.
const JOBS_AT_ONCE: usize = 4;

/// Runs durability jobs, up to [`JOBS_AT_ONCE`] at a time; returns each with its result.
fn run_jobs(jobs: Vec<(PackId, MakeDurable)>) -> Vec<(PackId, MakeDurable, Result<(), PackError>)> {
    let mut out = Vec::with_capacity(jobs.len());
    let mut rest = jobs.into_iter().peekable();
    while rest.peek().is_some() {
        let batch: Vec<_> = rest.by_ref().take(JOBS_AT_ONCE).collect();
        if batch.len() == 1 {
            out.extend(batch.into_iter().map(|(pack, mut job)| {
                let r = job();
                (pack, job, r)
            }));
            continue;
        }
        std::thread::scope(|s| {
            let running: Vec<_> = batch
                .into_iter()
                .map(|(pack, mut job)| {
                    s.spawn(move || {
                        let r = job();
                        (pack, job, r)
                    })
                })
                .collect();
            out.extend(running.into_iter().map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))));
        });
    }
    out
}

impl Writer {
    /// Packs not durable yet, owed or being made durable.
    fn held(&self) -> usize {
        self.owed.len() + self.running
    }
}

/// Content-addressed chunks in packs, on a [`PackBackend`].
#[derive(Clone)]
pub struct ChunkStore {
    backend: Arc<dyn PackBackend>,
    index: Store,
    writer: Arc<Mutex<Writer>>,
    /// Length of every pack known to hold chunks: listed at start, then as appended.
    sizes: Arc<Mutex<HashMap<PackId, u64>>>,
    /// Packs whose bytes cannot be read before they are durable (staged for an object store).
    unreadable: Arc<Mutex<HashSet<PackId>>>,
    flushing: Arc<AtomicBool>,
    /// One sync at a time: a caller that finds one running waits for it, then syncs what is left.
    sync_lock: Arc<Mutex<()>>,
    /// Chunks whose stored bytes failed their hash check since start.
    corrupt: Arc<AtomicU64>,
}

/// What a read of several chunks produced: the complete, verified frames of a prefix of the
/// request, and why it stopped early, if it did.
pub struct Frames {
    pub pieces: Vec<Bytes>,
    /// Chunk bytes in `pieces`, frame headers not counted.
    pub chunk_bytes: u64,
    pub error: Option<ChunkError>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChunkStore {
    /// Opens the store on `backend`; new chunks go to a new pack after the highest existing one,
    /// and index entries whose bytes are not (wholly) in the backend are dropped.
    pub fn open(backend: Arc<dyn PackBackend>, index: Store) -> ChunkResult<Self> {
        let sizes: HashMap<PackId, u64> = backend.list()?.into_iter().map(|p| (p.pack, p.len)).collect();
        let last = sizes.keys().copied().max().unwrap_or(0);
        let lost = index.chunks_not(|l| sizes.get(&l.pack).is_some_and(|&size| l.offset + u64::from(l.len) <= size));
        if !lost.is_empty() {
            tracing::warn!(
                chunks = lost.len(),
                backend = backend.describe(),
                "chunk index entries point past the end of their packs (bytes lost in a crash); forgetting them"
            );
            index.drop_chunk_locs(&lost)?;
            index.flush_blocking()?;
        }
        let writer = Writer {
            current: None,
            next_floor: last + 1,
            len: 0,
            current_dirty: false,
            owed: Vec::new(),
            running: 0,
            appended: 0,
            synced: 0,
        };
        Ok(ChunkStore {
            backend,
            index,
            writer: Arc::new(Mutex::new(writer)),
            sizes: Arc::new(Mutex::new(sizes)),
            unreadable: Arc::default(),
            flushing: Arc::default(),
            sync_lock: Arc::default(),
            corrupt: Arc::default(),
        })
    }

    /// Opens the store on pack files in `dir`.
    pub fn open_local(dir: &std::path::Path, index: Store) -> ChunkResult<Self> {
        Self::open(Arc::new(shoal_packs::local::LocalPacks::open(dir)?), index)
    }

    /// Where the packs are, for logs.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Chunks found corrupt (and quarantined) since start.
    pub fn corrupt_count(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// `true` if the store holds `id` (as far as the index knows: not lost, not quarantined).
    pub fn contains(&self, id: &ChunkId) -> ChunkResult<bool> {
        Ok(self.stored_len(id)?.is_some())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        locked(&self.writer)
    }

    /// The stored length of `id`, if its bytes are present in full; `None` when it is not stored,
    /// lost or quarantined. A failure to find out is an error, never "absent".
    pub fn stored_len(&self, id: &ChunkId) -> ChunkResult<Option<u64>> {
        let Some(loc) = self.index.chunk_loc(id)? else {
            return Ok(None);
        };
        let pack_len = locked(&self.sizes).get(&loc.pack).copied();
        Ok(pack_len.filter(|&n| loc.offset + u64::from(loc.len) <= n).map(|_| u64::from(loc.len)))
    }

    /// Appends the chunks not stored yet (the caller has verified their hashes) and indexes them.
    /// A chunk already stored is kept only if its stored bytes still match its hash; otherwise the
    /// new copy replaces it.
    pub fn put_many(&self, chunks: &[(ChunkId, &[u8])]) -> ChunkResult<()> {
        // Back-pressure, not refusal: with packs owed durability piling up (uploads outrunning
        // the backend), this upload makes them durable first. Only if that fails is it refused.
        if self.lock().held() >= MAX_OWED {
            self.settle(false)?;
        }
        let mut guard = self.lock();
        let mut fresh: Vec<(ChunkId, &[u8])> = Vec::new();
        let mut seen = HashSet::new();
        for (id, data) in chunks {
            // An index entry whose bytes did not survive intact counts as absent: store again.
            if !seen.insert(*id) || self.stored_intact(id, data.len())? {
                continue;
            }
            fresh.push((*id, data));
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let w = &mut *guard;
        // Others may have closed packs since: past twice the bound, refuse rather than hold more.
        if w.held() >= 2 * MAX_OWED {
            return Err(ChunkError::Backend(PackError::new(
                PackErrorKind::Transient,
                format!("{} packs are waiting to be made durable in {}", w.held(), self.backend.describe()),
            )));
        }
        let locs = self.append_current(w, &fresh)?;
        Ok(self.index.put_chunk_locs(&locs)?)
    }

    /// Appends the frames of `fresh` to the current pack (opened if need be); returns where each
    /// went. Nothing is indexed here.
    fn append_current(&self, w: &mut Writer, fresh: &[(ChunkId, &[u8])]) -> ChunkResult<Vec<(ChunkId, ChunkLoc)>> {
        self.ensure_pack(w)?;
        let (pack, out) = w.current.as_mut().expect("a pack is open");
        let pack = *pack;
        match append_frames(out.as_mut(), w.len, fresh, pack) {
            Ok((locs, end)) => {
                w.len = end;
                w.current_dirty = true;
                w.appended += 1;
                locked(&self.sizes).insert(pack, end);
                Ok(locs)
            }
            Err(e) => {
                // Whatever reached the pack is unindexed garbage; start a fresh pack so no later
                // append lands at an offset this one left unknown.
                w.len = u64::MAX;
                Err(e.into())
            }
        }
    }

    /// Opens a new pack for appends if none is open or the open one is full.
    fn ensure_pack(&self, w: &mut Writer) -> ChunkResult<()> {
        if w.current.is_some() && w.len < self.backend.pack_bytes() {
            return Ok(());
        }
        self.close_current(w)?;
        let pack = self.index.reserve_pack(w.next_floor)?;
        w.next_floor = pack + 1;
        let out = self.backend.create(pack)?;
        if !out.readable_before_durable() {
            locked(&self.unreadable).insert(pack);
        }
        locked(&self.sizes).insert(pack, 0);
        w.current = Some((pack, out));
        w.len = 0;
        Ok(())
    }

    /// Closes the current pack, if any, owing its durability to the next sync.
    fn close_current(&self, w: &mut Writer) -> ChunkResult<()> {
        let Some((pack, mut out)) = w.current.take() else {
            return Ok(());
        };
        if w.current_dirty {
            match out.make_durable() {
                Ok(job) => w.owed.push((pack, job)),
                Err(e) => {
                    w.current = Some((pack, out));
                    return Err(e.into());
                }
            }
            w.current_dirty = false;
        }
        Ok(())
    }

    /// `true` if `id` is stored in full with bytes that match its hash. A copy that fails the
    /// check is reported and quarantined. A copy not readable yet (staged for an object store)
    /// was verified when it arrived and counts as intact.
    fn stored_intact(&self, id: &ChunkId, len: usize) -> ChunkResult<bool> {
        if self.stored_len(id)? != Some(len as u64) {
            return Ok(false);
        }
        if let Some(loc) = self.index.chunk_loc(id)?
            && locked(&self.unreadable).contains(&loc.pack)
        {
            return Ok(true);
        }
        let frames = self.read_frames(std::slice::from_ref(id));
        match frames.error {
            None => Ok(true),
            Some(e) if e.unavailable() => Ok(false),
            Some(e) => Err(e),
        }
    }

    /// Makes every chunk stored so far durable, if any is not: the step before anything that
    /// names a new chunk (a commit, a pending version completed) is acknowledged.
    pub fn make_durable(&self) -> ChunkResult<()> {
        if self.needs_sync() { self.sync() } else { Ok(()) }
    }

    /// Makes every chunk appended so far durable.
    pub fn sync(&self) -> ChunkResult<()> {
        self.settle(true)
    }

    /// Runs the durability jobs owed, and with `current`, the current pack's too (sealing it if
    /// the backend seals on durability); only then counts what was appended as synced.
    fn settle(&self, current: bool) -> ChunkResult<()> {
        let _one = locked(&self.sync_lock);
        let (generation, jobs) = {
            let mut guard = self.lock();
            let w = &mut *guard;
            let generation = w.appended;
            if current && w.current_dirty {
                let seals = w.current.as_ref().is_some_and(|(_, out)| out.seals());
                if seals {
                    self.close_current(w)?;
                } else if let Some((pack, out)) = w.current.as_mut() {
                    let job = out.make_durable()?;
                    w.owed.push((*pack, job));
                    w.current_dirty = false;
                }
            }
            w.running += w.owed.len();
            (generation, std::mem::take(&mut w.owed))
        };
        let taken = jobs.len();
        let mut failed = Vec::new();
        let mut first_error = None;
        for (pack, job, result) in run_jobs(jobs) {
            match result {
                Ok(()) => {
                    locked(&self.unreadable).remove(&pack);
                }
                Err(e) => {
                    tracing::warn!(pack, error = %e, backend = self.backend.describe(), "could not make a pack durable");
                    first_error.get_or_insert(e);
                    failed.push((pack, job));
                }
            }
        }
        let mut w = self.lock();
        w.running -= taken;
        if let Some(e) = first_error {
            // Tried again by the next sync; what they hold stays owed.
            failed.append(&mut w.owed);
            w.owed = failed;
            return Err(e.into());
        }
        if current {
            w.synced = w.synced.max(generation);
        }
        Ok(())
    }

    /// Starts making appended chunks durable on a background thread, unless one is running, so
    /// the sync a commit waits for has little left to do. A backend that seals packs on
    /// durability (an object store) only gets the packs already closed: sealing the current one
    /// at every upload would make a small object per upload.
    pub fn start_writeback(&self) {
        let current = !self.lock().current.as_ref().is_some_and(|(_, out)| out.seals());
        if !current && self.lock().owed.is_empty() {
            return;
        }
        if self.flushing.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = self.clone();
        std::thread::spawn(move || {
            if let Err(e) = store.settle(current) {
                tracing::warn!(error = %e, "background chunk writeback failed");
            }
            store.flushing.store(false, Ordering::SeqCst);
        });
    }

    /// Closes the pack appends go to (made durable), so a collection can repack or retire it;
    /// the next append starts a new one.
    pub fn close_pack(&self) -> ChunkResult<()> {
        {
            let mut guard = self.lock();
            self.close_current(&mut guard)?;
        }
        self.sync()
    }

    /// Packs this process is writing or has not made durable yet: never repacked or retired.
    pub fn open_packs(&self) -> HashSet<PackId> {
        let w = self.lock();
        let mut out: HashSet<PackId> = w.owed.iter().map(|(p, _)| *p).collect();
        out.extend(w.current.as_ref().map(|(p, _)| *p));
        out.extend(locked(&self.unreadable).iter().copied());
        out
    }

    /// Every pack with its length, as far as this store knows (listed at start, then appended).
    pub fn pack_sizes(&self) -> HashMap<PackId, u64> {
        locked(&self.sizes).clone()
    }

    /// Writes `chunks` (read back verified from a pack being emptied) to the current pack, makes
    /// them durable, and only then points the index at the new copies, each only if the index
    /// still points at the old one. Returns how many moved.
    pub fn relocate(&self, chunks: &[(ChunkId, ChunkLoc, Bytes)]) -> ChunkResult<usize> {
        let moved: Vec<(ChunkId, ChunkLoc, ChunkLoc)> = {
            let mut guard = self.lock();
            let w = &mut *guard;
            let fresh: Vec<(ChunkId, &[u8])> = chunks.iter().map(|(id, _, b)| (*id, &b[..])).collect();
            let locs = self.append_current(w, &fresh)?;
            chunks.iter().zip(locs).map(|((id, from, _), (_, to))| (*id, *from, to)).collect()
        };
        self.sync()?;
        let mut n = 0;
        for (id, from, to) in moved {
            if self.index.move_chunk(&id, from, to)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes `pack` from the backend (nothing in the index points into it any more).
    pub fn delete_pack(&self, pack: PackId) -> ChunkResult<()> {
        self.backend.delete(pack)?;
        locked(&self.sizes).remove(&pack);
        Ok(())
    }

    /// How many groups of chunks one fetch reads at once.
    pub fn read_ahead(&self) -> usize {
        self.backend.read_ahead().max(1)
    }

    /// Requests made to the backend since start, by kind (empty for local files).
    pub fn request_counts(&self) -> Vec<(&'static str, u64)> {
        self.backend.request_counts()
    }

    /// Reads answered by the backend's local cache, and not.
    pub fn cache_reads(&self) -> Vec<(&'static str, u64)> {
        self.backend.cache_reads()
    }

    /// Drops staging buffers and cached read handles (they come back on the next use), so an
    /// idle server holds no memory for them.
    pub fn release_buffers(&self) {
        if let Some((_, out)) = self.lock().current.as_mut() {
            out.release_memory();
        }
        self.backend.release_memory();
    }

    /// `true` when chunks were appended since the last completed sync.
    pub fn needs_sync(&self) -> bool {
        let w = self.lock();
        w.appended > w.synced || !w.owed.is_empty()
    }

    /// The bytes of `id`, verified.
    pub fn get(&self, id: &ChunkId) -> ChunkResult<Vec<u8>> {
        let frames = self.read_frames(std::slice::from_ref(id));
        if let Some(e) = frames.error {
            return Err(e);
        }
        let frame: Vec<u8> = frames.pieces.concat();
        Ok(frame[FRAME_HEADER..].to_vec())
    }

    /// The frames (id, length, bytes) of `ids`, in order, as the fetch endpoint sends them, in
    /// one or more pieces. Packs store exactly these frames, so each run of chunks stored back to
    /// back is one read. Every chunk is checked against its id before it is returned; the read
    /// stops at the first chunk that is absent, unreadable or corrupt (a corrupt one is
    /// quarantined), keeping the frames before it.
    pub fn read_frames(&self, ids: &[ChunkId]) -> Frames {
        let mut out = Frames { pieces: Vec::new(), chunk_bytes: 0, error: None };
        let mut i = 0;
        while i < ids.len() {
            // The longest run of chunks stored back to back, starting at `ids[i]`.
            let mut run: Vec<(ChunkId, ChunkLoc)> = Vec::new();
            while let Some(id) = ids.get(i + run.len()) {
                let loc = match self.index.chunk_loc(id) {
                    Ok(Some(loc)) => loc,
                    Ok(None) if run.is_empty() => {
                        out.error = Some(ChunkError::NotFound(*id));
                        return out;
                    }
                    Err(e) if run.is_empty() => {
                        out.error = Some(e.into());
                        return out;
                    }
                    // Reported when the run starting there is read.
                    Ok(None) | Err(_) => break,
                };
                match run.last() {
                    Some((_, prev)) if !prev.followed_by(&loc) => break,
                    _ => run.push((*id, loc)),
                }
            }
            i += run.len();
            let mut bytes = match self.read_run(&run) {
                Ok(b) => b,
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            };
            if first_bad(&run, &bytes).is_some() && self.backend.forget_cached(run[0].1.pack) {
                // A local copy went bad, not necessarily the pack: read the store's own.
                tracing::warn!(
                    pack = run[0].1.pack,
                    "a cached pack failed its check; dropped, read again from the store"
                );
                bytes = match self.read_run(&run) {
                    Ok(b) => b,
                    Err(e) => {
                        out.error = Some(e);
                        return out;
                    }
                };
            }
            match self.verify_run(&run, bytes) {
                Ok(bytes) => {
                    out.chunk_bytes += run.iter().map(|(_, loc)| u64::from(loc.len)).sum::<u64>();
                    out.pieces.push(bytes);
                }
                Err((good, bad)) => {
                    let before = run.iter().take_while(|(id, _)| *id != bad);
                    out.chunk_bytes += before.map(|(_, loc)| u64::from(loc.len)).sum::<u64>();
                    if !good.is_empty() {
                        out.pieces.push(good);
                    }
                    out.error = Some(ChunkError::Corrupt(bad));
                    return out;
                }
            }
        }
        out
    }

    /// Reads the frames of `run` (chunks stored back to back in one pack) as one piece. A pack
    /// that cannot be read before it is durable is made durable first.
    fn read_run(&self, run: &[(ChunkId, ChunkLoc)]) -> ChunkResult<Bytes> {
        let pack = run[0].1.pack;
        if locked(&self.unreadable).contains(&pack) {
            self.sync()?;
        }
        let std::ops::Range { start, end } = run_range(run);
        match self.backend.read(pack, start, (end - start) as usize) {
            Ok(b) if b.len() as u64 == end - start => Ok(b),
            Ok(_) => Err(ChunkError::NotFound(run[0].0)),
            Err(e) if e.kind == PackErrorKind::NotFound => Err(ChunkError::NotFound(run[0].0)),
            Err(e) => Err(e.into()),
        }
    }

    /// Passes `bytes` (the frames of `run`) through when every frame is intact. Otherwise returns
    /// the intact frames before the first bad one and its id; the bad chunk is quarantined,
    /// logged and counted.
    fn verify_run(&self, run: &[(ChunkId, ChunkLoc)], bytes: Bytes) -> Result<Bytes, (Bytes, ChunkId)> {
        let Some((id, loc)) = first_bad(run, &bytes) else {
            return Ok(bytes);
        };
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            chunk = %id,
            pack = loc.pack,
            offset = loc.offset,
            backend = self.backend.describe(),
            "stored chunk failed its BLAKE3 check; quarantined until a device uploads it again"
        );
        if let Err(e) = self.index.quarantine_chunk(id, *loc) {
            tracing::error!(chunk = %id, error = %e, "could not quarantine a corrupt chunk");
        }
        Err((bytes.slice(..(loc.offset - run[0].1.offset) as usize), *id))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    use super::*;

    fn pack_path(dir: &Path, pack: PackId) -> PathBuf {
        dir.join(format!("{pack:08}.pack"))
    }

    #[test]
    fn put_get_sync_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let index = Store::open(&dir.path().join("meta")).unwrap();
        let s = ChunkStore::open_local(&dir.path().join("chunks"), index.clone()).unwrap();
        let (a, b) = (ChunkId::of(b"abc"), ChunkId::of(b"defg"));
        assert_eq!(s.stored_len(&a).unwrap(), None);
        s.put_many(&[(a, b"abc"), (b, b"defg"), (a, b"abc")]).unwrap();
        s.put_many(&[(a, b"abc")]).unwrap();
        assert!(s.needs_sync());
        s.sync().unwrap();
        assert!(!s.needs_sync());
        assert_eq!(s.get(&a).unwrap(), b"abc");
        assert_eq!(s.get(&b).unwrap(), b"defg");
        assert_eq!(s.stored_len(&b).unwrap(), Some(4));
        // Stored once, as frames (2 headers + 7 bytes), padded to the direct-I/O alignment.
        let len = std::fs::metadata(pack_path(&dir.path().join("chunks"), 1)).unwrap().len();
        assert!(len == 2 * 36 + 7 || len == 4096, "{len}");
        // A larger batch spans several staging buffers.
        let big: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 200_000]).collect();
        let batch: Vec<(ChunkId, &[u8])> = big.iter().map(|d| (ChunkId::of(d), &d[..])).collect();
        s.put_many(&batch).unwrap();
        for (id, d) in &batch {
            assert_eq!(&s.get(id).unwrap()[..], *d);
        }
        // Frames come back in request order, whatever the storage order.
        let ids = [batch[3].0, batch[4].0, a, batch[0].0];
        let frames = s.read_frames(&ids);
        assert!(frames.error.is_none());
        let frames: Vec<u8> = frames.pieces.concat();
        let mut rest = &frames[..];
        for id in ids {
            let (got, data, used) = shoal_protocol::api::decode_frame(rest, u32::MAX).unwrap().unwrap();
            assert_eq!((got, ChunkId::of(data)), (id, id));
            rest = &rest[used..];
        }
        assert!(rest.is_empty());

        // A restart writes to a new pack and still reads the old one.
        let s = ChunkStore::open_local(&dir.path().join("chunks"), index).unwrap();
        let c = ChunkId::of(b"x");
        s.put_many(&[(c, b"x")]).unwrap();
        assert_eq!(s.get(&c).unwrap(), b"x");
        assert_eq!(s.get(&a).unwrap(), b"abc");
        assert!(pack_path(&dir.path().join("chunks"), 2).exists());
        assert!(s.get(&ChunkId::of(b"nope")).is_err());
    }

    #[test]
    fn truncated_pack_reports_chunk_missing() {
        let dir = tempfile::tempdir().unwrap();
        let index = Store::open(&dir.path().join("meta")).unwrap();
        let s = ChunkStore::open_local(&dir.path().join("chunks"), index.clone()).unwrap();
        let a = ChunkId::of(b"lost in a crash");
        s.put_many(&[(a, b"lost in a crash")]).unwrap();
        drop(s);
        std::fs::OpenOptions::new()
            .write(true)
            .open(pack_path(&dir.path().join("chunks"), 1))
            .unwrap()
            .set_len(40)
            .unwrap();
        let s = ChunkStore::open_local(&dir.path().join("chunks"), index).unwrap();
        assert_eq!(s.stored_len(&a).unwrap(), None);
        assert!(matches!(s.get(&a), Err(ChunkError::NotFound(_))));
    }

    /// Flips one byte of `id`'s stored bytes in place.
    fn corrupt(dir: &Path, index: &Store, id: &ChunkId) {
        let loc = index.chunk_loc(id).unwrap().unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(pack_path(dir, loc.pack)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, loc.offset).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], loc.offset).unwrap();
    }

    #[test]
    fn corrupt_chunks_are_never_served_and_a_correct_upload_repairs_them() {
        let dir = tempfile::tempdir().unwrap();
        let chunks_dir = dir.path().join("chunks");
        let index = Store::open(&dir.path().join("meta")).unwrap();
        let s = ChunkStore::open_local(&chunks_dir, index.clone()).unwrap();
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 5000]).collect();
        let ids: Vec<ChunkId> = data.iter().map(|d| ChunkId::of(d)).collect();
        let batch: Vec<(ChunkId, &[u8])> = ids.iter().zip(&data).map(|(id, d)| (*id, &d[..])).collect();
        s.put_many(&batch).unwrap();
        corrupt(&chunks_dir, &index, &ids[1]);
        // The frames before the bad chunk come back whole; the read stops there.
        let frames = s.read_frames(&ids);
        let got: Vec<u8> = frames.pieces.concat();
        assert_eq!(got.len(), FRAME_HEADER + 5000);
        assert_eq!(frames.chunk_bytes, 5000);
        assert!(matches!(frames.error, Some(ChunkError::Corrupt(id)) if id == ids[1]));
        assert_eq!(s.corrupt_count(), 1);
        // Quarantined: absent from now on, so devices are asked for it again.
        assert!(!s.contains(&ids[1]).unwrap());
        assert!(matches!(s.get(&ids[1]), Err(ChunkError::NotFound(_))));
        // A correct upload stores it anew.
        s.put_many(&[batch[1]]).unwrap();
        assert_eq!(s.get(&ids[1]).unwrap(), data[1]);
        // A re-upload of a chunk whose stored copy went bad (not yet noticed) replaces it too.
        corrupt(&chunks_dir, &index, &ids[2]);
        s.put_many(&[batch[2]]).unwrap();
        assert_eq!(s.get(&ids[2]).unwrap(), data[2]);
        assert_eq!(s.corrupt_count(), 2);
    }

    #[test]
    fn pack_numbers_are_never_reused_and_lost_chunks_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let chunks_dir = dir.path().join("chunks");
        let index = Store::open(&dir.path().join("meta")).unwrap();
        let s = ChunkStore::open_local(&chunks_dir, index.clone()).unwrap();
        let a = ChunkId::of(b"first");
        s.put_many(&[(a, b"first")]).unwrap();
        let first = index.chunk_loc(&a).unwrap().unwrap().pack;
        // A crash loses the pack's creation, but the index entry survived.
        drop(s);
        std::fs::remove_file(pack_path(&chunks_dir, first)).unwrap();
        let s = ChunkStore::open_local(&chunks_dir, index.clone()).unwrap();
        assert!(!s.contains(&a).unwrap(), "an entry into a lost pack is dropped at start");
        let b = ChunkId::of(b"second");
        s.put_many(&[(b, b"second")]).unwrap();
        let second = index.chunk_loc(&b).unwrap().unwrap().pack;
        assert!(second > first, "pack {second} reuses the lost pack's number {first}");
        assert!(s.get(&a).is_err(), "the lost chunk never reads as other bytes");
        assert_eq!(s.get(&b).unwrap(), b"second");
    }
}
