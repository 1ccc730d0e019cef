//! What two devices of one user say to each other (QUIC, ALPN `shoal/peer/2`).
//!
//! **Introduction**, on the first bidirectional stream, before anything else. The TLS handshake
//! reveals nothing about either side (each presents a throwaway certificate; the client sends a
//! constant server name), so the devices prove who they are inside it, bound to this connection
//! by a value both derive from its TLS session (`binding`, an exporter), in an order that tells
//! an unauthenticated party nothing:
//! 1. caller → called: [`GroupProof`], a keyed hash of the binding under the user's LAN key,
//!    which the coordinator gives the user's devices: "I am one of this user's devices";
//! 2. called → caller: its [`DeviceProof`]: its device certificate (issued by the user's CA) and
//!    a signature over the binding with the certificate's key, and the id of its run;
//! 3. caller → called: the caller's [`DeviceProof`];
//! 4. called → caller: [`WELCOME`], one byte.
//!
//! Either side closes the connection instead of answering a message it does not accept. Each
//! message is a 2-byte big-endian length and that many bytes, at most [`MAX_INTRO_MESSAGE`].
//!
//! **Requests**, afterwards. Every request is one bidirectional stream: the caller writes one
//! request and finishes its side, the answer comes back on the same stream.
//!
//! - `Have(ids)` → a bitmap, one bit per id in request order (bit `i` is bit `i % 8` of byte
//!   `i / 8`): set if the device can serve that chunk now.
//! - `Get(ids)` → chunk frames (`api::encode_frame`) for the ids in request order, skipping any the
//!   device cannot serve after all (a file changed since `Have`); then the stream ends. A caller
//!   takes what came and asks another source for the rest.
//!
//! Requests are binary: a tag byte, a 4-byte big-endian count, then the 32-byte ids.

use crate::ChunkId;

/// Largest introduction message (a device certificate is ~600 bytes).
pub const MAX_INTRO_MESSAGE: usize = 8 * 1024;
/// The called device's last introduction message: the caller is admitted.
pub const WELCOME: u8 = 1;
/// What both sides export from the TLS session (RFC 5705 / 8446 §7.5) to bind the introduction
/// to this connection, and how many bytes.
pub const BINDING_LABEL: &[u8] = b"EXPERIMENTAL-shoal-peer-v2";
pub const BINDING_LEN: usize = 32;

/// The caller's proof that it holds the user's LAN key: `keyed_hash(lan key, GROUP_CONTEXT ||
/// binding)`, BLAKE3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupProof(pub [u8; 32]);

/// What the group proof hashes before the binding.
pub const GROUP_CONTEXT: &[u8] = b"shoal peer group proof v2";
/// What each side signs before the binding, so neither signature can stand for the other's.
pub const CALLER_CONTEXT: &[u8] = b"shoal peer caller v2";
pub const CALLED_CONTEXT: &[u8] = b"shoal peer called v2";

impl GroupProof {
    /// Computes the proof of `binding` under `key`.
    pub fn compute(key: &[u8; 32], binding: &[u8]) -> GroupProof {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(GROUP_CONTEXT);
        h.update(binding);
        GroupProof(*h.finalize().as_bytes())
    }

    /// `true` if this is the proof of `binding` under `key` (compared in constant time).
    pub fn verify(&self, key: &[u8; 32], binding: &[u8]) -> bool {
        blake3::Hash::from(self.0) == blake3::Hash::from(GroupProof::compute(key, binding).0)
    }

    pub fn decode(buf: &[u8]) -> Result<GroupProof, IntroError> {
        <[u8; 32]>::try_from(buf).map(GroupProof).map_err(|_| IntroError::Length(buf.len()))
    }
}

/// A device's proof of identity: its certificate (DER), a signature over its side's context and
/// the binding with the certificate's key (`scheme`: a TLS SignatureScheme code), and a random id
/// of its current run (a device that restarted is a new session, so its old connection goes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProof {
    pub session: [u8; 16],
    pub cert: Vec<u8>,
    pub scheme: u16,
    pub signature: Vec<u8>,
}

/// Why introduction bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntroError {
    #[error("introduction message of {0} bytes has the wrong length")]
    Length(usize),
    #[error("introduction message of {0} bytes exceeds {MAX_INTRO_MESSAGE}")]
    TooLarge(usize),
}

impl DeviceProof {
    /// Session, scheme, then the certificate and the signature, each after a 2-byte length.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(22 + self.cert.len() + self.signature.len());
        out.extend_from_slice(&self.session);
        out.extend_from_slice(&self.scheme.to_be_bytes());
        for part in [&self.cert, &self.signature] {
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<DeviceProof, IntroError> {
        let bad = || IntroError::Length(buf.len());
        if buf.len() > MAX_INTRO_MESSAGE {
            return Err(IntroError::TooLarge(buf.len()));
        }
        let (session, rest) = buf.split_first_chunk::<16>().ok_or_else(bad)?;
        let (scheme, mut rest) = rest.split_first_chunk::<2>().ok_or_else(bad)?;
        let mut parts = Vec::with_capacity(2);
        for _ in 0..2 {
            let (len, tail) = rest.split_first_chunk::<2>().ok_or_else(bad)?;
            let len = u16::from_be_bytes(*len) as usize;
            if tail.len() < len {
                return Err(bad());
            }
            let (part, tail) = tail.split_at(len);
            parts.push(part.to_vec());
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(bad());
        }
        let signature = parts.pop().ok_or_else(bad)?;
        let cert = parts.pop().ok_or_else(bad)?;
        Ok(DeviceProof { session: *session, cert, scheme: u16::from_be_bytes(*scheme), signature })
    }
}

/// One introduction message as sent: its 2-byte length, then its bytes.
pub fn frame_intro(msg: &[u8]) -> Result<Vec<u8>, IntroError> {
    if msg.len() > MAX_INTRO_MESSAGE {
        return Err(IntroError::TooLarge(msg.len()));
    }
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    Ok(out)
}

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

    #[test]
    fn introductions_round_trip_and_proofs_bind() {
        let proof = DeviceProof { session: [7; 16], cert: vec![1; 600], scheme: 0x0403, signature: vec![2; 72] };
        assert_eq!(DeviceProof::decode(&proof.encode()), Ok(proof.clone()));
        let mut short = proof.encode();
        short.pop();
        assert!(DeviceProof::decode(&short).is_err());
        assert!(DeviceProof::decode(&[0; MAX_INTRO_MESSAGE + 1]).is_err());
        let key = [9u8; 32];
        let g = GroupProof::compute(&key, b"binding");
        assert!(g.verify(&key, b"binding"));
        assert!(!g.verify(&key, b"another connection"));
        assert!(!g.verify(&[8; 32], b"binding"));
        assert_eq!(GroupProof::decode(&g.0), Ok(g));
        assert!(GroupProof::decode(&[0; 31]).is_err());
        assert_eq!(frame_intro(&[5, 6]), Ok(vec![0, 2, 5, 6]));
        assert!(frame_intro(&[0; MAX_INTRO_MESSAGE + 1]).is_err());
    }

    proptest! {
        /// Introduction messages from the network never panic the parser, and what parses
        /// encodes back to itself.
        #[test]
        fn device_proofs_decode_totally(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(p) = DeviceProof::decode(&bytes) {
                prop_assert_eq!(p.encode(), bytes);
            }
        }

        /// Parsing network input never panics, and whatever parses encodes back to itself.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(r) = PeerRequest::decode(&bytes) {
                prop_assert_eq!(r.encode(), bytes);
            }
        }
    }
}
