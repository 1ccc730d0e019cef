//! The chunk store on local disk: append-only pack files under `<data>/chunks/`, each a sequence of
//! frames (32-byte id, 4-byte length, bytes — the wire's batch format), with an index from chunk
//! id to (pack, offset, length) in the metadata store. One file per chunk cost ~0.4 ms of file
//! system work per chunk here (16k chunks per GiB); appending a batch is one write. The
//! coordinator never interprets chunk bytes beyond checking that their BLAKE3 matches the id.
//!
//! Durability: appends are not synced one by one. A commit that references chunks calls
//! [`ChunkStore::sync`] (fdatasync of every pack written since the last sync) before it is
//! acknowledged, and [`ChunkStore::start_writeback`] lets the disk catch up meanwhile. A pack is
//! never appended to across restarts, so a torn tail after a crash is never written over, and a
//! pack number is never used twice: it is reserved durably in the metadata store before the pack
//! is created. At start-up, index entries that point past the end of their pack (or into a pack
//! that is gone) are dropped, so a chunk lost in a crash reads as absent and is asked for again.
//!
//! Integrity: every read is checked against the chunk's BLAKE3 before a byte is served. A chunk
//! whose stored bytes fail the check is quarantined (it reads as absent from then on, so
//! `chunks/missing` asks devices for it again), logged and counted; a correct upload stores it
//! anew. An upload of a chunk that is already stored re-checks the stored copy the same way.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_protocol::ChunkId;
use shoal_protocol::api::FRAME_HEADER;

use crate::store::{ChunkLoc, Store};
use shoal_sys::direct::{self, AlignedBuf};

/// A pack is closed and a new one started past this size.
const PACK_BYTES: u64 = 512 * 1024 * 1024;
/// Bytes staged in memory between writes to a pack.
const STAGING_BYTES: usize = 4 * 1024 * 1024;
/// Zeros for padding frames (at most two alignment blocks).
static ZEROS: [u8; 2 * direct::ALIGN] = [0; 2 * direct::ALIGN];
/// Open pack handles kept for reads.
const OPEN_PACKS: usize = 64;

/// An open pack for reads, and whether it does direct I/O.
type PackReader = (Arc<std::fs::File>, bool);

struct Writer {
    /// The pack appends go to; `None` until the first append after start (then reserved).
    pack: Option<u32>,
    /// The lowest number a new pack may take: above every pack on disk.
    next_floor: u32,
    file: Option<std::fs::File>,
    /// The open pack takes direct writes (see `direct`): every write is aligned and padded.
    direct: bool,
    /// Staging buffer for appends, reused (allocated on first use).
    buf: Option<AlignedBuf>,
    len: u64,
    /// Packs written since the last completed sync.
    dirty: BTreeSet<u32>,
    /// Appends so far, and how many of them the last completed sync covered.
    appended: u64,
    synced: u64,
}

/// Content-addressed chunks in pack files.
#[derive(Clone)]
pub struct ChunkStore {
    dir: PathBuf,
    index: Store,
    writer: Arc<Mutex<Writer>>,
    readers: Arc<Mutex<HashMap<u32, PackReader>>>,
    flushing: Arc<AtomicBool>,
    /// One sync at a time: a caller that finds one running waits for it, then syncs what is left.
    sync_lock: Arc<Mutex<()>>,
    /// Chunks whose stored bytes failed their hash check since start.
    corrupt: Arc<AtomicU64>,
}

/// Why a chunk could not be read.
fn corrupt_error(id: &ChunkId) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("stored chunk {id} failed its BLAKE3 check"))
}

/// What a read of several chunks produced: the complete, verified frames of a prefix of the
/// request, and why it stopped early, if it did.
pub struct Frames {
    pub pieces: Vec<Bytes>,
    /// Chunk bytes in `pieces`, frame headers not counted.
    pub chunk_bytes: u64,
    pub error: Option<io::Error>,
}

fn pack_path(dir: &Path, pack: u32) -> PathBuf {
    dir.join(format!("{pack:08}.pack"))
}

