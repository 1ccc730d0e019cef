//! What a pack holds: a sequence of frames (32-byte chunk id, 4-byte big-endian length, the
//! chunk's bytes), exactly as chunk batches travel on the wire, padded at the end of every flush
//! with a frame of zero id to the writer's alignment. So a run of chunks stored back to back is
//! served with one read and no copy, and every chunk read is checked against its id here.

use shoal_protocol::ChunkId;
use shoal_protocol::api::FRAME_HEADER;

use crate::{PackError, PackId, PackWriter};

/// Zeros for padding frames (at most two alignment blocks).
static ZEROS: [u8; 2 * 4096] = [0; 2 * 4096];

/// Where a chunk's bytes are: pack number, byte offset of the bytes (past the frame header) and
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pack: PackId,
    pub offset: u64,
    pub len: u32,
}

impl ChunkLoc {
    /// The size of [`to_bytes`](Self::to_bytes).
    pub const ENCODED: usize = 16;

    /// Pack, offset and length, big-endian.
    pub fn to_bytes(&self) -> [u8; Self::ENCODED] {
        let mut b = [0u8; Self::ENCODED];
        b[..4].copy_from_slice(&self.pack.to_be_bytes());
        b[4..12].copy_from_slice(&self.offset.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// The inverse of [`to_bytes`](Self::to_bytes); `None` if `b` is too short.
    pub fn from_bytes(b: &[u8]) -> Option<ChunkLoc> {
        Some(ChunkLoc {
            pack: u32::from_be_bytes(b.get(0..4)?.try_into().ok()?),
            offset: u64::from_be_bytes(b.get(4..12)?.try_into().ok()?),
            len: u32::from_be_bytes(b.get(12..16)?.try_into().ok()?),
        })
    }

    /// `true` if `next`'s frame starts right where this chunk's bytes end, in the same pack: the
    /// two are read with one request.
    pub fn followed_by(&self, next: &ChunkLoc) -> bool {
        self.pack == next.pack && self.offset + u64::from(self.len) + FRAME_HEADER as u64 == next.offset
    }
}

/// Appends the frames of `fresh` to `out` (whose pack `pack` is `at` bytes long), padded to the
/// writer's alignment, and flushes; returns where each chunk went and the pack's new length.
pub fn append_frames(
    out: &mut dyn PackWriter,
    at: u64,
    fresh: &[(ChunkId, &[u8])],
    pack: PackId,
) -> Result<(Vec<(ChunkId, ChunkLoc)>, u64), PackError> {
    let mut locs = Vec::with_capacity(fresh.len());
    let mut pos = at;
    for (id, data) in fresh {
        out.append(&header(id.as_bytes(), data.len()))?;
        locs.push((*id, ChunkLoc { pack, offset: pos + FRAME_HEADER as u64, len: data.len() as u32 }));
        out.append(data)?;
        pos += (FRAME_HEADER + data.len()) as u64;
    }
    let align = out.alignment();
    let rem = pos as usize % align;
    if rem != 0 {
        // Pad with a frame of zero id, so the pack stays a frame sequence.
        let mut pad = align - rem;
        if pad < FRAME_HEADER {
            pad += align;
        }
        out.append(&header(&[0; 32], pad - FRAME_HEADER))?;
        let mut zeros = pad - FRAME_HEADER;
        while zeros > 0 {
            let n = zeros.min(ZEROS.len());
            out.append(&ZEROS[..n])?;
            zeros -= n;
        }
        pos += pad as u64;
    }
    out.flush()?;
    Ok((locs, pos))
}

fn header(id: &[u8; 32], len: usize) -> [u8; FRAME_HEADER] {
    let mut h = [0u8; FRAME_HEADER];
    h[..32].copy_from_slice(id);
    h[32..].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// The byte range of a pack that holds the frames of `run` (chunks stored back to back, each
/// [`followed_by`](ChunkLoc::followed_by) the next): from the first frame's header to the end of
/// the last chunk.
pub fn run_range(run: &[(ChunkId, ChunkLoc)]) -> std::ops::Range<u64> {
    match (run.first(), run.last()) {
        (Some((_, first)), Some((_, last))) => first.offset - FRAME_HEADER as u64..last.offset + u64::from(last.len),
        _ => 0..0,
    }
}

/// The first chunk of `run` whose frame in `bytes` (what [`run_range`] of `run` read) is not
/// intact: not its id, not its length, or bytes whose BLAKE3 is not its id. `None`: every
/// chunk of `run` may be served.
pub fn first_bad<'a>(run: &'a [(ChunkId, ChunkLoc)], bytes: &[u8]) -> Option<&'a (ChunkId, ChunkLoc)> {
    let base = run.first()?.1.offset;
    run.iter().find(|(id, loc)| !frame_ok(bytes, base, id, loc))
}

/// `true` if the frame of `id` at `loc` inside `bytes` (which starts with the frame of the chunk
/// whose data is at offset `base`) carries `id`, the right length, and bytes whose BLAKE3 is `id`.
fn frame_ok(bytes: &[u8], base: u64, id: &ChunkId, loc: &ChunkLoc) -> bool {
    let Some(data_at) = loc.offset.checked_sub(base).map(|d| d as usize + FRAME_HEADER) else {
        return false;
    };
    let Some(header) = bytes.get(data_at - FRAME_HEADER..data_at) else {
        return false;
    };
    let Some(data) = bytes.get(data_at..data_at + loc.len as usize) else {
        return false;
    };
    header[..32] == id.as_bytes()[..] && header[32..] == loc.len.to_be_bytes() && ChunkId::of(data) == *id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PackBackend;
    use crate::local::LocalPacks;

    #[test]
    fn frames_go_in_padded_and_come_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let packs = LocalPacks::open(dir.path()).unwrap();
        let data: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + i as usize * 700]).collect();
        let fresh: Vec<(ChunkId, &[u8])> = data.iter().map(|d| (ChunkId::of(d), &d[..])).collect();
        let mut w = packs.create(7).unwrap();
        let (locs, len) = append_frames(&mut *w, 0, &fresh, 7).unwrap();
        assert_eq!(len % w.alignment() as u64, 0, "padded to the alignment");
        w.make_durable().unwrap()().unwrap();
        drop(w);
        assert!(locs.windows(2).all(|p| p[0].1.followed_by(&p[1].1)));
        let range = run_range(&locs);
        let bytes = packs.read(7, range.start, (range.end - range.start) as usize).unwrap();
        assert_eq!(first_bad(&locs, &bytes), None);
        assert_eq!(ChunkLoc::from_bytes(&locs[3].1.to_bytes()), Some(locs[3].1));

        // One flipped byte in the third chunk: the two before it may still be served.
        let mut bad = bytes.to_vec();
        bad[(locs[2].1.offset - locs[0].1.offset) as usize + FRAME_HEADER + 10] ^= 1;
        assert_eq!(first_bad(&locs, &bad).map(|(id, _)| *id), Some(locs[2].0));
        // Cut short, or a length that is not the index's: bad too.
        assert_eq!(first_bad(&locs, &bytes[..bytes.len() - 1]).map(|(id, _)| *id), Some(locs[4].0));
        let mut wrong = locs.clone();
        wrong[1].1.len -= 1;
        assert_eq!(first_bad(&wrong, &bytes).map(|(id, _)| *id), Some(locs[1].0));
    }
}
