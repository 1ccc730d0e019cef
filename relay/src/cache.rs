//! The relay's chunk cache on disk: segments (`shoal_packs` local packs, `NNNNNNNN.pack` in the
//! cache directory) written in order, each a sequence of chunk frames, with an index from chunk
//! to location kept in memory. Every read passes the pack store's check (id, length, BLAKE3)
//! before a byte is served; a chunk that fails it is dropped from the index and fetched again.
//!
//! Eviction is by whole segments, oldest first, with a second chance: a chunk read since it
//! was written is copied forward into the current segment when its segment goes (its mark is
//! cleared), so chunks in use stay, as with least-recently-used eviction, at the cost of
//! rewriting them once per pass through the cache. At most half of a segment is copied forward,
//! so every eviction frees at least half a segment. The bound counts the disk each segment
//! takes (padding included), so the directory never holds more than `cap` bytes of segments.
//!
//! Segments are written and read through the page cache, not with direct I/O as the
//! coordinator's packs are: the chunks a region's devices ask for are mostly the ones just
//! fetched for another device of the region, and the kernel keeps those in memory it can take
//! back, outside the relay's own (bench/relay: hits 0.71x the coordinator's time this way,
//! 0.88x-1.09x reading the disk each time). The relay keeps no database of its own whose pages
//! bulk data could push out of the page cache.
//!
//! Nothing is synced: a crash can leave a segment's tail unreadable, which the scan at start
//! stops at, and any bytes that went bad fail their check when read. At start every segment's
//! frame headers are walked to rebuild the index; segments past the bound go.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use shoal_packs::frames::{ChunkLoc, append_frames, first_bad, run_range};
use shoal_packs::local::LocalPacks;
use shoal_packs::{PackBackend, PackError, PackId, PackWriter};
use shoal_protocol::api::FRAME_HEADER;
use shoal_protocol::{CHUNK_PARAMS, ChunkId};

/// Segments per cache: the eviction granule is a sixteenth of the cache.
const SEGMENTS: u64 = 16;
/// Most chunks read with one request.
const RUN_MAX: usize = 64;
/// Segment size bounds.
const SEGMENT_MIN: u64 = 1024 * 1024;
const SEGMENT_MAX: u64 = 64 * 1024 * 1024;

struct Slot {
    loc: ChunkLoc,
    /// Read since it was written (or copied forward).
    hit: bool,
}

struct Writing {
    pack: PackId,
    out: Box<dyn PackWriter>,
    len: u64,
}

struct State {
    index: HashMap<ChunkId, Slot>,
    /// Every segment with the bytes it takes on disk, oldest first.
    segments: BTreeMap<PackId, u64>,
    writing: Option<Writing>,
    next: PackId,
    bytes: u64,
    evictions: u64,
    corrupt: u64,
}

/// What the cache holds, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub bytes: u64,
    pub chunks: u64,
    pub evictions: u64,
    pub corrupt: u64,
}

pub struct Cache {
    packs: LocalPacks,
    cap: u64,
    segment_bytes: u64,
    state: Mutex<State>,
}

