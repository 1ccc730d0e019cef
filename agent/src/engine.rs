//! One device's sync engine. A cycle pulls the journal from the durable cursor, sends the outbox,
//! scans the disk, plans against the three trees, applies the plan (conflicted copies, fetches,
//! removals) and turns local changes into outbox commits. The daemon and `sync --once` both run
//! cycles; correctness never depends on a watcher event arriving.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_protocol::path::{Escaped, RESERVED_DIR};
use shoal_protocol::{Change, CommitId, Entry, EntryKind, Seq, SyncPath};

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::own::OwnWrites;
use crate::planner::{self, Node, Op};
use crate::scan::{self, Ignore, Scan};
use crate::store::{Batch, IndexRec, OutboxItem, Store};
use crate::transfer;

mod disk;
mod download;
mod pending;
mod upload;

pub use pending::UploadsLeft;

use disk::{Removal, ensure_dir, remove_local, rename_noreplace};
use download::Retry;
use upload::split_commits;

/// Most dirty paths one cycle looks at.
const DIRTY_STEP: usize = 4096;
/// Directories one cycle of a full pass visits.
const FULL_STEP_DIRS: usize = 64;

/// Why the engine could not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the sync folder's marker {0} is missing: is the disk mounted? Nothing is synced until it \
         is back (an unmounted folder must never look like everything was deleted)"
    )]
    MarkerMissing(PathBuf),
    #[error(transparent)]
    Offline(ClientError),
}

/// What one cycle did.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct CycleReport {
    /// Nothing left to do: the folder equals the coordinator's tree as far as this device knows.
    pub in_sync: bool,
    pub cursor: Seq,
    pub planned: usize,
    pub fetched_files: usize,
    pub committed_changes: usize,
    pub conflicts: usize,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    pub bytes_reused_locally: u64,
    pub pending_uploads: usize,
    pub unstable: usize,
    pub skipped: Vec<String>,
    pub errors: Vec<String>,
    /// The coordinator refused an upload or a commit for the user's storage quota.
    pub over_quota: bool,
    /// Paths (and directories) the cycle looked at.
    pub scope: usize,
    /// Stored path records the cycle decoded (a debug counter: bounded by the change, not by the
    /// folder, outside full passes).
    pub reads: u64,
    /// More queued work (dirty paths, a full pass) waits for the next cycle.
    pub more_work: bool,
    /// Run a cycle again within this time even if nothing happens (this device holds another
    /// device's pending version, and may have to upload it).
    pub recheck: Option<std::time::Duration>,
    /// The user's pending versions, if this cycle looked.
    pub pending_versions: Option<Vec<shoal_protocol::api::PendingVersion>>,
    /// Uploads this device still owes for its own pending versions.
    pub owed_uploads: usize,
}

/// Running byte counters, shared with progress displays and the status.
#[derive(Debug, Default)]
pub struct Counters {
    pub uploaded: AtomicU64,
    pub downloaded: AtomicU64,
    /// Operations the running cycle is applying (0 between cycles and while it only looks), so
    /// that the status can say "syncing" while a long one runs.
    pub applying: AtomicU64,
    /// Chunk bytes downloads got, by source.
    pub by_source: Arc<transfer::SourceCounts>,
}

