//! What garbage collection keeps in the store: condemned chunks (`g/CHUNK` → when), retired
//! packs (`r/PACK` → when: nothing points into them any more; deleted by a later collection),
//! and the walk over every user's versions that marks what is referenced. The rules are in
//! `crate::gc`.

use std::collections::HashSet;

use super::*;

fn condemned_key(id: &ChunkId) -> Vec<u8> {
    key(b"g/", &[id.as_bytes()])
}

fn retired_key(pack: u32) -> Vec<u8> {
    key(b"r/", &[&pack.to_be_bytes()])
}

/// When each of one path's versions (oldest first) was replaced, for retention: the commit time
/// of the next version that is not pending (a pending or withdrawn successor may never become
/// durable, and must not expire the last version the origin holds); `None` while none is.
pub fn superseded(versions: &[Entry], pending: &HashSet<Seq>) -> Vec<Option<u64>> {
    let mut out = vec![None; versions.len()];
    let mut next: Option<u64> = None;
    for (i, e) in versions.iter().enumerate().rev() {
        out[i] = next;
        if !pending.contains(&e.version) {
            next = Some(e.time_ms);
        }
    }
    out
}

/// One version as garbage collection sees it.
pub struct VersionRef {
    pub user: UserId,
    pub entry: Entry,
    /// When the path's next version (or deletion) replaced it; `None` while it is the head.
    pub superseded_ms: Option<u64>,
}

