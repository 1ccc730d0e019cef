//! Relay tickets: what the coordinator signs so that a relay, which knows no user and no device,
//! can tell whether to serve a chunk. A ticket names a user, when it expires, and the chunks it
//! covers: a short list of ids, or the BLAKE3 digest of a longer list that the request carries
//! beside the ticket. The relay checks the signature offline with the coordinator's Ed25519
//! public key (`shoal_net::ticket`); this module is the format and the coverage rule, no crypto.
//!
//! A ticket travels as `base64url(body || signature)` (no padding), where the signature is over
//! [`SIGNED_CONTEXT`] followed by the body, and the body is:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version, 1 |
//! | 8 | user number, big-endian |
//! | 8 | expiry, milliseconds since the Unix epoch, big-endian |
//! | 1 | scope: 1 = ids, 2 = list digest |
//! | 2 + 32·n | ids: count n (at most [`MAX_TICKET_IDS`]), then the ids |
//! | 32 + 4 | list digest: BLAKE3 (keyed by purpose, [`list_digest`]) of the ids in order, and their count |

use crate::ChunkId;

/// What the signature covers before the body: a signature made for anything else never verifies
/// as a ticket.
pub const SIGNED_CONTEXT: &[u8] = b"shoal relay ticket v1\0";
/// The body's format version.
pub const TICKET_VERSION: u8 = 1;
/// Most ids a ticket lists itself; longer lists go by digest.
pub const MAX_TICKET_IDS: usize = 64;
/// Most ids a list behind a digest may hold (a request carries it whole).
pub const MAX_TICKET_LIST: usize = 4096;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The chunks a ticket covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// These ids.
    Ids(Vec<ChunkId>),
    /// The ids of a list the request carries, whose [`list_digest`] this is, `count` long.
    List { digest: [u8; 32], count: u32 },
}

/// What a ticket says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketBody {
    pub user: u64,
    pub expires_ms: u64,
    pub scope: Scope,
}

/// Why a ticket does not let its bearer have a chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("malformed ticket: {0}")]
    Malformed(&'static str),
    #[error("the ticket's signature is not the coordinator's")]
    BadSignature,
    #[error("the ticket expired")]
    Expired,
    #[error("the ticket does not cover chunk {0}")]
    NotCovered(ChunkId),
    #[error("the chunk list does not match the ticket's")]
    WrongList,
}

/// The digest a ticket names a list of ids by: BLAKE3 in derive-key mode (so it is never the id
/// of any chunk), over the ids in order.
pub fn list_digest(ids: &[ChunkId]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("shoal relay ticket chunk list v1");
    for id in ids {
        h.update(id.as_bytes());
    }
    *h.finalize().as_bytes()
}

impl TicketBody {
    /// A ticket for `ids`: listed if there are few, by digest otherwise. `None` past
    /// [`MAX_TICKET_LIST`] ids, or for none.
    pub fn for_chunks(user: u64, expires_ms: u64, ids: &[ChunkId]) -> Option<TicketBody> {
        let scope = match ids.len() {
            0 => return None,
            n if n <= MAX_TICKET_IDS => Scope::Ids(ids.to_vec()),
            n if n <= MAX_TICKET_LIST => Scope::List { digest: list_digest(ids), count: n as u32 },
            _ => return None,
        };
        Some(TicketBody { user, expires_ms, scope })
    }

    /// The body's bytes, as signed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(TICKET_VERSION);
        out.extend_from_slice(&self.user.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        match &self.scope {
            Scope::Ids(ids) => {
                out.push(1);
                out.extend_from_slice(&(ids.len() as u16).to_be_bytes());
                ids.iter().for_each(|id| out.extend_from_slice(id.as_bytes()));
            }
            Scope::List { digest, count } => {
                out.push(2);
                out.extend_from_slice(digest);
                out.extend_from_slice(&count.to_be_bytes());
            }
        }
        out
    }

    /// Parses a body; every byte must be accounted for.
    pub fn decode(b: &[u8]) -> Result<TicketBody, TicketError> {
        let mut r = Reader(b);
        if r.take::<1>()?[0] != TICKET_VERSION {
            return Err(TicketError::Malformed("unknown version"));
        }
        let user = u64::from_be_bytes(r.take()?);
        let expires_ms = u64::from_be_bytes(r.take()?);
        let scope = match r.take::<1>()?[0] {
            1 => {
                let n = u16::from_be_bytes(r.take()?) as usize;
                if n == 0 || n > MAX_TICKET_IDS {
                    return Err(TicketError::Malformed("bad number of ids"));
                }
                Scope::Ids((0..n).map(|_| r.take().map(ChunkId)).collect::<Result<_, _>>()?)
            }
            2 => {
                let digest = r.take()?;
                let count = u32::from_be_bytes(r.take()?);
                if count == 0 || count as usize > MAX_TICKET_LIST {
                    return Err(TicketError::Malformed("bad list length"));
                }
                Scope::List { digest, count }
            }
            _ => return Err(TicketError::Malformed("unknown scope")),
        };
        if !r.0.is_empty() {
            return Err(TicketError::Malformed("trailing bytes"));
        }
        Ok(TicketBody { user, expires_ms, scope })
    }

