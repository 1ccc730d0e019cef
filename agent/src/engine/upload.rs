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

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use futures::StreamExt;
use shoal_protocol::api::{CommitRequest, CommitResponse, ErrorCode};
use shoal_protocol::path::Escaped;
use shoal_protocol::{Change, ChunkId, EntryKind, Seq, SyncPath};

use super::{CycleReport, Engine, EngineError};
use crate::client::ClientError;
use crate::store::{Batch, OutboxItem, Owed};
use crate::transfer::{self, UploadError};

/// Most changes in one outbox commit: half of what the coordinator accepts. The coordinator
/// appends a commit in one sled batch, whose replaced nodes stay in memory until it ends: at
/// 100,000 new files its memory peaked at 82 MiB with commits of 500, 95 MiB with 1,000.
const COMMIT_CHANGES: usize = shoal_protocol::api::MAX_COMMIT_CHANGES / 2;
/// Outbox commits sent at once.
const COMMITS_IN_FLIGHT: usize = 2;
/// How long a device commits upload-first after the coordinator refused a peer-first commit for
/// holding too many pending versions (`pending_limit`): long enough for the owed uploads to drain.
const UPLOAD_FIRST_AFTER_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Most chunk references paid in one batch of owed uploads.
const OWED_CHUNKS: usize = 100_000;
/// Most chunk references in one outbox commit (~40 GiB of files; ~45 MiB of JSON, under the
/// coordinator's 64 MiB body limit).
const COMMIT_CHUNKS: usize = 500_000;

/// An outbox commit sent and not yet answered.
struct Sent {
    id: u64,
    paths: Vec<SyncPath>,
    /// Its chunks the origin lacked when it was sent.
    missing: HashSet<ChunkId>,
    peer_first: bool,
}

/// The paths the commits in flight change, each with whether its change reshapes the tree
/// below it (`reshapes`), and every directory above them.
#[derive(Default)]
struct Flying {
    paths: HashMap<SyncPath, bool>,
    above: HashMap<SyncPath, usize>,
}

/// `true` unless `c` makes a directory where nothing ever was. The coordinator checks a
/// change against what is live above it (no entry under a file) and a new file against what
/// is live below it; only a new directory leaves both as they were, so changes below it may
/// arrive before or after it. Anything else (a file, a deletion, a directory over a path that
/// existed, perhaps as a file) must not be overtaken by changes below it, nor overtake them.
fn reshapes(c: &Change) -> bool {
    !(c.kind == EntryKind::Dir && !c.deleted && c.base.is_none())
}

impl Flying {
    fn add(&mut self, changes: &[(SyncPath, bool)]) {
        for (p, reshapes) in changes {
            self.paths.insert(p.clone(), *reshapes);
            let mut up = p.parent();
            while let Some(d) = up {
                up = d.parent();
                *self.above.entry(d).or_default() += 1;
            }
        }
    }

    fn remove(&mut self, paths: &[SyncPath]) {
        for p in paths {
            self.paths.remove(p);
            let mut up = p.parent();
            while let Some(d) = up {
                up = d.parent();
                if let Some(n) = self.above.get_mut(&d) {
                    *n -= 1;
                    if *n == 0 {
                        self.above.remove(&d);
                    }
                }
            }
        }
    }

    /// `true` if a change of `p` (reshaping the tree below it or not) must wait for the
    /// commits in flight: one changes `p`, reshapes a directory above it, or changes a path
    /// below a `p` that reshapes.
    fn clashes(&self, p: &SyncPath, reshapes: bool) -> bool {
        if self.paths.contains_key(p) || (reshapes && self.above.contains_key(p)) {
            return true;
        }
        let mut up = p.parent();
        while let Some(d) = up {
            if self.paths.get(&d) == Some(&true) {
                return true;
            }
            up = d.parent();
        }
        false
    }
}