pub struct Engine {
    cfg: Config,
    root: PathBuf,
    tmp: PathBuf,
    store: Store,
    client: Client,
    pub counters: Arc<Counters>,
    reported_cursor: Seq,
    /// Downloads that failed, by path: tried again after a backoff, not on every cycle.
    retries: HashMap<SyncPath, Retry>,
    /// What this engine just wrote, so the watcher does not take it for the user's work.
    own: OwnWrites,
    /// Paths that may have changed (watcher events, journal entries), for the next cycles.
    dirty: std::collections::BTreeSet<SyncPath>,
    /// Paths whose last cycle left something to do again (a skipped install, a refused commit).
    replan: std::collections::BTreeSet<SyncPath>,
    /// Directories a running full pass still has to visit (`None`: the top level).
    full: std::collections::VecDeque<Option<SyncPath>>,
    /// Directories new on this disk whose entries are still to be looked at.
    later: std::collections::VecDeque<SyncPath>,
    /// Names that cannot be synced, as found by the scans since the last full pass started.
    skipped: std::collections::BTreeSet<String>,
    /// The user's devices on the LAN, asked for chunks before the origin.
    peers: Option<crate::peer::node::PeerNode>,
    /// The relay chooser (unless `relays = false`).
    relays: Option<Arc<crate::relay::Relays>>,
    /// Downloads in progress, whose verified chunks peers may take.
    partials: transfer::Partials,
    /// Small files' chunks hashed lately, which peers and uploads take without reading the files.
    recent: transfer::RecentChunks,
    /// When the pending versions were last looked at, and whether there were any.
    pending_checked: Option<std::time::Instant>,
    watch_pending: bool,
    /// Files moved since the last look: a version may have become pending or durable.
    pending_stale: bool,
    /// The pending versions listed last time (path, version).
    seen_pending: HashSet<(SyncPath, Seq)>,
    /// Those of them listed as stuck: nobody supplies their chunks, so they are not fetched.
    stuck: HashSet<(SyncPath, Seq)>,
    /// Commit only after uploading, even with peers connected (the daemon is stopping).
    upload_first: bool,
    /// Turns true once the daemon's first dials to the user's devices are over (`set_peers`).
    peers_met: Option<tokio::sync::watch::Receiver<bool>>,
    /// Commit only after uploading until then: the coordinator refused a peer-first commit for
    /// holding too many pending versions.
    upload_first_until: Option<std::time::Instant>,
}

/// Creates the `.shoal` marker (and temp dir) in a new sync root. Both are private (0700): the
/// temp dir holds downloads before they get their final name and mode.
pub fn init_root(root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("creating the sync folder {}", root.display()))?;
    let marker = root.join(RESERVED_DIR);
    crate::config::create_private_dir(&marker)?;
    crate::config::create_private_dir(&marker.join("tmp"))?;
    Ok(())
}

impl CycleReport {
    /// `true` when the cycle moved anything: a fetch, a commit, a conflict resolved.
    pub fn made_progress(&self) -> bool {
        self.fetched_files + self.committed_changes + self.conflicts > 0
    }
}

impl Engine {
    pub fn open(home: &Path, cfg: Config) -> anyhow::Result<Engine> {
        let root = cfg.root()?.to_path_buf();
        let store = Store::open(&home.join("db"))?;
        let client = Client::new(&cfg)?;
        let tmp = root.join(RESERVED_DIR).join("tmp");
        let relays = cfg.relays.then(|| crate::relay::Relays::new(client.clone(), cfg.region.clone()));
        let engine = Engine {
            relays,
            cfg,
            root,
            tmp,
            store,
            client,
            counters: Arc::default(),
            reported_cursor: 0,
            retries: HashMap::new(),
            own: OwnWrites::default(),
            dirty: Default::default(),
            replan: Default::default(),
            // Nothing may have been watched while the agent was stopped: start with a full pass.
            full: [None].into(),
            later: Default::default(),
            skipped: Default::default(),
            peers: None,
            partials: Default::default(),
            recent: Default::default(),
            pending_checked: None,
            watch_pending: false,
            pending_stale: false,
            seen_pending: HashSet::new(),
            stuck: HashSet::new(),
            upload_first: false,
            upload_first_until: None,
            peers_met: None,
        };
        engine.check_marker()?;
        // `.shoal` is the agent's own and private, as `init` makes it (older folders had 0755).
        if let Err(e) = crate::config::tighten_tree(&engine.root.join(RESERVED_DIR)) {
            tracing::warn!(error = %e, "cannot restrict the sync folder's .shoal directory to its owner");
        }
        // Leftovers of an interrupted download were never visible under a real name: drop them.
        if let Ok(rd) = std::fs::read_dir(&engine.tmp) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(engine)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The paths this engine writes, for the watcher to recognise their events.
    pub fn own_writes(&self) -> OwnWrites {
        self.own.clone()
    }

    /// Notes `path` and its parent directories as just written by this engine.
    fn note_written(&self, path: &SyncPath, md: &std::fs::Metadata) {
        self.own.note_stat(&path.to_local(&self.root), md);
        // Its directories were looked at when first written into (or made); a thousand files
        // installed into one need not stat it a thousand times.
        let mut p = path.parent();
        while let Some(cur) = p {
            let local = cur.to_local(&self.root);
            if self.own.knows(&local) {
                break;
            }
            self.own.note(&local);
            p = cur.parent();
        }
    }

    /// Asks `node`'s peers for chunks before the origin from now on; downloads first wait for
    /// `met` to turn true (the first dials to the user's other devices are over), a few seconds
    /// at most.
    pub fn set_peers(&mut self, node: crate::peer::node::PeerNode, met: tokio::sync::watch::Receiver<bool>) {
        self.peers = Some(node);
        self.peers_met = Some(met);
    }

    /// The relay downloads go through, if one was chosen: its name and url.
    pub fn relay_in_use(&self) -> Option<(String, String)> {
        self.relays.as_ref().and_then(|r| r.in_use())
    }

    /// The downloads in progress (for the chunk server).
    pub fn partials(&self) -> transfer::Partials {
        self.partials.clone()
    }

    /// The chunks hashed lately (for the chunk server).
    pub fn recent(&self) -> transfer::RecentChunks {
        self.recent.clone()
    }

    /// The folder this engine syncs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn check_marker(&self) -> Result<(), EngineError> {
        let marker = self.root.join(RESERVED_DIR);
        if !marker.is_dir() {
            return Err(EngineError::MarkerMissing(marker));
        }
        crate::config::create_private_dir(&self.tmp).map_err(|_| EngineError::MarkerMissing(marker))?;
        Ok(())
    }

