//! Pending versions held by this device: committed (by any device) before the origin had their
//! chunks. Two rules keep them from being lost:
//! - before this device overwrites or removes a local file whose content is a pending version, it
//!   uploads that content (`secure_pending`): a pending version never counts as backed up;
//! - a device that holds another device's pending version uploads it when its author cannot: the
//!   author is not connected to the coordinator, or withdrew it (`help_pending`). While any
//!   version of the user is pending, it looks again every `PENDING_RECHECK` (the status shows
//!   them too); a version nobody supplies for long is *stuck*: it is not fetched (a local edit
//!   goes on top of it) and only looked at every `STUCK_RECHECK`.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use shoal_protocol::api::PendingResponse;
use shoal_protocol::{ChunkId, Entry, EntryKind, SyncPath};

use super::{CycleReport, Engine, EngineError};

/// What a device still owes the coordinator (see [`Engine::finish_uploads`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UploadsLeft {
    /// Changes in the outbox, not committed yet.
    pub unsent_changes: usize,
    /// This device's own pending versions whose chunks it has not uploaded.
    pub owed_versions: usize,
    /// Other devices' pending versions this device holds and could not upload.
    pub held_versions: usize,
}

impl UploadsLeft {
    pub fn is_empty(&self) -> bool {
        *self == UploadsLeft::default()
    }
}
use crate::planner::Op;
use crate::transfer::{self, UploadError};

/// How often a device holding someone else's pending version checks whether it should upload it.
pub(super) const PENDING_RECHECK: Duration = Duration::from_secs(2);
/// How long a stopping device that owes nothing of its own waits for the list of pending versions.
const ONE_LOOK: Duration = Duration::from_secs(2);
/// How often a device looks again while only stuck versions are pending (one may come back to
/// life when its author returns and uploads it).
const STUCK_RECHECK: Duration = Duration::from_secs(60);