impl Cache {
    /// Opens the cache in `dir`, bounded by `cap` bytes of disk, rebuilding its index from the
    /// segments there.
    pub fn open(dir: &Path, cap: u64) -> Result<Cache, PackError> {
        let packs = LocalPacks::open_buffered(dir)?;
        let segment_bytes = (cap / SEGMENTS).clamp(SEGMENT_MIN, SEGMENT_MAX);
        let mut state = State {
            index: HashMap::new(),
            segments: BTreeMap::new(),
            writing: None,
            next: 1,
            bytes: 0,
            evictions: 0,
            corrupt: 0,
        };
        let mut found = packs.list()?;
        found.sort_by_key(|p| p.pack);
        for p in &found {
            state.next = state.next.max(p.pack + 1);
            let disk = disk_bytes(p.len);
            for (id, loc) in scan(&packs, p.pack, p.len) {
                state.index.insert(id, Slot { loc, hit: false });
            }
            state.segments.insert(p.pack, disk);
            state.bytes += disk;
        }
        let cache = Cache { packs, cap, segment_bytes, state: Mutex::new(state) };
        {
            let mut st = cache.lock();
            while st.bytes > cap {
                let Some((&oldest, _)) = st.segments.first_key_value() else { break };
                cache.drop_segment(&mut st, oldest);
            }
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.lock();
        CacheStats { bytes: st.bytes, chunks: st.index.len() as u64, evictions: st.evictions, corrupt: st.corrupt }
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().index.contains_key(id)
    }

    /// The bytes of `id`, verified; `None` if the cache does not hold it intact (a copy that
    /// fails its check is dropped).
    pub fn get(&self, id: &ChunkId) -> Option<Bytes> {
        self.read_frames(std::slice::from_ref(id)).pop().flatten().map(|f| f.slice(FRAME_HEADER..))
    }

    /// The frame (id, length, bytes: the wire's format) of each of `ids` the cache holds
    /// intact, `None` for the others. Chunks stored back to back are read with one request; each
    /// is checked before it is returned, and one that fails is dropped.
    pub fn read_frames(&self, ids: &[ChunkId]) -> Vec<Option<Bytes>> {
        let locs: Vec<Option<ChunkLoc>> = {
            let mut st = self.lock();
            ids.iter()
                .map(|id| {
                    st.index.get_mut(id).map(|slot| {
                        slot.hit = true;
                        slot.loc
                    })
                })
                .collect()
        };
        let mut out = vec![None; ids.len()];
        let mut bad = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let Some(first) = locs[i] else {
                i += 1;
                continue;
            };
            let mut run = vec![(ids[i], first)];
            while let Some(Some(next)) = locs.get(i + run.len()) {
                if run.len() >= RUN_MAX || !run[run.len() - 1].1.followed_by(next) {
                    break;
                }
                run.push((ids[i + run.len()], *next));
            }
            let range = run_range(&run);
            match self.packs.read(first.pack, range.start, (range.end - range.start) as usize) {
                Ok(b) => {
                    for (k, (id, loc)) in run.iter().enumerate() {
                        let from = (loc.offset - FRAME_HEADER as u64 - range.start) as usize;
                        let to = (loc.offset + u64::from(loc.len) - range.start) as usize;
                        let frame = b.slice(from.min(b.len())..to.min(b.len()));
                        let single = [(*id, ChunkLoc { offset: FRAME_HEADER as u64, ..*loc })];
                        if first_bad(&single, &frame).is_none() {
                            out[i + k] = Some(frame);
                        } else {
                            bad.push((*id, *loc, "failed its check".to_string()));
                        }
                    }
                }
                Err(e) => bad.extend(run.iter().map(|(id, loc)| (*id, *loc, e.to_string()))),
            }
            i += run.len();
        }
        if !bad.is_empty() {
            let mut st = self.lock();
            for (id, loc, why) in bad {
                tracing::warn!(chunk = %id, pack = loc.pack, reason = %why, "cached chunk unreadable; dropped");
                if st.index.get(&id).is_some_and(|s| s.loc == loc) {
                    st.index.remove(&id);
                    st.corrupt += 1;
                }
            }
        }
        out
    }