impl Store {
    /// Every user with a journal (a head record).
    pub fn journal_users(&self) -> Result<Vec<UserId>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(b"h/") {
            let (k, _) = kv?;
            out.push(k.get(2..).and_then(be_u64).ok_or_else(|| StoreError::Corrupt { key: "h/".into() })?);
        }
        Ok(out)
    }

    /// Calls `f` with every version of `user`, path by path, each path's oldest first, with when
    /// it was replaced (see [`superseded`]; `pending`: the user's pending versions). Reads each
    /// journal entry once; holds one path's versions at a time.
    pub fn for_each_version(
        &self,
        user: UserId,
        pending: &HashSet<Seq>,
        mut f: impl FnMut(VersionRef) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let prefix = key(b"v/", &[&user.to_be_bytes()]);
        let mut path: Vec<Entry> = Vec::new();
        let flush = |path: &mut Vec<Entry>, f: &mut dyn FnMut(VersionRef) -> Result<(), StoreError>| {
            let times = superseded(path, pending);
            for (entry, superseded_ms) in path.drain(..).zip(times) {
                f(VersionRef { user, entry, superseded_ms })?;
            }
            Ok::<_, StoreError>(())
        };
        for kv in self.meta.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let corrupt = || StoreError::Corrupt { key: format!("v/{user} {:?}", String::from_utf8_lossy(&k)) };
            let seq = k.len().checked_sub(8).and_then(|at| be_u64(&k[at..])).ok_or_else(corrupt)?;
            let Some(entry) = self.entry(user, seq)? else { continue };
            if path.last().is_some_and(|p| p.path != entry.path) {
                flush(&mut path, &mut f)?;
            }
            path.push(entry);
        }
        flush(&mut path, &mut f)
    }

    /// Every version of one path, oldest first.
    pub fn path_versions(&self, user: UserId, path: &SyncPath) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = self.history(user, path, after, 10_000)?;
            after = page.last().map(|e| e.version);
            out.extend(page);
            if !more {
                return Ok(out);
            }
        }
    }

    /// Every chunk location in the index.
    pub fn chunk_locs(&self) -> Vec<(ChunkId, ChunkLoc)> {
        let mut out = Vec::new();
        lock(&self.chunks).recs.for_each_loc(|id, loc| out.push((*id, *loc)));
        out
    }

    /// The condemned chunks and when each was condemned.
    pub fn condemned(&self) -> HashMap<ChunkId, u64> {
        lock(&self.chunks).condemned.clone()
    }

    /// `true` if `id` is condemned (then `chunks/missing` asks for it again).
    pub fn is_condemned(&self, id: &ChunkId) -> bool {
        let log = lock(&self.chunks);
        !log.condemned.is_empty() && log.condemned.contains_key(id)
    }

    /// Condemns `ids` as of `now_ms` (those stored and not condemned already).
    pub fn condemn(&self, ids: &[ChunkId], now_ms: u64) -> Result<usize, StoreError> {
        let mut log = lock(&self.chunks);
        let mut batch = sled::Batch::default();
        let fresh: Vec<ChunkId> =
            ids.iter().filter(|id| log.recs.loc(id).is_some() && !log.condemned.contains_key(id)).copied().collect();
        for id in &fresh {
            batch.insert(condemned_key(id), &now_ms.to_be_bytes());
        }
        self.meta.apply_batch(batch)?;
        for id in &fresh {
            log.condemned.insert(*id, now_ms);
        }
        Ok(fresh.len())
    }

    /// Takes `ids` off the condemned list: something counts on them again (an upload, a commit
    /// naming them, a collection that found them referenced). Once revived, a chunk cannot be
    /// deleted before it is condemned again; a deletion that came first left it absent.
    pub fn revive(&self, ids: &[ChunkId]) -> Result<usize, StoreError> {
        let mut log = lock(&self.chunks);
        if log.condemned.is_empty() {
            return Ok(0);
        }
        let back: Vec<ChunkId> = ids.iter().filter(|id| log.condemned.contains_key(id)).copied().collect();
        if back.is_empty() {
            return Ok(0);
        }
        let mut batch = sled::Batch::default();
        for id in &back {
            batch.remove(condemned_key(id));
        }
        self.meta.apply_batch(batch)?;
        for id in &back {
            log.condemned.remove(id);
        }
        Ok(back.len())
    }

    /// Deletes from the index each of `ids` that is still condemned, since `before_ms` or
    /// earlier: its location goes and every user holding it stops holding it, in one batch with
    /// the condemned record. Returns what was deleted, with where it was.
    pub fn delete_condemned(&self, ids: &[ChunkId], before_ms: u64) -> Result<Vec<(ChunkId, ChunkLoc)>, StoreError> {
        let mut log = lock(&self.chunks);
        let mut batch = sled::Batch::default();
        let mut ops = Vec::new();
        let mut gone = Vec::new();
        for id in ids {
            let (Some(&at), Some(loc)) = (log.condemned.get(id), log.recs.loc(id)) else { continue };
            if at > before_ms {
                continue;
            }
            batch.remove(condemned_key(id));
            ops.push(Op::Gone(*id));
            ops.extend(log.recs.holders(id).into_iter().map(|u| Op::Unheld(u, *id)));
            gone.push((*id, loc));
        }
        self.log_chunk_ops(&mut log, batch, &ops)?;
        for (id, _) in &gone {
            log.condemned.remove(id);
        }
        Ok(gone)
    }

    /// Points `id` at `to` if it is still at `from` (a relocation by a repack; a chunk deleted
    /// or stored anew meanwhile is left alone). Returns `true` if it moved.
    pub fn move_chunk(&self, id: &ChunkId, from: ChunkLoc, to: ChunkLoc) -> Result<bool, StoreError> {
        let mut log = lock(&self.chunks);
        if log.recs.loc(id) != Some(from) {
            return Ok(false);
        }
        self.log_chunk_ops(&mut log, sled::Batch::default(), &[Op::Stored(*id, to)])?;
        Ok(true)
    }

    /// Records that nothing points into `packs` any more, as of `now_ms`.
    pub fn retire_packs(&self, packs: &[u32], now_ms: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for p in packs {
            batch.insert(retired_key(*p), &now_ms.to_be_bytes());
        }
        Ok(self.meta.apply_batch(batch)?)
    }

    /// The retired packs and when each was retired.
    pub fn retired_packs(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(b"r/") {
            let (k, v) = kv?;
            let corrupt = || StoreError::Corrupt { key: "r/".into() };
            let pack = k.get(2..6).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).ok_or_else(corrupt)?;
            out.push((pack, be_u64(&v).ok_or_else(corrupt)?));
        }
        Ok(out)
    }

    /// Forgets retired packs that are deleted.
    pub fn forget_retired(&self, packs: &[u32]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for p in packs {
            batch.remove(retired_key(*p));
        }
        Ok(self.meta.apply_batch(batch)?)
    }
}

fn quota_key(user: UserId) -> Vec<u8> {
    key(b"o/", &[&user.to_be_bytes()])
}

impl Store {
    /// The user's quota in bytes (`o/UID`); `None`: no limit.
    pub fn quota(&self, user: UserId) -> Result<Option<u64>, StoreError> {
        Ok(self.meta.get(quota_key(user))?.and_then(|v| be_u64(&v)))
    }

    /// Sets (or with `None`, removes) the user's quota, durably.
    pub fn set_quota(&self, user: UserId, quota: Option<u64>) -> Result<(), StoreError> {
        match quota {
            Some(q) => self.meta.insert(quota_key(user), &q.to_be_bytes())?,
            None => self.meta.remove(quota_key(user))?,
        };
        self.flush_blocking()
    }

    /// What counts against the user's quota: the bytes of the distinct chunks stored for it, and
    /// of those its pending versions still wait for.
    pub fn usage(&self, user: UserId) -> Result<u64, StoreError> {
        let held = lock(&self.chunks).recs.held_bytes(user);
        Ok(held + self.awaited_bytes(user)?)
    }
}
