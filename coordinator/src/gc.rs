//! Retention and garbage collection.
//!
//! **Retention:** a version is kept while it is the head of its path, and for the retention
//! period (`keep`, default 30 days; `None`: forever) after the next version or the deletion of
//! its path replaced it. So a deleted file can be restored for the retention period after its
//! deletion, and a version replaced a year ago but kept for 30 days after that is gone. A
//! version past that is *expired*: `history` says so and it cannot be restored, whether or not
//! its chunks were reclaimed yet.
//!
//! **Collection** marks every chunk a retained version names (pending versions are heads, or
//! retained like any other), then, for each chunk the index holds that nothing marked:
//! condemns it the first time, and deletes it from the index only when a later collection finds
//! it still condemned and unreferenced at least `grace` after it was condemned. Anything that
//! counts on a chunk revives it first (an upload of it, a commit naming it, a collection finding
//! it referenced), and `chunks/missing` answers a condemned chunk as missing, so no device
//! counts on it. Revival and deletion take the same lock; a revived chunk is never deleted, and
//! a commit after a deletion finds the chunk absent (it waits for it, or is refused), so nothing
//! a commit acknowledges names a deleted chunk. See ARCHITECTURE.md for why marking, not counts.
//!
//! **Packs:** a pack nothing in the index points into any more is *retired*, and deleted from the
//! backend by a collection at least `grace` later (a read that looked up a location just before
//! the index moved on still finds its bytes). A pack whose live chunks fill less than half of it
//! is repacked: its live chunks are read back verified, appended to the current pack, made
//! durable, and only then pointed at; the emptied pack is retired.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use shoal_protocol::ChunkId;
use shoal_protocol::api::FRAME_HEADER;

use crate::chunks::{ChunkResult, ChunkStore};
use crate::store::{ChunkLoc, Store, VersionRef};

/// The retention policy and collection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long a replaced version is kept; `None`: forever.
    pub keep: Option<Duration>,
    /// How long a chunk stays condemned, and a pack retired, before it is deleted: longer than a
    /// device takes from asking what is missing to committing.
    pub grace: Duration,
}

pub const DEFAULT_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

impl Default for Policy {
    fn default() -> Self {
        Policy { keep: Some(DEFAULT_KEEP), grace: DEFAULT_GRACE }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Policy {
    /// `true` if the version replaced at `superseded_ms` (`None`: the head) is retained at `now_ms`.
    pub fn retains(&self, superseded_ms: Option<u64>, now_ms: u64) -> bool {
        match (superseded_ms, self.keep) {
            (None, _) | (_, None) => true,
            (Some(t), Some(keep)) => now_ms.saturating_sub(t) < ms(keep),
        }
    }
}

/// What one collection found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub versions: u64,
    pub versions_expired: u64,
    /// Distinct chunks the retained versions name.
    pub chunks_referenced: u64,
    pub chunks_stored: u64,
    /// Stored chunks nothing retained names (condemned now or before).
    pub chunks_unreferenced: u64,
    pub bytes_unreferenced: u64,
    pub chunks_condemned: u64,
    pub chunks_revived: u64,
    /// Deleted from the index (with a dry run: would be).
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    pub packs_repacked: u64,
    pub chunks_moved: u64,
    pub packs_retired: u64,
    /// Deleted from the backend (with a dry run: would be).
    pub packs_deleted: u64,
    pub bytes_reclaimed: u64,
    pub millis: u64,
}

/// Why a collection stopped.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Chunks(#[from] crate::chunks::ChunkError),
}

/// Chunks changed per store batch.
const GROUP: usize = 256;

/// A pack is repacked when its live chunks fill less than this share of it.
const REPACK_BELOW: f64 = 0.5;

