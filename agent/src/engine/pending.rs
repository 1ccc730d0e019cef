//! Pending versions held by this device: committed (by any device) before the origin had their
//! chunks. Two rules keep them from being lost:
//! - before this device overwrites or removes a local file whose content is a pending version, it
//!   uploads that content (`secure_pending`): a pending version never counts as backed up;
//! - a device that holds another device's pending version uploads it when its author cannot: the
//!   author is not connected to the coordinator, or withdrew it (`help_pending`). While any
//!   version of the user is pending, it looks again every `PENDING_RECHECK` (the status shows
//!   them too).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use shoal_protocol::api::PendingResponse;
use shoal_protocol::{ChunkId, Entry, EntryKind, SyncPath};

use super::{CycleReport, Engine, EngineError};
use crate::planner::Op;
use crate::transfer::{self, UploadError};

/// How often a device holding someone else's pending version checks whether it should upload it.
pub(super) const PENDING_RECHECK: Duration = Duration::from_secs(2);

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
        if !self.watch_pending && !self.pending_stale && self.pending_checked.is_some() {
            return Ok(());
        }
        if let Some(wait) =
            self.pending_checked.and_then(|t| PENDING_RECHECK.checked_sub(t.elapsed())).filter(|w| !w.is_zero())
        {
            report.recheck = Some(wait);
            return Ok(());
        }
        self.pending_checked = Some(Instant::now());
        self.pending_stale = false;
        let me = self.cfg.device_id;
        let pending = self.fetch_pending().await?.versions;
        // A download that failed because nobody could supply a pending version is tried again
        // at once when that version becomes durable (or leaves the list otherwise).
        let listed: HashSet<(SyncPath, u64)> = pending.iter().map(|v| (v.path.clone(), v.version)).collect();
        for (path, _) in std::mem::replace(&mut self.seen_pending, listed.clone()).difference(&listed) {
            if self.retry_now(path) {
                tracing::debug!(path = %path.escaped(), "a pending version became durable; fetching it again now");
            }
        }
        // While anything is pending, the status follows it every `PENDING_RECHECK`. Withdrawn
        // versions alone do not keep it looking: their author gave up on them, and a device that
        // fetches one later looks again because its files moved.
        self.watch_pending = pending.iter().any(|v| !v.withdrawn);
        report.recheck = self.watch_pending.then_some(PENDING_RECHECK);
        report.pending_versions = Some(pending.clone());
        // Only another device's version whose author cannot upload it is this device's business.
        for v in pending.into_iter().filter(|v| v.device != me && (v.withdrawn || !v.author_online)) {
            let slot = self.store.get(&v.path)?;
            let Some(e) = slot.synced.filter(|e| e.version == v.version) else { continue };
            // The local file is still exactly that version (as last scanned).
            if slot.index.as_ref().and_then(|r| r.manifest.as_ref()).map(|m| m.hash) != e.hash() {
                continue;
            }
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
