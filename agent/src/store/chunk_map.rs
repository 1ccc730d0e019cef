//! The chunk map: where each chunk of each indexed file lies (chunk id → path, offset, length),
//! derived from the index records and kept in the same atomic batches.
//!
//! It has two parts. The *buckets* (`c/<bucket u16 BE>`, see the store's layout) hold the
//! locations sorted by (chunk, path), 16,384 of them keyed by the chunk id's top bits, so a
//! bucket's size grows with the folder (~60 records each at a million chunks). Rewriting a
//! bucket for every edit made the bytes written per new file grow with the folder, so edits go
//! to the *delta* first: one `d/<seq u64 BE>` record per batch that changed the map, holding
//! that batch's removals and additions in order, mirrored in memory as the net change per
//! (chunk, path). When the delta holds [`MERGE_RECORDS`] records, or [`MERGE_PAIRS`] pairs (more
//! as the buckets grow, up to [`MERGE_PAIRS_MAX`]: one pair per 256 bytes of buckets) it is
//! merged into the buckets (each touched bucket rewritten once) and its records removed. A
//! merge writes in steps and is idempotent (a bucket with the delta applied twice reads the
//! same), so one cut short by a crash is simply done again from the records still stored.
//! Lookups read the delta before the bucket and let the delta's pairs win.

use std::collections::{BTreeMap, HashMap, HashSet};

use shoal_protocol::{ChunkId, Manifest, SyncPath};

use super::{BUCKET_VERSION, ChunkLoc, RECORD_VERSION, decode};

/// Format version of delta records.
const DELTA_VERSION: u8 = 1;
/// Net (chunk, path) changes the delta holds before it is merged into the buckets, at least: a
/// merge then rewrites at most every bucket once per this many changes, and the delta's memory
/// stays bounded (~150 bytes per pair).
pub(super) const MERGE_PAIRS: usize = 65_536;
/// Net changes the delta holds before a merge, at most. Between the two, a merge is due once the
/// delta holds a pair for every `MERGE_BYTES_PER_PAIR` bytes the last merge found in the buckets:
/// a merge rewrites nearly every bucket, so with a fixed limit the bytes rewritten per change
/// would grow with the folder (at a million chunks, ~66 MiB of buckets every 65,536 changes).
pub(super) const MERGE_PAIRS_MAX: usize = 131_072;
/// Bucket bytes per pair of delta a merge may rewrite (see `MERGE_PAIRS_MAX`).
const MERGE_BYTES_PER_PAIR: usize = 256;
/// Buckets in the map (ids' top 14 bits).
const BUCKETS: usize = 1 << 14;
/// Delta records (sled keys, each costing sled memory) before a merge, for folders changed a
/// file at a time.
pub(super) const MERGE_RECORDS: usize = 4_096;
/// Buckets rewritten per sled batch while merging.
const MERGE_STEP: usize = 1_024;

/// The chunk map bucket of a chunk id: its top 14 bits.
pub(super) fn chunk_key(id: &ChunkId) -> [u8; 4] {
    let b = (u16::from(id.0[0]) << 6) | (u16::from(id.0[1]) >> 2);
    let [hi, lo] = b.to_be_bytes();
    [b'c', b'/', hi, lo]
}

/// One record of a stored chunk map bucket, borrowed from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawLoc<'a> {
    pub(super) id: &'a [u8; 32],
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) path: &'a str,
    /// The whole record as stored.
    pub(super) bytes: &'a [u8],
}

impl RawLoc<'_> {
    pub(super) fn order(&self) -> (&[u8; 32], &str) {
        (self.id, self.path)
    }
}

/// Bytes of a bucket record before its path: id, offset, length, path length.
pub(super) const BUCKET_RECORD_HEAD: usize = 32 + 8 + 4 + 2;

fn push_record(out: &mut Vec<u8>, l: &ChunkLoc) {
    // Paths are at most `MAX_PATH_BYTES` (4,096) long: their length fits in two bytes.
    let path_len = u16::try_from(l.path.as_str().len()).expect("a sync path is at most 4,096 bytes");
    out.extend_from_slice(&l.id.0);
    out.extend_from_slice(&l.offset.to_le_bytes());
    out.extend_from_slice(&l.len.to_le_bytes());
    out.extend_from_slice(&path_len.to_le_bytes());
    out.extend_from_slice(l.path.as_str().as_bytes());
}

