//! Chunk records: where the chunk store keeps each chunk and which chunks each user holds, as
//! a log of changes (`y/` records) answered from memory; the pack-number counter; quarantine.

use super::*;

/// The chunk records in memory and the state of their log.
#[derive(Default)]
pub(super) struct ChunkLog {
    pub(super) recs: ChunkRecords,
    /// The number of the next `y/` record.
    pub(super) next: u64,
    /// Changes in the log's records that count.
    pub(super) ops: usize,
    /// Chunks garbage collection found unreferenced, and when (`g/` records): deleted by a
    /// later collection unless something revives them first (see `store/gc.rs`).
    pub(super) condemned: HashMap<ChunkId, u64>,
}

impl ChunkLog {
    /// Adds `ops` to `batch` as new log records. Their change to memory follows once the batch
    /// is applied ([`ChunkLog::applied`]).
    pub(super) fn append(&mut self, batch: &mut sled::Batch, ops: &[Op]) {
        for rec in ops.chunks(LOG_RECORD_OPS) {
            batch.insert(log_key(self.next), encode_ops(rec));
            self.next += 1;
        }
    }

    pub(super) fn applied(&mut self, ops: &[Op]) {
        for op in ops {
            self.recs.apply(op);
        }
        self.ops += ops.len();
    }
}

pub(super) fn log_key(n: u64) -> Vec<u8> {
    key(b"y/", &[&n.to_be_bytes()])
}

impl Store {
    /// Rebuilds the chunk records from the log.
    pub(super) fn load_chunk_log(&self) -> Result<(), StoreError> {
        let base = self.meta.get(LOG_BASE_KEY)?.map_or(Some(0), |v| be_u64(&v));
        let base = base.ok_or_else(|| StoreError::Corrupt { key: "n/chunk-log".into() })?;
        let mut log = lock(&self.chunks);
        *log = ChunkLog { next: base, ..ChunkLog::default() };
        for kv in self.meta.range(log_key(base)..key(b"y/", &[&[0xff; 9]])) {
            let (k, v) = kv?;
            let corrupt = || StoreError::Corrupt { key: format!("y/{:?}", k.get(2..).and_then(be_u64)) };
            let n = k.get(2..).and_then(be_u64).ok_or_else(corrupt)?;
            let ops = decode_ops(&v).ok_or_else(corrupt)?;
            log.applied(&ops);
            log.next = n + 1;
        }
        for kv in self.meta.scan_prefix(b"g/") {
            let (k, v) = kv?;
            let corrupt = || StoreError::Corrupt { key: "g/".into() };
            let id = ChunkId(k.get(2..34).and_then(|b| b.try_into().ok()).ok_or_else(corrupt)?);
            log.condemned.insert(id, be_u64(&v).ok_or_else(corrupt)?);
        }
        Ok(())
    }