    /// Notes paths that may have changed on disk (watcher events): the next cycles look at them
    /// (and their parents). A change to the ignore rules starts a full pass.
    pub fn mark_dirty(&mut self, paths: impl IntoIterator<Item = SyncPath>) {
        for p in paths {
            if p.as_str() == scan::IGNORE_FILE {
                self.start_full_pass();
            }
            self.dirty.insert(p);
        }
    }

    /// Notes directories that appeared on disk (made, or moved in): their entries are looked at by
    /// later cycles, as for a directory new to the index, even where one was before (a directory
    /// removed and made again, whose new entries may have come before any watch covered them).
    /// (One the scan finds new anyway is visited twice; a visit of an indexed directory only
    /// compares its entries' stats.)
    pub fn mark_new_dirs(&mut self, dirs: impl IntoIterator<Item = SyncPath>) {
        self.later.extend(dirs);
    }

    /// Starts a full pass over the folder (unless one is running): the backstop that finds what
    /// no event reported. It runs a few directories per cycle, after the dirty paths, so events
    /// keep being answered while it runs.
    pub fn start_full_pass(&mut self) {
        if self.full.is_empty() {
            self.full.push_back(None);
            self.skipped.clear();
        }
    }

    /// `true` while dirty paths, new directories or a full pass are queued: the next cycle has
    /// work for sure.
    pub fn has_work(&self) -> bool {
        !self.dirty.is_empty() || !self.full.is_empty() || !self.later.is_empty()
    }

    /// What the next cycle looks at: the dirty paths with their parents (up to `DIRTY_STEP`), the
    /// paths to re-plan, the next directories new on this disk, and the next directories of a
    /// running full pass (which so advances however busy the folder is, a bounded step at a time).
    fn next_scope(&self) -> (Vec<scan::Item>, Vec<SyncPath>, usize, usize) {
        let mut items = std::collections::BTreeSet::new();
        let taken: Vec<SyncPath> = self.dirty.iter().take(DIRTY_STEP).cloned().collect();
        for p in taken.iter().chain(&self.replan) {
            let mut cur = Some(p.clone());
            while let Some(c) = cur {
                cur = c.parent();
                if !items.insert(scan::Item::Path(c)) {
                    break;
                }
            }
        }
        // Background directories: a full step when nothing else waits, a small one beside
        // fresh changes so they arrive without waiting for it.
        let step = if taken.is_empty() && self.replan.is_empty() { FULL_STEP_DIRS } else { FULL_STEP_DIRS / 8 };
        let dirs = self.full.len().min(step);
        items.extend(self.full.iter().take(dirs).cloned().map(scan::Item::Dir));
        let new_dirs = self.later.len().min(step);
        items.extend(self.later.iter().take(new_dirs).cloned().map(|d| scan::Item::Dir(Some(d))));
        (items.into_iter().collect(), taken, dirs, new_dirs)
    }