/// A location's place in a bucket: the order of stored records.
fn loc_order(l: &ChunkLoc) -> (&[u8; 32], &str) {
    (&l.id.0, l.path.as_str())
}

/// A stored bucket in its current form. The first form (`[1]` + postcard `Vec<ChunkLoc>`, which
/// decodes every record on every edit) is converted; its bucket is rewritten in the current form
/// when next edited. An unreadable one reads as empty.
pub(super) fn current_bucket(v: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if v.first() != Some(&RECORD_VERSION) {
        return std::borrow::Cow::Borrowed(v);
    }
    let locs: Vec<ChunkLoc> = decode(v).unwrap_or_default();
    std::borrow::Cow::Owned(edit_bucket(Vec::new(), Vec::new(), locs))
}

/// The records of a bucket in its current form, in order. A damaged one yields the records
/// before the damage (the map is only a hint: every chunk read from a file is verified).
pub(super) fn bucket_records(v: &[u8]) -> Vec<RawLoc<'_>> {
    let Some((&BUCKET_VERSION, mut rest)) = v.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some((r, tail)) = parse_record(rest) {
        out.push(r);
        rest = tail;
    }
    out
}

/// The record at the start of `v` and what follows it; `None` if `v` does not start with a
/// whole, well-formed one.
fn parse_record(v: &[u8]) -> Option<(RawLoc<'_>, &[u8])> {
    let head = v.get(..BUCKET_RECORD_HEAD)?;
    let id: &[u8; 32] = head[..32].try_into().ok()?;
    let offset = u64::from_le_bytes(head[32..40].try_into().ok()?);
    let len = u32::from_le_bytes(head[40..44].try_into().ok()?);
    let path_len = usize::from(u16::from_le_bytes(head[44..46].try_into().ok()?));
    let path = std::str::from_utf8(v.get(BUCKET_RECORD_HEAD..BUCKET_RECORD_HEAD + path_len)?).ok()?;
    let (bytes, tail) = v.split_at(BUCKET_RECORD_HEAD + path_len);
    Some((RawLoc { id, offset, len, path, bytes }, tail))
}

/// A bucket's new stored form: `old`'s records without the dropped (chunk, path) pairs, with
/// `add` merged in (an added pair replaces a stored one). Kept records are copied as stored, so
/// the cost of an edit stays small as buckets fill up. Assumes `old` is sorted, as written.
pub(super) fn edit_bucket(old: Vec<RawLoc<'_>>, drop: Vec<(ChunkId, SyncPath)>, add: Vec<ChunkLoc>) -> Vec<u8> {
    let drop: HashSet<(&[u8; 32], &str)> = drop.iter().map(|(id, p)| (&id.0, p.as_str())).collect();
    // In record order; of the same pair added twice, the last one wins.
    let add: BTreeMap<(ChunkId, SyncPath), ChunkLoc> = add.into_iter().map(|l| ((l.id, l.path.clone()), l)).collect();
    let mut out = Vec::with_capacity(1 + old.iter().map(|r| r.bytes.len()).sum::<usize>());
    out.push(BUCKET_VERSION);
    let mut add = add.into_values().peekable();
    for r in old {
        let mut replaced = false;
        while let Some(l) = add.next_if(|l| loc_order(l) <= r.order()) {
            replaced |= loc_order(&l) == r.order();
            push_record(&mut out, &l);
        }
        if !replaced && !drop.contains(&r.order()) {
            out.extend_from_slice(r.bytes);
        }
    }
    for l in add {
        push_record(&mut out, &l);
    }
    out
}

/// The chunk locations of a file's manifest: each chunk once, at its first offset.
pub(super) fn locations(path: &SyncPath, m: &Manifest) -> Vec<ChunkLoc> {
    let mut seen = HashSet::new();
    crate::transfer::offsets(m)
        .filter(|(_, c)| seen.insert(c.id))
        .map(|(offset, c)| ChunkLoc { id: c.id, path: path.clone(), offset, len: c.len })
        .collect()
}

