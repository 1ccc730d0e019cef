//! Commit rules: what makes a commit acceptable, and how an accepted one becomes journal entries.
//! Synchronous and free of HTTP: [`crate::service::commit`] runs [`apply`] on a blocking thread
//! under the user's commit lock, so the heads it reads cannot move before the append and a large
//! commit never stalls the async threads or another user's commits.

use std::collections::{HashMap, HashSet};

use shoal_protocol::api::{CommitRequest, CommitResponse, Conflict, ErrorCode, MAX_COMMIT_CHANGES};
use shoal_protocol::{Change, ChunkId, DeviceId, Entry, EntryKind, SyncPath};

use crate::chunks::ChunkStore;
use crate::error::{ApiError, ApiResult};
use crate::store::{CommitOutcome, NewPending, PendingRec, Store, UserId};

/// Most pending versions one device may have (withdrawn ones included), and most chunks its
/// pending versions may wait for: a device commits peer-first only what it pays within a cycle or
/// two, and at ~50 bytes per chunk awaited (plus ~100 per version) one device costs the
/// coordinator at most ~8 MiB of memory however many chunks it names. A commit past them is
/// refused with `pending_limit`, and the device uploads first instead.
pub const MAX_DEVICE_PENDING_VERSIONS: u64 = 20_000;
pub const MAX_DEVICE_PENDING_CHUNKS: u64 = 131_072;
/// The same for all of a user's devices together (distinct chunks).
pub const MAX_USER_PENDING_VERSIONS: u64 = 40_000;
pub const MAX_USER_PENDING_CHUNKS: u64 = 262_144;

/// Checks what can be checked without the store: size of the commit, each change's shape, and
/// that no path appears twice.
pub fn validate(req: &CommitRequest) -> ApiResult<()> {
    if req.changes.is_empty() || req.changes.len() > MAX_COMMIT_CHANGES {
        return Err(ApiError::bad(format!("a commit holds 1 to {MAX_COMMIT_CHANGES} changes")));
    }
    let mut paths = HashSet::new();
    for c in &req.changes {
        validate_change(c)?;
        if !paths.insert(&c.path) {
            return Err(ApiError::bad(format!("{} appears twice in one commit", c.path)));
        }
    }
    Ok(())
}

fn validate_change(c: &Change) -> ApiResult<()> {
    let invalid = |m: &str| ApiError::new(ErrorCode::InvalidManifest, format!("{}: {m}", c.path));
    match (c.kind, c.deleted, &c.manifest) {
        (_, true, None) => Ok(()),
        (_, true, Some(_)) => Err(invalid("a deletion carries no manifest")),
        (EntryKind::Dir, false, None) => Ok(()),
        (EntryKind::Dir, false, Some(_)) => Err(invalid("a directory carries no manifest")),
        (EntryKind::File, false, Some(m)) if m.is_consistent() => Ok(()),
        (EntryKind::File, false, Some(_)) => Err(invalid(
            "chunk lengths do not add up to the size, a chunk is out of the chunker's bounds, or there are too many chunks",
        )),
        (EntryKind::File, false, None) => Err(invalid("a file needs a manifest")),
        (EntryKind::Symlink, false, _) => Err(ApiError::bad(format!("{}: symbolic links are not synced", c.path))),
    }
}