impl Engine {
    /// Uploads, from the local files, every pending version the plan would overwrite or remove.
    /// Fails (and nothing is applied) if one cannot be uploaded.
    pub(super) async fn secure_pending(
        &mut self,
        ops: &[Op],
        synced: &BTreeMap<SyncPath, Entry>,
        report: &mut CycleReport,
    ) -> anyhow::Result<()> {
        let at_risk: Vec<&Entry> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Fetch(e) => synced.get(&e.path),
                Op::Remove { path, .. } => synced.get(path),
                _ => None,
            })
            .filter(|e| e.kind == EntryKind::File && e.manifest.as_ref().is_some_and(|m| !m.chunks.is_empty()))
            .collect();
        if at_risk.is_empty() {
            return Ok(());
        }
        let pending = self.fetch_pending().await?;
        let versions: HashSet<u64> = pending.versions.iter().map(|v| v.version).collect();
        // Past the listed page, any version may be pending: each at-risk one is checked (an
        // upload of what the origin already has sends nothing).
        for e in at_risk.into_iter().filter(|e| pending.more || versions.contains(&e.version)) {
            match self.upload_held(e, report).await {
                Ok(()) | Err(UploadError::SourceChanged(_)) => {}
                Err(UploadError::Client(err)) if err.is_retryable() => return Err(EngineError::Offline(err).into()),
                Err(UploadError::Client(err)) => {
                    anyhow::bail!("{}: cannot back up pending version {} before replacing it: {err}", e.path, e.version)
                }
            }
        }
        Ok(())
    }

    /// Uploads the pending versions of other devices that this device holds unchanged and whose
    /// author cannot upload them. Looks (one request) at most every `PENDING_RECHECK`, and only
    /// while something is pending or a cycle moved files since the last look; sets
    /// `report.recheck` so the next look happens even if the folder stays quiet.
    pub(super) async fn help_pending(&mut self, report: &mut CycleReport) -> anyhow::Result<()> {
        self.pending_stale |= report.fetched_files > 0 || report.committed_changes > 0 || report.bytes_uploaded > 0;
        if !self.watch_pending && !self.pending_stale && self.stuck.is_empty() && self.pending_checked.is_some() {
            return Ok(());
        }
        // Stuck versions alone are looked at seldom: nothing is expected of them.
        let every = if self.watch_pending || self.pending_stale { PENDING_RECHECK } else { STUCK_RECHECK };
        if let Some(wait) = self.pending_checked.and_then(|t| every.checked_sub(t.elapsed())).filter(|w| !w.is_zero()) {
            report.recheck = Some(wait);
            return Ok(());
        }
        self.pending_checked = Some(Instant::now());
        self.pending_stale = false;
        let me = self.cfg.device_id;
        let pending = self.fetch_pending().await?.versions;
        // A download that failed because nobody could supply a pending version is tried again
        // at once when that version becomes durable (or leaves the list otherwise); one not tried
        // because the version was stuck is planned again when it no longer is.
        let listed: HashSet<(SyncPath, u64)> = pending.iter().map(|v| (v.path.clone(), v.version)).collect();
        let stuck: HashSet<(SyncPath, u64)> =
            pending.iter().filter(|v| v.stuck).map(|v| (v.path.clone(), v.version)).collect();
        let old_stuck = std::mem::replace(&mut self.stuck, stuck.clone());
        let gone: Vec<SyncPath> = std::mem::replace(&mut self.seen_pending, listed.clone())
            .difference(&listed)
            .chain(old_stuck.difference(&stuck))
            .map(|(p, _)| p.clone())
            .collect();
        for path in gone {
            if self.retry_now(&path) {
                tracing::debug!(path = %path.escaped(), "a pending version became durable; fetching it again now");
            }
            self.dirty.insert(path);
        }
        // While anything is pending, the status follows it every `PENDING_RECHECK`. Withdrawn
        // versions alone do not keep it looking: their author gave up on them, and a device that
        // fetches one later looks again because its files moved.
        self.watch_pending = pending.iter().any(|v| !v.withdrawn && !v.stuck);
        report.recheck =
            if self.watch_pending { Some(PENDING_RECHECK) } else { (!self.stuck.is_empty()).then_some(STUCK_RECHECK) };
        report.pending_versions = Some(pending.clone());
        // Only another device's version whose author cannot upload it is this device's business.
        for v in pending.into_iter().filter(|v| v.device != me && (v.withdrawn || !v.author_online)) {
            let Some(e) = self.holds_unchanged(&v.path, v.version)? else { continue };
            tracing::info!(path = %v.path.escaped(), version = v.version, "uploading another device's pending version");
            match self.upload_held(&e, report).await {
                Ok(()) | Err(UploadError::SourceChanged(_)) => {}
                Err(err) => {
                    // Look again next time, even if nothing else is pending then.
                    self.pending_stale = true;
                    match err {
                        UploadError::Client(err) if err.is_retryable() => return Err(EngineError::Offline(err).into()),
                        err => report.errors.push(format!("{}: {err}", v.path)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Before the daemon stops: sends the outbox (upload first: nobody will fetch from a device
    /// that is going away), pays this device's owed uploads, and uploads every other device's
    /// pending version this device holds unchanged (its author may be stopping too, and the
    /// version may exist nowhere else). Returns what is still owed.
    pub async fn finish_uploads(&mut self) -> anyhow::Result<UploadsLeft> {
        self.upload_first = true;
        let mut report = CycleReport::default();
        let owes = !self.uploads_left()?.is_empty();
        if owes {
            self.drain_outbox(&mut report).await?;
            self.pay_owed(&mut report).await?;
        }
        // Owing nothing of its own, a device looks once, briefly, for others' versions it holds:
        // a coordinator that does not answer (gone itself) is not waited for.
        let listed = if owes {
            self.fetch_pending().await?.versions
        } else {
            match tokio::time::timeout(ONE_LOOK, self.fetch_pending()).await {
                Ok(Ok(p)) => p.versions,
                _ => return Ok(UploadsLeft::default()),
            }
        };
        let me = self.cfg.device_id;
        let mut held_left = 0;
        for v in listed.into_iter().filter(|v| v.device != me) {
            let Some(e) = self.holds_unchanged(&v.path, v.version)? else { continue };
            tracing::info!(path = %v.path.escaped(), version = v.version, "uploading another device's pending version before stopping");
            match self.upload_held(&e, &mut report).await {
                Ok(()) | Err(UploadError::SourceChanged(_)) => {}
                Err(UploadError::Client(err)) if err.is_retryable() => return Err(EngineError::Offline(err).into()),
                Err(err) => {
                    tracing::warn!(path = %v.path.escaped(), error = %err, "could not upload another device's pending version");
                    held_left += 1;
                }
            }
        }
        let mut left = self.uploads_left()?;
        left.held_versions = held_left;
        Ok(left)
    }

    /// What this device still owes the coordinator: changes in its outbox, uploads for its own
    /// pending versions.
    pub fn uploads_left(&self) -> anyhow::Result<UploadsLeft> {
        Ok(UploadsLeft {
            unsent_changes: self.store.outbox()?.iter().map(|(_, i)| i.changes.len()).sum(),
            owed_versions: self.store.owed()?.len(),
            held_versions: 0,
        })
    }

    /// `true` if the folder holds a version listed as pending when the list was last read.
    pub(super) fn holds_pending(&self) -> anyhow::Result<bool> {
        for (path, version) in &self.seen_pending {
            if self.store.get(path)?.synced.is_some_and(|e| e.version == *version) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The synced entry of `path` if it is `version` and the local file is still exactly that
    /// version (as last scanned).
    fn holds_unchanged(&self, path: &SyncPath, version: u64) -> anyhow::Result<Option<Entry>> {
        let slot = self.store.get(path)?;
        let Some(e) = slot.synced.filter(|e| e.version == version) else { return Ok(None) };
        let hash = slot.index.as_ref().and_then(|r| r.manifest.as_ref()).map(|m| m.hash);
        Ok((hash.is_some() && hash == e.hash()).then_some(e))
    }

    async fn fetch_pending(&self) -> anyhow::Result<PendingResponse> {
        Ok(self.client.pending().await.map_err(EngineError::Offline)?)
    }

    /// Uploads the chunks of `e` the origin lacks, read from the local file (each re-verified).
    async fn upload_held(&mut self, e: &Entry, report: &mut CycleReport) -> Result<(), UploadError> {
        let Some(m) = &e.manifest else { return Ok(()) };
        let mut ids: Vec<ChunkId> = m.chunks.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        let missing: HashSet<ChunkId> = self.client.missing(&ids).await?.into_iter().collect();
        let files = vec![(e.path.to_local(&self.root), m.clone())];
        report.bytes_uploaded +=
            transfer::upload_chunks(&self.client, files, missing, Some(&self.recent), &self.counters.uploaded).await?;
        Ok(())
    }
}
