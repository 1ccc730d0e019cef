//! The journal and history: per-user entries (`j/`), heads (`h/`, `p/`), the history index
//! (`v/`) and commit ids for replays (`c/`).

use super::*;

/// Format version of a `c/` record that names the journal entries a commit got instead of
/// holding them: a commit of 500 files stored its ~85 KiB of entries twice, and sled rewrites a
/// node with all its values whenever it consolidates or splits one.
pub(super) const COMMIT_SPAN_VERSION: u8 = 2;

/// The journal entries a commit got: `count` from `first` on.
#[derive(Serialize, Deserialize)]
pub(super) struct CommitSpan {
    pub(super) first: Seq,
    pub(super) count: u64,
}

/// A commit's `c/` record: its span of the journal (entries are numbered one after another and
/// never removed), or the whole response should its entries not be consecutive.
pub(super) fn encode_commit(resp: &CommitResponse) -> Vec<u8> {
    match resp.entries.first().map(|e| e.version) {
        Some(first) if resp.entries.iter().zip(first..).all(|(e, seq)| e.version == seq) => {
            let mut out = vec![COMMIT_SPAN_VERSION];
            let span = CommitSpan { first, count: resp.entries.len() as u64 };
            out.extend(postcard::to_stdvec(&span).expect("postcard serializes store records"));
            out
        }
        _ => encode(resp),
    }
}

pub(super) fn history_key(user: UserId, path: &SyncPath, seq: Seq) -> Vec<u8> {
    key(b"v/", &[&user.to_be_bytes(), path.as_str().as_bytes(), &[0], &seq.to_be_bytes()])
}

/// What applying a commit produced.
pub enum CommitOutcome {
    Applied(CommitResponse),
    /// A retry of an already-applied commit: the original response.
    Replayed(CommitResponse),
    Stale(Vec<Conflict>),
}

impl Store {
    pub fn head_seq(&self, user: UserId) -> Result<Seq, StoreError> {
        Ok(self.meta.get(key(b"h/", &[&user.to_be_bytes()]))?.and_then(|v| be_u64(&v)).unwrap_or(0))
    }

    pub(super) fn entry(&self, user: UserId, seq: Seq) -> Result<Option<Entry>, StoreError> {
        self.get(&key(b"j/", &[&user.to_be_bytes(), &seq.to_be_bytes()]))
    }

    /// A journal entry and its stored size, for pages bounded by bytes.
    pub(super) fn sized_entry(&self, user: UserId, seq: Seq) -> Result<Option<(Entry, usize)>, StoreError> {
        let k = key(b"j/", &[&user.to_be_bytes(), &seq.to_be_bytes()]);
        match self.meta.get(&k)? {
            Some(v) => Ok(Some((decode(&k, &v)?, v.len()))),
            None => Ok(None),
        }
    }

    /// The current head of `path` (possibly a tombstone).
    pub fn head(&self, user: UserId, path: &SyncPath) -> Result<Option<Entry>, StoreError> {
        let Some(seq) = self.meta.get(key(b"p/", &[&user.to_be_bytes(), path.as_str().as_bytes()]))? else {
            return Ok(None);
        };
        let seq = be_u64(&seq).ok_or_else(|| StoreError::Corrupt { key: format!("p/{path}") })?;
        self.entry(user, seq)
    }

    /// The answer a commit got, for its replays: read back from the journal (the record holds
    /// where its entries start and how many there are), or as stored whole before that.
    pub fn commit_response(&self, user: UserId, id: &CommitId) -> Result<Option<CommitResponse>, StoreError> {
        let k = key(b"c/", &[&user.to_be_bytes(), id.as_bytes()]);
        let Some(v) = self.meta.get(&k)? else { return Ok(None) };
        let corrupt = || StoreError::Corrupt { key: format!("c/{user} {id}") };
        match v.split_first() {
            Some((&VALUE_VERSION, _)) => decode(&k, &v).map(Some),
            Some((&COMMIT_SPAN_VERSION, rest)) => {
                let span: CommitSpan = postcard::from_bytes(rest).map_err(|_| corrupt())?;
                let since = span.first.checked_sub(1).ok_or_else(corrupt)?;
                let upto = since.checked_add(span.count).ok_or_else(corrupt)?;
                let count = usize::try_from(span.count).map_err(|_| corrupt())?;
                let entries = self.changes(user, since, upto, count, usize::MAX)?;
                if entries.len() != count || count == 0 {
                    return Err(corrupt());
                }
                Ok(Some(CommitResponse { entries }))
            }
            _ => Err(corrupt()),
        }
    }

