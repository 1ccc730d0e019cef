//! Applying remote versions to disk: every file a cycle fetches is assembled from the fetcher's
//! sources into a verified temp file, then renamed into place only if the local file still looks
//! as it did when scanned. Small files go in groups, each group's chunks fetched while the
//! group before is written, with one sync per group; large ones stream on their own. A failed
//! download is retried later, keeping a large file's verified start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shoal_protocol::path::Escaped;
use shoal_protocol::{ChunkId, Entry, SyncPath};

use super::disk::{install, sync_fs};
use super::{CycleReport, Engine, EngineError};
use crate::planner::Op;
use crate::scan;
use crate::store::{Batch, IndexRec};
use crate::transfer::{self, AssembleError, AssembleOpts, Fetcher, LocalChunk};

/// The longest the first downloads of a daemon wait for its first dials to its peers.
const FIRST_DIALS_WAIT: Duration = Duration::from_secs(5);
/// Files up to this size are fetched together in groups; larger ones stream on their own.
const SMALL_FILE: u64 = 1024 * 1024;
/// Bytes fetched per group of small files.
const GROUP_BYTES: u64 = 16 * 1024 * 1024;
/// Files per group of small files.
const GROUP_FILES: usize = 2000;
/// First wait before a failed download is tried again (doubled after each failure): long
/// enough that a full disk or a bad chunk is not hammered, short enough that a quick fix is
/// picked up at once.
const RETRY_FIRST: Duration = Duration::from_secs(2);
/// Longest wait between tries of a failing download: a freed disk or a repaired chunk is
/// noticed within two minutes, and a file that keeps failing costs a request or two per two
/// minutes.
const RETRY_MAX: Duration = Duration::from_secs(120);

/// A download that failed: when to try it again, and what it keeps for that try.
pub(super) struct Retry {
    /// The content being fetched; a newer version starts afresh.
    hash: ChunkId,
    not_before: Instant,
    delay: Duration,
    /// Why it failed, for the status.
    error: String,
    /// The interrupted temp file of a large file, whose verified start the next try keeps
    /// instead of fetching it again. Kept in memory only: temp files are deleted at start.
    partial: Option<PathBuf>,
}

impl Engine {
    /// Fetches and installs files: small ones in groups (one fetch request, one sync for the
    /// group), large ones streamed one by one.
    pub(super) async fn fetch_files(
        &mut self,
        mut files: Vec<Entry>,
        expect: &BTreeMap<SyncPath, Option<IndexRec>>,
        report: &mut CycleReport,
    ) -> anyhow::Result<bool> {
        let mut dirty = false;
        let now = Instant::now();
        files.retain(|e| match self.retries.get(&e.path) {
            Some(r) if Some(r.hash) == e.hash() && r.not_before > now => {
                let wait = r.not_before - now;
                report.errors.push(format!("{}: {} (next try in {}s)", e.path, r.error, wait.as_secs() + 1));
                dirty = true;
                false
            }
            _ => true,
        });
        // A daemon that has just started gives its LAN peers a chance first: its first dials
        // take a moment (bounded where they are made; here too, should the coordinator be slow
        // to answer at all).
        if let Some(met) = self.peers_met.as_mut()
            && !*met.borrow()
        {
            let _ = tokio::time::timeout(FIRST_DIALS_WAIT, met.wait_for(|m| *m)).await;
            self.peers_met = None;
        }
        // Chunks the folder already holds, wherever they are (the chunk map, not this cycle's
        // scope): renames, copies and edits reuse local bytes. Every read is verified, so a map
        // entry a later write made stale only costs a fetch.
        let relay = match &self.relays {
            Some(r) => r.pick().await.map(|r| r as std::sync::Arc<dyn crate::transfer::ChunkSource>),
            None => None,
        };
        let mut fetcher = Fetcher::new(
            self.client.clone(),
            self.counters.by_source.clone(),
            self.peers.clone(),
            relay,
            self.partials.clone(),
        );
        let needed = files.iter().flat_map(|e| e.manifest.iter().flat_map(|m| m.chunks.iter().map(|c| &c.id)));
        for (id, l) in self.store.chunk_locations(needed)? {
            fetcher.add_local(id, LocalChunk { file: l.path.to_local(&self.root), offset: l.offset, len: l.len });
        }
        files.sort_by_key(|e| e.size());
        let split = files.partition_point(|e| e.size() <= SMALL_FILE);
        let large = files.split_off(split);
        let mut groups: Vec<Vec<Entry>> = Vec::new();
        let mut bytes = 0;
        for e in files {
            if groups.last().is_none_or(|g| g.len() >= GROUP_FILES || bytes + e.size() > GROUP_BYTES) {
                groups.push(Vec::new());
                bytes = 0;
            }
            bytes += e.size();
            groups.last_mut().expect("a group was just pushed").push(e);
        }
        for g in large {
            groups.push(vec![g]);
        }
        // Each group's renames are made durable by the sync that also covers the next group's
        // temp files (one sync per group, not two), and recorded in the store after it; whatever
        // is installed but not recorded when the loop stops is synced and recorded here.
        let mut unrecorded = None;
        let r = self.fetch_groups(groups, &mut fetcher, expect, report, &mut unrecorded).await;
        if let Some(batch) = unrecorded {
            sync_fs(&self.root)?;
            self.store.apply(batch)?;
        }
        Ok(r? | dirty)
    }

