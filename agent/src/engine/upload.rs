//! Sending local changes. Each outbox commit's missing chunks are uploaded, then the commit; the
//! coordinator's answer moves the synced and remote trees in the same batch that drops it.
//!
//! Peer-first: while a LAN peer is connected, a commit whose chunks the origin lacks is sent
//! *first*, as pending (`pending_ok`), so the other devices see it at once and fetch it from
//! this one; the upload it owes is recorded (`Owed`) in the batch that drops the outbox item and
//! is sent by the next cycle while it scans (`pay_owed`), making the version durable. An owed
//! upload whose file changed before its chunks left is withdrawn at the coordinator: a device
//! that fetched it can still upload it, and if none did, history shows it withdrawn rather than
//! promised.

use std::collections::HashSet;
use std::path::PathBuf;

use shoal_protocol::api::{CommitRequest, ErrorCode};
use shoal_protocol::path::Escaped;
use shoal_protocol::{Change, ChunkId, Seq, SyncPath};

use super::{CycleReport, Engine, EngineError};
use crate::store::{Batch, Owed};
use crate::transfer::{self, UploadError};

/// Most changes in one outbox commit: half of what the coordinator accepts. The coordinator
/// appends a commit in one sled batch, whose replaced nodes stay in memory until it ends: at
/// 100,000 new files its memory peaked at 82 MiB with commits of 500, 95 MiB with 1,000.
const COMMIT_CHANGES: usize = shoal_protocol::api::MAX_COMMIT_CHANGES / 2;
/// Most chunk references paid in one batch of owed uploads.
const OWED_CHUNKS: usize = 100_000;
/// Most chunk references in one outbox commit (~40 GiB of files; ~45 MiB of JSON, under the
/// coordinator's 64 MiB body limit).
const COMMIT_CHUNKS: usize = 500_000;

impl Engine {
    /// Sends every outbox commit: uploads the chunks the coordinator is missing, then commits.
    /// Returns `true` when an item was dropped (refused or its source changed) and the next cycle
    /// must re-plan.
    pub(super) async fn drain_outbox(&mut self, report: &mut CycleReport) -> anyhow::Result<bool> {
        let mut dirty = false;
        for (id, item) in self.store.outbox()? {
            let paths: Vec<SyncPath> = item.changes.iter().map(|c| c.path.clone()).collect();
            let started = std::time::Instant::now();
            let files: Vec<(PathBuf, shoal_protocol::Manifest)> = item
                .changes
                .iter()
                .filter_map(|c| c.manifest.as_ref().map(|m| (c.path.to_local(&self.root), m.clone())))
                .collect();
            let mut ids: Vec<ChunkId> = files.iter().flat_map(|(_, m)| m.chunks.iter().map(|c| c.id)).collect();
            ids.sort_unstable();
            ids.dedup();
            let missing: HashSet<ChunkId> =
                self.client.missing(&ids).await.map_err(EngineError::Offline)?.into_iter().collect();
            // Peer-first only when someone can fetch the version from here before the origin has
            // it; and always for a commit that was sent peer-first before (its answer lost, or
            // this device stopped before recording it): it may be pending already, and only the
            // answer to its replay says what this device owes.
            let sent_pending = self.store.sent_pending(id)?;
            let peer_first = sent_pending
                || (!missing.is_empty() && self.peers.as_ref().is_some_and(|p| !p.connections().is_empty()));
            if peer_first && !sent_pending {
                let mut b = Batch::default();
                b.mark_sent_pending(id);
                self.store.apply(b)?;
                self.store.flush().await?;
            }
            let upload = if peer_first {
                Ok(0)
            } else {
                transfer::upload_chunks(
                    &self.client,
                    files,
                    missing.clone(),
                    Some(&self.recent),
                    &self.counters.uploaded,
                )
                .await
            };
            match upload {
                Ok(n) => report.bytes_uploaded += n,
                Err(UploadError::SourceChanged(p)) => {
                    tracing::debug!(path = %Escaped(&p.display().to_string()), "file changed before upload; re-planning");
                    self.drop_outbox(id, paths)?;
                    dirty = true;
                    continue;
                }
                Err(UploadError::Client(e)) if e.is_retryable() => {
                    return Err(EngineError::Offline(e).into());
                }
                Err(UploadError::Client(e)) => {
                    report.errors.push(e.to_string());
                    self.drop_outbox(id, paths)?;
                    dirty = true;
                    continue;
                }
            }
            tracing::debug!(elapsed = ?started.elapsed(), "chunks uploaded");
            let req = CommitRequest { commit_id: item.commit_id, changes: item.changes, pending_ok: peer_first };
            match self.client.commit(&req).await {
                Ok(resp) => {
                    #[cfg(feature = "test-faults")]
                    if peer_first && std::env::var("SHOAL_TEST_CRASH").as_deref() == Ok("after-pending-commit") {
                        // A crash between the coordinator's answer and recording it.
                        tracing::error!("test fault: exiting right after a pending commit");
                        std::process::exit(3);
                    }
                    let mut batch = Batch::default();
                    batch.del_outbox(id);
                    for e in &resp.entries {
                        if peer_first
                            && let Some(m) =
                                e.manifest.as_ref().filter(|m| m.chunks.iter().any(|c| missing.contains(&c.id)))
                        {
                            batch.put_owed(e.version, &Owed { path: e.path.clone(), manifest: m.clone() });
                        }
                        // A replayed commit's entries may be older than what the journal already
                        // showed us: never move the remote tree backwards.
                        batch.put_remote_if_newer(e);
                        if e.deleted {
                            batch.del_synced(&e.path);
                        } else {
                            batch.put_synced(e);
                        }
                    }
                    self.store.apply(batch)?;
                    self.store.flush().await?;
                    report.committed_changes += resp.entries.len();
                }
                Err(e) if e.is_retryable() => return Err(EngineError::Offline(e).into()),
                Err(e) => {
                    if e.code() != Some(ErrorCode::StaleBase) {
                        tracing::warn!(error = %Escaped(&e.to_string()), "commit refused");
                        report.errors.push(e.to_string());
                    }
                    self.drop_outbox(id, paths)?;
                    dirty = true;
                    if e.code() == Some(ErrorCode::StaleBase) {
                        self.pull().await.map_err(EngineError::Offline)?;
                    }
                }
            }
        }
        Ok(dirty)
    }