/// Checks bases, the tree shape and chunk ownership, then appends the commit (already
/// [`validate`]d). The caller holds the user's commit lock and makes the append durable before
/// anyone sees it.
pub fn apply(
    store: &Store,
    chunks: &ChunkStore,
    user: UserId,
    device: DeviceId,
    req: CommitRequest,
    time_ms: u64,
) -> ApiResult<CommitOutcome> {
    if let Some(resp) = store.commit_response(user, &req.commit_id)? {
        return Ok(CommitOutcome::Replayed(resp));
    }
    let mut conflicts = Vec::new();
    for c in &req.changes {
        let head = store.head(user, &c.path)?;
        if head.as_ref().map(|h| h.version) != c.base {
            conflicts.push(Conflict { path: c.path.clone(), head });
        } else if c.deleted && head.as_ref().is_none_or(|h| h.deleted) {
            return Err(ApiError::new(ErrorCode::NotFound, format!("{}: nothing to delete", c.path)));
        }
    }
    if !conflicts.is_empty() {
        return Ok(CommitOutcome::Stale(conflicts));
    }
    check_hierarchy(store, user, &req.changes)?;
    // Chunks this commit names are counted on from here: garbage collection must not delete
    // them (a deletion that came first leaves them absent, and the checks below see it).
    let named: Vec<ChunkId> =
        req.changes.iter().flat_map(|c| c.manifest.iter().flat_map(|m| &m.chunks)).map(|c| c.id).collect();
    store.revive(&named)?;
    // Which chunks the origin holds for this user, each looked up once; per change, the distinct
    // chunks it lacks (the version is pending until they arrive, if the device allows that).
    let mut held: HashMap<shoal_protocol::ChunkId, bool> = HashMap::new();
    let mut waits: Vec<Vec<shoal_protocol::ChunkId>> = vec![Vec::new(); req.changes.len()];
    for (i, c) in req.changes.iter().enumerate() {
        let mut lacking = HashSet::new();
        for chunk in c.manifest.iter().flat_map(|m| &m.chunks) {
            let present = match held.get(&chunk.id) {
                Some(p) => *p,
                None => {
                    let p = origin_holds(store, chunks, user, &c.path, chunk)?;
                    held.insert(chunk.id, p);
                    p
                }
            };
            if present {
                continue;
            }
            if !req.pending_ok {
                return Err(ApiError::new(
                    ErrorCode::UnknownChunk,
                    format!("{}: chunk {} was never uploaded by this user", c.path, chunk.id),
                ));
            }
            if lacking.insert(chunk.id) {
                waits[i].push(chunk.id);
            }
        }
    }
    check_pending_limits(store, user, device, &waits)?;
    // What the pending versions add to the user's storage: the chunks they await that nothing
    // awaits yet.
    let already = store.awaited(user, &waits.iter().flatten().copied().collect::<Vec<_>>());
    let lens: HashMap<ChunkId, u32> =
        req.changes.iter().flat_map(|c| c.manifest.iter().flat_map(|m| &m.chunks)).map(|c| (c.id, c.len)).collect();
    let mut new: HashSet<ChunkId> = HashSet::new();
    let adding: u64 = waits
        .iter()
        .flatten()
        .filter(|id| !already.contains(id) && new.insert(**id))
        .map(|id| u64::from(lens.get(id).copied().unwrap_or(0)))
        .sum();
    check_quota(store, user, adding)?;
    // An upload since the handler's sync (another device's, or a repair) must be on disk before
    // a commit that may name it is acknowledged.
    chunks.make_durable()?;
    // A collection may have condemned a chunk while this commit waited for the sync: revive
    // again, and make sure every chunk found held still is. From here to the append only
    // microseconds pass, and a chunk condemned in them is deleted no sooner than a grace period.
    store.revive(&named)?;
    if let Some((id, _)) = held.iter().find(|(id, present)| **present && store.chunk_loc(id).ok().flatten().is_none()) {
        return Err(ApiError::new(
            ErrorCode::UnknownChunk,
            format!("chunk {id} is no longer stored (collected as garbage meanwhile): upload it again"),
        ));
    }
    let mut seq = store.head_seq(user)?;
    let entries: Vec<Entry> = req
        .changes
        .into_iter()
        .map(|c| {
            seq += 1;
            Entry {
                path: c.path,
                kind: c.kind,
                manifest: c.manifest,
                exec: c.exec,
                mtime_ns: c.mtime_ns,
                deleted: c.deleted,
                version: seq,
                base: c.base,
                device,
                time_ms,
            }
        })
        .collect();
    let pending: Vec<NewPending> = entries
        .iter()
        .zip(waits)
        .filter(|(_, w)| !w.is_empty())
        .map(|(e, w)| {
            let rec = PendingRec {
                path: e.path.clone(),
                device,
                since_ms: time_ms,
                missing: w.len() as u64,
                withdrawn: false,
            };
            (e.version, rec, w)
        })
        .collect();
    let resp = CommitResponse { entries };
    store.append(user, &req.commit_id, &resp, &pending)?;
    Ok(CommitOutcome::Applied(resp))
}