impl ChunkStore {
    /// Opens the store in `dir`; new chunks go to a new pack after the highest existing one, and
    /// index entries whose bytes are not (wholly) on disk are dropped.
    pub fn open(dir: &Path, index: Store) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut sizes: HashMap<u32, u64> = HashMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".pack")).and_then(|n| n.parse::<u32>().ok()) {
                sizes.insert(n, e.metadata()?.len());
            }
        }
        let last = sizes.keys().copied().max().unwrap_or(0);
        let lost = index.chunks_not(|l| sizes.get(&l.pack).is_some_and(|&size| l.offset + u64::from(l.len) <= size));
        if !lost.is_empty() {
            tracing::warn!(
                chunks = lost.len(),
                "chunk index entries point past the end of their packs (bytes lost in a crash); forgetting them"
            );
            index.drop_chunk_locs(&lost).map_err(io::Error::other)?;
            index.flush_blocking().map_err(io::Error::other)?;
        }
        let writer = Writer {
            pack: None,
            next_floor: last + 1,
            file: None,
            direct: false,
            buf: None,
            len: 0,
            dirty: BTreeSet::new(),
            appended: 0,
            synced: 0,
        };
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            index,
            writer: Arc::new(Mutex::new(writer)),
            readers: Arc::default(),
            flushing: Arc::default(),
            sync_lock: Arc::default(),
            corrupt: Arc::default(),
        })
    }

    /// Chunks found corrupt (and quarantined) since start.
    pub fn corrupt_count(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// `true` if the store holds `id` (as far as the index knows: not lost, not quarantined).
    pub fn contains(&self, id: &ChunkId) -> io::Result<bool> {
        Ok(self.locate(id)?.is_some())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where `id` is stored, if it is.
    fn locate(&self, id: &ChunkId) -> io::Result<Option<ChunkLoc>> {
        self.index.chunk_loc(id).map_err(io::Error::other)
    }

    /// The stored length of `id`, if its bytes are present in full; `None` when it is not stored,
    /// lost or quarantined. A failure to find out is an error, never "absent".
    pub fn stored_len(&self, id: &ChunkId) -> io::Result<Option<u64>> {
        let Some(loc) = self.locate(id)? else {
            return Ok(None);
        };
        let pack_len = match std::fs::metadata(pack_path(&self.dir, loc.pack)) {
            Ok(md) => md.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok((loc.offset + u64::from(loc.len) <= pack_len).then_some(u64::from(loc.len)))
    }

    /// Appends the chunks not stored yet (the caller has verified their hashes) and indexes them.
    /// A chunk already stored is kept only if its stored bytes still match its hash; otherwise the
    /// new copy replaces it.
    pub fn put_many(&self, chunks: &[(ChunkId, &[u8])]) -> io::Result<()> {
        let mut guard = self.lock();
        let mut fresh: Vec<(ChunkId, &[u8])> = Vec::new();
        let mut seen = std::collections::HashSet::new();
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
        if w.file.is_none() || w.len >= PACK_BYTES {
            let pack = self.index.reserve_pack(w.next_floor).map_err(io::Error::other)?;
            w.next_floor = pack + 1;
            let path = pack_path(&self.dir, pack);
            let (file, direct) = match direct::open_direct(&path, true)? {
                Some(f) => (f, true),
                None => (std::fs::OpenOptions::new().create_new(true).write(true).open(&path)?, false),
            };
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            w.pack = Some(pack);
            w.file = Some(file);
            w.direct = direct;
            w.len = 0;
        }
        let pack = w.pack.expect("a pack is reserved whenever one is open");
        let file = w.file.as_ref().expect("a pack is open");
        let buf = w.buf.get_or_insert_with(|| AlignedBuf::new(STAGING_BYTES));
        buf.clear();
        let mut out = Appender { file, buf, flushed: w.len, pos: w.len };
        match Self::append(&mut out, &fresh, pack, w.direct) {
            Ok(locs) => {
                w.len = out.pos;
                w.dirty.insert(pack);
                w.appended += 1;
                self.index.put_chunk_locs(&locs).map_err(io::Error::other)
            }
            Err(e) => {
                // Whatever reached the pack is unindexed garbage; start a fresh pack so no later
                // append lands at an offset this one left unknown.
                if let Some(b) = w.buf.as_mut() {
                    b.clear();
                }
                w.len = PACK_BYTES;
                Err(e)
            }
        }
    }

    /// `true` if `id` is stored in full with bytes that match its hash. A copy that fails the
    /// check is reported and quarantined.
    fn stored_intact(&self, id: &ChunkId, len: usize) -> io::Result<bool> {
        if self.stored_len(id)? != Some(len as u64) {
            return Ok(false);
        }
        let frames = self.read_frames(std::slice::from_ref(id));
        match frames.error {
            None => Ok(true),
            Some(e) if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::NotFound => Ok(false),
            Some(e) => Err(e),
        }
    }

    fn append(
        out: &mut Appender<'_>,
        fresh: &[(ChunkId, &[u8])],
        pack: u32,
        direct: bool,
    ) -> io::Result<Vec<(ChunkId, ChunkLoc)>> {
        let mut locs = Vec::with_capacity(fresh.len());
        for (id, data) in fresh {
            let mut header = [0u8; FRAME_HEADER];
            header[..32].copy_from_slice(id.as_bytes());
            header[32..].copy_from_slice(&(data.len() as u32).to_be_bytes());
            out.push(&header)?;
            locs.push((*id, ChunkLoc { pack, offset: out.pos, len: data.len() as u32 }));
            out.push(data)?;
        }
        if direct {
            // Pad to the alignment with a frame of zero id, so the pack stays a frame sequence.
            let rem = out.pos as usize % direct::ALIGN;
            if rem != 0 {
                let mut pad = direct::ALIGN - rem;
                if pad < FRAME_HEADER {
                    pad += direct::ALIGN;
                }
                let mut header = [0u8; FRAME_HEADER];
                header[32..].copy_from_slice(&((pad - FRAME_HEADER) as u32).to_be_bytes());
                out.push(&header)?;
                out.push(&ZEROS[..pad - FRAME_HEADER])?;
            }
        }
        out.flush()?;
        Ok(locs)
    }

    /// Makes every chunk appended so far durable.
    pub fn sync(&self) -> io::Result<()> {
        let _one = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (generation, packs) = {
            let w = self.lock();
            (w.appended, w.dirty.clone())
        };
        if packs.is_empty() {
            return Ok(());
        }
        for pack in &packs {
            std::fs::File::open(pack_path(&self.dir, *pack))?.sync_data()?;
        }
        // The new packs' directory entries.
        std::fs::File::open(&self.dir)?.sync_all()?;
        let mut w = self.lock();
        w.synced = w.synced.max(generation);
        if w.appended == generation {
            w.dirty.clear();
        }
        Ok(())
    }

    /// Starts flushing appended chunks to disk on a background thread, unless one is running, so
    /// the sync a commit waits for has little left to do.
    pub fn start_writeback(&self) {
        if self.flushing.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = self.clone();
        std::thread::spawn(move || {
            if let Err(e) = store.sync() {
                tracing::warn!(error = %e, "background chunk writeback failed");
            }
            store.flushing.store(false, Ordering::SeqCst);
        });
    }

    /// Drops the staging buffer and cached read handles (they come back on the next use), so an
    /// idle server holds no memory for them.
    pub fn release_buffers(&self) {
        self.lock().buf = None;
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// `true` when chunks were appended since the last completed sync.
    pub fn needs_sync(&self) -> bool {
        let w = self.lock();
        w.appended > w.synced
    }

    /// The bytes of `id`, verified.
    pub fn get(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        let frames = self.read_frames(std::slice::from_ref(id));
        if let Some(e) = frames.error {
            return Err(e);
        }
        let frame: Vec<u8> = frames.pieces.concat();
        Ok(frame[FRAME_HEADER..].to_vec())
    }

    /// The frames (id, length, bytes) of `ids`, in order, as the fetch endpoint sends them, in
    /// one or more pieces. Packs store exactly these frames, so each run of chunks stored back to
    /// back is one read; reads bypass the page cache where the file system allows. Every chunk is
    /// checked against its id before it is returned; the read stops at the first chunk that is
    /// absent, unreadable or corrupt (a corrupt one is quarantined), keeping the frames before it.
    pub fn read_frames(&self, ids: &[ChunkId]) -> Frames {
        let mut out = Frames { pieces: Vec::new(), chunk_bytes: 0, error: None };
        let mut i = 0;
        while i < ids.len() {
            // The longest run of chunks stored back to back, starting at `ids[i]`.
            let mut run: Vec<(ChunkId, ChunkLoc)> = Vec::new();
            while let Some(id) = ids.get(i + run.len()) {
                let loc = match self.locate(id) {
                    Ok(Some(loc)) => loc,
                    Ok(None) if run.is_empty() => {
                        out.error = Some(not_found(id));
                        return out;
                    }
                    Err(e) if run.is_empty() => {
                        out.error = Some(e);
                        return out;
                    }
                    // Reported when the run starting there is read.
                    Ok(None) | Err(_) => break,
                };
                let follows = |prev: &ChunkLoc| {
                    prev.pack == loc.pack && prev.offset + u64::from(prev.len) + FRAME_HEADER as u64 == loc.offset
                };
                match run.last() {
                    Some((_, prev)) if !follows(prev) => break,
                    _ => run.push((*id, loc)),
                }
            }
            i += run.len();
            let bytes = match self.read_run(&run) {
                Ok(b) => b,
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            };
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
                    out.error = Some(corrupt_error(&bad));
                    return out;
                }
            }
        }
        out
    }

    /// Reads the frames of `run` (chunks stored back to back in one pack) as one piece.
    fn read_run(&self, run: &[(ChunkId, ChunkLoc)]) -> io::Result<Bytes> {
        let (first, last) = (run[0].1, run[run.len() - 1].1);
        let (start, end) = (first.offset - FRAME_HEADER as u64, last.offset + u64::from(last.len));
        let (file, is_direct) = self.reader(first.pack)?;
        if is_direct {
            let align = direct::ALIGN as u64;
            let from = start / align * align;
            let to = end.div_ceil(align) * align;
            let mut buf = AlignedBuf::new((to - from) as usize);
            buf.fill_from(&file, from, (to - from) as usize)?;
            Ok(buf.into_bytes((start - from) as usize..(end - from) as usize))
        } else {
            let mut buf = vec![0u8; (end - start) as usize];
            file.read_exact_at(&mut buf, start)?;
            Ok(Bytes::from(buf))
        }
    }

    /// Passes `bytes` (the frames of `run`) through when every frame is intact. Otherwise returns
    /// the intact frames before the first bad one and its id; the bad chunk is quarantined,
    /// logged and counted.
    fn verify_run(&self, run: &[(ChunkId, ChunkLoc)], bytes: Bytes) -> Result<Bytes, (Bytes, ChunkId)> {
        let base = run[0].1.offset;
        for (id, loc) in run {
            if !frame_ok(&bytes, base, id, loc) {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    chunk = %id,
                    pack = loc.pack,
                    offset = loc.offset,
                    "stored chunk failed its BLAKE3 check; quarantined until a device uploads it again"
                );
                if let Err(e) = self.index.quarantine_chunk(id, *loc) {
                    tracing::error!(chunk = %id, error = %e, "could not quarantine a corrupt chunk");
                }
                return Err((bytes.slice(..(loc.offset - base) as usize), *id));
            }
        }
        Ok(bytes)
    }

    /// A read handle for `pack`, and whether it does direct I/O.
    fn reader(&self, pack: u32) -> io::Result<PackReader> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = readers.get(&pack) {
            return Ok(r.clone());
        }
        if readers.len() >= OPEN_PACKS {
            readers.clear();
        }
        let path = pack_path(&self.dir, pack);
        let r = match direct::open_direct_read(&path)? {
            Some(f) => (Arc::new(f), true),
            None => (Arc::new(std::fs::File::open(&path)?), false),
        };
        readers.insert(pack, r.clone());
        Ok(r)
    }
}

