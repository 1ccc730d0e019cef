//! What two devices of one user say to each other once connected (QUIC, ALPN `shoal/peer/1`, after
//! the `PeerHello`/`PeerWelcome` exchange). Every request is one bidirectional stream: the caller
//! writes one request and finishes its side, the answer comes back on the same stream.
//!
//! - `Have(ids)` → a bitmap, one bit per id in request order (bit `i` is bit `i % 8` of byte
//!   `i / 8`): set if the device can serve that chunk now.
//! - `Get(ids)` → chunk frames (`api::encode_frame`) for the ids in request order, skipping any the
//!   device cannot serve after all (a file changed since `Have`); then the stream ends. A caller
//!   takes what came and asks another source for the rest.
//!
//! Requests are binary: a tag byte, a 4-byte big-endian count, then the 32-byte ids.

use crate::ChunkId;

/// Most chunk ids in one request.
pub const MAX_PEER_IDS: usize = 4096;
/// Largest request on the wire.
pub const MAX_PEER_REQUEST: usize = 5 + 32 * MAX_PEER_IDS;

const TAG_HAVE: u8 = b'H';
const TAG_GET: u8 = b'G';

/// A request from one device to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRequest {
    Have(Vec<ChunkId>),
    Get(Vec<ChunkId>),
}

/// Why request bytes are not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRequestError {
    #[error("peer request is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("unknown peer request {0:#04x}")]
    UnknownTag(u8),
    #[error("peer request names {0} chunks, more than {MAX_PEER_IDS}")]
    TooMany(usize),
    #[error("peer request names {count} chunks but carries {bytes} bytes of ids")]
    Length { count: usize, bytes: usize },
}

impl PeerRequest {
    pub fn ids(&self) -> &[ChunkId] {
        match self {
            PeerRequest::Have(ids) | PeerRequest::Get(ids) => ids,
        }
    }

    /// The request's bytes. Panics on more than `MAX_PEER_IDS` ids: callers split their lists.
    pub fn encode(&self) -> Vec<u8> {
        let ids = self.ids();
        assert!(ids.len() <= MAX_PEER_IDS, "a peer request holds at most {MAX_PEER_IDS} ids");
        let mut out = Vec::with_capacity(5 + 32 * ids.len());
        out.push(match self {
            PeerRequest::Have(_) => TAG_HAVE,
            PeerRequest::Get(_) => TAG_GET,
        });
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            out.extend_from_slice(id.as_bytes());
        }
        out
    }

    /// Parses a whole request (the caller bounds what it reads by `MAX_PEER_REQUEST`).
    pub fn decode(buf: &[u8]) -> Result<PeerRequest, PeerRequestError> {
        let Some((&tag, rest)) = buf.split_first() else { return Err(PeerRequestError::Short(0)) };
        if rest.len() < 4 {
            return Err(PeerRequestError::Short(buf.len()));
        }
        let (count, body) = rest.split_at(4);
        let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
        if count > MAX_PEER_IDS {
            return Err(PeerRequestError::TooMany(count));
        }
        if body.len() != count * 32 {
            return Err(PeerRequestError::Length { count, bytes: body.len() });
        }
        let ids = body
            .chunks_exact(32)
            .map(|b| {
                let mut id = [0u8; 32];
                id.copy_from_slice(b);
                ChunkId(id)
            })
            .collect();
        match tag {
            TAG_HAVE => Ok(PeerRequest::Have(ids)),
            TAG_GET => Ok(PeerRequest::Get(ids)),
            t => Err(PeerRequestError::UnknownTag(t)),
        }
    }
}

/// The answer to `Have`: one bit per requested id.
pub fn encode_bitmap(bits: impl IntoIterator<Item = bool>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, b) in bits.into_iter().enumerate() {
        if i % 8 == 0 {
            out.push(0);
        }
        if b {
            *out.last_mut().expect("a byte was pushed") |= 1 << (i % 8);
        }
    }
    out
}

/// Bytes in the bitmap answering a `Have` of `n` ids.
pub fn bitmap_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// Bit `i` of a bitmap (`false` past its end).
pub fn bitmap_get(map: &[u8], i: usize) -> bool {
    map.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn requests_round_trip() {
        let ids: Vec<ChunkId> = (0..5u8).map(|i| ChunkId::of(&[i])).collect();
        for r in [PeerRequest::Have(ids.clone()), PeerRequest::Get(ids), PeerRequest::Get(Vec::new())] {
            assert_eq!(PeerRequest::decode(&r.encode()), Ok(r));
        }
        let full = PeerRequest::Have(vec![ChunkId::of(b""); MAX_PEER_IDS]).encode();
        assert_eq!(full.len(), MAX_PEER_REQUEST);
    }

    #[test]
    fn bad_requests_are_refused() {
        let good = PeerRequest::Get(vec![ChunkId::of(b"a")]).encode();
        assert_eq!(PeerRequest::decode(&[]), Err(PeerRequestError::Short(0)));
        assert_eq!(PeerRequest::decode(&good[..3]), Err(PeerRequestError::Short(3)));
        assert_eq!(PeerRequest::decode(&good[..good.len() - 1]), Err(PeerRequestError::Length { count: 1, bytes: 31 }));
        let mut tag = good.clone();
        tag[0] = b'X';
        assert_eq!(PeerRequest::decode(&tag), Err(PeerRequestError::UnknownTag(b'X')));
        let mut many = good;
        many[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(PeerRequest::decode(&many), Err(PeerRequestError::TooMany(u32::MAX as usize)));
    }

    #[test]
    fn bitmaps() {
        let bits = [true, false, false, true, false, false, false, false, true];
        let map = encode_bitmap(bits);
        assert_eq!(map, vec![0b0000_1001, 0b1]);
        assert_eq!(map.len(), bitmap_len(bits.len()));
        for (i, b) in bits.iter().enumerate() {
            assert_eq!(bitmap_get(&map, i), *b);
        }
        assert!(!bitmap_get(&map, 100));
    }

    proptest! {
        /// Parsing network input never panics, and whatever parses encodes back to itself.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(r) = PeerRequest::decode(&bytes) {
                prop_assert_eq!(r.encode(), bytes);
            }
        }
    }
}