    /// `Ok` if the ticket, at `now_ms`, lets its bearer have `id`; `list` is the chunk list the
    /// request carries (needed for a ticket by digest, ignored otherwise).
    pub fn allows(&self, id: &ChunkId, list: Option<&[ChunkId]>, now_ms: u64) -> Result<(), TicketError> {
        self.allows_all(std::slice::from_ref(id), list, now_ms)
    }

    /// `Ok` if the ticket, at `now_ms`, lets its bearer have every chunk of `ids`; the list (for
    /// a ticket by digest) is checked once, however many chunks are asked for.
    pub fn allows_all(&self, ids: &[ChunkId], list: Option<&[ChunkId]>, now_ms: u64) -> Result<(), TicketError> {
        if now_ms >= self.expires_ms {
            return Err(TicketError::Expired);
        }
        let covered: std::collections::HashSet<&ChunkId> = match &self.scope {
            Scope::Ids(ids) => ids.iter().collect(),
            Scope::List { digest, count } => {
                let list = list.ok_or(TicketError::WrongList)?;
                if list.len() != *count as usize || list_digest(list) != *digest {
                    return Err(TicketError::WrongList);
                }
                list.iter().collect()
            }
        };
        match ids.iter().find(|id| !covered.contains(id)) {
            Some(id) => Err(TicketError::NotCovered(*id)),
            None => Ok(()),
        }
    }
}

/// Splits a ticket's bytes into body and signature.
pub fn split_signed(b: &[u8]) -> Result<(&[u8], &[u8; SIGNATURE_LEN]), TicketError> {
    let at = b.len().checked_sub(SIGNATURE_LEN).ok_or(TicketError::Malformed("too short"))?;
    let (body, sig) = b.split_at(at);
    Ok((body, sig.try_into().map_err(|_| TicketError::Malformed("too short"))?))
}

/// The message a ticket's signature is over.
pub fn signed_message(body: &[u8]) -> Vec<u8> {
    [SIGNED_CONTEXT, body].concat()
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], TicketError> {
        if self.0.len() < N {
            return Err(TicketError::Malformed("cut short"));
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("split at N"))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ids(n: usize, seed: u8) -> Vec<ChunkId> {
        (0..n).map(|i| ChunkId::of(&[seed, i as u8, (i >> 8) as u8])).collect()
    }

    #[test]
    fn bodies_round_trip_and_cover_what_they_name() {
        let few = ids(3, 1);
        let t = TicketBody::for_chunks(7, 1_000, &few).unwrap();
        assert!(matches!(t.scope, Scope::Ids(_)));
        assert_eq!(TicketBody::decode(&t.encode()).unwrap(), t);
        assert_eq!(t.allows(&few[2], None, 999), Ok(()));
        assert_eq!(t.allows(&few[2], None, 1_000), Err(TicketError::Expired));
        let other = ids(1, 2)[0];
        assert_eq!(t.allows(&other, None, 0), Err(TicketError::NotCovered(other)));

        let many = ids(500, 3);
        let t = TicketBody::for_chunks(7, 1_000, &many).unwrap();
        assert!(matches!(t.scope, Scope::List { count: 500, .. }));
        assert_eq!(TicketBody::decode(&t.encode()).unwrap(), t);
        assert_eq!(t.allows(&many[499], Some(&many), 0), Ok(()));
        // The list must be the one signed: not absent, not another, not reordered or cut.
        assert_eq!(t.allows(&many[0], None, 0), Err(TicketError::WrongList));
        let mut swapped = many.clone();
        swapped.swap(0, 1);
        assert_eq!(t.allows(&many[0], Some(&swapped), 0), Err(TicketError::WrongList));
        let mut replaced = many.clone();
        replaced[10] = other;
        assert_eq!(t.allows(&other, Some(&replaced), 0), Err(TicketError::WrongList));
        assert_eq!(t.allows(&other, Some(&many), 0), Err(TicketError::NotCovered(other)));
        assert_eq!(t.allows_all(&many[..300], Some(&many), 0), Ok(()));
        assert_eq!(t.allows_all(&[many[1], other], Some(&many), 0), Err(TicketError::NotCovered(other)));

        assert!(TicketBody::for_chunks(7, 1, &[]).is_none());
        assert!(TicketBody::for_chunks(7, 1, &ids(MAX_TICKET_LIST + 1, 4)).is_none());
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let t = TicketBody::for_chunks(7, 1_000, &ids(2, 1)).unwrap().encode();
        for cut in 0..t.len() {
            assert!(TicketBody::decode(&t[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = t.clone();
        long.push(0);
        assert_eq!(TicketBody::decode(&long), Err(TicketError::Malformed("trailing bytes")));
        let mut v2 = t.clone();
        v2[0] = 2;
        assert_eq!(TicketBody::decode(&v2), Err(TicketError::Malformed("unknown version")));
        assert!(split_signed(&[0; SIGNATURE_LEN - 1]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(t) = TicketBody::decode(&b) {
                prop_assert_eq!(t.encode(), b);
            }
        }
    }
}
