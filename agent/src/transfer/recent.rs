//! The chunks of small files this device hashed lately, kept in memory (16 MiB with their
//! bookkeeping, oldest out first). A scan commits what it hashed at once, and the device's
//! peers ask for those chunks, and its uploads of pending versions read them again, within
//! seconds: for a file of a few KiB, opening it, checking its stat against the index and reading
//! it back cost several times the bytes. Chunks are named by the hash of their bytes, so a
//! remembered chunk stays right to serve or upload whatever the file holds by then.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_protocol::ChunkId;

/// Chunks of files up to this size are remembered: past it, reading a file costs about its
/// bytes, and its chunks would push out many small files' worth.
pub const RECENT_FILE_MAX: u64 = 64 * 1024;
/// Most bytes remembered, each chunk counted with `ENTRY_COST`.
const RECENT_BYTES: usize = 16 * 1024 * 1024;
/// What remembering a chunk costs beyond its bytes (map and queue slots, the allocation): a
/// folder of tiny files must not fill the limit with bookkeeping it does not count.
const ENTRY_COST: usize = 160;

/// Recently hashed chunks by id. Cheap to clone; clones share the chunks.
#[derive(Clone)]
pub struct RecentChunks(Arc<Mutex<Recent>>);

struct Recent {
    chunks: HashMap<ChunkId, Bytes>,
    /// Ids in the order they came, to forget the oldest first.
    order: VecDeque<ChunkId>,
    bytes: usize,
    limit: usize,
}

impl Default for RecentChunks {
    fn default() -> RecentChunks {
        RecentChunks::with_limit(RECENT_BYTES)
    }
}

impl RecentChunks {
    fn with_limit(limit: usize) -> RecentChunks {
        RecentChunks(Arc::new(Mutex::new(Recent { chunks: HashMap::new(), order: VecDeque::new(), bytes: 0, limit })))
    }

    /// Remembers chunks just hashed: each id must be the hash of its bytes.
    pub fn add(&self, chunks: impl IntoIterator<Item = (ChunkId, Bytes)>) {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (id, data) in chunks {
            let cost = data.len() + ENTRY_COST;
            if cost > r.limit || r.chunks.contains_key(&id) {
                continue;
            }
            r.bytes += cost;
            r.chunks.insert(id, data);
            r.order.push_back(id);
            while r.bytes > r.limit {
                let Some(old) = r.order.pop_front() else { break };
                if let Some(d) = r.chunks.remove(&old) {
                    r.bytes -= d.len() + ENTRY_COST;
                }
            }
        }
    }

    /// The bytes of chunk `id`, if remembered.
    pub fn get(&self, id: &ChunkId) -> Option<Bytes> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).chunks.get(id).cloned()
    }

    /// The remembered ones of `ids`, by id (one lock for them all).
    pub fn get_many<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) -> HashMap<ChunkId, Bytes> {
        let r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        ids.into_iter().filter_map(|id| Some((*id, r.chunks.get(id)?.clone()))).collect()
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).chunks.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> (ChunkId, Bytes) {
        let data = vec![n; len];
        (ChunkId::of(&data), Bytes::from(data))
    }

    #[test]
    fn the_oldest_chunks_go_first_once_past_the_limit() {
        let r = RecentChunks::with_limit(100 + 2 * ENTRY_COST);
        let (a, b, c, big) = (chunk(1, 40), chunk(2, 40), chunk(3, 40), chunk(4, 101 + 2 * ENTRY_COST));
        r.add([a.clone(), b.clone(), a.clone()]);
        assert_eq!(r.get(&a.0), Some(a.1.clone()));
        assert_eq!(r.get_many([&a.0, &c.0]), HashMap::from([(a.0, a.1.clone())]));
        assert!(r.contains(&b.0));
        r.add([c.clone(), big.clone()]);
        assert!(!r.contains(&a.0), "oldest out");
        assert!(r.contains(&b.0) && r.contains(&c.0));
        assert!(!r.contains(&big.0), "larger than the whole cache");
        assert_eq!(r.0.lock().unwrap().bytes, 80 + 2 * ENTRY_COST);
    }

    #[test]
    fn tiny_chunks_are_counted_with_their_bookkeeping() {
        let r = RecentChunks::with_limit(10 * (ENTRY_COST + 1));
        r.add((0..100u8).map(|n| chunk(n, 1)));
        let kept = r.0.lock().unwrap().chunks.len();
        assert_eq!(kept, 10, "ten one-byte chunks fit, not the limit's worth of bytes");
    }
}