    /// Runs one reconciliation over the next part of the folder (see `next_scope`).
    pub async fn cycle(&mut self) -> anyhow::Result<CycleReport> {
        let r = self.cycle_inner().await;
        self.counters.applying.store(0, std::sync::atomic::Ordering::Relaxed);
        r
    }

    async fn cycle_inner(&mut self) -> anyhow::Result<CycleReport> {
        self.check_marker()?;
        let mut report = CycleReport::default();
        let reads_before = self.store.reads();
        let t0 = std::time::Instant::now();
        self.pull().await.map_err(EngineError::Offline)?;
        let t_pull = t0.elapsed();
        let mut dirty = self.drain_outbox(&mut report).await?;
        let t_outbox = t0.elapsed();

        let (items, taken, dirs, new_dirs) = self.next_scope();
        report.scope = items.len();
        let ignore = Ignore::load(&self.root);
        let root = self.root.clone();
        let store = self.store.clone();
        let recent = self.recent.clone();
        let (early_tx, early_rx) = tokio::sync::mpsc::channel(2);
        // Large files' chunks go up while they are hashed, unless a peer may take them first: then
        // the commit goes before the upload (see `engine/upload.rs`), and a slow uplink must not
        // hold up the hashing.
        let early_on = self.peers.as_ref().is_none_or(|p| p.connections().is_empty());
        let early = tokio::spawn(transfer::upload_early(self.client.clone(), early_rx, self.counters.clone()));
        let scanner = tokio::task::spawn_blocking(move || {
            let g = scan::gather(&root, &ignore, &store, items, early_on.then_some(&early_tx), Some(&recent));
            (g, ignore)
        });
        // Uploads owed for pending versions (committed by earlier cycles) go while the folder is
        // scanned, so that the coordinator stores one batch while this device hashes the next.
        let (scanned, paid) = tokio::join!(scanner, self.pay_owed(&mut report));
        let (gathered, ignore) = scanned.context("scanner panicked")?;
        paid?;
        report.bytes_uploaded += early.await.unwrap_or(0);
        let scan::Gathered { scan, stored, next_dirs, later } =
            gathered.with_context(|| format!("cannot read the sync folder {}", self.root.display()))?;
        tracing::debug!(elapsed = ?(t0.elapsed() - t_outbox), hashed = scan.hashed_bytes, paths = stored.len(), "scanned");
        // The scope is read: what it covered leaves the queues (a failure above keeps them).
        for p in &taken {
            self.dirty.remove(p);
        }
        self.replan.clear();
        self.full.drain(..dirs);
        self.full.extend(next_dirs.into_iter().map(Some));
        self.later.drain(..new_dirs);
        self.later.extend(later);
        self.replan.extend(scan.recheck.iter().cloned());
        self.save_index(&stored, &scan)?;
        report.unstable = scan.unstable;
        self.skipped.extend(scan.skipped.iter().cloned());
        report.skipped = self.skipped.iter().cloned().collect();

        let keep = |p: &SyncPath, e: &Entry| !ignore.is_ignored(p, e.kind == EntryKind::Dir);
        let mut remote: BTreeMap<SyncPath, Entry> = BTreeMap::new();
        let mut synced: BTreeMap<SyncPath, Entry> = BTreeMap::new();
        for (p, slot) in stored {
            remote.extend(slot.remote.filter(|e| keep(&p, e)).map(|e| (p.clone(), e)));
            synced.extend(slot.synced.filter(|e| keep(&p, e)).map(|e| (p.clone(), e)));
        }
        let local = scan.nodes();
        let mut pending: HashSet<SyncPath> = HashSet::new();
        for (_, item) in self.store.outbox()? {
            pending.extend(item.changes.into_iter().map(|c| c.path));
        }
        for b in &scan.busy {
            for tree in [&remote, &synced] {
                pending.extend(tree.range(b.clone()..).take_while(|(p, _)| p.starts_with(b)).map(|(p, _)| p.clone()));
            }
        }
        let t_scanned = t0.elapsed();
        // Remote versions nobody can supply now are not fetched (and cost no retries).
        let unavailable: HashSet<SyncPath> = self
            .stuck
            .iter()
            .filter(|(p, v)| remote.get(p).is_some_and(|e| e.version == *v))
            .map(|(p, _)| p.clone())
            .collect();
        let trees = planner::Trees {
            remote: &remote,
            local: &local,
            synced: &synced,
            pending: &pending,
            unavailable: &unavailable,
        };
        let ops = planner::plan(&trees);
        report.planned = ops.len();
        let t_planned = t0.elapsed();
        self.forget_retries(&ops);
        if !ops.is_empty() {
            tracing::debug!(ops = ops.len(), "applying plan");
            self.counters.applying.store(ops.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let paths: Vec<SyncPath> = ops.iter().map(|op| op.path().clone()).collect();
            // The scope has left the queues: should applying the plan fail (the coordinator went
            // away mid-download, say), its paths go back, or nothing would look at them again
            // before the next full pass.
            let applied = match self.secure_pending(&ops, &synced, &mut report).await {
                Ok(()) => self.execute(ops, &scan, &mut report).await,
                Err(e) => Err(e),
            };
            let again = match applied {
                Ok(again) => again,
                Err(e) => {
                    self.replan.extend(paths);
                    return Err(e);
                }
            };
            if again {
                // Something was skipped or moved: look at these paths again next time.
                self.replan.extend(paths);
            }
            dirty |= again;
            dirty |= self.drain_outbox(&mut report).await?;
        }
        if report.planned > 0 || report.committed_changes > 0 {
            tracing::info!(
                planned = report.planned,
                fetched = report.fetched_files,
                committed = report.committed_changes,
                bytes_up = report.bytes_uploaded,
                bytes_down = report.bytes_downloaded,
                bytes_reused = report.bytes_reused_locally,
                hashed = scan.hashed_bytes,
                conflicts = report.conflicts,
                "sync cycle"
            );
        }
        let t_executed = t0.elapsed();
        self.help_pending(&mut report).await?;
        tracing::debug!(?t_pull, ?t_outbox, ?t_scanned, ?t_planned, ?t_executed, total = ?t0.elapsed(), "cycle phases");
        report.pending_uploads = self.store.outbox()?.iter().map(|(_, i)| i.changes.len()).sum();
        report.owed_uploads = self.store.owed()?.len();
        report.cursor = self.store.cursor()?;
        report.more_work = self.has_work();
        report.in_sync = report.planned == 0
            && !dirty
            && report.pending_uploads == 0
            && report.owed_uploads == 0
            && scan.unstable == 0
            && !report.more_work
            && self.replan.is_empty();
        // A version another device has not backed up yet, held here: not in sync until it is
        // durable (this device uploads it should its author fail to).
        if report.in_sync && !self.seen_pending.is_empty() {
            report.in_sync = !self.holds_pending()?;
        }
        if report.cursor != self.reported_cursor && self.client.report_cursor(report.cursor).await.is_ok() {
            self.reported_cursor = report.cursor;
        }
        report.reads = self.store.reads() - reads_before;
        Ok(report)
    }

    /// Reads the journal from the durable cursor into the remote tree, page by page.
    async fn pull(&mut self) -> Result<(), ClientError> {
        let mut cursor = self.store.cursor().map_err(|e| ClientError::Protocol(e.to_string()))?;
        loop {
            let page = self.client.changes(cursor, 1000, std::time::Duration::ZERO).await?;
            if page.entries.is_empty() {
                return Ok(());
            }
            let mut batch = Batch::default();
            for e in &page.entries {
                batch.put_remote(e);
            }
            batch.set_cursor(page.next);
            // Entries the synced tree already matches (this device's acknowledged commits) need
            // no cycle; the rest do.
            let unsynced = self.store.apply_unsynced(batch).map_err(|e| ClientError::Protocol(e.to_string()))?;
            self.dirty.extend(unsynced);
            cursor = page.next;
            if cursor >= page.head {
                return Ok(());
            }
        }
    }

    /// Records the scanned state of the covered paths: changed records are written, and records
    /// of covered paths no longer on disk (and not below an unreadable path) are dropped.
    fn save_index(&self, stored: &BTreeMap<SyncPath, crate::store::Slot>, scan: &Scan) -> anyhow::Result<()> {
        let mut batch = Batch::default();
        for (p, rec) in &scan.tree {
            if stored.get(p).and_then(|s| s.index.as_ref()) != Some(rec) {
                batch.put_index(p, rec);
            }
        }
        for (p, slot) in stored {
            if slot.index.is_some() && !scan.tree.contains_key(p) && !scan.busy.iter().any(|b| p.starts_with(b)) {
                batch.del_index(p);
            }
        }
        self.store.apply(batch)
    }

    /// Applies a plan. Returns `true` when something was skipped or moved and another cycle is due.
    async fn execute(&mut self, ops: Vec<Op>, scan: &Scan, report: &mut CycleReport) -> anyhow::Result<bool> {
        let mut dirty = false;
        let mut expect: BTreeMap<SyncPath, Option<IndexRec>> = BTreeMap::new();
        let (mut dirs, mut files, mut removes, mut changes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut replacements: Vec<Entry> = Vec::new();
        let mut batch = Batch::default();
        for op in ops {
            match op {
                Op::ConflictCopy { path, remote } => {
                    match self.move_aside(&path, scan.tree.get(&path)) {
                        Ok(copy) => {
                            tracing::info!(path = %path.escaped(), copy = %copy.escaped(), "conflict: kept the local version as a conflicted copy");
                            // The copy is this agent's write, so no watcher event brings it to
                            // a cycle: it must be looked at (and committed) from here.
                            self.dirty.insert(copy);
                            report.conflicts += 1;
                            batch.del_index(&path);
                            expect.insert(path, None);
                            if remote.kind == EntryKind::Dir { dirs.push(remote) } else { files.push(remote) }
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.escaped(), error = %Escaped(&format!("{e:#}")), "could not move a conflicting file aside; will retry");
                        }
                    }
                    dirty = true;
                }
                Op::Fetch(e) if scan.tree.get(&e.path).is_some_and(|r| r.kind != e.kind) => {
                    // A file becoming a directory or back: the old one goes first (after the
                    // removals below have emptied a directory).
                    replacements.push(e);
                }
                Op::Fetch(e) => {
                    expect.insert(e.path.clone(), scan.tree.get(&e.path).cloned());
                    match e.kind {
                        EntryKind::Dir => dirs.push(e),
                        EntryKind::File => files.push(e),
                        EntryKind::Symlink => {
                            tracing::warn!(path = %e.path.escaped(), "symbolic links are not synced")
                        }
                    }
                }
                Op::Adopt(e) => batch.put_synced(&e),
                Op::Forget(p) => batch.del_synced(&p),
                Op::Remove { path, .. } => removes.push(path),
                Op::Upload { path, local, base } => changes.push(self.change(&path, local, base, scan)?),
            }
        }
        self.store.apply(batch)?;

        dirs.sort_by_key(|e| e.path.depth());
        let mut batch = Batch::default();
        for e in dirs {
            let _writing = self.own.writing();
            match ensure_dir(&self.root, &e.path) {
                Ok(md) => {
                    self.note_written(&e.path, &md);
                    batch.put_index(&e.path, &scan::stat_rec(&md));
                    batch.put_synced(&e);
                }
                Err(err) => {
                    tracing::warn!(path = %e.path.escaped(), error = %Escaped(&format!("{err:#}")), "cannot create directory");
                    report.errors.push(format!("{}: {err:#}", e.path));
                    dirty = true;
                }
            }
        }
        self.store.apply(batch)?;

        if !files.is_empty() {
            dirty |= self.fetch_files(files, &expect, report).await?;
        }

        removes.sort_by_key(|p| std::cmp::Reverse(p.depth()));
        let mut batch = Batch::default();
        for path in removes {
            let writing = self.own.writing();
            let removal = remove_local(&self.root, &path, scan.tree.get(&path));
            self.own.note(&path.to_local(&self.root));
            drop(writing);
            match removal {
                Ok(Removal::Done) => {
                    batch.del_synced(&path);
                    batch.del_index(&path);
                }
                Ok(Removal::NotEmpty) => {
                    // It still holds files this device keeps (ignored or new): the directory
                    // stays, and is offered back to the coordinator as a local addition.
                    batch.del_synced(&path);
                    dirty = true;
                }
                Ok(Removal::Changed) => dirty = true,
                Err(err) => {
                    tracing::warn!(path = %path.escaped(), error = %Escaped(&format!("{err:#}")), "cannot remove");
                    dirty = true;
                }
            }
        }
        self.store.apply(batch)?;

        if !replacements.is_empty() {
            replacements.sort_by_key(|e| e.path.depth());
            let mut files = Vec::new();
            let mut batch = Batch::default();
            for e in replacements {
                let _writing = self.own.writing();
                let scanned = scan.tree.get(&e.path);
                let removed = matches!(remove_local(&self.root, &e.path, scanned), Ok(Removal::Done));
                self.own.note(&e.path.to_local(&self.root));
                // A directory that still holds local additions is kept, as a conflicted copy.
                let moved = !removed
                    && scanned.is_some_and(|r| r.kind == EntryKind::Dir)
                    && self.move_aside(&e.path, scanned).map(|copy| self.dirty.insert(copy)).is_ok();
                if !removed && !moved {
                    dirty = true;
                    continue;
                }
                if moved {
                    report.conflicts += 1;
                    dirty = true;
                }
                batch.del_index(&e.path);
                expect.insert(e.path.clone(), None);
                match e.kind {
                    EntryKind::Dir => match ensure_dir(&self.root, &e.path) {
                        Ok(md) => {
                            self.note_written(&e.path, &md);
                            batch.put_index(&e.path, &scan::stat_rec(&md));
                            batch.put_synced(&e);
                        }
                        Err(_) => dirty = true,
                    },
                    EntryKind::File => files.push(e),
                    EntryKind::Symlink => {}
                }
            }
            self.store.apply(batch)?;
            if !files.is_empty() {
                dirty |= self.fetch_files(files, &expect, report).await?;
            }
        }

        if !changes.is_empty() {
            let mut batch = Batch::default();
            for part in split_commits(changes, report) {
                let item = OutboxItem { commit_id: new_commit_id(), changes: part };
                batch.put_outbox(self.store.next_outbox_id()?, &item);
            }
            self.store.apply(batch)?;
            self.store.flush().await?;
        }
        Ok(dirty)
    }

    /// The change that commits the local state of `path`.
    fn change(&self, path: &SyncPath, local: Option<Node>, base: Option<Seq>, scan: &Scan) -> anyhow::Result<Change> {
        let rec = scan.tree.get(path);
        Ok(match (local, rec) {
            (Some(n), Some(rec)) if n.kind == EntryKind::File => Change {
                path: path.clone(),
                kind: EntryKind::File,
                manifest: rec.manifest.clone(),
                exec: n.exec,
                mtime_ns: rec.mtime_ns,
                deleted: false,
                base,
            },
            (Some(_), rec) => Change {
                path: path.clone(),
                kind: EntryKind::Dir,
                manifest: None,
                exec: false,
                mtime_ns: rec.map_or(0, |r| r.mtime_ns),
                deleted: false,
                base,
            },
            (None, _) => Change {
                path: path.clone(),
                kind: EntryKind::File,
                manifest: None,
                exec: false,
                mtime_ns: 0,
                deleted: true,
                base,
            },
        })
    }

    /// Renames the local version of `path` to a conflicted-copy name next to it.
    fn move_aside(&self, path: &SyncPath, scanned: Option<&IndexRec>) -> anyhow::Result<SyncPath> {
        let local = path.to_local(&self.root);
        let md = local.symlink_metadata()?;
        // A file must be exactly as scanned; a directory's own stat changes with its entries,
        // which are tracked one by one, so it only has to still be a directory.
        let unchanged = match scanned {
            Some(r) if r.kind == EntryKind::Dir => md.is_dir(),
            Some(r) => r.same_stat(&scan::stat_rec(&md)),
            None => false,
        };
        if !unchanged {
            anyhow::bail!("changed since the scan");
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        for n in 1..1000 {
            let name = conflict_name(path.file_name(), &self.cfg.device_name, now, n);
            let copy = path.with_file_name(&name)?;
            let dest = copy.to_local(&self.root);
            let _writing = self.own.writing();
            match rename_noreplace(&local, &dest) {
                Ok(()) => {
                    self.own.note(&local);
                    self.own.note(&dest);
                    return Ok(copy);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("no free conflicted-copy name")
    }
}

fn new_commit_id() -> CommitId {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source is available");
    CommitId(b)
}

/// `name (conflicted copy DEVICE YYYY-MM-DD HHMMSS).ext`, with ` N` before the `)` for n > 1.
/// The time is UTC.
pub fn conflict_name(name: &str, device: &str, unix_secs: u64, n: u32) -> String {
    let (stem, ext) = match name.rfind('.') {
        // A long "extension" is not one (`v1.5 final report...`): keep it in the stem, which is
        // what gets trimmed when the name is too long.
        Some(i) if i > 0 && name.len() - i <= 16 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    // A name from an older enrollment may hold what names no longer can: text-reordering or
    // control characters never reach a file name.
    let device: String = device
        .chars()
        .filter(|c| !matches!(c, '/' | '\\' | '\0') && !c.is_control() && !shoal_protocol::path::hides_text(*c))
        .take(40)
        .collect();
    let suffix = if n > 1 { format!(" {n}") } else { String::new() };
    let (date, (h, m, s)) = utc(unix_secs);
    let stamp = format!("{date} {h:02}{m:02}{s:02}");
    // Keep the result under the component limit by trimming the stem, never the marker.
    let marker = format!(" (conflicted copy {device} {stamp}{suffix}){ext}");
    let room = 255usize.saturating_sub(marker.len());
    let mut cut = stem.len().min(room);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{marker}", &stem[..cut])
}

/// A Unix time as a UTC date (`YYYY-MM-DD`) and (hour, minute, second).
pub fn utc(unix_secs: u64) -> (String, (u64, u64, u64)) {
    let t = shoal_sys::clock::utc(unix_secs);
    (shoal_sys::clock::ymd(&t), (t.hour().into(), t.minute().into(), t.second().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names() {
        // 2026-11-21 20:22:53 UTC
        let t = 1_795_292_573;
        assert_eq!(
            conflict_name("report.pdf", "laptop", t, 1),
            "report (conflicted copy laptop 2026-11-21 202253).pdf"
        );
        assert_eq!(conflict_name(".bashrc", "d", t, 2), ".bashrc (conflicted copy d 2026-11-21 202253 2)");
        assert_eq!(conflict_name("a.tar.gz", "d", 0, 1), "a.tar (conflicted copy d 1970-01-01 000000).gz");
        let long = conflict_name(&"é".repeat(120), "dev", t, 1);
        assert!(long.len() <= 255 && SyncPath::parse(&long).is_ok());
        assert_eq!(
            conflict_name("a.txt", "lap\u{202e}top\n", t, 1),
            "a (conflicted copy laptop 2026-11-21 202253).txt",
            "a device name's reordering and control characters stay out of file names"
        );
        let long_ext = conflict_name(&format!("v1.{}", "x".repeat(250)), "dev", t, 1);
        assert!(long_ext.len() <= 255 && SyncPath::parse(&long_ext).is_ok(), "{long_ext}");
    }
}
