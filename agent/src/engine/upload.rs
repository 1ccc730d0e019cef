//! Sending local changes: each outbox commit's missing chunks are uploaded, then the commit; the
//! coordinator's answer moves the synced and remote trees in the same batch that drops it.

use std::collections::HashSet;
use std::path::PathBuf;

use shoal_protocol::api::{CommitRequest, ErrorCode};
use shoal_protocol::path::Escaped;
use shoal_protocol::{Change, ChunkId, SyncPath};

use super::{CycleReport, Engine, EngineError};
use crate::store::Batch;
use crate::transfer::{self, UploadError};

/// Most changes in one outbox commit: what the coordinator accepts.
const COMMIT_CHANGES: usize = shoal_protocol::api::MAX_COMMIT_CHANGES;
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
            match transfer::upload_chunks(&self.client, files, missing, &self.counters.uploaded).await {
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
            let req = CommitRequest { commit_id: item.commit_id, changes: item.changes };
            match self.client.commit(&req).await {
                Ok(resp) => {
                    let mut batch = Batch::default();
                    batch.del_outbox(id);
                    for e in &resp.entries {
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