/// Runs one collection at `now_ms` (or, with `dry_run`, reports what it would do and changes
/// nothing).
pub fn collect(
    store: &Store,
    chunks: &ChunkStore,
    policy: &Policy,
    now_ms: u64,
    dry_run: bool,
) -> Result<Report, GcError> {
    let started = Instant::now();
    let mut report = Report { dry_run, ..Report::default() };
    if !dry_run {
        // The pack appends go to is never repacked or retired; close it, so what it holds that
        // expired can be reclaimed too.
        chunks.close_pack()?;
    }
    // Mark.
    let mut referenced: Vec<ChunkId> = Vec::new();
    let mut distinct = 0usize;
    for user in store.journal_users()? {
        let pending: HashSet<u64> = store.pending(user)?.into_iter().map(|(seq, _)| seq).collect();
        store.for_each_version(user, &pending, |v: VersionRef| {
            report.versions += 1;
            if policy.retains(v.superseded_ms, now_ms) {
                referenced.extend(v.entry.manifest.iter().flat_map(|m| m.chunks.iter().map(|c| c.id)));
                // Versions of one file share most chunks: dedup as the list doubles, so it
                // follows the distinct chunks, not every reference.
                if referenced.len() >= 2 * distinct.max(1 << 16) {
                    referenced.sort_unstable();
                    referenced.dedup();
                    distinct = referenced.len();
                }
            } else {
                report.versions_expired += 1;
            }
            Ok(())
        })?;
    }
    referenced.sort_unstable();
    referenced.dedup();
    report.chunks_referenced = referenced.len() as u64;
    let is_referenced = |id: &ChunkId| referenced.binary_search(id).is_ok();

    // The packs as they are before the index is read: a pack created after this is not looked
    // at, and one open now is never repacked or retired.
    let sizes = chunks.pack_sizes();
    let open = chunks.open_packs();
    // Sweep the index.
    let stored = store.chunk_locs();
    report.chunks_stored = stored.len() as u64;
    let condemned = store.condemned();
    let deadline = now_ms.saturating_sub(ms(policy.grace));
    let (mut revive, mut condemn, mut delete) = (Vec::new(), Vec::new(), Vec::new());
    for (id, loc) in &stored {
        if is_referenced(id) {
            if condemned.contains_key(id) {
                revive.push(*id);
            }
            continue;
        }
        report.chunks_unreferenced += 1;
        report.bytes_unreferenced += u64::from(loc.len);
        match condemned.get(id) {
            Some(&at) if at <= deadline => delete.push(*id),
            Some(_) => {}
            None => condemn.push(*id),
        }
    }
    let mut gone: Vec<(ChunkId, ChunkLoc)> = Vec::new();
    if dry_run {
        report.chunks_revived = revive.len() as u64;
        report.chunks_condemned = condemn.len() as u64;
        let locs: HashMap<ChunkId, ChunkLoc> = stored.iter().copied().collect();
        gone = delete.iter().filter_map(|id| locs.get(id).map(|l| (*id, *l))).collect();
    } else {
        // In groups: sled keeps every node a batch replaces until the batch ends (one batch of
        // 40,000 condemned chunks held ~150 MiB).
        for group in revive.chunks(GROUP) {
            report.chunks_revived += store.revive(group)? as u64;
        }
        // Stamped with when they are condemned, not when the collection began: a long mark must
        // not bring a chunk closer to deletion than the grace period says.
        let stamp = now_ms + ms(started.elapsed());
        for group in condemn.chunks(GROUP) {
            report.chunks_condemned += store.condemn(group, stamp)? as u64;
        }
        for group in delete.chunks(GROUP) {
            gone.extend(store.delete_condemned(group, deadline)?);
        }
    }
    report.chunks_deleted = gone.len() as u64;
    report.bytes_deleted = gone.iter().map(|(_, l)| u64::from(l.len)).sum();

    // Packs: what each still holds.
    let gone_ids: HashSet<ChunkId> = gone.iter().map(|(id, _)| *id).collect();
    let mut live: HashMap<u32, Vec<(ChunkId, ChunkLoc)>> = HashMap::new();
    for (id, loc) in &stored {
        if !gone_ids.contains(id) {
            live.entry(loc.pack).or_default().push((*id, *loc));
        }
    }
    let retired: HashMap<u32, u64> = store.retired_packs()?.into_iter().collect();
    let mut retire = Vec::new();
    for (&pack, &size) in &sizes {
        if open.contains(&pack) || retired.contains_key(&pack) {
            continue;
        }
        let held = live.get(&pack).map(Vec::as_slice).unwrap_or(&[]);
        let live_bytes: u64 = held.iter().map(|(_, l)| u64::from(l.len) + FRAME_HEADER as u64).sum();
        if held.is_empty() {
            retire.push(pack);
        } else if size > 0 && (live_bytes as f64) < REPACK_BELOW * size as f64 {
            report.packs_repacked += 1;
            report.chunks_moved += held.len() as u64;
            if !dry_run {
                repack(chunks, held)?;
            }
            retire.push(pack);
        }
    }
    report.packs_retired = retire.len() as u64;
    if !dry_run {
        store.retire_packs(&retire, now_ms)?;
        // The moves and deletions are durable before any pack goes.
        store.flush_blocking()?;
    }
    // Retired packs past the grace period, into which nothing points any more.
    let pointed: HashSet<u32> = store.chunk_locs().into_iter().map(|(_, l)| l.pack).collect();
    let mut deleted = Vec::new();
    for (&pack, &at) in &retired {
        if at > deadline {
            continue;
        }
        if pointed.contains(&pack) {
            tracing::error!(pack, "a retired pack is pointed into again; keeping it");
            if !dry_run {
                store.forget_retired(&[pack])?;
            }
            continue;
        }
        report.bytes_reclaimed += sizes.get(&pack).copied().unwrap_or(0);
        if !dry_run {
            chunks.delete_pack(pack)?;
        }
        deleted.push(pack);
    }
    report.packs_deleted = deleted.len() as u64;
    if !dry_run {
        store.forget_retired(&deleted)?;
        store.flush_blocking()?;
    }
    report.millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

/// Moves `held` (the live chunks of one pack) into the current pack, a few MiB at a time.
fn repack(chunks: &ChunkStore, held: &[(ChunkId, ChunkLoc)]) -> ChunkResult<()> {
    let mut held = held.to_vec();
    held.sort_by_key(|(_, l)| l.offset);
    let mut group: Vec<(ChunkId, ChunkLoc)> = Vec::new();
    let mut bytes = 0u64;
    let flush = |group: &mut Vec<(ChunkId, ChunkLoc)>| -> ChunkResult<()> {
        if group.is_empty() {
            return Ok(());
        }
        let ids: Vec<ChunkId> = group.iter().map(|(id, _)| *id).collect();
        let frames = chunks.read_frames(&ids);
        if let Some(e) = frames.error {
            return Err(e);
        }
        let mut data = Vec::with_capacity(group.len());
        let all: Vec<u8> = frames.pieces.concat();
        let mut rest = &all[..];
        for (id, loc) in group.iter() {
            let (got, bytes, used) = shoal_protocol::api::decode_frame(rest, u32::MAX)
                .ok()
                .flatten()
                .ok_or(crate::chunks::ChunkError::Corrupt(*id))?;
            debug_assert_eq!(got, *id);
            data.push((*id, *loc, bytes::Bytes::copy_from_slice(bytes)));
            rest = &rest[used..];
        }
        chunks.relocate(&data)?;
        group.clear();
        Ok(())
    };
    for (id, loc) in held {
        bytes += u64::from(loc.len);
        group.push((id, loc));
        if bytes >= 4 * 1024 * 1024 {
            flush(&mut group)?;
            bytes = 0;
        }
    }
    flush(&mut group)
}

#[cfg(test)]
mod tests {
    //! Garbage collection tested as storage systems test it: random interleavings of uploads,
    //! commits (durable and pending), pending versions paid, deletions, time passing,
    //! collections (real and dry), restarts, and a device that was told "held" and commits
    //! later; after every step every retained durable version must read back byte-identical.
    //! `SHOAL_GC_SEED=N` replays one seed; `SHOAL_GC_SEEDS=K` runs K (default 1,000).

    use std::collections::{HashMap, HashSet};

    use shoal_protocol::api::{CommitRequest, ErrorCode};
    use shoal_protocol::{Change, ChunkRef, CommitId, DeviceId, EntryKind, Manifest, SyncPath};

    use super::*;
    use crate::store::CommitOutcome;
    use crate::store::tests::reopen;

    const USER: u64 = 1;
    const DEVICE: DeviceId = DeviceId([1; 16]);
    const DAY: u64 = 24 * 3600 * 1000;
    const PATHS: [&str; 4] = ["a.txt", "b.bin", "c.doc", "d.md"];

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    struct World {
        dir: tempfile::TempDir,
        store: Store,
        chunks: ChunkStore,
        now: u64,
        policy: Policy,
        /// Every chunk's bytes, by id.
        bytes: HashMap<ChunkId, Vec<u8>>,
        /// Chunks a device was told the origin holds, not yet committed.
        told_held: Vec<ChunkId>,
        commits: u64,
        log: Vec<String>,
    }

    impl World {
        fn new() -> World {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("meta")).unwrap();
            let chunks = ChunkStore::open_local(&dir.path().join("chunks"), store.clone()).unwrap();
            let policy = Policy { keep: Some(Duration::from_millis(10 * DAY)), grace: Duration::from_secs(3600) };
            World {
                dir,
                store,
                chunks,
                now: 1_800_000_000_000,
                policy,
                bytes: HashMap::new(),
                told_held: Vec::new(),
                commits: 0,
                log: Vec::new(),
            }
        }

        fn chunk(&mut self, rng: &mut Rng) -> ChunkId {
            // Reuse an old chunk now and then: dedup across versions and paths.
            if !self.bytes.is_empty() && rng.below(3) == 0 {
                let mut ids: Vec<&ChunkId> = self.bytes.keys().collect();
                ids.sort();
                return *ids[rng.below(ids.len() as u64) as usize];
            }
            let len = 1 + rng.below(3000) as usize;
            let seed = rng.next();
            let data: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8 ^ i as u8).collect();
            let id = ChunkId::of(&data);
            self.bytes.insert(id, data);
            id
        }

        fn upload(&mut self, ids: &[ChunkId]) {
            let refs: Vec<(ChunkId, &[u8])> = ids.iter().map(|id| (*id, &self.bytes[id][..])).collect();
            self.chunks.put_many(&refs).unwrap();
            if self.store.has_pending(USER).unwrap() {
                self.chunks.make_durable().unwrap();
            }
            self.store.revive(ids).unwrap();
            self.store.chunks_stored(USER, ids).unwrap();
        }

        fn commit(&mut self, path: &str, chunks: Option<&[ChunkId]>, pending_ok: bool) -> Result<(), ErrorCode> {
            let path = SyncPath::parse(path).unwrap();
            let base = self.store.head(USER, &path).unwrap().map(|e| e.version);
            let manifest = chunks.map(|ids| Manifest {
                size: ids.iter().map(|id| self.bytes[id].len() as u64).sum(),
                hash: ChunkId::of(path.as_str().as_bytes()),
                chunks: ids.iter().map(|id| ChunkRef { id: *id, len: self.bytes[id].len() as u32 }).collect(),
            });
            let change = Change {
                path,
                kind: EntryKind::File,
                deleted: manifest.is_none(),
                manifest,
                exec: false,
                mtime_ns: 0,
                base,
            };
            self.commits += 1;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&self.commits.to_be_bytes());
            let req = CommitRequest { commit_id: CommitId(id), changes: vec![change], pending_ok };
            match crate::commit::apply(&self.store, &self.chunks, USER, DEVICE, req, self.now) {
                Ok(CommitOutcome::Applied(_)) => {
                    self.store.flush_blocking().unwrap();
                    Ok(())
                }
                Ok(CommitOutcome::Stale(_)) => Err(ErrorCode::StaleBase),
                Ok(CommitOutcome::Replayed(_)) => panic!("fresh commit ids never replay"),
                Err(e) => Err(e.0.code),
            }
        }

        fn restart(&mut self) {
            let dir = self.dir.path().to_path_buf();
            let placeholder = Store::open(&dir.join("placeholder")).unwrap();
            self.chunks = ChunkStore::open_local(&dir.join("placeholder-chunks"), placeholder.clone()).unwrap();
            self.store = placeholder;
            self.store = reopen(&dir.join("meta"));
            self.chunks = ChunkStore::open_local(&dir.join("chunks"), self.store.clone()).unwrap();
        }

        /// Every retained version that is not pending reads back whole.
        fn check(&self) -> Result<(), String> {
            let pending: HashSet<u64> = self.store.pending(USER).unwrap().into_iter().map(|(s, _)| s).collect();
            let mut bad = Vec::new();
            self.store
                .for_each_version(USER, &pending, |v| {
                    if !self.policy.retains(v.superseded_ms, self.now) || pending.contains(&v.entry.version) {
                        return Ok(());
                    }
                    for c in v.entry.manifest.iter().flat_map(|m| &m.chunks) {
                        match self.chunks.get(&c.id) {
                            Ok(b) if b == self.bytes[&c.id] => {}
                            Ok(_) => bad.push(format!(
                                "{} v{}: chunk {} reads other bytes",
                                v.entry.path, v.entry.version, c.id
                            )),
                            Err(e) => bad.push(format!("{} v{}: chunk {}: {e}", v.entry.path, v.entry.version, c.id)),
                        }
                    }
                    Ok(())
                })
                .unwrap();
            if bad.is_empty() { Ok(()) } else { Err(bad.join("; ")) }
        }
    }

    fn play(seed: u64, steps: usize) -> Result<World, Box<(World, String)>> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut w = World::new();
        for step in 0..steps {
            let what = rng.below(100);
            let path = PATHS[rng.below(PATHS.len() as u64) as usize];
            let note = match what {
                0..=19 => {
                    let ids: Vec<ChunkId> = (0..1 + rng.below(4)).map(|_| w.chunk(&mut rng)).collect();
                    w.upload(&ids);
                    format!("upload {} chunks", ids.len())
                }
                20..=44 => {
                    let ids: Vec<ChunkId> = (0..1 + rng.below(4)).map(|_| w.chunk(&mut rng)).collect();
                    let pending_ok = rng.below(2) == 0;
                    if !pending_ok {
                        w.upload(&ids);
                    }
                    let r = w.commit(path, Some(&ids), pending_ok);
                    format!("commit {path} ({} chunks, pending_ok {pending_ok}): {r:?}", ids.len())
                }
                45..=51 => {
                    let r = w.commit(path, None, false);
                    format!("delete {path}: {r:?}")
                }
                52..=59 => {
                    // The authors of pending versions upload what they owe.
                    let mut owed = Vec::new();
                    let all: HashSet<u64> = w.store.pending(USER).unwrap().into_iter().map(|(s, _)| s).collect();
                    for (seq, _) in w.store.pending(USER).unwrap() {
                        let mut found = None;
                        w.store
                            .for_each_version(USER, &all, |v| {
                                if v.entry.version == seq {
                                    found = v.entry.manifest.clone();
                                }
                                Ok(())
                            })
                            .unwrap();
                        owed.extend(found.into_iter().flat_map(|m| m.chunks.into_iter().map(|c| c.id)));
                    }
                    owed.sort();
                    owed.dedup();
                    w.upload(&owed);
                    format!("pay {} owed chunks", owed.len())
                }
                60..=69 => {
                    let by = [60_000, 3_600_000, 2 * 3_600_000, DAY, 4 * DAY, 11 * DAY][rng.below(6) as usize];
                    w.now += by;
                    format!("time passes: {} min", by / 60_000)
                }
                70..=81 => {
                    let dry = rng.below(4) == 0;
                    let before = (w.store.chunk_locs(), w.store.condemned(), w.chunks.pack_sizes());
                    let r = collect(&w.store, &w.chunks, &w.policy, w.now, dry).unwrap();
                    if dry {
                        let after = (w.store.chunk_locs(), w.store.condemned(), w.chunks.pack_sizes());
                        if before != after {
                            return Err(Box::new((w, format!("step {step}: a dry run changed something"))));
                        }
                    }
                    format!(
                        "gc{}: {} condemned, {} deleted, {} repacked, {} packs deleted",
                        if dry { " --dry-run" } else { "" },
                        r.chunks_condemned,
                        r.chunks_deleted,
                        r.packs_repacked,
                        r.packs_deleted
                    )
                }
                82..=87 => {
                    w.restart();
                    "restart".to_string()
                }
                88..=93 => {
                    // A device asks what is missing; what it is told is held it will not send.
                    let mut ids: Vec<ChunkId> = w.store.chunk_locs().into_iter().map(|(id, _)| id).collect();
                    ids.sort();
                    let ask: Vec<ChunkId> =
                        (0..3).filter_map(|_| ids.get(rng.below(ids.len().max(1) as u64) as usize).copied()).collect();
                    w.told_held = ask
                        .into_iter()
                        .filter(|id| {
                            !w.store.is_condemned(id)
                                && w.store.user_has_chunk(USER, id).unwrap()
                                && w.chunks.contains(id).unwrap()
                        })
                        .collect();
                    format!("missing: told {} held", w.told_held.len())
                }
                _ => {
                    // ...and commits them later, without uploading.
                    let told = std::mem::take(&mut w.told_held);
                    if told.is_empty() {
                        "nothing told".to_string()
                    } else {
                        let r = w.commit(path, Some(&told), false);
                        if let Err(code) = r
                            && code != ErrorCode::UnknownChunk
                            && code != ErrorCode::StaleBase
                        {
                            return Err(Box::new((
                                w,
                                format!("step {step}: a commit of told-held chunks failed with {code:?}"),
                            )));
                        }
                        format!("commit {path} of {} told-held chunks: {r:?}", told.len())
                    }
                }
            };
            w.log.push(format!("{step}: {note}"));
            if let Err(e) = w.check() {
                return Err(Box::new((w, format!("after step {step} ({note}): {e}"))));
            }
        }
        Ok(w)
    }

    #[test]
    fn randomized_interleavings_never_lose_a_retained_version() {
        let seeds: Vec<u64> = match std::env::var("SHOAL_GC_SEED") {
            Ok(s) => vec![s.parse().expect("SHOAL_GC_SEED is a number")],
            Err(_) => {
                let n: u64 = std::env::var("SHOAL_GC_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
                let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() * 1000;
                (base..base + n).collect()
            }
        };
        let (mut deleted, mut repacked) = (0u64, 0u64);
        for seed in &seeds {
            match play(*seed, 40) {
                Ok(w) => {
                    let r = collect(&w.store, &w.chunks, &w.policy, w.now + 20 * DAY, true).unwrap();
                    deleted += r.chunks_deleted;
                    repacked += r.packs_repacked;
                }
                Err(failed) => {
                    let (w, e) = *failed;
                    panic!("seed {seed} failed (replay with SHOAL_GC_SEED={seed}): {e}\n{}", w.log.join("\n"))
                }
            }
        }
        // The interleavings reached the interesting cases.
        assert!(seeds.len() < 100 || (deleted > 0 && repacked > 0), "{deleted} deleted, {repacked} repacked");
    }

    #[test]
    fn expired_versions_are_reclaimed_after_the_grace_period_and_heads_never() {
        let mut w = World::new();
        let make = |w: &mut World, fill: u8, len: usize| {
            let data = vec![fill; len];
            let id = ChunkId::of(&data);
            w.bytes.insert(id, data);
            id
        };
        let old: Vec<ChunkId> = (0..3).map(|i| make(&mut w, i, 3000)).collect();
        let new = vec![make(&mut w, 9, 100)];
        w.upload(&old);
        w.commit("a.txt", Some(&old), false).unwrap();
        w.now += DAY;
        w.upload(&new);
        w.commit("a.txt", Some(&new), false).unwrap();
        assert_eq!(w.store.usage(USER).unwrap(), 3 * 3000 + 100, "quota usage: distinct chunk bytes");
        // Within retention: nothing unreferenced.
        let r = collect(&w.store, &w.chunks, &w.policy, w.now, false).unwrap();
        assert_eq!((r.versions, r.versions_expired, r.chunks_unreferenced), (2, 0, 0));
        // Past it: condemned first, deleted a grace period later; the pack, mostly dead, is
        // repacked and retired, and deleted a grace period after that. The head never goes.
        w.now += 11 * DAY;
        let r = collect(&w.store, &w.chunks, &w.policy, w.now, false).unwrap();
        assert_eq!((r.versions_expired, r.chunks_condemned, r.chunks_deleted), (1, 3, 0), "{r:?}");
        let dry = collect(&w.store, &w.chunks, &w.policy, w.now + 2 * 3_600_000, true).unwrap();
        assert_eq!(dry.chunks_deleted, 3, "a dry run reports what would go");
        w.now += 2 * 3_600_000;
        let r = collect(&w.store, &w.chunks, &w.policy, w.now, false).unwrap();
        assert_eq!(r.chunks_deleted, 3);
        for id in &old {
            assert!(!w.chunks.contains(id).unwrap());
        }
        assert!(r.packs_retired >= 1 && r.chunks_moved >= 1, "{r:?}");
        w.check().unwrap();
        assert_eq!(w.store.usage(USER).unwrap(), 100, "deleted chunks stop counting");
        w.restart();
        w.check().unwrap();
        assert_eq!(w.store.usage(USER).unwrap(), 100, "and the count survives a restart");
        w.now += 2 * 3_600_000;
        let r = collect(&w.store, &w.chunks, &w.policy, w.now, false).unwrap();
        assert!(r.packs_deleted >= 1 && r.bytes_reclaimed >= 9000, "{r:?}");
        w.check().unwrap();
        assert_eq!(w.chunks.get(&new[0]).unwrap(), w.bytes[&new[0]]);
        // Forever keeps everything.
        let forever = Policy { keep: None, ..w.policy };
        assert!(forever.retains(Some(0), u64::MAX));
    }

    #[test]
    fn a_pending_successor_never_expires_the_last_durable_version() {
        let mut w = World::new();
        let mut rng = Rng(13);
        let v1: Vec<ChunkId> = (0..2).map(|_| w.chunk(&mut rng)).collect();
        let v2: Vec<ChunkId> = (0..2).map(|_| w.chunk(&mut rng)).collect();
        w.upload(&v1);
        w.commit("a.txt", Some(&v1), false).unwrap();
        w.commit("a.txt", Some(&v2), true).unwrap();
        assert_eq!(w.store.pending(USER).unwrap().len(), 1, "v2 waits for its chunks");
        for _ in 0..3 {
            w.now += 40 * DAY;
            let r = collect(&w.store, &w.chunks, &w.policy, w.now, false).unwrap();
            assert_eq!((r.versions_expired, r.chunks_condemned, r.chunks_deleted), (0, 0, 0), "{r:?}");
        }
        w.check().unwrap();
        // Once v2 is durable, v1 expires after the retention period.
        w.upload(&v2);
        assert!(w.store.pending(USER).unwrap().is_empty());
        let r = collect(&w.store, &w.chunks, &w.policy, w.now, false).unwrap();
        assert_eq!(r.versions_expired, 1, "{r:?}");
    }

    #[test]
    fn a_revived_chunk_is_never_deleted() {
        let mut w = World::new();
        let mut rng = Rng(11);
        let c = w.chunk(&mut rng);
        w.upload(&[c]);
        let r = collect(&w.store, &w.chunks, &w.policy, w.now, false).unwrap();
        assert_eq!(r.chunks_condemned, 1, "an upload nothing commits is unreferenced");
        assert!(w.store.is_condemned(&c));
        // A commit names it before the next collection: revived, kept.
        w.commit("a.txt", Some(&[c]), false).unwrap();
        assert!(!w.store.is_condemned(&c));
        w.now += 3 * 3_600_000;
        let r = collect(&w.store, &w.chunks, &w.policy, w.now, false).unwrap();
        assert_eq!(r.chunks_deleted, 0);
        w.check().unwrap();
    }
}
