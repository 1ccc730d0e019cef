//! The coordinator's chunk records: where the chunk store keeps each chunk, and which chunks
//! each user holds. They are read three times and written twice per chunk of an initial sync,
//! keyed by random chunk ids. As sled keys (`x/CHUNK`, `k/UID CHUNK` before) every insert
//! copied a node somewhere in a tree that outgrew the page cache: half of the coordinator's CPU
//! in an initial sync, and all of its growth per file from 100,000 to 1,000,000 files.
//!
//! Now the store keeps them as a log of changes under sequential keys (cheap appends; see
//! `store/chunk_log.rs`, `y/` records) and answers every lookup from the tables here, rebuilt
//! from the log on open. A table is a sorted array (48 bytes per location; 36 per held chunk,
//! its id and its length for quotas) and a hash map of changes merged into it once it holds an
//! eighth of the array's length, so memory stays near the records' own size and a change costs
//! a constant amortized amount whatever the number of records. This module does no I/O.

use std::collections::HashMap;

use shoal_protocol::ChunkId;

use crate::store::UserId;

/// Format version of a log record: the number of [`Op`]s (u32, big-endian), then the ops.
const LOG_VERSION: u8 = 1;

/// Changes a table holds beside its array before they are merged in, at least.
const MERGE_MIN: usize = 4_096;

pub use shoal_packs::ChunkLoc;

/// The value of an `x/` record of releases before.
pub(crate) fn decode_loc_record(b: &[u8]) -> Option<ChunkLoc> {
    if b.len() != 17 || b[0] != 1 {
        return None;
    }
    ChunkLoc::from_bytes(&b[1..])
}

/// The value of an `x/` record of releases before, the form `q/` records keep.
pub(crate) fn encode_loc_record(loc: &ChunkLoc) -> Vec<u8> {
    let mut v = vec![1];
    v.extend_from_slice(&loc.to_bytes());
    v
}

/// One change to the chunk records, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The chunk store keeps the chunk at this location.
    Stored(ChunkId, ChunkLoc),
    /// The chunk store no longer keeps the chunk (bytes lost, or quarantined).
    Gone(ChunkId),
    /// The user holds the chunk (uploaded it, or got it admitted).
    Held(UserId, ChunkId),
    /// The user no longer holds the chunk.
    Unheld(UserId, ChunkId),
}

impl Op {
    const STORED: u8 = 1;
    const GONE: u8 = 2;
    const HELD: u8 = 3;
    const UNHELD: u8 = 4;

    /// Bytes of the largest op as logged.
    pub const MAX_LEN: usize = 1 + 32 + 16;
}

/// A log record holding `ops`.
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + ops.len() * Op::MAX_LEN);
    out.push(LOG_VERSION);
    let count = u32::try_from(ops.len()).expect("a log record holds a few hundred ops");
    out.extend_from_slice(&count.to_be_bytes());
    for op in ops {
        match op {
            Op::Stored(id, loc) => {
                out.push(Op::STORED);
                out.extend_from_slice(&id.0);
                out.extend_from_slice(&loc.to_bytes());
            }
            Op::Gone(id) => {
                out.push(Op::GONE);
                out.extend_from_slice(&id.0);
            }
            Op::Held(user, id) | Op::Unheld(user, id) => {
                out.push(if matches!(op, Op::Held(..)) { Op::HELD } else { Op::UNHELD });
                out.extend_from_slice(&user.to_be_bytes());
                out.extend_from_slice(&id.0);
            }
        }
    }
    out
}

/// The ops of a log record; `None` if it is not a whole, well-formed one of a known version.
pub fn decode_ops(v: &[u8]) -> Option<Vec<Op>> {
    let (&LOG_VERSION, rest) = v.split_first()? else {
        return None;
    };
    let count = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let mut rest = &rest[4..];
    let id_at = |b: &[u8], at: usize| -> Option<ChunkId> { Some(ChunkId(b.get(at..at + 32)?.try_into().ok()?)) };
    let mut ops = Vec::with_capacity(count.min(rest.len() / 41));
    while let Some((&tag, body)) = rest.split_first() {
        let (op, len) = match tag {
            Op::STORED => (Op::Stored(id_at(body, 0)?, ChunkLoc::from_bytes(body.get(32..48)?)?), 48),
            Op::GONE => (Op::Gone(id_at(body, 0)?), 32),
            Op::HELD | Op::UNHELD => {
                let user = u64::from_be_bytes(body.get(0..8)?.try_into().ok()?);
                let id = id_at(body, 8)?;
                (if tag == Op::HELD { Op::Held(user, id) } else { Op::Unheld(user, id) }, 40)
            }
            _ => return None,
        };
        ops.push(op);
        rest = &body[len..];
    }
    (ops.len() == count).then_some(ops)
}