impl Engine {
    /// Sends every outbox commit: uploads the chunks the coordinator is missing, then commits.
    /// Returns `true` when an item was dropped (refused or its source changed) and the next cycle
    /// must re-plan.
    ///
    /// One `missing` question covers every item, and the peer-first marks of all items are made
    /// durable together before any is sent; the answers are recorded as they come and made
    /// durable once at the end (an answer lost to a crash is had again by replaying its commit:
    /// the coordinator answers a commit id it has seen as it did the first time).
    pub(super) async fn drain_outbox(&mut self, report: &mut CycleReport) -> anyhow::Result<bool> {
        let mut dirty = false;
        let items = self.store.outbox()?;
        if items.is_empty() {
            return Ok(false);
        }
        let chunk_ids = |item: &OutboxItem| -> Vec<ChunkId> {
            let mut ids: Vec<ChunkId> = item
                .changes
                .iter()
                .flat_map(|c| c.manifest.iter().flat_map(|m| m.chunks.iter().map(|c| c.id)))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let items: Vec<(u64, OutboxItem, Vec<ChunkId>)> = items
            .into_iter()
            .map(|(id, item)| {
                let ids = chunk_ids(&item);
                (id, item, ids)
            })
            .collect();
        let mut all: Vec<ChunkId> = items.iter().flat_map(|(_, _, ids)| ids.iter().copied()).collect();
        all.sort_unstable();
        all.dedup();
        // What the origin lacks, less what the uploads below send.
        let mut lacking: HashSet<ChunkId> =
            self.client.missing(&all).await.map_err(EngineError::Offline)?.into_iter().collect();
        drop(all);
        // Peer-first only when someone can fetch the version from here before the origin has
        // it; and always for a commit that was sent peer-first before (its answer lost, or this
        // device stopped before recording it): it may be pending already, and only the answer to
        // its replay says what this device owes.
        let limited = self.upload_first_until.is_some_and(|t| std::time::Instant::now() < t);
        let peers_on =
            !self.upload_first && !limited && self.peers.as_ref().is_some_and(|p| !p.connections().is_empty());
        let mut marks = Batch::default();
        let mut plan = Vec::with_capacity(items.len());
        for (id, item, ids) in items {
            let sent_pending = self.store.sent_pending(id)?;
            let peer_first = sent_pending || (peers_on && ids.iter().any(|c| lacking.contains(c)));
            if peer_first && !sent_pending {
                marks.mark_sent_pending(id);
            }
            plan.push((id, item, ids, peer_first));
        }
        if !marks.is_empty() {
            self.store.apply(marks)?;
            self.store.flush().await?;
        }
        let mut recorded = false;
        // Commits in flight, answered in the order sent, and the paths they change.
        let mut flight = futures::stream::FuturesOrdered::new();
        let mut flying = Flying::default();
        for (id, item, ids, peer_first) in plan {
            let paths: Vec<SyncPath> = item.changes.iter().map(|c| c.path.clone()).collect();
            let shapes: Vec<(SyncPath, bool)> = item.changes.iter().map(|c| (c.path.clone(), reshapes(c))).collect();
            let missing: HashSet<ChunkId> = ids.into_iter().filter(|c| lacking.contains(c)).collect();
            if !peer_first && !missing.is_empty() {
                // Uploaded first, then committed (while the commits before it are in flight).
                let started = std::time::Instant::now();
                let files: Vec<(PathBuf, shoal_protocol::Manifest)> = item
                    .changes
                    .iter()
                    .filter_map(|c| c.manifest.as_ref().map(|m| (c.path.to_local(&self.root), m.clone())))
                    .collect();
                let upload = transfer::upload_chunks(
                    &self.client,
                    files,
                    missing.clone(),
                    Some(&self.recent),
                    &self.counters.uploaded,
                )
                .await;
                match upload {
                    Ok(n) => {
                        report.bytes_uploaded += n;
                        for c in &missing {
                            lacking.remove(c);
                        }
                    }
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
                        report.over_quota |= e.code() == Some(ErrorCode::QuotaExceeded);
                        report.errors.push(e.to_string());
                        self.drop_outbox(id, paths)?;
                        dirty = true;
                        continue;
                    }
                }
                tracing::debug!(elapsed = ?started.elapsed(), "chunks uploaded");
            }
            // A few commits go at once (the coordinator reads one while it stores the one before,
            // and this device records answers meanwhile), never two changing the same path, nor
            // a path and one below it unless the upper one is a new directory: the coordinator
            // may take them in either order.
            while flight.len() >= COMMITS_IN_FLIGHT || shapes.iter().any(|(p, r)| flying.clashes(p, *r)) {
                let Some((sent, answer)) = flight.next().await else { break };
                dirty |= self.answered(sent, answer, &mut flying, &mut recorded, report).await?;
            }
            flying.add(&shapes);
            let req = CommitRequest { commit_id: item.commit_id, changes: item.changes, pending_ok: peer_first };
            let client = self.client.clone();
            let task = tokio::spawn(async move { client.commit(&req).await });
            let sent = Sent { id, paths, missing, peer_first };
            flight.push_back(async move {
                let answer =
                    task.await.unwrap_or_else(|e| Err(ClientError::Protocol(format!("commit task failed: {e}"))));
                (sent, answer)
            });
        }
        while let Some((sent, answer)) = flight.next().await {
            dirty |= self.answered(sent, answer, &mut flying, &mut recorded, report).await?;
        }
        if recorded {
            self.store.flush().await?;
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
    /// Records the coordinator's answer to an outbox commit (its entries, and what this device
    /// now owes if it was sent peer-first), or drops a refused one. Returns `true` when the next
    /// cycle must re-plan.
    async fn answered(
        &mut self,
        sent: Sent,
        answer: Result<CommitResponse, ClientError>,
        flying: &mut Flying,
        recorded: &mut bool,
        report: &mut CycleReport,
    ) -> anyhow::Result<bool> {
        let Sent { id, paths, missing, peer_first } = sent;
        flying.remove(&paths);
        match answer {
            Ok(resp) => {
                if peer_first && shoal_sys::failpoints::value("crash-after-pending-commit").is_some() {
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
                *recorded = true;
                report.committed_changes += resp.entries.len();
                Ok(false)
            }
            Err(e) if e.is_retryable() => Err(EngineError::Offline(e).into()),
            Err(e) if peer_first && e.code() == Some(ErrorCode::PendingLimit) => {
                // Refused before anything was appended: the coordinator keeps no more pending
                // versions for now. The item stays, to go upload-first for a while.
                tracing::info!(error = %Escaped(&e.to_string()), "the coordinator holds enough pending versions; uploading before committing for a while");
                self.upload_first_until = Some(std::time::Instant::now() + UPLOAD_FIRST_AFTER_LIMIT);
                let mut b = Batch::default();
                b.unmark_sent_pending(id);
                self.store.apply(b)?;
                Ok(true)
            }
            Err(e) => {
                if e.code() != Some(ErrorCode::StaleBase) {
                    tracing::warn!(error = %Escaped(&e.to_string()), "commit refused");
                    report.over_quota |= e.code() == Some(ErrorCode::QuotaExceeded);
                    report.errors.push(e.to_string());
                }
                self.drop_outbox(id, paths)?;
                if e.code() == Some(ErrorCode::StaleBase) {
                    self.pull().await.map_err(EngineError::Offline)?;
                }
                Ok(true)
            }
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_in_flight_clash_on_a_path_and_below_what_reshapes_the_tree() {
        let p = |s: &str| SyncPath::parse(s).unwrap();
        let change = |path: &str, kind: EntryKind, deleted: bool, base: Option<Seq>| Change {
            path: p(path),
            kind,
            manifest: None,
            exec: false,
            mtime_ns: 0,
            deleted,
            base,
        };
        assert!(!reshapes(&change("new", EntryKind::Dir, false, None)));
        assert!(reshapes(&change("was-a-file", EntryKind::Dir, false, Some(3))));
        assert!(reshapes(&change("f", EntryKind::File, false, None)));
        assert!(reshapes(&change("gone", EntryKind::Dir, true, Some(3))));

        let mut f = Flying::default();
        // In flight: a new directory with a file in it, a file that became a directory, a file.
        f.add(&[(p("new"), false), (p("new/a"), true), (p("notes"), true)]);
        f.add(&[(p("x/f"), true)]);
        for (path, reshaping, clash) in [
            ("new", false, true),
            ("new/b", true, false),
            ("new/sub", false, false),
            ("new/a/under", false, true),
            ("notes/x", false, true),
            ("notes", true, true),
            ("x", false, false),
            ("x", true, true),
            ("x/g", true, false),
            ("notes2", true, false),
        ] {
            assert_eq!(f.clashes(&p(path), reshaping), clash, "{path} {reshaping}");
        }
        f.remove(&[p("new"), p("new/a"), p("notes")]);
        assert!(!f.clashes(&p("notes/x"), true) && !f.clashes(&p("new"), true));
        assert!(f.clashes(&p("x"), true), "x/f still flies");
        f.remove(&[p("x/f")]);
        assert!(f.paths.is_empty() && f.above.is_empty());
    }
}