    /// Appends `entries` (already numbered `head+1..`, with bases checked by the caller under the
    /// commit lock) to the journal, moves the heads and records the commit id, in one atomic batch.
    /// Versions of the commit whose chunks the origin still lacks are recorded as pending in the
    /// same batch.
    pub fn append(
        &self,
        user: UserId,
        id: &CommitId,
        resp: &CommitResponse,
        pending: &[NewPending],
    ) -> Result<(), StoreError> {
        let u = user.to_be_bytes();
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        if !pending.is_empty() {
            // Derived from the records before this commit's, which are added below.
            self.load_waits(user, &mut w)?;
        }
        let mut batch = sled::Batch::default();
        for (seq, rec, _) in pending {
            batch.insert(key(b"w/", &[&u, &seq.to_be_bytes()]), encode(rec));
        }
        let mut last = None;
        for e in &resp.entries {
            let seq = e.version.to_be_bytes();
            batch.insert(key(b"j/", &[&u, &seq]), encode(e));
            batch.insert(key(b"p/", &[&u, e.path.as_str().as_bytes()]), &seq[..]);
            batch.insert(history_key(user, &e.path, e.version), &[][..]);
            last = Some(e.version);
        }
        if let Some(last) = last {
            batch.insert(key(b"h/", &[&u]), &last.to_be_bytes()[..]);
        }
        batch.insert(key(b"c/", &[&u, id.as_bytes()]), encode_commit(resp));
        self.meta.apply_batch(batch)?;
        if w.loaded {
            for (seq, rec, chunks) in pending {
                let lens: HashMap<ChunkId, u32> = resp
                    .entries
                    .iter()
                    .filter(|e| e.version == *seq)
                    .flat_map(|e| e.manifest.iter().flat_map(|m| m.chunks.iter().map(|c| (c.id, c.len))))
                    .collect();
                let sized: Vec<(ChunkId, u32)> =
                    chunks.iter().map(|c| (*c, lens.get(c).copied().unwrap_or(0))).collect();
                w.add(*seq, rec.device, &sized, rec.since_ms);
            }
        }
        self.pending_count.fetch_add(pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Journal entries with `since < seq <= upto`: at most `limit` of them, and no more once their
    /// stored size passes `max_bytes` (at least one entry, whatever its size).
    pub fn changes(
        &self,
        user: UserId,
        since: Seq,
        upto: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let u = user.to_be_bytes();
        if upto <= since {
            return Ok(Vec::new());
        }
        let from = key(b"j/", &[&u, &since.saturating_add(1).to_be_bytes()]);
        let to = key(b"j/", &[&u, &upto.to_be_bytes()]);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.meta.range(from..=to).take(limit) {
            let (k, v) = kv?;
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Versions of `path` after `after`, oldest first: at most `limit` (and no more once past
    /// `MAX_PAGE_BYTES` stored, at least one), plus whether more follow.
    pub fn history(
        &self,
        user: UserId,
        path: &SyncPath,
        after: Option<Seq>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), StoreError> {
        let prefix = key(b"v/", &[&user.to_be_bytes(), path.as_str().as_bytes(), &[0]]);
        let start = history_key(user, path, after.map_or(0, |a| a.saturating_add(1)));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.meta.range(start..) {
            let (k, _) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = be_u64(&k[prefix.len()..]).ok_or_else(|| StoreError::Corrupt { key: format!("v/{path}") })?;
            if let Some((e, size)) = self.sized_entry(user, seq)? {
                if out.len() == limit || (!out.is_empty() && bytes + size > MAX_PAGE_BYTES) {
                    return Ok((out, true));
                }
                bytes += size;
                out.push(e);
            }
        }
        Ok((out, false))
    }

    /// Live heads strictly under directory `dir`.
    pub fn live_under(&self, user: UserId, dir: &SyncPath) -> Result<Vec<Entry>, StoreError> {
        let mut prefix = key(b"p/", &[&user.to_be_bytes(), dir.as_str().as_bytes()]);
        prefix.push(b'/');
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(&prefix) {
            let (_, v) = kv?;
            let seq = be_u64(&v).ok_or_else(|| StoreError::Corrupt { key: "p/".into() })?;
            if let Some(e) = self.entry(user, seq)?
                && !e.deleted
            {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Live heads ordered by path, strictly after `after`, as of the current head: at most
    /// `limit` (and no more once past `MAX_PAGE_BYTES` stored, at least one), plus whether more
    /// follow.
    pub fn tree_head(
        &self,
        user: UserId,
        after: Option<&SyncPath>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), StoreError> {
        let u = user.to_be_bytes();
        let prefix = key(b"p/", &[&u]);
        let start = match after {
            Some(a) => {
                let mut k = key(b"p/", &[&u, a.as_str().as_bytes()]);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.meta.range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = be_u64(&v).ok_or_else(|| StoreError::Corrupt { key: "p/".into() })?;
            let Some((e, size)) = self.sized_entry(user, seq)? else {
                continue;
            };
            if e.deleted {
                continue;
            }
            if out.len() == limit || (!out.is_empty() && bytes + size > MAX_PAGE_BYTES) {
                return Ok((out, true));
            }
            bytes += size;
            out.push(e);
        }
        Ok((out, false))
    }

    /// Live entries as of journal seq `at`, ordered by path (reads the history index).
    pub fn tree_at(&self, user: UserId, at: Seq) -> Result<Vec<Entry>, StoreError> {
        let prefix = key(b"v/", &[&user.to_be_bytes()]);
        let mut best: std::collections::BTreeMap<Vec<u8>, Seq> = Default::default();
        for kv in self.meta.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let body = &k[prefix.len()..];
            if body.len() < 9 {
                return Err(StoreError::Corrupt { key: "v/".into() });
            }
            let (path, seq) = body.split_at(body.len() - 9);
            let seq = be_u64(&seq[1..]).unwrap_or(0);
            if seq <= at {
                best.insert(path.to_vec(), seq);
            }
        }
        let mut out = Vec::new();
        for seq in best.into_values() {
            if let Some(e) = self.entry(user, seq)?
                && !e.deleted
            {
                out.push(e);
            }
        }
        Ok(out)
    }
}