/// A set of chunk ids with a value each: a sorted array and the changes made since it was last
/// merged (`None`: removed).
struct Table<V> {
    base: Vec<(ChunkId, V)>,
    delta: HashMap<ChunkId, Option<V>>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table { base: Vec::new(), delta: HashMap::new() }
    }
}

impl<V: Copy> Table<V> {
    fn get(&self, id: &ChunkId) -> Option<V> {
        match self.delta.get(id) {
            Some(v) => *v,
            None => self.base.binary_search_by(|(k, _)| k.cmp(id)).ok().map(|i| self.base[i].1),
        }
    }

    fn set(&mut self, id: ChunkId, v: Option<V>) {
        self.delta.insert(id, v);
        if self.delta.len() >= MERGE_MIN.max(self.base.len() / 8) {
            self.merge();
        }
    }

    /// Folds the changes into the array.
    fn merge(&mut self) {
        if self.delta.is_empty() {
            return;
        }
        let mut delta: Vec<(ChunkId, Option<V>)> = self.delta.drain().collect();
        delta.sort_unstable_by_key(|e| e.0);
        let adds = delta.iter().filter(|(_, v)| v.is_some()).count();
        let mut out = Vec::with_capacity(self.base.len() + adds);
        let mut old = std::mem::take(&mut self.base).into_iter().peekable();
        for (id, v) in delta {
            while let Some(e) = old.next_if(|(k, _)| *k < id) {
                out.push(e);
            }
            old.next_if(|(k, _)| *k == id);
            if let Some(v) = v {
                out.push((id, v));
            }
        }
        out.extend(old);
        self.base = out;
    }

    fn len(&mut self) -> usize {
        self.merge();
        self.base.len()
    }

    /// Every entry, in id order.
    fn entries(&mut self) -> &[(ChunkId, V)] {
        self.merge();
        &self.base
    }
}

/// Every chunk record, as the log's ops left them.
#[derive(Default)]
pub struct ChunkRecords {
    locs: Table<ChunkLoc>,
    /// Per user, the chunks it holds, each with its length when it became the user's.
    held: HashMap<UserId, Table<u32>>,
    /// Per user, the sum of those lengths: the bytes stored for it (its quota usage).
    held_bytes: HashMap<UserId, u64>,
}

