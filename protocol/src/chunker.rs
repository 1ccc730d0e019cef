//! Content-defined chunking (FastCDC v2020) with BLAKE3 per chunk and for the whole file, in one
//! streaming pass. Every file is cut with the same pinned parameters so identical content dedups
//! across files, versions and devices; `tests::snapshot` pins the cut points, because changing
//! them silently breaks dedup.

use std::io::{self, Read};

use fastcdc::v2020::FastCDC;

use crate::entry::{ChunkRef, Manifest};
use crate::ids::ChunkId;

/// FastCDC v2020 size bounds. fastcdc 5 requires even sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
}

/// The one parameter set every Shoal chunk is cut with: 16 KiB / 64 KiB / 256 KiB.
/// Chosen with `chunkbench params` (README, "Chunker parameters"): a small edit uploads ~90-160 KiB
/// of new chunks on average while per-chunk overhead (metadata, requests, index rows) stays at
/// about 13k chunks per GiB. Changing it re-chunks every file: bump `CHUNKER_VERSION`.
pub const CHUNK_PARAMS: ChunkParams = ChunkParams { min: 16 * 1024, avg: 64 * 1024, max: 256 * 1024 };

/// Names the chunker (algorithm, crate major version, parameters) in stored formats.
pub const CHUNKER_VERSION: u32 = 1;

/// Bytes read from the source at a time. Large enough to amortize reads and hold many maximal
/// chunks; small enough that chunking a file of any size uses a few MiB of memory.
const READ_BUF: usize = 4 * 1024 * 1024;

/// Why chunking failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkerError {
    #[error("reading the source failed: {0}")]
    Read(#[from] io::Error),
    #[error("the chunk callback failed: {0}")]
    Callback(String),
}

/// A streaming chunker with fixed parameters.
#[derive(Debug, Clone, Copy)]
pub struct Chunker {
    params: ChunkParams,
}

impl Default for Chunker {
    fn default() -> Self {
        Chunker { params: CHUNK_PARAMS }
    }
}

impl Chunker {
    /// A chunker with other parameters, for benchmarks. Sizes must be even and ordered.
    pub fn with_params(params: ChunkParams) -> Self {
        assert!(
            params.min.is_multiple_of(2) && params.avg.is_multiple_of(2) && params.max.is_multiple_of(2),
            "fastcdc v2020 needs even sizes"
        );
        assert!(params.min <= params.avg && params.avg <= params.max && params.max * 2 <= READ_BUF);
        Chunker { params }
    }

    /// Chunks everything `src` yields and returns the manifest.
    pub fn manifest(&self, src: impl Read) -> Result<Manifest, ChunkerError> {
        self.chunk(src, |_, _, _| Ok(()))
    }

    /// Chunks everything `src` yields, calling `on_chunk(chunk, offset, bytes)` for each chunk in
    /// order, and returns the manifest. Memory use is bounded by the read buffer, whatever the
    /// size of the source. For large reads both cores work: the whole-file hash runs on a second
    /// thread while the buffer is cut, then both threads hash the buffer's chunks, which are
    /// handed to `on_chunk` in order.
    pub fn chunk<F>(&self, src: impl Read, on_chunk: F) -> Result<Manifest, ChunkerError>
    where
        F: FnMut(&ChunkRef, u64, &[u8]) -> Result<(), String>,
    {
        self.chunk_sized(src, READ_BUF as u64, on_chunk)
    }