/// Refuses what would add `adding` bytes to the user's storage past its quota.
pub fn check_quota(store: &Store, user: UserId, adding: u64) -> ApiResult<()> {
    if adding == 0 {
        return Ok(());
    }
    let Some(quota) = store.quota(user)? else { return Ok(()) };
    let used = store.usage(user)?;
    if used.saturating_add(adding) > quota {
        use shoal_protocol::size::format_bytes;
        return Err(ApiError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "over quota ({} used / {} quota; this needs {} more): free space by deleting files, or ask the operator for more",
                format_bytes(used),
                format_bytes(quota),
                format_bytes(adding)
            ),
        ));
    }
    Ok(())
}

/// Refuses a commit whose pending versions (`waits`: per change, the chunks it would wait for)
/// would take the device or its user past the limits above.
fn check_pending_limits(store: &Store, user: UserId, device: DeviceId, waits: &[Vec<ChunkId>]) -> ApiResult<()> {
    let versions = waits.iter().filter(|w| !w.is_empty()).count() as u64;
    if versions == 0 {
        return Ok(());
    }
    let chunks: u64 = waits.iter().map(|w| w.len() as u64).sum();
    let now = store.pending_load(user, device)?;
    let over = |what: &str, have: u64, adding: u64, max: u64| {
        (have + adding > max).then(|| {
            ApiError::new(
                ErrorCode::PendingLimit,
                format!("{what} would have {} (at most {max}): upload the chunks first, then commit", have + adding),
            )
        })
    };
    let refusal = over("this device's pending versions", now.device_versions, versions, MAX_DEVICE_PENDING_VERSIONS)
        .or_else(|| {
            over(
                "the chunks this device's pending versions await",
                now.device_chunks,
                chunks,
                MAX_DEVICE_PENDING_CHUNKS,
            )
        })
        .or_else(|| over("the user's pending versions", now.user_versions, versions, MAX_USER_PENDING_VERSIONS))
        .or_else(|| {
            over("the chunks the user's pending versions await", now.user_chunks, chunks, MAX_USER_PENDING_CHUNKS)
        });
    match refusal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `true` if the origin stores `chunk` for the user, in full. A chunk of another length under the
/// same id is refused; one lost before it was synced (a crash after its upload) or quarantined as
/// corrupt is forgotten, so `chunks/missing` asks for it again.
fn origin_holds(
    store: &Store,
    chunks: &ChunkStore,
    user: UserId,
    path: &SyncPath,
    chunk: &shoal_protocol::ChunkRef,
) -> ApiResult<bool> {
    if !store.user_has_chunk(user, &chunk.id)? {
        return Ok(false);
    }
    match chunks.stored_len(&chunk.id)? {
        Some(len) if len == u64::from(chunk.len) => Ok(true),
        Some(len) => Err(ApiError::new(
            ErrorCode::InvalidManifest,
            format!("{path}: chunk {} is {len} bytes, not {}", chunk.id, chunk.len),
        )),
        None => {
            store.forget_user_chunk(user, &chunk.id)?;
            Ok(false)
        }
    }
}

/// Keeps the tree a tree after the commit: nothing live under a file, and no file over a
/// directory that still holds live entries. Refused with `conflict`; the device re-plans.
///
/// Linear in the number of distinct ancestors: each ancestor is looked up once, and a walk up
/// from a change stops at the first ancestor already known to have no live file at or above it.
fn check_hierarchy(store: &Store, user: UserId, changes: &[Change]) -> ApiResult<()> {
    let pending: HashMap<&SyncPath, &Change> = changes.iter().map(|c| (&c.path, c)).collect();
    let live_file = |p: &SyncPath| -> ApiResult<bool> {
        if let Some(c) = pending.get(p) {
            return Ok(!c.deleted && c.kind == EntryKind::File);
        }
        Ok(store.head(user, p)?.is_some_and(|h| !h.deleted && h.kind == EntryKind::File))
    };
    let conflict = |m: String| ApiError::new(ErrorCode::Conflict, m);
    // Directories known to be no live file, with no live file above them either.
    let mut clear: HashSet<SyncPath> = HashSet::new();
    for c in changes.iter().filter(|c| !c.deleted) {
        let mut walked = Vec::new();
        let mut parent = c.path.parent();
        while let Some(p) = parent {
            if clear.contains(&p) {
                break;
            }
            if live_file(&p)? {
                return Err(conflict(format!("{}: {p} is a file", c.path)));
            }
            parent = p.parent();
            walked.push(p);
        }
        clear.extend(walked);
        if c.kind == EntryKind::File {
            for e in store.live_under(user, &c.path)? {
                if pending.get(&e.path).is_none_or(|pc| !pc.deleted) {
                    return Err(conflict(format!("{}: the directory still holds {}", c.path, e.path)));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use shoal_protocol::{CommitId, Manifest};

    use super::*;
    use crate::store::tests::reopen;

    fn dir(p: &str) -> Change {
        Change {
            path: SyncPath::parse(p).unwrap(),
            kind: EntryKind::Dir,
            manifest: None,
            exec: false,
            mtime_ns: 0,
            deleted: false,
            base: None,
        }
    }

    fn empty_file(p: &str) -> Change {
        Change { kind: EntryKind::File, manifest: Some(Manifest::empty()), ..dir(p) }
    }

    /// Applies `changes` as one commit and says whether it was applied (else the error code).
    fn check(store: &Store, chunks: &ChunkStore, changes: Vec<Change>) -> Result<(), ErrorCode> {
        let req = CommitRequest { commit_id: CommitId(rand_id()), changes, pending_ok: false };
        validate(&req).map_err(|e| e.0.code)?;
        match apply(store, chunks, 1, DeviceId([1; 16]), req, 0).map_err(|e| e.0.code)? {
            CommitOutcome::Applied(_) => Ok(()),
            CommitOutcome::Replayed(_) => panic!("fresh ids never replay"),
            CommitOutcome::Stale(_) => Err(ErrorCode::StaleBase),
        }
    }

    /// Commits `manifest` as file `name` for `user` with `pending_ok`, at `at`; its version.
    fn commit_pending(
        store: &Store,
        chunks: &ChunkStore,
        user: UserId,
        name: &str,
        manifest: Manifest,
        at: u64,
    ) -> u64 {
        let file = Change { manifest: Some(manifest), ..empty_file(name) };
        let req = CommitRequest { commit_id: CommitId(rand_id()), changes: vec![file], pending_ok: true };
        let CommitOutcome::Applied(resp) = apply(store, chunks, user, DeviceId([1; 16]), req, at).unwrap() else {
            panic!("not applied")
        };
        resp.entries[0].version
    }

    /// The user's pending versions with the chunks each still lacks.
    fn missing_counts(store: &Store, user: UserId) -> Vec<(u64, u64)> {
        store.pending(user).unwrap().iter().map(|(v, r)| (*v, r.rec.missing)).collect()
    }

    fn rand_id() -> [u8; 16] {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).unwrap();
        b
    }

    #[test]
    fn tree_stays_a_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("meta")).unwrap();
        let chunks = ChunkStore::open_local(&tmp.path().join("chunks"), store.clone()).unwrap();
        assert_eq!(check(&store, &chunks, vec![dir("a"), empty_file("a/f")]), Ok(()));
        // Nothing under a file, in the same commit or against the stored tree.
        assert_eq!(check(&store, &chunks, vec![dir("a/f/x")]), Err(ErrorCode::Conflict));
        assert_eq!(check(&store, &chunks, vec![empty_file("b"), dir("b/c")]), Err(ErrorCode::Conflict));
        // No file over a directory that still holds something.
        assert_eq!(check(&store, &chunks, vec![Change { base: Some(1), ..empty_file("a") }]), Err(ErrorCode::Conflict));
        // Deep chains are fine up to the depth bound, whatever the order of the changes.
        let mut chain: Vec<Change> = (1..=200).map(|d| dir(&vec!["d"; d].join("/"))).collect();
        chain.reverse();
        assert_eq!(check(&store, &chunks, chain), Ok(()));
    }

    #[test]
    fn manifests_must_be_chunked_as_the_chunker_cuts() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("meta")).unwrap();
        let chunks = ChunkStore::open_local(&tmp.path().join("chunks"), store.clone()).unwrap();
        let one = shoal_protocol::ChunkRef { id: shoal_protocol::ChunkId::of(b"x"), len: 1 };
        // Many references to one tiny chunk: every chunk but the last must be at least the minimum.
        let m = Manifest { size: 600_000, hash: shoal_protocol::ChunkId::of(b""), chunks: vec![one; 600_000] };
        let c = Change { manifest: Some(m), ..empty_file("big") };
        assert_eq!(check(&store, &chunks, vec![c]), Err(ErrorCode::InvalidManifest));
    }

    /// Chunks recorded many more at once than one store batch holds (`STORED_GROUP`), some
    /// twice in different batches, count off a waiting version once each, and it becomes
    /// durable once, when the last arrives; what it still waits for survives a restart (derived
    /// again from the records), and so does another version waiting for some of the same chunks.
    #[test]
    fn a_version_waiting_for_many_chunks_is_counted_off_across_batches() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        let store = Store::open(&dir).unwrap();
        let chunks = ChunkStore::open_local(&tmp.path().join("chunks"), store.clone()).unwrap();
        let ids: Vec<shoal_protocol::ChunkId> =
            (0..600u32).map(|i| shoal_protocol::ChunkId::of(&i.to_be_bytes())).collect();
        let refs = ids.iter().map(|id| shoal_protocol::ChunkRef { id: *id, len: 65_536 }).collect();
        let m = Manifest { size: 600 * 65_536, hash: shoal_protocol::ChunkId::of(b"whole"), chunks: refs };
        let version = commit_pending(&store, &chunks, 1, "big", m, 5);
        assert_eq!(store.pending(1).unwrap()[0].1.rec.missing, 600);

        // Indexed as stored (their bytes are not needed here): a chunk the user uploaded counts as
        // held only while the chunk store has it.
        let locs: Vec<_> =
            ids.iter().map(|id| (*id, crate::store::ChunkLoc { pack: 1, offset: 0, len: 65_536 })).collect();
        store.put_chunk_locs(&locs).unwrap();
        let mut most = ids[..599].to_vec();
        most.extend_from_slice(&ids[..599]);
        assert_eq!(store.chunks_stored(1, &most).unwrap(), Vec::<u64>::new());
        assert_eq!(store.pending(1).unwrap()[0].1.rec.missing, 1);
        assert!(ids[..599].iter().all(|id| store.user_has_chunk(1, id).unwrap()));

        // A second version waits for the last chunk and one of its own.
        let own = shoal_protocol::ChunkId::of(b"own");
        let refs =
            vec![shoal_protocol::ChunkRef { id: ids[599], len: 65_536 }, shoal_protocol::ChunkRef { id: own, len: 10 }];
        let m = Manifest { size: 65_536 + 10, hash: shoal_protocol::ChunkId::of(b"second"), chunks: refs };
        let second = commit_pending(&store, &chunks, 1, "second", m, 6);
        let missing = |s: &Store| missing_counts(s, 1);
        assert_eq!(missing(&store), vec![(version, 1), (second, 2)]);
        drop((chunks, store));

        let store = reopen(&dir);
        // Derived again from the records: the 599 chunks stored are the user's (`k/`).
        assert_eq!(missing(&store), vec![(version, 1), (second, 2)]);
        assert_eq!(store.chunks_stored(1, &ids).unwrap(), vec![version]);
        assert_eq!(missing(&store), vec![(second, 1)]);
        assert_eq!(store.pending_stats().unwrap().0, 1);
        drop(store);

        let store = reopen(&dir);
        assert_eq!(missing(&store), vec![(second, 1)]);
        assert_eq!(store.chunks_stored(1, &[own]).unwrap(), vec![second]);
        assert!(store.pending(1).unwrap().is_empty());
        assert_eq!(store.pending_stats().unwrap().0, 0);
    }

    /// `/metrics` counts every user's pending versions without scanning them, and the oldest is the
    /// earliest first version of any user; the count survives a restart and follows versions
    /// becoming durable.
    #[test]
    fn pending_stats_follow_commits_across_users_and_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        let store = Store::open(&dir).unwrap();
        let chunks = ChunkStore::open_local(&tmp.path().join("chunks"), store.clone()).unwrap();
        let commit = |user: u64, name: &str, seed: u32, at: u64| {
            let id = shoal_protocol::ChunkId::of(&seed.to_be_bytes());
            let m = Manifest { size: 10, hash: id, chunks: vec![shoal_protocol::ChunkRef { id, len: 10 }] };
            commit_pending(&store, &chunks, user, name, m, at);
            id
        };
        let first = commit(3, "a", 1, 500);
        commit(3, "b", 2, 900);
        commit(7, "c", 3, 300);
        commit(u64::MAX, "d", 4, 800);
        assert_eq!(store.pending_stats().unwrap(), (4, Some(300)));
        drop((chunks, store));

        let store = reopen(&dir);
        assert_eq!(store.pending_stats().unwrap(), (4, Some(300)));
        assert_eq!(store.chunks_stored(3, &[first]).unwrap().len(), 1);
        assert_eq!(store.pending_stats().unwrap(), (3, Some(300)));
        assert_eq!(store.chunks_stored(7, &[shoal_protocol::ChunkId::of(&3u32.to_be_bytes())]).unwrap().len(), 1);
        assert_eq!(store.pending_stats().unwrap(), (2, Some(800)));
    }

    /// A chunk a pending version counted as held, found gone later (its index entry dropped
    /// after a crash), is awaited again by that version, not only by the commit that found out.
    #[test]
    fn a_held_chunk_found_lost_is_awaited_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("meta")).unwrap();
        let chunks = ChunkStore::open_local(&tmp.path().join("chunks"), store.clone()).unwrap();
        let data = shoal_protocol::testdata::noise(6, 300_000);
        let manifest = shoal_protocol::Chunker::default().manifest(&data[..]).unwrap();
        let ids: Vec<shoal_protocol::ChunkId> = manifest.chunks.iter().map(|c| c.id).collect();
        assert!(ids.len() >= 2, "{manifest:?}");
        let first = &data[..manifest.chunks[0].len as usize];
        chunks.put_many(&[(ids[0], first)]).unwrap();
        chunks.sync().unwrap();
        store.chunks_stored(1, &ids[..1]).unwrap();
        let n = ids.len() as u64;
        let v1 = commit_pending(&store, &chunks, 1, "one", manifest.clone(), 5);
        assert_eq!(missing_counts(&store, 1), vec![(v1, n - 1)]);
        store.drop_chunk_locs(&ids[..1]).unwrap();
        let v2 = commit_pending(&store, &chunks, 1, "two", manifest, 5);
        assert_eq!(missing_counts(&store, 1), vec![(v1, n), (v2, n)]);
        assert!(!store.user_has_chunk(1, &ids[0]).unwrap());
        assert_eq!(store.chunks_stored(1, &ids[1..]).unwrap(), Vec::<u64>::new());
    }

    /// A commit naming chunks the origin lacks is refused unless the device allows pending
    /// versions; then the version waits for exactly its missing chunks and becomes durable when
    /// the last arrives. Another user's copy of a chunk does not count.
    #[test]
    fn versions_wait_for_their_missing_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("meta")).unwrap();
        let chunks = ChunkStore::open_local(&tmp.path().join("chunks"), store.clone()).unwrap();
        let data = shoal_protocol::testdata::noise(5, 300_000);
        let manifest = shoal_protocol::Chunker::default().manifest(&data[..]).unwrap();
        let ids: Vec<shoal_protocol::ChunkId> = manifest.chunks.iter().map(|c| c.id).collect();
        assert!(ids.len() >= 3, "{manifest:?}");
        let bytes = |i: usize| {
            let start: u64 = manifest.chunks[..i].iter().map(|c| u64::from(c.len)).sum();
            &data[start as usize..start as usize + manifest.chunks[i].len as usize]
        };
        // The first chunk is stored, but by another user (2); the second by this user (1).
        chunks.put_many(&[(ids[0], bytes(0)), (ids[1], bytes(1))]).unwrap();
        chunks.sync().unwrap();
        store.chunks_stored(2, &ids[..1]).unwrap();
        store.chunks_stored(1, &ids[1..2]).unwrap();
        let file = Change { manifest: Some(manifest.clone()), ..empty_file("f") };
        assert_eq!(check(&store, &chunks, vec![file.clone()]), Err(ErrorCode::UnknownChunk));
        assert!(store.pending(1).unwrap().is_empty());

        let version = commit_pending(&store, &chunks, 1, "f", manifest.clone(), 77);
        let pending = store.pending(1).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].0, version);
        assert_eq!((pending[0].1.rec.missing, pending[0].1.rec.since_ms), (ids.len() as u64 - 1, 77));
        assert!(store.pending(2).unwrap().is_empty(), "pending versions are per user");
        assert_eq!(store.pending_stats().unwrap(), (1, Some(77)));

        // Only the author may withdraw it.
        assert_eq!(store.withdraw(1, DeviceId([9; 16]), &[version]).unwrap(), 0);
        assert_eq!(store.withdraw(1, DeviceId([1; 16]), &[version]).unwrap(), 1);
        assert!(store.pending(1).unwrap()[0].1.rec.withdrawn);

        // Chunks arrive (one twice, one the version does not need): counted off once each, and
        // the user's in the same step.
        let stranger = shoal_protocol::ChunkId::of(b"unrelated");
        assert_eq!(store.chunks_stored(1, &[ids[0], ids[0], stranger]).unwrap(), Vec::<u64>::new());
        assert!(store.user_has_chunk(1, &ids[0]).unwrap() && store.user_has_chunk(1, &stranger).unwrap());
        assert_eq!(store.pending(1).unwrap()[0].1.rec.missing, ids.len() as u64 - 2);
        assert_eq!(store.chunks_stored(1, &ids[2..]).unwrap(), vec![version]);
        assert!(store.pending(1).unwrap().is_empty());
        assert_eq!(store.pending_stats().unwrap(), (0, None));
    }

    /// A device commits pending versions up to its limits and no further; another device of the
    /// user up to the user's; a refused commit changes nothing, and chunks that arrive free the
    /// budget again. Withdrawing all of a device's versions (its revocation) leaves them counted.
    #[test]
    fn pending_versions_and_awaited_chunks_are_capped_per_device_and_user() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("meta")).unwrap();
        let chunks = ChunkStore::open_local(&tmp.path().join("chunks"), store.clone()).unwrap();
        let ids = |seed: u64, n: u64| -> Vec<ChunkId> {
            (0..n).map(|i| ChunkId::of(&[seed.to_be_bytes(), i.to_be_bytes()].concat())).collect()
        };
        let manifest = |ids: &[ChunkId]| Manifest {
            size: ids.len() as u64 * 65_536,
            hash: ChunkId::of(ids[0].as_bytes()),
            chunks: ids.iter().map(|id| shoal_protocol::ChunkRef { id: *id, len: 65_536 }).collect(),
        };
        let commit = |device: u8, names: &[String], chunk_ids: &[Vec<ChunkId>]| {
            let changes = names
                .iter()
                .zip(chunk_ids)
                .map(|(n, ids)| Change { manifest: Some(manifest(ids)), ..empty_file(n) })
                .collect();
            let req = CommitRequest { commit_id: CommitId(rand_id()), changes, pending_ok: true };
            match apply(&store, &chunks, 1, DeviceId([device; 16]), req, 0) {
                Ok(CommitOutcome::Applied(_)) => Ok(()),
                Ok(_) => panic!("neither replayed nor stale"),
                Err(e) => Err(e.0.code),
            }
        };
        let one = |device: u8, name: &str, chunk_ids: Vec<ChunkId>| commit(device, &[name.to_string()], &[chunk_ids]);

        // Chunks awaited, per device: up to the limit, not one more.
        let big = ids(1, MAX_DEVICE_PENDING_CHUNKS);
        assert_eq!(one(1, "big", big.clone()), Ok(()));
        assert_eq!(one(1, "more", ids(2, 1)), Err(ErrorCode::PendingLimit));
        // Another device of the user, up to the user's limit (distinct chunks).
        assert_eq!(one(2, "other", ids(3, MAX_USER_PENDING_CHUNKS - MAX_DEVICE_PENDING_CHUNKS)), Ok(()));
        assert_eq!(one(3, "third", ids(4, 1)), Err(ErrorCode::PendingLimit));
        let before = store.pending(1).unwrap().len();
        assert_eq!(before, 2, "refused commits added nothing");
        // Chunks arriving free the budget.
        store.put_chunk_locs(&[(big[0], crate::store::ChunkLoc { pack: 1, offset: 0, len: 65_536 })]).unwrap();
        store.chunks_stored(1, &big[..1]).unwrap();
        assert_eq!(one(3, "third", ids(4, 1)), Ok(()));

        // Versions, per device: a thousand per commit up to the limit.
        let tmp2 = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp2.path().join("meta")).unwrap();
        let chunks = ChunkStore::open_local(&tmp2.path().join("chunks"), store.clone()).unwrap();
        let commit = |device: u8, first: u64, n: u64| {
            let changes = (first..first + n)
                .map(|i| Change { manifest: Some(manifest(&ids(100 + i, 1))), ..empty_file(&format!("f{i}")) })
                .collect();
            let req = CommitRequest { commit_id: CommitId(rand_id()), changes, pending_ok: true };
            apply(&store, &chunks, 1, DeviceId([device; 16]), req, 0).map(|_| ()).map_err(|e| e.0.code)
        };
        for k in 0..MAX_DEVICE_PENDING_VERSIONS / 1000 {
            assert_eq!(commit(1, k * 1000, 1000), Ok(()));
        }
        assert_eq!(commit(1, MAX_DEVICE_PENDING_VERSIONS, 1), Err(ErrorCode::PendingLimit));
        assert_eq!(store.withdraw_device(1, DeviceId([1; 16])).unwrap() as u64, MAX_DEVICE_PENDING_VERSIONS);
        assert_eq!(commit(1, MAX_DEVICE_PENDING_VERSIONS, 1), Err(ErrorCode::PendingLimit), "withdrawn still count");
        assert_eq!(commit(2, MAX_DEVICE_PENDING_VERSIONS, 1), Ok(()));
    }
}