impl ChunkRecords {
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::Stored(id, loc) => self.locs.set(id, Some(loc)),
            Op::Gone(id) => self.locs.set(id, None),
            Op::Held(user, id) => {
                let len = self.locs.get(&id).map_or(0, |l| l.len);
                let t = self.held.entry(user).or_default();
                if t.get(&id).is_none() {
                    t.set(id, Some(len));
                    *self.held_bytes.entry(user).or_default() += u64::from(len);
                }
            }
            Op::Unheld(user, id) => {
                if let Some(t) = self.held.get_mut(&user)
                    && let Some(len) = t.get(&id)
                {
                    t.set(id, None);
                    let b = self.held_bytes.entry(user).or_default();
                    *b = b.saturating_sub(u64::from(len));
                }
            }
        }
    }

    /// Where the chunk store keeps `id`.
    pub fn loc(&self, id: &ChunkId) -> Option<ChunkLoc> {
        self.locs.get(id)
    }

    /// The bytes of the chunks `user` holds.
    pub fn held_bytes(&self, user: UserId) -> u64 {
        self.held_bytes.get(&user).copied().unwrap_or(0)
    }

    /// The users holding `id`.
    pub fn holders(&self, id: &ChunkId) -> Vec<UserId> {
        self.held.iter().filter(|(_, t)| t.get(id).is_some()).map(|(u, _)| *u).collect()
    }

    /// `true` if `user` holds `id`.
    pub fn holds(&self, user: UserId, id: &ChunkId) -> bool {
        self.held.get(&user).is_some_and(|t| t.get(id).is_some())
    }

    /// Calls `f` with every chunk location, in id order.
    pub fn for_each_loc(&mut self, mut f: impl FnMut(&ChunkId, &ChunkLoc)) {
        for (id, loc) in self.locs.entries() {
            f(id, loc);
        }
    }

    /// Every chunk location, in id order.
    #[cfg(test)]
    pub fn locs(&mut self) -> Vec<(ChunkId, ChunkLoc)> {
        self.locs.entries().to_vec()
    }

    /// How many records there are: chunk locations and (user, chunk) pairs held.
    pub fn len(&mut self) -> usize {
        self.locs.len() + self.held.values_mut().map(Table::len).sum::<usize>()
    }

    /// The ops that build these records from nothing, in order.
    pub fn restated(&mut self) -> Vec<Op> {
        let mut ops: Vec<Op> = self.locs.entries().iter().map(|(id, loc)| Op::Stored(*id, *loc)).collect();
        let mut users: Vec<UserId> = self.held.keys().copied().collect();
        users.sort_unstable();
        for user in users {
            let t = self.held.get_mut(&user).expect("listed above");
            ops.extend(t.entries().iter().map(|(id, _)| Op::Held(user, *id)));
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u32) -> ChunkId {
        ChunkId::of(&i.to_le_bytes())
    }

    /// Tables answer as a plain map would through adds, replacements and removals across many
    /// merges, and a log record's ops come back as written.
    #[test]
    fn records_follow_their_ops_across_merges_and_through_the_log_encoding() {
        let mut recs = ChunkRecords::default();
        let mut locs: HashMap<ChunkId, ChunkLoc> = HashMap::new();
        let mut held: std::collections::HashSet<(UserId, ChunkId)> = Default::default();
        let mut log = Vec::new();
        for i in 0..30_000u32 {
            let loc = ChunkLoc { pack: i % 7, offset: u64::from(i) * 100, len: i };
            let user = u64::from(i % 3);
            let mut ops = vec![Op::Stored(id(i), loc), Op::Held(user, id(i))];
            if i % 5 == 0 {
                ops.push(Op::Gone(id(i / 2)));
                ops.push(Op::Unheld(u64::from(i / 2 % 3), id(i / 2)));
            }
            if i % 11 == 0 {
                ops.push(Op::Stored(id(i / 3), ChunkLoc { pack: 99, offset: 1, len: 2 }));
            }
            for op in &ops {
                recs.apply(op);
                match *op {
                    Op::Stored(c, l) => drop(locs.insert(c, l)),
                    Op::Gone(c) => drop(locs.remove(&c)),
                    Op::Held(u, c) => drop(held.insert((u, c))),
                    Op::Unheld(u, c) => drop(held.remove(&(u, c))),
                }
            }
            let rec = encode_ops(&ops);
            assert_eq!(decode_ops(&rec).as_deref(), Some(&ops[..]));
            log.push(rec);
        }
        for i in 0..31_000u32 {
            assert_eq!(recs.loc(&id(i)), locs.get(&id(i)).copied(), "chunk {i}");
            for u in 0..3 {
                assert_eq!(recs.holds(u, &id(i)), held.contains(&(u, id(i))), "chunk {i} of user {u}");
            }
        }
        assert_eq!(recs.len(), locs.len() + held.len());
        let mut sorted: Vec<_> = locs.iter().map(|(c, l)| (*c, *l)).collect();
        sorted.sort_unstable_by_key(|e| e.0);
        assert_eq!(recs.locs(), sorted);

        // Replaying the log, or the restated ops, rebuilds the same records.
        for ops in [log.iter().flat_map(|r| decode_ops(r).unwrap()).collect::<Vec<_>>(), recs.restated()] {
            let mut again = ChunkRecords::default();
            ops.iter().for_each(|op| again.apply(op));
            assert_eq!(again.locs(), sorted);
            assert_eq!(again.len(), recs.len());
            assert!(held.iter().all(|(u, c)| again.holds(*u, c)));
        }
    }

    /// A record cut short, of an unknown version or with an unknown op, is refused whole.
    #[test]
    fn damaged_log_records_are_refused() {
        let rec = encode_ops(&[Op::Held(1, id(1)), Op::Stored(id(2), ChunkLoc { pack: 1, offset: 2, len: 3 })]);
        for cut in 1..rec.len() {
            assert_eq!(decode_ops(&rec[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode_ops(&[]), None);
        assert_eq!(decode_ops(&[2]), None);
        assert_eq!(decode_ops(&[LOG_VERSION, 0, 0, 0, 0]), Some(Vec::new()));
        let mut longer = rec.clone();
        longer[4] = 1;
        assert_eq!(decode_ops(&longer), None, "fewer ops than counted");
        let mut unknown = rec.clone();
        unknown[5] = 9;
        assert_eq!(decode_ops(&unknown), None);
    }
}