    /// [`Chunker::chunk`] for a source expected to hold about `size` bytes: the read buffer
    /// starts just large enough for that (a 1 KiB file no longer costs a zeroed 4 MiB buffer)
    /// and grows to the full size if the source turns out larger. The result is the same.
    pub fn chunk_sized<F>(&self, mut src: impl Read, size: u64, mut on_chunk: F) -> Result<Manifest, ChunkerError>
    where
        F: FnMut(&ChunkRef, u64, &[u8]) -> Result<(), String>,
    {
        let p = self.params;
        // One byte more than expected, so the read that finds the end fits.
        let start = usize::try_from(size.saturating_add(1)).unwrap_or(READ_BUF).clamp(1, READ_BUF);
        let mut buf = vec![0u8; start];
        let mut filled = 0usize; // bytes of `buf` holding data
        let mut hashed = 0usize; // prefix of `buf` already fed to the whole-file hasher
        let mut offset = 0u64; // file offset of buf[0]
        let mut whole = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let mut eof = false;
        while !eof {
            while filled < buf.len() {
                let n = match src.read(&mut buf[filled..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                };
                if n == 0 {
                    eof = true;
                    break;
                }
                filled += n;
                if filled == buf.len() && buf.len() < READ_BUF {
                    // Larger than expected: cutting needs the full buffer (`2 * max` at least).
                    buf.resize(READ_BUF, 0);
                }
            }
            let data = &buf[..filled];
            let fresh = &data[hashed..];
            let (consumed, result) = std::thread::scope(|s| {
                // Small reads are hashed inline: a thread costs more than it saves.
                let big = fresh.len() >= 1 << 20;
                let h = if big {
                    Some(s.spawn(|| {
                        whole.update(fresh);
                    }))
                } else {
                    whole.update(fresh);
                    None
                };
                // Cut first (while the whole-file hash runs beside), then hash the chunks on
                // both threads, then hand them over in order.
                let mut cuts: Vec<(usize, usize)> = Vec::new();
                for c in FastCDC::new(data, p.min, p.avg, p.max) {
                    if !eof && c.offset + c.length == data.len() {
                        // The cut may only be the end of the buffer: re-cut with more data.
                        break;
                    }
                    cuts.push((c.offset, c.length));
                }
                if let Some(h) = h {
                    h.join().expect("the hashing thread only calls blake3, which does not panic");
                }
                let hash = |cuts: &[(usize, usize)]| -> Vec<ChunkId> {
                    cuts.iter().map(|&(at, len)| ChunkId::of(&data[at..at + len])).collect()
                };
                let ids = if big && cuts.len() > 1 {
                    let (first, second) = cuts.split_at(cuts.len() / 2);
                    std::thread::scope(|s| {
                        let other = s.spawn(|| hash(second));
                        let mut ids = hash(first);
                        ids.extend(other.join().expect("the hashing thread only calls blake3, which does not panic"));
                        ids
                    })
                } else {
                    hash(&cuts)
                };
                let mut consumed = 0usize;
                let mut result = Ok(());
                for (&(at, len), id) in cuts.iter().zip(ids) {
                    let chunk = ChunkRef { id, len: len as u32 };
                    if let Err(e) = on_chunk(&chunk, offset + at as u64, &data[at..at + len]) {
                        result = Err(e);
                        break;
                    }
                    chunks.push(chunk);
                    consumed = at + len;
                }
                (consumed, result)
            });
            result.map_err(ChunkerError::Callback)?;
            buf.copy_within(consumed..filled, 0);
            filled -= consumed;
            hashed = filled;
            offset += consumed as u64;
        }
        let size = chunks.iter().map(|c| u64::from(c.len)).sum();
        Ok(Manifest { size, hash: whole.finalize().into(), chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::noise;
    use proptest::prelude::*;

    fn check(data: &[u8]) -> (Manifest, Vec<Vec<u8>>) {
        let mut pieces = Vec::new();
        let m = Chunker::default()
            .chunk(data, |c, off, b| {
                assert_eq!(c.len as usize, b.len());
                assert_eq!(ChunkId::of(b), c.id);
                assert_eq!(off as usize, pieces.iter().map(Vec::len).sum::<usize>());
                pieces.push(b.to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(pieces.concat(), data, "chunks concatenate to the input");
        assert_eq!(m.hash, ChunkId::of(data));
        assert_eq!(m.size as usize, data.len());
        assert!(m.is_consistent());
        for (i, c) in m.chunks.iter().enumerate() {
            assert!(c.len as usize <= CHUNK_PARAMS.max);
            if i + 1 < m.chunks.len() {
                assert!(c.len as usize >= CHUNK_PARAMS.min, "only the last chunk may be short");
            }
        }
        (m, pieces)
    }

    #[test]
    fn empty_file_has_no_chunks() {
        let (m, _) = check(b"");
        assert_eq!(m, Manifest::empty());
    }

    #[test]
    fn streaming_equals_whole_buffer_chunking() {
        // 11 MiB crosses several read buffers; compare with fastcdc over the whole slice.
        let data = noise(7, 11 * 1024 * 1024 + 12345);
        let (m, _) = check(&data);
        let p = CHUNK_PARAMS;
        let direct: Vec<u32> = FastCDC::new(&data, p.min, p.avg, p.max).map(|c| c.length as u32).collect();
        assert_eq!(m.chunks.iter().map(|c| c.len).collect::<Vec<_>>(), direct);
    }

    /// Pins the cut points and ids. If this fails, the chunker changed and every stored file would
    /// re-chunk: that needs a new `CHUNKER_VERSION`, not a new snapshot.
    #[test]
    fn snapshot() {
        let data = noise(42, 1024 * 1024);
        let (m, _) = check(&data);
        let lens: Vec<u32> = m.chunks.iter().map(|c| c.len).collect();
        assert_eq!(lens, SNAPSHOT_LENS, "cut points moved");
        assert_eq!(m.chunks[0].id.to_string(), SNAPSHOT_FIRST_ID);
        assert_eq!(m.hash.to_string(), SNAPSHOT_FILE_HASH);
    }

    const SNAPSHOT_LENS: &[u32] =
        &[75408, 38902, 35231, 73905, 50484, 24278, 75794, 151960, 150696, 66923, 66671, 58737, 26970, 57467, 95150];
    const SNAPSHOT_FIRST_ID: &str = "ec3b225c7377f84af09f52131a8ee82b18622cd1da973c4cb00d5bad48881ac5";
    const SNAPSHOT_FILE_HASH: &str = "734b6cf25993f7c0cffb11946df3bef03b9174a0962edd4531466f5e4a5f7940";

    #[test]
    fn callback_error_stops_chunking() {
        let data = noise(1, 1 << 20);
        let err = Chunker::default().chunk(&data[..], |_, _, _| Err("stop".into())).unwrap_err();
        assert!(matches!(err, ChunkerError::Callback(ref s) if s == "stop"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn concatenation_and_bounds(seed in any::<u64>(), len in 0usize..1_500_000) {
            check(&noise(seed, len));
        }

        /// The size hint only sizes the first read buffer: a wrong one (a file that grew or
        /// shrank since its stat) gives the same manifest.
        #[test]
        fn size_hint_never_changes_the_result(seed in any::<u64>(), len in 0usize..9_000_000, hint in 0u64..10_000_000) {
            let data = noise(seed, len);
            let want = Chunker::default().manifest(&data[..]).unwrap();
            let got = Chunker::default().chunk_sized(&data[..], hint, |_, _, _| Ok(())).unwrap();
            prop_assert_eq!(got, want);
            let exact = Chunker::default().chunk_sized(&data[..], len as u64, |_, _, _| Ok(())).unwrap();
            prop_assert_eq!(exact, Chunker::default().manifest(&data[..]).unwrap());
        }

        /// An edit only changes chunks near it: inserting a few bytes in the middle of a file
        /// leaves all but a few chunks shared with the old version.
        #[test]
        fn edit_is_local(seed in any::<u64>(), at in 0.0f64..1.0, ins in 1usize..2048) {
            let old = noise(seed, 4 * 1024 * 1024);
            let pos = (old.len() as f64 * at) as usize;
            let mut new = old[..pos].to_vec();
            new.extend_from_slice(&noise(seed ^ 1, ins));
            new.extend_from_slice(&old[pos..]);
            let (a, _) = check(&old);
            let (b, _) = check(&new);
            let old_ids: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.id).collect();
            let fresh: u64 = b.chunks.iter().filter(|c| !old_ids.contains(&c.id)).map(|c| u64::from(c.len)).sum();
            prop_assert!(fresh <= 3 * CHUNK_PARAMS.max as u64, "{fresh} new bytes for a {ins}-byte insert");
        }
    }
}