    /// Uploads what this device owes for its pending versions (see the module doc), oldest
    /// first, many versions per batch: one `missing` question and one stream of upload requests
    /// for up to `OWED_CHUNKS` chunk references. A version whose file changed is withdrawn and
    /// the rest of its batch sent again; an upload the coordinator refuses stays owed (reported,
    /// tried again next cycle).
    pub(super) async fn pay_owed(&mut self, report: &mut CycleReport) -> anyhow::Result<()> {
        let mut owed = self.store.owed()?;
        // A path's file holds at most its newest owed version: older ones of the same path are
        // already lost here (withdrawn; a device that fetched one may still upload it).
        let mut newest: std::collections::HashMap<SyncPath, Seq> = std::collections::HashMap::new();
        for (v, o) in &owed {
            let n = newest.entry(o.path.clone()).or_insert(*v);
            *n = (*n).max(*v);
        }
        let (keep, superseded): (Vec<_>, Vec<_>) = owed.into_iter().partition(|(v, o)| newest[&o.path] == *v);
        owed = keep;
        if !superseded.is_empty() {
            let mut b = Batch::default();
            for (version, o) in &superseded {
                self.withdraw(*version, o).await?;
                b.del_owed(*version);
            }
            self.store.apply(b)?;
        }
        while !owed.is_empty() {
            let mut refs = 0usize;
            let take = owed
                .iter()
                .position(|(_, o)| {
                    refs += o.manifest.chunks.len();
                    refs > OWED_CHUNKS
                })
                .unwrap_or(owed.len())
                .max(1);
            let mut group: Vec<(Seq, Owed)> = owed.drain(..take).collect();
            let mut ids: Vec<ChunkId> =
                group.iter().flat_map(|(_, o)| o.manifest.chunks.iter().map(|c| c.id)).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut paid = Batch::default();
            while !group.is_empty() {
                let missing: HashSet<ChunkId> =
                    self.client.missing(&ids).await.map_err(EngineError::Offline)?.into_iter().collect();
                let files = group.iter().map(|(_, o)| (o.path.to_local(&self.root), o.manifest.clone())).collect();
                match transfer::upload_chunks(&self.client, files, missing, Some(&self.recent), &self.counters.uploaded)
                    .await
                {
                    Ok(n) => {
                        report.bytes_uploaded += n;
                        tracing::info!(versions = group.len(), bytes = n, "pending versions uploaded");
                        for (version, _) in &group {
                            paid.del_owed(*version);
                        }
                        break;
                    }
                    Err(UploadError::Client(e)) if e.is_retryable() => return Err(EngineError::Offline(e).into()),
                    Err(UploadError::Client(e)) => {
                        report.errors.push(format!("uploading pending versions failed: {e}"));
                        break;
                    }
                    Err(UploadError::SourceChanged(file)) => {
                        let (gone, kept): (Vec<_>, Vec<_>) =
                            group.into_iter().partition(|(_, o)| o.path.to_local(&self.root) == file);
                        if gone.is_empty() {
                            anyhow::bail!("{} changed during an upload it was not part of", file.display());
                        }
                        for (version, o) in &gone {
                            self.withdraw(*version, o).await?;
                            paid.del_owed(*version);
                        }
                        group = kept;
                    }
                }
            }
            self.store.apply(paid)?;
            self.store.flush().await?;
        }
        Ok(())
    }

    async fn withdraw(&self, version: Seq, owed: &Owed) -> anyhow::Result<()> {
        tracing::warn!(
            path = %owed.path.escaped(),
            version,
            "the file changed before this pending version of it was uploaded; withdrawing it (a device that fetched it may still upload it)"
        );
        self.client.withdraw(vec![version]).await.map_err(EngineError::Offline)?;
        Ok(())
    }

    /// Drops an outbox item whose commit cannot be sent as it is; its paths are planned again.
    fn drop_outbox(&mut self, id: u64, paths: Vec<SyncPath>) -> anyhow::Result<()> {
        self.replan.extend(paths);
        let mut b = Batch::default();
        b.del_outbox(id);
        self.store.apply(b)
    }
}

/// Groups changes into commits that stay well inside the coordinator's request limits: at most
/// `COMMIT_CHANGES` changes and `COMMIT_CHUNKS` chunk references each (a chunk reference is ~90
/// bytes of JSON). A single file with more chunks than that (over ~40 GiB) cannot be committed
/// and is reported as skipped.
pub(super) fn split_commits(changes: Vec<Change>, report: &mut CycleReport) -> Vec<Vec<Change>> {
    let mut out: Vec<Vec<Change>> = Vec::new();
    let mut chunks = 0usize;
    for c in changes {
        let n = c.manifest.as_ref().map_or(0, |m| m.chunks.len());
        if n > COMMIT_CHUNKS {
            report.skipped.push(format!("{}: too large to sync ({n} chunks)", c.path));
            continue;
        }
        if out.last().is_none_or(|p| p.len() >= COMMIT_CHANGES || chunks + n > COMMIT_CHUNKS) {
            out.push(Vec::new());
            chunks = 0;
        }
        chunks += n;
        out.last_mut().expect("a commit was just started").push(c);
    }
    out
}