    /// Fetches and installs `groups` in order (see `fetch_files`), the next group's chunks
    /// fetched while the current one is written. The batch recording a group of small files is
    /// left in `unrecorded` until a later sync covers its renames.
    async fn fetch_groups(
        &mut self,
        groups: Vec<Vec<Entry>>,
        fetcher: &mut Fetcher,
        expect: &BTreeMap<SyncPath, Option<IndexRec>>,
        report: &mut CycleReport,
        unrecorded: &mut Option<Batch>,
    ) -> anyhow::Result<bool> {
        let mut dirty = false;
        let streams = |g: &[Entry]| g.len() == 1 && g[0].size() > SMALL_FILE;
        let chunks = |g: &[Entry]| -> Vec<ChunkId> {
            g.iter().flat_map(|e| e.manifest.iter().flat_map(|m| &m.chunks)).map(|c| c.id).collect()
        };
        let mut ahead = None;
        let mut groups = groups.into_iter().peekable();
        while let Some(group) = groups.next() {
            let streamed = streams(&group);
            // Chunks no source could deliver intact, with why: only the files that need them fail.
            let mut unavailable: HashMap<ChunkId, String> = HashMap::new();
            if streamed {
                // Streamed files sync themselves; the renames of the group before need a sync.
                fetcher.clear_fetched();
                if let Some(batch) = unrecorded.take() {
                    sync_fs(&self.root)?;
                    self.store.apply(batch)?;
                }
            } else {
                let fetching = ahead.take().unwrap_or_else(|| fetcher.fetch_ahead(&chunks(&group)));
                let failed = fetcher.take_ahead(fetching).await.map_err(EngineError::Offline)?;
                unavailable.extend(failed.into_iter().map(|(id, e)| (id, e.to_string())));
                ahead = groups.peek().filter(|g| !streams(g)).map(|g| fetcher.fetch_ahead(&chunks(g)));
            }
            let mut ready = Vec::new();
            for e in group {
                let Some(m) = &e.manifest else { continue };
                if let Some(why) = m.chunks.iter().find_map(|c| unavailable.get(&c.id)) {
                    self.download_failed(&e, why.clone(), None, report);
                    dirty = true;
                    continue;
                }
                // A large file interrupted earlier continues where its verified bytes end.
                let partial =
                    self.retries.get(&e.path).filter(|r| Some(r.hash) == e.hash()).and_then(|r| r.partial.clone());
                let (tmp, resume) = match partial {
                    Some(t) if streamed && t.exists() => (t, true),
                    _ => (self.tmp.join(format!("{}.part", shoal_sys::random::hex(8))), false),
                };
                // `install` replaces the file only if it still has the scanned stat, mode included.
                let existing = expect.get(&e.path).and_then(|r| r.as_ref()).map(|r| r.mode);
                let mode = transfer::file_mode(existing, e.exec, transfer::process_umask());
                let opts = AssembleOpts { mode, mtime_ns: e.mtime_ns, fsync: streamed, progress: None, resume };
                match transfer::assemble(fetcher, m, &tmp, opts).await {
                    Ok(st) => {
                        if st.resumed > 0 {
                            tracing::info!(path = %e.path.escaped(), kept = st.resumed, "resumed an interrupted download");
                        }
                        report.bytes_downloaded += st.downloaded;
                        report.bytes_reused_locally += st.local;
                        self.counters.downloaded.fetch_add(st.downloaded, Ordering::Relaxed);
                        self.take_retry(&e.path, Some(&tmp));
                        ready.push((e, tmp));
                    }
                    Err(AssembleError::Offline(err)) => {
                        // Worth keeping for the next round: it retries as soon as the coordinator
                        // answers again.
                        let kept = streamed.then(|| tmp.clone());
                        if kept.is_none() {
                            let _ = std::fs::remove_file(&tmp);
                        }
                        self.keep_partial(&e, kept);
                        return Err(EngineError::Offline(err).into());
                    }
                    Err(err) => {
                        // A verified start of a large file is kept (a full disk, a chunk missing
                        // further on); a small one is fetched again, and frees its space now.
                        let keep = streamed && !matches!(err, AssembleError::HashMismatch);
                        if !keep {
                            let _ = std::fs::remove_file(&tmp);
                        }
                        self.download_failed(&e, err.to_string(), keep.then_some(tmp), report);
                        dirty = true;
                    }
                }
            }
            if !streamed {
                sync_fs(&self.root)?;
                if let Some(batch) = unrecorded.take() {
                    self.store.apply(batch)?;
                }
            }
            let mut batch = Batch::default();
            let mut parents = HashSet::new();
            let mut dirs = HashSet::new();
            for (e, tmp) in ready {
                let _writing = self.own.writing();
                let expected = expect.get(&e.path).cloned().flatten();
                match install(&self.root, &e.path, &tmp, expected.as_ref(), &mut dirs) {
                    Ok(md) => {
                        self.note_written(&e.path, &md);
                        let mut rec = scan::stat_rec(&md);
                        rec.manifest = e.manifest.clone();
                        // We wrote and verified these bytes ourselves: the stat taken after the
                        // rename describes them, so the index need not wait for times to settle.
                        rec.hashed_ns =
                            shoal_sys::clock::now_ns().max(rec.mtime_ns).max(rec.ctime_ns) + scan::SETTLE_NS;
                        batch.put_index(&e.path, &rec);
                        batch.put_synced(&e);
                        report.fetched_files += 1;
                        parents.insert(e.path.to_local(&self.root).parent().map(Path::to_path_buf));
                    }
                    Err(err) => {
                        let _ = std::fs::remove_file(&tmp);
                        self.take_retry(&e.path, None);
                        tracing::info!(path = %e.path.escaped(), reason = %Escaped(&format!("{err:#}")), "not installing a fetched file now");
                        dirty = true;
                    }
                }
            }
            if streamed {
                for dir in parents.into_iter().flatten() {
                    if let Ok(d) = std::fs::File::open(&dir) {
                        let _ = d.sync_all();
                    }
                }
                self.store.apply(batch)?;
            } else {
                *unrecorded = Some(batch);
            }
        }
        Ok(dirty)
    }