/// `true` if the frame of `id` at `loc` inside `bytes` (which starts with the frame of the chunk
/// whose data is at offset `base`) carries `id`, the right length, and bytes whose BLAKE3 is `id`.
fn frame_ok(bytes: &[u8], base: u64, id: &ChunkId, loc: &ChunkLoc) -> bool {
    let data_at = (loc.offset - base) as usize + FRAME_HEADER;
    let Some(header) = bytes.get(data_at - FRAME_HEADER..data_at) else {
        return false;
    };
    let Some(data) = bytes.get(data_at..data_at + loc.len as usize) else {
        return false;
    };
    header[..32] == id.as_bytes()[..] && header[32..] == loc.len.to_be_bytes() && ChunkId::of(data) == *id
}

fn not_found(id: &ChunkId) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("chunk {id}"))
}

/// Streams bytes into a pack through the staging buffer, writing whole buffers at aligned offsets.
struct Appender<'a> {
    file: &'a std::fs::File,
    buf: &'a mut AlignedBuf,
    /// Pack offset where the staged bytes go, and the logical end of what was pushed.
    flushed: u64,
    pos: u64,
}

impl Appender<'_> {
    fn push(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.buf.push(data);
            data = &data[n..];
            self.pos += n as u64;
            if self.buf.is_full() {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            direct::write_at(self.file, self.buf.as_slice(), self.flushed)?;
            self.flushed += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_sync_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let index = Store::open(&dir.path().join("meta")).unwrap();
        let s = ChunkStore::open(&dir.path().join("chunks"), index.clone()).unwrap();
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
        assert!(len == 2 * 36 + 7 || len == direct::ALIGN as u64, "{len}");
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
        let s = ChunkStore::open(&dir.path().join("chunks"), index).unwrap();
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
        let s = ChunkStore::open(&dir.path().join("chunks"), index).unwrap();
        let a = ChunkId::of(b"lost in a crash");
        s.put_many(&[(a, b"lost in a crash")]).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(pack_path(&dir.path().join("chunks"), 1))
            .unwrap()
            .set_len(40)
            .unwrap();
        assert_eq!(s.stored_len(&a).unwrap(), None);
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
        let s = ChunkStore::open(&chunks_dir, index.clone()).unwrap();
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
        assert_eq!(frames.error.unwrap().kind(), io::ErrorKind::InvalidData);
        assert_eq!(s.corrupt_count(), 1);
        // Quarantined: absent from now on, so devices are asked for it again.
        assert!(!s.contains(&ids[1]).unwrap());
        assert_eq!(s.get(&ids[1]).unwrap_err().kind(), io::ErrorKind::NotFound);
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
        let s = ChunkStore::open(&chunks_dir, index.clone()).unwrap();
        let a = ChunkId::of(b"first");
        s.put_many(&[(a, b"first")]).unwrap();
        let first = index.chunk_loc(&a).unwrap().unwrap().pack;
        // A crash loses the pack's creation, but the index entry survived.
        drop(s);
        std::fs::remove_file(pack_path(&chunks_dir, first)).unwrap();
        let s = ChunkStore::open(&chunks_dir, index.clone()).unwrap();
        assert!(!s.contains(&a).unwrap(), "an entry into a lost pack is dropped at start");
        let b = ChunkId::of(b"second");
        s.put_many(&[(b, b"second")]).unwrap();
        let second = index.chunk_loc(&b).unwrap().unwrap().pack;
        assert!(second > first, "pack {second} reuses the lost pack's number {first}");
        assert!(s.get(&a).is_err(), "the lost chunk never reads as other bytes");
        assert_eq!(s.get(&b).unwrap(), b"second");
    }
}