    /// Stores `chunks` (already verified by the caller), evicting as needed; chunks the cache
    /// already holds are skipped.
    pub fn insert(&self, chunks: &[(ChunkId, Bytes)]) -> Result<(), PackError> {
        let mut st = self.lock();
        let mut fresh: Vec<(ChunkId, &[u8])> = Vec::with_capacity(chunks.len());
        let mut seen = std::collections::HashSet::new();
        for (id, data) in chunks {
            if !st.index.contains_key(id) && seen.insert(*id) {
                fresh.push((*id, &data[..]));
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let incoming: u64 = fresh.iter().map(|(_, d)| (FRAME_HEADER + d.len()) as u64).sum::<u64>() + 2 * 4096;
        if incoming > self.cap {
            return Ok(());
        }
        self.make_room(&mut st, incoming)?;
        self.append(&mut st, &fresh)?;
        Ok(())
    }

    /// Appends `fresh` to the current segment (starting one if needed) and indexes it.
    fn append(&self, st: &mut State, fresh: &[(ChunkId, &[u8])]) -> Result<(), PackError> {
        if st.writing.as_ref().is_some_and(|w| w.len >= self.segment_bytes) {
            st.writing = None;
        }
        if st.writing.is_none() {
            let pack = st.next;
            st.next += 1;
            let out = self.packs.create(pack)?;
            st.segments.insert(pack, 0);
            st.writing = Some(Writing { pack, out, len: 0 });
        }
        let w = st.writing.as_mut().expect("a segment is open");
        let (locs, len) = match append_frames(w.out.as_mut(), w.len, fresh, w.pack) {
            Ok(r) => r,
            Err(e) => {
                // How much of the segment reached the disk is unknown now: it goes whole (it is a
                // cache), so the bound counts only what is known.
                let pack = w.pack;
                self.drop_segment(st, pack);
                return Err(e);
            }
        };
        let (pack, before) = (w.pack, disk_bytes(w.len));
        w.len = len;
        let after = disk_bytes(len);
        *st.segments.entry(pack).or_default() = after;
        st.bytes += after - before;
        for (id, loc) in locs {
            st.index.insert(id, Slot { loc, hit: false });
        }
        Ok(())
    }

    /// Evicts the oldest segments until `incoming` more bytes fit under the cap.
    fn make_room(&self, st: &mut State, incoming: u64) -> Result<(), PackError> {
        while st.bytes + incoming > self.cap {
            let Some((&oldest, _)) = st.segments.first_key_value() else { break };
            if st.writing.as_ref().is_some_and(|w| w.pack == oldest) {
                // Only the segment being written is left: start afresh.
                st.writing = None;
            }
            // Chunks read since they were written get a second chance, up to half the segment.
            let seg = *st.segments.get(&oldest).unwrap_or(&0);
            let mut hot: Vec<(ChunkId, ChunkLoc)> =
                st.index.iter().filter(|(_, s)| s.loc.pack == oldest && s.hit).map(|(id, s)| (*id, s.loc)).collect();
            hot.sort_by_key(|(_, loc)| loc.offset);
            let mut budget = seg / 2;
            hot.retain(|(_, loc)| {
                let cost = u64::from(loc.len) + FRAME_HEADER as u64;
                let keep = cost <= budget;
                if keep {
                    budget -= cost;
                }
                keep
            });
            let mut kept = Vec::with_capacity(hot.len());
            for (id, loc) in &hot {
                if let Some(b) = self.read_checked(*id, *loc) {
                    kept.push((*id, b));
                }
            }
            self.drop_segment(st, oldest);
            if !kept.is_empty() {
                let refs: Vec<(ChunkId, &[u8])> = kept.iter().map(|(id, b)| (*id, &b[..])).collect();
                self.append(st, &refs)?;
            }
        }
        Ok(())
    }

    fn read_checked(&self, id: ChunkId, loc: ChunkLoc) -> Option<Bytes> {
        let run = [(id, loc)];
        let range = run_range(&run);
        let b = self.packs.read(loc.pack, range.start, (range.end - range.start) as usize).ok()?;
        first_bad(&run, &b).is_none().then(|| b.slice(FRAME_HEADER..))
    }

    fn drop_segment(&self, st: &mut State, pack: PackId) {
        if st.writing.as_ref().is_some_and(|w| w.pack == pack) {
            st.writing = None;
        }
        if let Some(disk) = st.segments.remove(&pack) {
            st.bytes -= disk;
        }
        st.index.retain(|_, s| s.loc.pack != pack);
        st.evictions += 1;
        if let Err(e) = self.packs.delete(pack) {
            tracing::warn!(pack, error = %e, "could not delete an evicted cache segment");
        }
    }
}

/// Disk a segment of `len` bytes takes: whole 4 KiB blocks.
fn disk_bytes(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}

/// The chunks of segment `pack` (`len` bytes), from its frame headers, up to the first header
/// that cannot be a chunk's (a tail a crash cut short). Padding frames (zero id) are skipped.
fn scan(packs: &LocalPacks, pack: PackId, len: u64) -> Vec<(ChunkId, ChunkLoc)> {
    let mut out = Vec::new();
    let mut at = 0u64;
    while at + FRAME_HEADER as u64 <= len {
        let Ok(h) = packs.read(pack, at, FRAME_HEADER) else { break };
        let n = u32::from_be_bytes([h[32], h[33], h[34], h[35]]);
        let end = at + FRAME_HEADER as u64 + u64::from(n);
        let padding = h[..32].iter().all(|b| *b == 0);
        if end > len || (!padding && n as usize > CHUNK_PARAMS.max) {
            break;
        }
        if !padding {
            let mut id = [0u8; 32];
            id.copy_from_slice(&h[..32]);
            out.push((ChunkId(id), ChunkLoc { pack, offset: at + FRAME_HEADER as u64, len: n }));
        }
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u32, size: usize) -> (ChunkId, Bytes) {
        let mut d = vec![(i % 251) as u8; size];
        d[..4].copy_from_slice(&i.to_le_bytes());
        (ChunkId::of(&d), Bytes::from(d))
    }

    fn dir_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096) * 4096).sum()
    }

    #[test]
    fn the_cache_stays_within_its_bound_and_keeps_what_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 4 * 1024 * 1024;
        let cache = Cache::open(dir.path(), cap).unwrap();
        let hot = chunk(0, 60_000);
        cache.insert(std::slice::from_ref(&hot)).unwrap();
        for i in 1..400 {
            cache.insert(&[chunk(i, 60_000)]).unwrap();
            // Read the hot chunk now and then, as a busy relay would.
            if i % 10 == 0 {
                assert_eq!(cache.get(&hot.0).as_deref(), Some(&hot.1[..]), "hot chunk kept at {i}");
            }
            assert!(cache.stats().bytes <= cap, "{:?}", cache.stats());
            assert!(dir_bytes(dir.path()) <= cap, "disk {} at {i}", dir_bytes(dir.path()));
        }
        let s = cache.stats();
        assert!(s.evictions > 0, "{s:?}");
        assert!(!cache.contains(&chunk(1, 60_000).0), "cold chunks went");
        assert!(cache.contains(&chunk(399, 60_000).0));
    }

    #[test]
    fn a_reopened_cache_keeps_its_chunks_and_never_serves_a_tampered_one() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (0..20).map(|i| chunk(i, 30_000 + i as usize)).collect();
        // Two runs: the second writes a segment of its own.
        for part in [&chunks[..10], &chunks[10..]] {
            let cache = Cache::open(dir.path(), 64 * 1024 * 1024).unwrap();
            cache.insert(part).unwrap();
        }
        let cache = Cache::open(dir.path(), 64 * 1024 * 1024).unwrap();
        assert_eq!(cache.stats().chunks, 20);
        for (id, data) in &chunks {
            assert_eq!(cache.get(id).as_deref(), Some(&data[..]));
        }
        // Flip a byte in the middle of chunk 3's bytes, on disk.
        let path = dir.path().join(format!("{:08}.pack", 1));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(32).position(|w| w == chunks[3].0.as_bytes()).unwrap() + FRAME_HEADER + 100;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let cache = Cache::open(dir.path(), 64 * 1024 * 1024).unwrap();
        assert_eq!(cache.get(&chunks[3].0), None, "a tampered chunk is never served");
        assert!(!cache.contains(&chunks[3].0));
        assert_eq!(cache.stats().corrupt, 1);
        assert_eq!(cache.get(&chunks[4].0).as_deref(), Some(&chunks[4].1[..]));
        // A segment cut short by a crash: the chunks before the cut are kept.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let cut = bytes.windows(32).position(|w| w == chunks[8].0.as_bytes()).unwrap() as u64 + 10;
        file.set_len(cut).unwrap();
        let cache = Cache::open(dir.path(), 64 * 1024 * 1024).unwrap();
        assert!(cache.contains(&chunks[7].0) && !cache.contains(&chunks[8].0));
        assert!(cache.contains(&chunks[15].0), "the next segment is untouched");
    }

    #[test]
    fn a_smaller_bound_at_start_evicts_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path(), 1024 * 1024 * 1024).unwrap();
            for i in 0..100 {
                cache.insert(&[chunk(i, 100_000)]).unwrap();
            }
        }
        let cache = Cache::open(dir.path(), 2 * 1024 * 1024).unwrap();
        assert!(cache.stats().bytes <= 2 * 1024 * 1024);
        assert!(dir_bytes(dir.path()) <= 2 * 1024 * 1024);
    }
}