    /// Records that fetching `e` failed: it is tried again after a delay that doubles with each
    /// failure (`RETRY_FIRST` up to `RETRY_MAX`), continuing from `partial` if given.
    fn download_failed(&mut self, e: &Entry, error: String, partial: Option<PathBuf>, report: &mut CycleReport) {
        let Some(hash) = e.hash() else { return };
        let prev = self.take_retry(&e.path, partial.as_deref()).filter(|r| r.hash == hash);
        let delay = prev.as_ref().map_or(RETRY_FIRST, |r| (r.delay * 2).min(RETRY_MAX));
        tracing::warn!(
            path = %e.path.escaped(),
            error = %Escaped(&error),
            retry_in = ?delay,
            kept_bytes = partial.as_ref().and_then(|p| p.metadata().ok()).map_or(0, |m| m.len()),
            "download failed"
        );
        report.errors.push(format!("{}: {error}", e.path));
        // Perhaps a pending version nobody can supply: the list says, and whether it is stuck.
        self.pending_stale = true;
        self.retries.insert(e.path.clone(), Retry { hash, not_before: Instant::now() + delay, delay, error, partial });
    }

    /// Lets a failed download of `path` be tried again in the next cycle (queued for it).
    /// Returns `false` if none is waiting.
    pub(super) fn retry_now(&mut self, path: &SyncPath) -> bool {
        let Some(r) = self.retries.get_mut(path) else { return false };
        r.not_before = Instant::now();
        self.replan.insert(path.clone());
        true
    }

    /// Keeps the interrupted temp file of `e` for the next try, without delaying it.
    fn keep_partial(&mut self, e: &Entry, partial: Option<PathBuf>) {
        let Some(hash) = e.hash() else { return };
        let prev = self.take_retry(&e.path, partial.as_deref()).filter(|r| r.hash == hash);
        let (delay, error) = prev.map_or((Duration::ZERO, String::new()), |r| (r.delay, r.error));
        self.retries.insert(e.path.clone(), Retry { hash, not_before: Instant::now(), delay, error, partial });
    }

    /// Takes the failed download of `path` off the list, deleting the temp file it kept unless
    /// that is `keep` (the file a download of it uses now). Whatever replaces or ends a failed
    /// download goes through here, so no kept temp file outlives its entry.
    fn take_retry(&mut self, path: &SyncPath, keep: Option<&Path>) -> Option<Retry> {
        let r = self.retries.remove(path)?;
        if let Some(t) = &r.partial
            && Some(t.as_path()) != keep
        {
            let _ = std::fs::remove_file(t);
        }
        Some(r)
    }

    /// Forgets failed downloads the plan no longer fetches (and deletes what they kept).
    pub(super) fn forget_retries(&mut self, ops: &[Op]) {
        let fetching: HashSet<&SyncPath> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Fetch(e) => Some(&e.path),
                Op::ConflictCopy { path, .. } => Some(path),
                _ => None,
            })
            .collect();
        self.retries.retain(|p, r| {
            let keep = fetching.contains(p);
            if !keep && let Some(t) = &r.partial {
                let _ = std::fs::remove_file(t);
            }
            keep
        });
    }
}