    /// Moves the chunk records of releases before (`x/CHUNK`, `k/UID CHUNK`) into the log, a
    /// group at a time, each group's removal in the batch that logs it. A location that does not
    /// decode is dropped, as the chunk store's check on open would have dropped it; so is a key
    /// of the wrong length.
    pub(super) fn move_old_chunk_records(&self) -> Result<(), StoreError> {
        let (mut moved, mut dropped) = (0usize, 0usize);
        for prefix in [&b"x/"[..], &b"k/"[..]] {
            loop {
                let mut batch = sled::Batch::default();
                let mut ops = Vec::new();
                let mut n = 0;
                for kv in self.meta.scan_prefix(prefix).take(OLD_RECORDS_GROUP) {
                    let (k, v) = kv?;
                    let id = |at: usize| k.get(at..).and_then(|b| <[u8; 32]>::try_from(b).ok()).map(ChunkId);
                    let op = match prefix {
                        b"x/" => {
                            id(2).zip(crate::chunk_records::decode_loc_record(&v)).map(|(id, loc)| Op::Stored(id, loc))
                        }
                        _ => k.get(2..10).and_then(be_u64).zip(id(10)).map(|(user, id)| Op::Held(user, id)),
                    };
                    match op {
                        Some(op) => ops.push(op),
                        None => dropped += 1,
                    }
                    batch.remove(k);
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                let mut log = lock(&self.chunks);
                log.append(&mut batch, &ops);
                self.meta.apply_batch(batch)?;
                log.applied(&ops);
                moved += ops.len();
            }
        }
        if moved + dropped > 0 {
            self.flush_blocking()?;
            tracing::info!(moved, dropped, "moved the chunk records of an earlier release into the chunk log");
        }
        Ok(())
    }

    /// Rewrites the chunk log if it holds more than twice the live records (see the module doc).
    /// A rewrite cut short leaves a log that reads the same: restated records only repeat what
    /// the log before them ends with, and the old records stop counting in one write.
    pub(super) fn compact_chunk_log(&self) -> Result<(), StoreError> {
        let mut log = lock(&self.chunks);
        let live = log.recs.len();
        let mut base = self.meta.get(LOG_BASE_KEY)?.and_then(|v| be_u64(&v)).unwrap_or(0);
        if log.ops > COMPACT_MIN.max(2 * live) {
            let first = log.next;
            let ops = log.recs.restated();
            for group in ops.chunks(LOG_RECORD_OPS * 64) {
                let mut batch = sled::Batch::default();
                log.append(&mut batch, group);
                self.meta.apply_batch(batch)?;
            }
            self.meta.insert(LOG_BASE_KEY, &first.to_be_bytes())?;
            base = first;
            tracing::info!(changes = log.ops, records = live, "rewrote the chunk log");
            log.ops = ops.len();
            self.flush_blocking()?;
        }
        // Records below the base no longer count; a rewrite may have been cut short removing them.
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in self.meta.range(log_key(0)..log_key(base)).take(OLD_RECORDS_GROUP) {
                batch.remove(kv?.0);
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.meta.apply_batch(batch)?;
        }
        Ok(())
    }

    pub fn user_has_chunk(&self, user: UserId, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(lock(&self.chunks).recs.holds(user, id))
    }

    /// Where the chunk store keeps `id`.
    pub fn chunk_loc(&self, id: &ChunkId) -> Result<Option<ChunkLoc>, StoreError> {
        Ok(lock(&self.chunks).recs.loc(id))
    }

    /// Writes `ops` to the chunk log with whatever else `batch` holds, atomically.
    pub(super) fn log_chunk_ops(
        &self,
        log: &mut ChunkLog,
        mut batch: sled::Batch,
        ops: &[Op],
    ) -> Result<(), StoreError> {
        log.append(&mut batch, ops);
        self.meta.apply_batch(batch)?;
        log.applied(ops);
        Ok(())
    }

    pub fn put_chunk_locs(&self, locs: &[(ChunkId, ChunkLoc)]) -> Result<(), StoreError> {
        let ops: Vec<Op> = locs.iter().map(|(id, loc)| Op::Stored(*id, *loc)).collect();
        self.log_chunk_ops(&mut lock(&self.chunks), sled::Batch::default(), &ops)
    }

    /// Stops serving `id` from its stored copy, which failed its hash check: the location moves to
    /// `q/` (kept for inspection), so the chunk reads as absent and a correct upload stores it anew.
    /// Only if the index still points at `loc` (a repair may have raced ahead).
    pub fn quarantine_chunk(&self, id: &ChunkId, loc: ChunkLoc) -> Result<(), StoreError> {
        let mut log = lock(&self.chunks);
        if log.recs.loc(id) == Some(loc) {
            let mut batch = sled::Batch::default();
            batch.insert(key(b"q/", &[id.as_bytes()]), crate::chunk_records::encode_loc_record(&loc));
            self.log_chunk_ops(&mut log, batch, &[Op::Gone(*id)])?;
        }
        Ok(())
    }

    /// The indexed chunks whose location fails `intact`, for the start-up check against the packs.
    pub fn chunks_not(&self, mut intact: impl FnMut(&ChunkLoc) -> bool) -> Vec<ChunkId> {
        let mut log = lock(&self.chunks);
        let mut out = Vec::new();
        log.recs.for_each_loc(|id, loc| {
            if !intact(loc) {
                out.push(*id);
            }
        });
        out
    }

    /// Forgets where the given chunks were stored (their bytes are gone).
    pub fn drop_chunk_locs(&self, ids: &[ChunkId]) -> Result<(), StoreError> {
        let ops: Vec<Op> = ids.iter().map(|id| Op::Gone(*id)).collect();
        self.log_chunk_ops(&mut lock(&self.chunks), sled::Batch::default(), &ops)
    }

    /// Reserves a pack number never handed out before, at least `at_least`, and makes the
    /// reservation durable before returning, so a crash can never lead to the same number naming
    /// two different packs (the index may still point into the first).
    pub fn reserve_pack(&self, at_least: u32) -> Result<u32, StoreError> {
        let k = b"n/pack";
        let mut got = at_least;
        self.meta.fetch_and_update(k, |old| {
            let next = old.and_then(|v| v.try_into().ok()).map_or(0, u32::from_be_bytes);
            got = next.max(at_least);
            Some(got.saturating_add(1).to_be_bytes().to_vec())
        })?;
        self.flush_blocking()?;
        Ok(got)
    }

    /// The user no longer holds `id` (its stored bytes are gone). Pending versions that counted
    /// it as held wait for it again: the user's waits are derived anew on their next use.
    pub fn forget_user_chunk(&self, user: UserId, id: &ChunkId) -> Result<(), StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.log_chunk_ops(&mut lock(&self.chunks), sled::Batch::default(), &[Op::Unheld(user, *id)])?;
        *w = Waits::default();
        Ok(())
    }

    /// Where this data directory's chunks are ("local", or "s3://BUCKET/PREFIX"), as recorded
    /// by the first start; `None` before it. A store that already holds chunk records and no
    /// such record is from a release before backends existed: local.
    pub fn chunk_backend(&self) -> Result<Option<String>, StoreError> {
        if let Some(v) = self.meta.get(BACKEND_KEY)? {
            return Ok(Some(String::from_utf8_lossy(&v).into_owned()));
        }
        let any_chunk = lock(&self.chunks).recs.len() > 0;
        Ok(any_chunk.then(|| "local".to_string()))
    }

    /// Records where this data directory's chunks are, durably.
    pub fn set_chunk_backend(&self, backend: &str) -> Result<(), StoreError> {
        self.meta.insert(BACKEND_KEY, backend.as_bytes())?;
        self.flush_blocking()
    }
}

/// Where the chunks are: see [`Store::chunk_backend`].
const BACKEND_KEY: &[u8] = b"n/chunk-backend";
