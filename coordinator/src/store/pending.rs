//! Pending versions: committed before the origin held all their chunks (`w/` records), and in
//! memory per user the chunks each still waits for ([`Waits`]).

use super::*;

/// A version committed before the origin had all its chunks (see `api::PendingVersion`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRec {
    pub path: SyncPath,
    pub device: DeviceId,
    pub since_ms: u64,
    /// Distinct chunks missing: as stored, the count at commit time; as read through
    /// [`Store::pending`], the count still missing. The record goes when none is left.
    pub missing: u64,
    pub withdrawn: bool,
}

/// A pending version as appended with its commit: the record and the chunks it waits for.
pub type NewPending = (Seq, PendingRec, Vec<ChunkId>);

/// A pending version as listed: its record (with the count of chunks still missing) and when it
/// last made progress (its commit, a chunk of it arriving, or the store opening).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingState {
    pub rec: PendingRec,
    pub progress_ms: u64,
}

/// How many pending versions, and chunks awaited, a user and one of its devices have: what the
/// limits on them are checked against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingLoad {
    pub user_versions: u64,
    /// Distinct chunks the user's pending versions wait for.
    pub user_chunks: u64,
    pub device_versions: u64,
    /// Chunks the device's pending versions wait for (a chunk two of them wait for counts twice).
    pub device_chunks: u64,
}

/// One user's pending versions and the chunks each still waits for, derived from the store on
/// first use after start ([`Store::load_waits`]) and from then on changed together with the
/// records: by commits that add pending versions and uploads that count chunks off them. Held
/// locked across each such change, so a derivation never sees half of one. Its size follows the
/// chunks awaited (~50 bytes each), which the uploads of the versions' authors pay off.
#[derive(Default)]
pub(super) struct Waits {
    pub(super) loaded: bool,
    /// The first pending version waiting for each chunk; any others in `more`.
    pub(super) first: HashMap<ChunkId, Seq>,
    pub(super) more: HashMap<ChunkId, Vec<Seq>>,
    /// Every pending version (withdrawn ones too): its author, how many distinct chunks it still
    /// lacks, and when it last made progress.
    pub(super) versions: HashMap<Seq, Waiting>,
    /// The length of each chunk waited for, and their sum (counted in the user's quota usage).
    pub(super) sizes: HashMap<ChunkId, u32>,
    pub(super) bytes: u64,
}

/// One pending version in [`Waits`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Waiting {
    pub(super) device: DeviceId,
    pub(super) missing: u64,
    pub(super) progress_ms: u64,
}

impl Waits {
    /// Adds pending version `seq`, waiting for `chunks` (with their lengths).
    pub(super) fn add(&mut self, seq: Seq, device: DeviceId, chunks: &[(ChunkId, u32)], progress_ms: u64) {
        for (c, len) in chunks {
            if let std::collections::hash_map::Entry::Vacant(v) = self.sizes.entry(*c) {
                v.insert(*len);
                self.bytes += u64::from(*len);
            }
            match self.first.entry(*c) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(seq);
                }
                std::collections::hash_map::Entry::Occupied(_) => self.more.entry(*c).or_default().push(seq),
            }
        }
        self.versions.insert(seq, Waiting { device, missing: chunks.len() as u64, progress_ms });
    }

    pub(super) fn load(&self, device: DeviceId) -> PendingLoad {
        let mine = self.versions.values().filter(|w| w.device == device);
        PendingLoad {
            user_versions: self.versions.len() as u64,
            user_chunks: self.first.len() as u64,
            device_versions: mine.clone().count() as u64,
            device_chunks: mine.map(|w| w.missing).sum(),
        }
    }

    /// The versions waiting for `id`.
    pub(super) fn waiting(&self, id: &ChunkId) -> impl Iterator<Item = Seq> + '_ {
        self.first.get(id).into_iter().chain(self.more.get(id).into_iter().flatten()).copied()
    }

    pub(super) fn arrived(&mut self, id: &ChunkId) {
        self.first.remove(id);
        self.more.remove(id);
        if let Some(len) = self.sizes.remove(id) {
            self.bytes = self.bytes.saturating_sub(u64::from(len));
        }
    }
}

/// Locks a user's [`Waits`]. Should a panic have cut a change to them short, they are derived
/// from the store again.
pub(super) fn lock_waits(m: &std::sync::Mutex<Waits>) -> std::sync::MutexGuard<'_, Waits> {
    m.lock().unwrap_or_else(|p| {
        m.clear_poison();
        let mut w = p.into_inner();
        *w = Waits::default();
        w
    })
}

impl Store {
    /// Removes the `m/` records of releases before (see the module doc): what they held is
    /// derived from the other records now.
    pub(super) fn drop_old_waits(&self) -> Result<(), StoreError> {
        let mut removed = 0usize;
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in self.meta.scan_prefix(b"m/").take(OLD_RECORDS_GROUP) {
                batch.remove(kv?.0);
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.meta.apply_batch(batch)?;
            removed += n;
        }
        if removed > 0 {
            self.flush_blocking()?;
            tracing::info!(records = removed, "removed the chunk-wait records of an earlier release");
        }
        Ok(())
    }