/// A batch's changes to the map: the (chunk, path) pairs it removes, then the locations it
/// adds (an added pair replaces a removed or stored one).
#[derive(Debug, Default)]
pub(super) struct MapEdit {
    pub(super) drop: Vec<(ChunkId, SyncPath)>,
    pub(super) add: Vec<ChunkLoc>,
}

impl MapEdit {
    pub(super) fn is_empty(&self) -> bool {
        self.drop.is_empty() && self.add.is_empty()
    }

    /// Its delta record: `[1]` + operations, each a tag (0 remove, 1 add) and a bucket-form
    /// record (a removal's offset and length are zero).
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = vec![DELTA_VERSION];
        for (id, path) in &self.drop {
            out.push(0);
            push_record(&mut out, &ChunkLoc { id: *id, path: path.clone(), offset: 0, len: 0 });
        }
        for l in &self.add {
            out.push(1);
            push_record(&mut out, l);
        }
        out
    }
}

/// The key of delta record `seq`.
pub(super) fn delta_key(seq: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(b"d/");
    k[2..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The operations of a stored delta record, in order: (added, record). A damaged record yields
/// the operations before the damage, like a bucket.
fn delta_ops(v: &[u8]) -> Vec<(bool, RawLoc<'_>)> {
    let Some((&DELTA_VERSION, mut rest)) = v.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some((&tag @ (0 | 1), body)) = rest.split_first() {
        let Some((r, tail)) = parse_record(body) else { break };
        out.push((tag == 1, r));
        rest = tail;
    }
    out
}

/// A chunk's location in one file (`Some`: offset and length) or its removal (`None`).
pub(super) type Net = Option<(u64, u32)>;

/// The delta as held in memory: the net change per (chunk, path) of the records not merged yet.
#[derive(Debug, Default)]
pub(super) struct Delta {
    /// Sequence number of the next record.
    next: u64,
    /// Records stored and not merged yet.
    records: usize,
    /// Net changes by chunk, then path.
    pairs: HashMap<ChunkId, Vec<(SyncPath, Net)>>,
    /// Pairs in `pairs`.
    len: usize,
    /// The buckets' size in bytes: known from an empty map on, each merge adding what it changed;
    /// `None` until a merge estimates it, for a map this run found stored.
    map_bytes: Option<usize>,
}

impl Delta {
    /// Reads the records a previous run stored and did not merge.
    pub(super) fn load(state: &sled::Tree) -> anyhow::Result<Delta> {
        // An empty map's size is known; a stored one's is estimated by the first merge.
        let mut d = Delta { map_bytes: state.scan_prefix(b"c/").next().is_none().then_some(0), ..Delta::default() };
        for kv in state.scan_prefix(b"d/") {
            let (k, v) = kv?;
            if let Ok(seq) = <[u8; 8]>::try_from(&k[2..]).map(u64::from_be_bytes) {
                d.next = d.next.max(seq + 1);
            }
            d.records += 1;
            for (added, r) in delta_ops(&v) {
                // A path that no longer parses (damage: the map is a hint) is passed over.
                let Ok(path) = SyncPath::parse(r.path) else { continue };
                d.note(ChunkId(*r.id), path, added.then_some((r.offset, r.len)));
            }
        }
        Ok(d)
    }

    fn note(&mut self, id: ChunkId, path: SyncPath, net: Net) {
        // Most chunks have one location: no room for more until needed.
        let pairs = self.pairs.entry(id).or_insert_with(|| Vec::with_capacity(1));
        match pairs.iter_mut().find(|(p, _)| *p == path) {
            Some(pair) => pair.1 = net,
            None => {
                pairs.push((path, net));
                self.len += 1;
            }
        }
    }

    /// The sequence number for a new record.
    pub(super) fn take_seq(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }

    /// Takes in an edit once its record is stored.
    pub(super) fn applied(&mut self, edit: MapEdit) {
        self.records += 1;
        for (id, path) in edit.drop {
            self.note(id, path, None);
        }
        for l in edit.add {
            self.note(l.id, l.path, Some((l.offset, l.len)));
        }
    }

    /// `true` once the delta holds `records` records, or as many pairs as the buckets' size
    /// calls for, from `pairs` up to `max_pairs`.
    pub(super) fn full(&self, (pairs, records, max_pairs): (usize, usize, usize)) -> bool {
        let due = (self.map_bytes.unwrap_or(0) / MERGE_BYTES_PER_PAIR).min(max_pairs).max(pairs);
        self.len >= due || self.records >= records
    }

    /// The net changes of `id`, if any.
    pub(super) fn of(&self, id: &ChunkId) -> Option<&[(SyncPath, Net)]> {
        self.pairs.get(id).map(Vec::as_slice)
    }

    /// Everything the delta holds, as one edit per bucket, and the sequence number below which
    /// its records lie.
    fn by_bucket(&self) -> (BTreeMap<[u8; 4], MapEdit>, u64) {
        let mut out: BTreeMap<[u8; 4], MapEdit> = BTreeMap::new();
        for (id, pairs) in &self.pairs {
            let edit = out.entry(chunk_key(id)).or_default();
            for (path, net) in pairs {
                match *net {
                    None => edit.drop.push((*id, path.clone())),
                    Some((offset, len)) => edit.add.push(ChunkLoc { id: *id, path: path.clone(), offset, len }),
                }
            }
        }
        (out, self.next)
    }
}

/// Merges the delta into the buckets, [`MERGE_STEP`] buckets per sled batch, then removes the
/// merged records and empties the delta. Runs on the store's one writer, so nothing is added
/// to the delta meanwhile; a lookup during the merge reads a bucket either side of its rewrite
/// with the delta still applied over it, which reads the same.
pub(super) fn merge(state: &sled::Tree, delta: &std::sync::Mutex<Delta>) -> anyhow::Result<()> {
    let (buckets, upto) = delta.lock().expect("chunk map delta lock").by_bucket();
    // Stored bytes of the touched buckets before and after.
    let (mut touched, mut before, mut after) = (0usize, 0usize, 0usize);
    let mut buckets = buckets.into_iter().peekable();
    while buckets.peek().is_some() {
        let mut batch = sled::Batch::default();
        for (key, MapEdit { drop, add }) in buckets.by_ref().take(MERGE_STEP) {
            let old = state.get(key)?;
            let current = old.as_deref().map(current_bucket);
            let bucket = edit_bucket(current.as_deref().map(bucket_records).unwrap_or_default(), drop, add);
            touched += 1;
            before += old.as_ref().map_or(0, |v| v.len());
            if bucket.len() > 1 {
                after += bucket.len();
                batch.insert(&key[..], bucket);
            } else if old.is_some() {
                batch.remove(&key[..]);
            }
        }
        state.apply_batch(batch)?;
    }
    let mut batch = sled::Batch::default();
    for kv in state.range(delta_key(0)..delta_key(upto)) {
        batch.remove(kv?.0);
    }
    state.apply_batch(batch)?;
    let mut d = delta.lock().expect("chunk map delta lock");
    let map_bytes = match d.map_bytes {
        Some(known) => Some(known.saturating_add(after).saturating_sub(before)),
        // The touched buckets are a random sample of them all (ids are hashes): their old size
        // tells the size of the rest.
        None if touched > 0 => {
            Some((before.saturating_mul(BUCKETS) / touched).saturating_add(after).saturating_sub(before))
        }
        None => None,
    };
    *d = Delta { next: d.next, map_bytes, ..Delta::default() };
    Ok(())
}

/// The map as lookups see it: every bucket's records with the delta over them. Checks that
/// every bucket is whole and sorted.
#[cfg(test)]
pub(super) fn effective(state: &sled::Tree, delta: &Delta) -> BTreeMap<(ChunkId, SyncPath), (u64, u32)> {
    let mut out = BTreeMap::new();
    for kv in state.scan_prefix(b"c/") {
        let (_, v) = kv.unwrap();
        assert_eq!(v[0], BUCKET_VERSION);
        let records = bucket_records(&v);
        assert_eq!(records.iter().map(|r| r.bytes.len()).sum::<usize>(), v.len() - 1);
        assert!(records.windows(2).all(|w| w[0].order() < w[1].order()));
        for r in records {
            out.insert((ChunkId(*r.id), SyncPath::parse(r.path).unwrap()), (r.offset, r.len));
        }
    }
    for (id, pairs) in &delta.pairs {
        for (path, net) in pairs {
            match net {
                Some(l) => out.insert((*id, path.clone()), *l),
                None => out.remove(&(*id, path.clone())),
            };
        }
    }
    out
}