    /// The user's pending versions, oldest first, each with the count of chunks it still lacks
    /// and when it last made progress.
    pub fn pending(&self, user: UserId) -> Result<Vec<(Seq, PendingState)>, StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        let recs = self.pending_records(user)?;
        Ok(recs
            .into_iter()
            .map(|(seq, mut rec)| {
                let waiting = w.versions.get(&seq);
                if let Some(v) = waiting {
                    rec.missing = v.missing;
                }
                let progress_ms = waiting.map_or(rec.since_ms, |v| v.progress_ms);
                (seq, PendingState { rec, progress_ms })
            })
            .collect())
    }

    /// How many pending versions and awaited chunks `user` and its `device` have now.
    pub fn pending_load(&self, user: UserId, device: DeviceId) -> Result<PendingLoad, StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        Ok(w.load(device))
    }

    /// Pending versions of every user that made no progress since `before_ms`, or were withdrawn
    /// (for `/metrics`).
    pub fn stuck_count(&self, before_ms: u64) -> Result<u64, StoreError> {
        let mut users = Vec::new();
        let mut from = b"w/".to_vec();
        while let Some(kv) = self.meta.range(from..).next() {
            let (k, _) = kv?;
            if !k.starts_with(b"w/") {
                break;
            }
            let Some(user) = k.get(2..10).and_then(be_u64) else { break };
            users.push(user);
            match user.checked_add(1) {
                Some(next) => from = key(b"w/", &[&next.to_be_bytes()]),
                None => break,
            }
        }
        let mut n = 0;
        for user in users {
            n +=
                self.pending(user)?.iter().filter(|(_, p)| p.rec.withdrawn || p.progress_ms < before_ms).count() as u64;
        }
        Ok(n)
    }

    /// The user's `w/` records as stored, oldest first.
    pub(super) fn pending_records(&self, user: UserId) -> Result<Vec<(Seq, PendingRec)>, StoreError> {
        let prefix = key(b"w/", &[&user.to_be_bytes()]);
        self.meta
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let seq = be_u64(&k[prefix.len()..]).ok_or_else(|| StoreError::Corrupt { key: "w/".into() })?;
                Ok((seq, decode(&k, &v)?))
            })
            .collect()
    }

    /// Pending versions of every user, and the oldest one's commit time (for `/metrics`). Reads
    /// one record per user with pending versions: a user's first (lowest journal number) is the
    /// oldest, commit times growing with the journal.
    pub fn pending_stats(&self) -> Result<(u64, Option<u64>), StoreError> {
        let mut oldest: Option<u64> = None;
        let mut from = b"w/".to_vec();
        while let Some(kv) = self.meta.range(from..).next() {
            let (k, v) = kv?;
            if !k.starts_with(b"w/") {
                break;
            }
            let rec: PendingRec = decode(&k, &v)?;
            oldest = Some(oldest.map_or(rec.since_ms, |o| o.min(rec.since_ms)));
            // On to the next user's records.
            match k.get(2..10).and_then(be_u64).and_then(|user| user.checked_add(1)) {
                Some(next) => from = key(b"w/", &[&next.to_be_bytes()]),
                None => break,
            }
        }
        Ok((self.pending_count.load(std::sync::atomic::Ordering::Relaxed), oldest))
    }

    /// `true` if the user has a pending version.
    pub fn has_pending(&self, user: UserId) -> Result<bool, StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        Ok(!w.versions.is_empty())
    }

    /// Those of `ids` that a pending version of the user waits for, as far as known without
    /// reading the store: none before its waits were first needed. The user lacks them (for
    /// `chunks/missing`, which then need not look them up).
    /// The bytes the user's pending versions still wait for (distinct chunks).
    pub fn awaited_bytes(&self, user: UserId) -> Result<u64, StoreError> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        Ok(w.bytes)
    }

    pub fn awaited(&self, user: UserId, ids: &[ChunkId]) -> std::collections::HashSet<ChunkId> {
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        if let Err(e) = self.load_waits(user, &mut w) {
            tracing::warn!(user, error = %e, "pending versions' waits could not be derived");
        }
        ids.iter().filter(|id| w.first.contains_key(id)).copied().collect()
    }

    /// The user's [`Waits`], not necessarily loaded yet.
    pub(super) fn waits_of(&self, user: UserId) -> std::sync::Arc<std::sync::Mutex<Waits>> {
        lock(&self.waits).entry(user).or_default().clone()
    }

    /// Derives what the user's pending versions wait for, unless done already: for each `w/`
    /// record, the distinct chunks of its journal entry's manifest that the user does not hold
    /// (not recorded as the user's, or the chunk store no longer indexes the chunk: lost or quarantined). A
    /// version found waiting for nothing (not left by this release, whose uploads remove the
    /// record with the last chunk) is made durable here.
    pub(super) fn load_waits(&self, user: UserId, w: &mut Waits) -> Result<(), StoreError> {
        if w.loaded {
            return Ok(());
        }
        let mut loaded = Waits { loaded: true, ..Waits::default() };
        let mut complete = Vec::new();
        for (seq, rec) in self.pending_records(user)? {
            let entry = self.entry(user, seq)?.ok_or_else(|| StoreError::Corrupt { key: format!("w/{user} {seq}") })?;
            let mut seen = std::collections::HashSet::new();
            let mut lacking = Vec::new();
            for c in entry.manifest.iter().flat_map(|m| &m.chunks) {
                if seen.insert(c.id) && !(self.user_has_chunk(user, &c.id)? && self.chunk_loc(&c.id)?.is_some()) {
                    lacking.push((c.id, c.len));
                }
            }
            if lacking.is_empty() {
                complete.push(seq);
            } else {
                loaded.add(seq, rec.device, &lacking, rec.since_ms.max(self.opened_ms));
            }
        }
        if !complete.is_empty() {
            let mut batch = sled::Batch::default();
            for seq in &complete {
                batch.remove(key(b"w/", &[&user.to_be_bytes(), &seq.to_be_bytes()]));
            }
            self.meta.apply_batch(batch)?;
            self.pending_count.fetch_sub(complete.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(user, versions = ?complete, "pending versions found complete are durable");
        }
        *w = loaded;
        Ok(())
    }

    /// Records that the origin now stores `ids` for the user and counts them off the user's
    /// pending versions waiting for them: versions left waiting for nothing become durable (their
    /// records go). When the user has pending versions, the caller has synced the chunks first.
    /// Each group of up to `STORED_GROUP` chunks is one atomic batch, so a chunk is never the
    /// user's while a version still waits for it; a crash between groups leaves the later ones
    /// unrecorded, to be uploaded again. Returns the versions that became durable. The caller
    /// holds the user's commit lock, so no commit can record a wait for a chunk between the
    /// upload and this.
    pub fn chunks_stored(&self, user: UserId, ids: &[ChunkId]) -> Result<Vec<Seq>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<ChunkId> = ids.iter().filter(|id| seen.insert(**id)).copied().collect();
        let cell = self.waits_of(user);
        let mut w = lock_waits(&cell);
        self.load_waits(user, &mut w)?;
        let u = user.to_be_bytes();
        let mut durable = Vec::new();
        for group in ids.chunks(STORED_GROUP) {
            let mut batch = sled::Batch::default();
            let mut counted: std::collections::BTreeMap<Seq, u64> = Default::default();
            for id in group {
                for seq in w.waiting(id) {
                    *counted.entry(seq).or_default() += 1;
                }
            }
            let done: Vec<Seq> = counted
                .iter()
                .filter(|(seq, n)| w.versions.get(seq).is_some_and(|v| v.missing <= **n))
                .map(|(seq, _)| *seq)
                .collect();
            for seq in &done {
                batch.remove(key(b"w/", &[&u, &seq.to_be_bytes()]));
            }
            let mut log = lock(&self.chunks);
            let ops: Vec<Op> =
                group.iter().filter(|id| !log.recs.holds(user, id)).map(|id| Op::Held(user, *id)).collect();
            self.log_chunk_ops(&mut log, batch, &ops)?;
            drop(log);
            for id in group {
                w.arrived(id);
            }
            let now = shoal_sys::clock::now_ms();
            for (seq, n) in counted {
                if let Some(v) = w.versions.get_mut(&seq) {
                    v.missing = v.missing.saturating_sub(n);
                    v.progress_ms = now;
                }
            }
            for seq in &done {
                w.versions.remove(seq);
            }
            self.pending_count.fetch_sub(done.len() as u64, std::sync::atomic::Ordering::Relaxed);
            durable.extend(done);
        }
        Ok(durable)
    }

    /// Marks every pending version `device` committed as withdrawn (the device was revoked: it
    /// will upload none of them). Returns how many were marked.
    pub fn withdraw_device(&self, user: UserId, device: DeviceId) -> Result<usize, StoreError> {
        let versions: Vec<Seq> = self
            .pending_records(user)?
            .into_iter()
            .filter(|(_, r)| r.device == device && !r.withdrawn)
            .map(|(seq, _)| seq)
            .collect();
        self.withdraw(user, device, &versions)
    }

    /// Marks the given pending versions, if `device` committed them, as withdrawn. Returns how
    /// many were marked.
    pub fn withdraw(&self, user: UserId, device: DeviceId, versions: &[Seq]) -> Result<usize, StoreError> {
        let mut n = 0;
        for seq in versions {
            let wk = key(b"w/", &[&user.to_be_bytes(), &seq.to_be_bytes()]);
            let Some(mut rec) = self.get::<PendingRec>(&wk)? else { continue };
            if rec.device == device && !rec.withdrawn {
                rec.withdrawn = true;
                self.meta.insert(wk, encode(&rec))?;
                n += 1;
            }
        }
        Ok(n)
    }

    // ---- journal ----
}
