//! The scanner: walks the sync root, applies ignore rules, and produces the local tree. Files
//! whose size, mtime, inode and mode match the index reuse its manifest; others are chunked and
//! hashed (on two threads), and re-checked afterwards so a file being written is retried, never
//! recorded torn. Paths that cannot be read, or that are symlinks or special files, are reported
//! as busy: the planner leaves them alone rather than mistaking them for deletions.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use shoal_protocol::path::RESERVED_DIR;
use shoal_protocol::{Chunker, EntryKind, SyncPath};

use crate::planner::Node;
use crate::store::{IndexRec, PageCache, Slot, Store};
use crate::transfer::{RECENT_FILE_MAX, RecentChunks};

/// Name of the per-root ignore file (gitignore syntax).
pub const IGNORE_FILE: &str = ".shoalignore";

/// Temp and OS junk files never synced: editors' swap and lock files, partial downloads and OS
/// metadata. Patterns are gitignore syntax.
pub const BUILTIN_IGNORES: &[&str] = &[
    ".DS_Store",
    "._*",
    ".Spotlight-V100",
    ".Trashes",
    "Thumbs.db",
    "ehthumbs.db",
    "desktop.ini",
    "$RECYCLE.BIN/",
    "~$*",
    ".~lock.*#",
    "*.swp",
    "*.swx",
    ".*.swp",
    "*~.tmp",
    ".#*",
    "*.crdownload",
    "*.part",
    ".nfs*",
];

/// How long after a read a file's mtime may still be written again without changing: a file
/// whose mtime is this close to when it was hashed is hashed again on the next scan.
const MTIME_TICK_NS: i64 = 50_000_000;
/// Timestamps with no sub-second part suggest a coarse file system (FAT, some network mounts).
const COARSE_MTIME_TICK_NS: i64 = 2_000_000_000;
/// A `hashed_ns` this far past a file's times marks its index entry as settled.
pub const SETTLE_NS: i64 = COARSE_MTIME_TICK_NS + 1;

/// `true` when the cached hash of a file with this stat may be trusted: its times were already in
/// the past, by more than the timestamp granularity, when it was read.
fn settled(rec: &IndexRec) -> bool {
    let tick = if rec.mtime_ns % 1_000_000_000 == 0 { COARSE_MTIME_TICK_NS } else { MTIME_TICK_NS };
    rec.mtime_ns.max(rec.ctime_ns) + tick < rec.hashed_ns
}

/// OS metadata files that may be deleted along with a directory the user deleted elsewhere
/// (the subset of `BUILTIN_IGNORES` that never holds user data).
const OS_JUNK: &[&str] = &[".DS_Store", "._*", "Thumbs.db", "ehthumbs.db", "desktop.ini"];

/// `true` for OS metadata files that can be removed with their directory.
pub fn is_os_junk(name: &str) -> bool {
    static JUNK: std::sync::OnceLock<Gitignore> = std::sync::OnceLock::new();
    let gi = JUNK.get_or_init(|| {
        let mut b = GitignoreBuilder::new("/");
        for pat in OS_JUNK {
            let _ = b.add_line(None, pat);
        }
        b.build().unwrap_or_else(|_| Gitignore::empty())
    });
    gi.matched(name, false).is_ignore()
}

/// Ignore rules of one sync root.
pub struct Ignore {
    gi: Gitignore,
}

impl Ignore {
    /// Built-in rules plus `<root>/.shoalignore` (if present). A malformed line is reported and
    /// skipped; the rest still apply.
    pub fn load(root: &Path) -> Ignore {
        let mut b = GitignoreBuilder::new(root);
        for pat in BUILTIN_IGNORES {
            let _ = b.add_line(None, pat);
        }
        let file = root.join(IGNORE_FILE);
        if file.exists()
            && let Some(e) = b.add(&file)
        {
            tracing::warn!(file = %file.display(), error = %e, "problem in ignore file");
        }
        let gi = b.build().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignore rules unusable; using none");
            Gitignore::empty()
        });
        Ignore { gi }
    }

    pub fn is_ignored(&self, path: &SyncPath, is_dir: bool) -> bool {
        self.gi.matched_path_or_any_parents(path.as_str(), is_dir).is_ignore()
    }
}

/// The result of a scan.
#[derive(Default)]
pub struct Scan {
    /// Everything found, with manifests for files.
    pub tree: BTreeMap<SyncPath, IndexRec>,
    /// Paths (files or directories, covering everything beneath) whose state is unknown this time.
    pub busy: HashSet<SyncPath>,
    /// Files that changed while being read; scan again soon.
    pub unstable: usize,
    /// Those files' paths.
    pub recheck: Vec<SyncPath>,
    /// Bytes chunked and hashed.
    pub hashed_bytes: u64,
    /// Names that cannot be synced (not UTF-8, too long, ...), for status.
    pub skipped: Vec<String>,
}

impl Scan {
    /// The local tree as the planner sees it.
    pub fn nodes(&self) -> BTreeMap<SyncPath, Node> {
        self.tree.iter().filter_map(|(p, r)| node_of(r).map(|n| (p.clone(), n))).collect()
    }
}

pub fn node_of(r: &IndexRec) -> Option<Node> {
    match r.kind {
        EntryKind::Dir => Some(Node::dir()),
        EntryKind::File => r.manifest.as_ref().map(|m| Node::file(m.hash, r.mode & 0o111 != 0)),
        EntryKind::Symlink => None,
    }
}

/// The stat part of an index record.
pub fn stat_rec(md: &std::fs::Metadata) -> IndexRec {
    let kind = if md.is_dir() { EntryKind::Dir } else { EntryKind::File };
    IndexRec {
        kind,
        size: if md.is_dir() { 0 } else { md.len() },
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        inode: md.ino(),
        mode: md.permissions().mode() & 0o7777,
        manifest: None,
        hashed_ns: 0,
    }
}

/// Receives batches of chunk frames cut from large files while they are hashed, so their upload
/// overlaps the hashing (see `Engine::cycle`). Sending is best effort: the commit path still
/// uploads whatever the coordinator lacks.
pub type EarlyChunks = tokio::sync::mpsc::Sender<Vec<u8>>;

/// Files at least this large send their chunks early.
pub const EARLY_UPLOAD_MIN: u64 = 8 * 1024 * 1024;
/// Bytes per early batch.
const EARLY_BATCH: usize = 4 * 1024 * 1024;

/// A part of the folder a cycle looks at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Item {
    /// One path. A directory removed from this disk (or replaced by a file), or removed remotely
    /// while still here, is looked at with everything below it; a directory new on this disk has
    /// its entries looked at by later cycles (`Gathered::later`).
    Path(SyncPath),
    /// A directory's own entries (`None`: the top level), each as for `Path`. Subdirectories
    /// that are directories on every side are returned in `Gathered::next_dirs` for a later visit.
    Dir(Option<SyncPath>),
    /// A path and everything below it.
    Tree(SyncPath),
}

/// What a cycle knows of the part of the folder it looks at.
#[derive(Default)]
pub struct Gathered {
    /// The disk, with manifests for files.
    pub scan: Scan,
    /// The stored records of every path the scope covers, and of no other: a covered path
    /// missing from `scan.tree` is gone from the disk.
    pub stored: BTreeMap<SyncPath, Slot>,
    /// Directories whose entries a full pass visits next.
    pub next_dirs: Vec<SyncPath>,
    /// Directories new on this disk whose entries later cycles look at (see `Reach::Later`).
    pub later: Vec<SyncPath>,
}

/// How much of a path a cycle must look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The path alone.
    Alone,
    /// The path and its whole subtree at once: a directory removed (or replaced by a file) on
    /// this disk, whose stored subtree must be planned with it, or a directory removed remotely
    /// that is still here, whose local additions keep it alive.
    Whole,
    /// The path now and its entries in later cycles: a directory that is new on this disk (or
    /// replaced a file). What lies below it is new too, so nothing there needs planning with it,
    /// and a directory of a million new files is taken a bounded step at a time.
    Later,
}

fn live_dir(e: &Option<shoal_protocol::Entry>) -> bool {
    e.as_ref().is_some_and(|e| !e.deleted && e.kind == EntryKind::Dir)
}

fn reach(md: Option<&std::fs::Metadata>, slot: &Slot) -> Reach {
    let disk = md.is_some_and(|m| m.is_dir());
    let index = slot.index.as_ref().is_some_and(|r| r.kind == EntryKind::Dir);
    let (synced, remote) = (live_dir(&slot.synced), live_dir(&slot.remote));
    if (!disk && (index || synced)) || (disk && synced && !remote) {
        Reach::Whole
    } else if disk && !(index && synced && remote) {
        Reach::Later
    } else {
        Reach::Alone
    }
}

/// The state of one path on disk: `Ok(None)` when absent (or below something that is not a real
/// directory), `Err` when it cannot be read.
fn stat_under(
    root: &Path,
    path: &SyncPath,
    real_dirs: &mut HashSet<SyncPath>,
) -> std::io::Result<Option<std::fs::Metadata>> {
    // Every parent must be a real directory: a path below a symlink is not in the folder.
    let mut parents: Vec<SyncPath> = std::iter::successors(path.parent(), |p| p.parent()).collect();
    parents.reverse();
    for d in parents {
        if real_dirs.contains(&d) {
            continue;
        }
        match d.to_local(root).symlink_metadata() {
            Ok(md) if md.is_dir() => {
                real_dirs.insert(d);
            }
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    match path.to_local(root).symlink_metadata() {
        Ok(md) => Ok(Some(md)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The sync path of `name` inside `dir`, or why it cannot be synced.
fn child_path(dir: Option<&SyncPath>, name: &std::ffi::OsStr, local: &Path) -> Result<SyncPath, String> {
    let Some(name) = name.to_str() else {
        return Err(format!("{}: name is not UTF-8", local.display()));
    };
    let joined = match dir {
        Some(d) => format!("{d}/{name}"),
        None => name.to_string(),
    };
    match SyncPath::parse(&joined) {
        Ok(p) if p.as_str() == joined => Ok(p),
        Ok(_) => Err(format!("{joined}: name is not in Unicode NFC form")),
        Err(e) => Err(format!("{joined}: {e}")),
    }
}

/// Looks at `items` on disk and in `store`: returns the local tree of what they cover (reusing
/// stored manifests where stat data shows no change, hashing the rest on two threads) and the
/// stored records of the same paths. Only the top level failing to list is an error: an empty
/// scan of it would read as "everything was deleted".
pub fn gather(
    root: &Path,
    ignore: &Ignore,
    store: &Store,
    items: impl IntoIterator<Item = Item>,
    early: Option<&EarlyChunks>,
    recent: Option<&RecentChunks>,
) -> anyhow::Result<Gathered> {
    let mut g = Gathered::default();
    let mut found: BTreeMap<SyncPath, std::fs::Metadata> = BTreeMap::new();
    let mut trees: Vec<SyncPath> = Vec::new();
    let mut real_dirs: HashSet<SyncPath> = HashSet::new();
    let mut work: std::collections::VecDeque<Item> = items.into_iter().collect();
    let under_tree = |trees: &[SyncPath], p: &SyncPath| trees.iter().any(|t| p.starts_with(t));
    let mut pages = PageCache::default();
    // A path's disk state (`Some(None)`: absent), or `None` when it is ignored or unreadable
    // (then noted busy): such a path is not looked at.
    let look = |p: &SyncPath, real_dirs: &mut HashSet<SyncPath>, busy: &mut HashSet<SyncPath>| {
        let md = match stat_under(root, p, real_dirs) {
            Ok(md) => md,
            Err(_) => {
                busy.insert(p.clone());
                return None;
            }
        };
        (!ignore.is_ignored(p, md.as_ref().is_some_and(|m| m.is_dir()))).then_some(md)
    };
    while let Some(item) = work.pop_front() {
        match item {
            Item::Path(p) => {
                if under_tree(&trees, &p) || g.stored.contains_key(&p) || found.contains_key(&p) {
                    continue;
                }
                let Some(md) = look(&p, &mut real_dirs, &mut g.scan.busy) else { continue };
                let slot = store.get_cached(&p, &mut pages)?;
                match reach(md.as_ref(), &slot) {
                    Reach::Whole => {
                        work.push_back(Item::Tree(p));
                        continue;
                    }
                    Reach::Later => g.later.push(p.clone()),
                    Reach::Alone => {}
                }
                if let Some(md) = md {
                    found.insert(p.clone(), md);
                }
                g.stored.insert(p, slot);
            }
            Item::Tree(t) => {
                if under_tree(&trees, &t) {
                    continue;
                }
                let Some(md) = look(&t, &mut real_dirs, &mut g.scan.busy) else { continue };
                trees.push(t.clone());
                g.stored.retain(|p, _| !p.starts_with(&t));
                found.retain(|p, _| !p.starts_with(&t));
                g.stored.insert(t.clone(), store.get_cached(&t, &mut pages)?);
                store.subtree(&t, |p, s| {
                    g.stored.insert(p, s);
                })?;
                if let Some(md) = md {
                    let is_dir = md.is_dir();
                    found.insert(t.clone(), md);
                    if is_dir {
                        walk(root, Some(&t), ignore, &mut found, &mut g.scan, true)?;
                    }
                }
            }
            Item::Dir(d) => {
                if d.as_ref().is_some_and(|d| under_tree(&trees, d)) {
                    continue;
                }
                if let Some(d) = &d {
                    let Some(md) = look(d, &mut real_dirs, &mut g.scan.busy) else { continue };
                    let slot = store.get_cached(d, &mut pages)?;
                    if reach(md.as_ref(), &slot) == Reach::Whole || !md.as_ref().is_some_and(|m| m.is_dir()) {
                        work.push_back(Item::Tree(d.clone()));
                        continue;
                    }
                    found.extend(md.map(|md| (d.clone(), md)));
                    g.stored.insert(d.clone(), slot);
                }
                let mut listed: BTreeMap<SyncPath, std::fs::Metadata> = BTreeMap::new();
                walk(root, d.as_ref(), ignore, &mut listed, &mut g.scan, false)?;
                let mut stored: BTreeMap<SyncPath, Slot> = BTreeMap::new();
                store.children(d.as_ref(), |p, s| {
                    stored.insert(p, s);
                })?;
                let names: std::collections::BTreeSet<SyncPath> = listed.keys().chain(stored.keys()).cloned().collect();
                for c in names {
                    let md = listed.remove(&c);
                    let slot = stored.remove(&c).unwrap_or_default();
                    if md.is_none() && (g.scan.busy.contains(&c) || d.as_ref().is_some_and(|d| g.scan.busy.contains(d)))
                    {
                        continue;
                    }
                    match reach(md.as_ref(), &slot) {
                        Reach::Whole => {
                            work.push_back(Item::Tree(c));
                            continue;
                        }
                        Reach::Later => g.later.push(c.clone()),
                        // A directory only the journal has (its entries pulled but not fetched
                        // when the agent stopped) is visited too: its entries are nowhere else
                        // queued.
                        Reach::Alone if md.as_ref().is_some_and(|m| m.is_dir()) || live_dir(&slot.remote) => {
                            g.next_dirs.push(c.clone())
                        }
                        Reach::Alone => {}
                    }
                    found.extend(md.map(|md| (c.clone(), md)));
                    g.stored.insert(c, slot);
                }
            }
        }
    }
    let index: BTreeMap<SyncPath, IndexRec> =
        g.stored.iter().filter_map(|(p, s)| s.index.clone().map(|r| (p.clone(), r))).collect();
    let mut to_hash = Vec::new();
    for (path, md) in found {
        let ft = md.file_type();
        if ft.is_dir() {
            g.scan.tree.insert(path, stat_rec(&md));
        } else if ft.is_file() {
            let rec = stat_rec(&md);
            match index.get(&path) {
                Some(old) if old.same_stat(&rec) && old.manifest.is_some() && settled(old) => {
                    g.scan.tree.insert(path, old.clone());
                }
                _ => {
                    let local = path.to_local(root);
                    to_hash.push((path, local, rec));
                }
            }
        } else {
            // Symlinks, sockets, devices: not synced, and never replaced.
            g.scan.busy.insert(path);
        }
    }
    hash_files(to_hash, &index, early, recent, &mut g.scan);
    Ok(g)
}

/// Lists the directory `dir` (`None`: the top level) into `found`, and everything below it when
/// `deep`, skipping ignored paths and never following symlinks. Unreadable directories are
/// marked busy; only the top level failing is an error.
fn walk(
    root: &Path,
    dir: Option<&SyncPath>,
    ignore: &Ignore,
    found: &mut BTreeMap<SyncPath, std::fs::Metadata>,
    out: &mut Scan,
    deep: bool,
) -> std::io::Result<()> {
    let start = dir.map_or_else(|| root.to_path_buf(), |d| d.to_local(root));
    let mut stack = vec![(start, dir.cloned())];
    while let Some((local, dir_path)) = stack.pop() {
        let rd = match (std::fs::read_dir(&local), &dir_path) {
            (Ok(rd), _) => rd,
            (Err(e), None) => return Err(e),
            (Err(e), Some(p)) => {
                tracing::warn!(dir = %shoal_protocol::path::Escaped(&local.display().to_string()), error = %e, "cannot read directory; leaving it alone");
                out.busy.insert(p.clone());
                continue;
            }
        };
        for ent in rd {
            let ent = match (ent, &dir_path) {
                (Ok(ent), _) => ent,
                (Err(e), None) => return Err(e),
                (Err(_), Some(p)) => {
                    // A listing cut short: what was not listed is unknown, not deleted.
                    out.busy.insert(p.clone());
                    break;
                }
            };
            let name = ent.file_name();
            if dir_path.is_none() && name == RESERVED_DIR {
                continue;
            }
            let path = match child_path(dir_path.as_ref(), &name, &ent.path()) {
                Ok(p) => p,
                Err(skip) => {
                    out.skipped.push(skip);
                    continue;
                }
            };
            let md = match ent.path().symlink_metadata() {
                Ok(md) => md,
                Err(_) => {
                    out.busy.insert(path);
                    continue;
                }
            };
            if ignore.is_ignored(&path, md.is_dir()) {
                continue;
            }
            if deep && md.is_dir() {
                stack.push((ent.path(), Some(path.clone())));
            }
            found.insert(path, md);
        }
    }
    Ok(())
}

/// Chunks and hashes `files` on two threads.
fn hash_files(
    files: Vec<(SyncPath, PathBuf, IndexRec)>,
    index: &BTreeMap<SyncPath, IndexRec>,
    early: Option<&EarlyChunks>,
    recent: Option<&RecentChunks>,
    out: &mut Scan,
) {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(files.len()));
    let workers = if files.len() > 1 { 2 } else { 1 };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((path, local, rec)) = files.get(i) else {
                        break;
                    };
                    let early = early.filter(|_| rec.size >= EARLY_UPLOAD_MIN);
                    let r = hash_file(local, rec, early, recent.filter(|_| rec.size <= RECENT_FILE_MAX));
                    results.lock().expect("no panics while holding the results lock").push((path.clone(), r));
                }
            });
        }
    });
    for (path, r) in results.into_inner().expect("workers have finished") {
        match r {
            Ok(rec) => {
                out.hashed_bytes += rec.size;
                out.tree.insert(path, rec);
            }
            Err(HashError::Unstable) => {
                out.unstable += 1;
                out.recheck.push(path.clone());
                match index.get(&path) {
                    Some(old) if old.manifest.is_some() => {
                        out.tree.insert(path, old.clone());
                    }
                    _ => {
                        out.busy.insert(path);
                    }
                }
            }
            Err(HashError::Io(e)) => {
                tracing::warn!(path = %path.escaped(), error = %e, "cannot read file; leaving it alone");
                out.busy.insert(path);
            }
        }
    }
}

enum HashError {
    Unstable,
    Io(std::io::Error),
}

/// Reads and hashes one file, checking before and after that nobody was writing it. Its chunks
/// go to `early` (as upload batches) and `recent`, when given.
fn hash_file(
    path: &Path,
    before: &IndexRec,
    early: Option<&EarlyChunks>,
    recent: Option<&RecentChunks>,
) -> Result<IndexRec, HashError> {
    let hashed_ns = shoal_sys::clock::now_ns();
    let f = std::fs::File::open(path).map_err(HashError::Io)?;
    let opened = stat_rec(&f.metadata().map_err(HashError::Io)?);
    if !opened.same_stat(before) {
        return Err(HashError::Unstable);
    }
    let mut batch = Vec::new();
    let mut kept = Vec::new();
    let manifest = Chunker::default()
        .chunk_sized(&f, before.size, |c, _, bytes| {
            if let Some(tx) = early {
                shoal_protocol::api::encode_frame(&mut batch, &c.id, bytes);
                if batch.len() >= EARLY_BATCH {
                    let _ = tx.blocking_send(std::mem::take(&mut batch));
                }
            }
            if recent.is_some() {
                kept.push((c.id, bytes::Bytes::copy_from_slice(bytes)));
            }
            Ok(())
        })
        .map_err(|e| match e {
            shoal_protocol::ChunkerError::Read(e) => HashError::Io(e),
            shoal_protocol::ChunkerError::Callback(_) => HashError::Unstable,
        })?;
    if let (Some(tx), false) = (early, batch.is_empty()) {
        let _ = tx.blocking_send(batch);
    }
    let after = stat_rec(&f.metadata().map_err(HashError::Io)?);
    let at_path = path.symlink_metadata().map(|m| stat_rec(&m)).map_err(|_| HashError::Unstable)?;
    if !after.same_stat(before) || !at_path.same_stat(before) || manifest.size != before.size {
        return Err(HashError::Unstable);
    }
    if let Some(r) = recent {
        r.add(kept);
    }
    Ok(IndexRec { manifest: Some(manifest), hashed_ns, ..before.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Batch;

    /// A full pass: the top level, then every directory it finds, as the engine runs one.
    fn full(root: &Path, store: &Store) -> Gathered {
        let ignore = Ignore::load(root);
        let mut all = Gathered::default();
        let mut next = vec![Item::Dir(None)];
        while !next.is_empty() {
            let g = gather(root, &ignore, store, std::mem::take(&mut next), None, None).unwrap();
            next = g.next_dirs.iter().chain(&g.later).cloned().map(|d| Item::Dir(Some(d))).collect();
            all.scan.tree.extend(g.scan.tree);
            all.scan.busy.extend(g.scan.busy);
            all.scan.hashed_bytes += g.scan.hashed_bytes;
            all.scan.skipped.extend(g.scan.skipped);
            all.stored.extend(g.stored);
        }
        all
    }

    /// Records `tree` as scanned, synced and remote: the state of a folder in sync.
    fn save(store: &Store, tree: &BTreeMap<SyncPath, IndexRec>) {
        let mut b = Batch::default();
        for (p, r) in tree {
            b.put_index(p, r);
            let e = shoal_protocol::Entry {
                path: p.clone(),
                kind: r.kind,
                manifest: r.manifest.clone(),
                exec: false,
                mtime_ns: r.mtime_ns,
                deleted: false,
                version: 1,
                base: None,
                device: shoal_protocol::DeviceId([0; 16]),
                time_ms: 0,
            };
            b.put_synced(&e);
            b.put_remote(&e);
        }
        store.apply(b).unwrap();
    }

    fn p(s: &str) -> SyncPath {
        SyncPath::parse(s).unwrap()
    }

    #[test]
    fn unreadable_root_is_an_error_not_an_empty_tree() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let gone = dir.path().join("not-there");
        assert!(gather(&gone, &Ignore::load(&gone), &store, [Item::Dir(None)], None, None).is_err());
    }

    #[test]
    fn scans_ignores_and_reuses_index() {
        let dir = tempfile::tempdir().unwrap();
        let root = &dir.path().join("root");
        let store = Store::open(&dir.path().join("db")).unwrap();
        std::fs::create_dir_all(root.join(".shoal/tmp")).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f.txt"), b"hello").unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join(".DS_Store"), b"junk").unwrap();
        std::fs::write(root.join("notes.log"), b"x").unwrap();
        std::fs::write(root.join(IGNORE_FILE), b"*.log\n").unwrap();
        std::os::unix::fs::symlink("a", root.join("link")).unwrap();
        let s = full(root, &store).scan;
        let names: Vec<&str> = s.tree.keys().map(|p| p.as_str()).collect();
        assert_eq!(names, [".shoalignore", "a", "a/b", "a/b/f.txt", "empty"]);
        assert!(s.busy.contains(&p("link")), "symlinks are left alone");
        let f = &s.tree[&p("a/b/f.txt")];
        assert_eq!(f.manifest.as_ref().unwrap().hash, shoal_protocol::ChunkId::of(b"hello"));
        assert_eq!(s.tree[&p("empty")].manifest, Some(shoal_protocol::Manifest::empty()));
        assert_eq!(s.hashed_bytes, 5 + 6);

        // A fresh index entry (mtime near the hash time) is hashed again; an old one is reused.
        save(&store, &s.tree);
        let again = full(root, &store).scan;
        assert_eq!(again.hashed_bytes, 11, "racy entries are re-hashed");
        let mut aged = again.tree.clone();
        for r in aged.values_mut().filter(|r| r.kind == EntryKind::File) {
            r.hashed_ns += 10 * MTIME_TICK_NS;
        }
        save(&store, &aged);
        assert_eq!(full(root, &store).scan.hashed_bytes, 0, "unchanged files are not re-read");
        assert_eq!(full(root, &store).scan.tree, aged);
    }

    #[test]
    fn the_chunks_of_small_files_are_remembered_as_they_are_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let root = &dir.path().join("root");
        let store = Store::open(&dir.path().join("db")).unwrap();
        std::fs::create_dir_all(root).unwrap();
        std::fs::write(root.join("small"), b"small").unwrap();
        let big = shoal_protocol::testdata::noise(3, RECENT_FILE_MAX as usize + 1);
        std::fs::write(root.join("big"), &big).unwrap();
        let recent = RecentChunks::default();
        let g = gather(root, &Ignore::load(root), &store, [Item::Dir(None)], None, Some(&recent)).unwrap();
        let chunks = |name: &str| g.scan.tree[&p(name)].manifest.clone().unwrap().chunks;
        let small = chunks("small");
        assert_eq!(recent.get(&small[0].id).as_deref(), Some(&b"small"[..]));
        assert!(chunks("big").iter().all(|c| !recent.contains(&c.id)));
    }

    #[test]
    fn scoped_gathers_cover_exactly_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = &dir.path().join("root");
        let store = Store::open(&dir.path().join("db")).unwrap();
        for d in ["x/y", "x/z", "w"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in ["x/y/1", "x/y/2", "x/z/3", "w/4", "top"] {
            std::fs::write(root.join(f), f.as_bytes()).unwrap();
        }
        save(&store, &full(root, &store).scan.tree);
        let ignore = Ignore::load(root);
        let gather_ = |items: Vec<Item>| gather(root, &ignore, &store, items, None, None).unwrap();

        // One known file: just it.
        let g = gather_(vec![Item::Path(p("x/y/1"))]);
        assert_eq!(g.stored.keys().collect::<Vec<_>>(), [&p("x/y/1")]);
        assert_eq!(g.scan.tree.keys().collect::<Vec<_>>(), [&p("x/y/1")]);

        // A directory moved away: everything below it is covered, and gone from the disk.
        std::fs::rename(root.join("x/y"), dir.path().join("moved")).unwrap();
        let g = gather_(vec![Item::Path(p("x")), Item::Path(p("x/y"))]);
        let covered: Vec<&str> = g.stored.keys().map(|p| p.as_str()).collect();
        assert_eq!(covered, ["x", "x/y", "x/y/1", "x/y/2"]);
        assert_eq!(g.scan.tree.keys().map(|p| p.as_str()).collect::<Vec<_>>(), ["x"]);

        // A directory moved in: it now, its entries by a later visit.
        std::fs::rename(dir.path().join("moved"), root.join("w/in")).unwrap();
        let g = gather_(vec![Item::Path(p("w")), Item::Path(p("w/in"))]);
        let found: Vec<&str> = g.scan.tree.keys().map(|p| p.as_str()).collect();
        assert_eq!(found, ["w", "w/in"]);
        assert_eq!(g.later, [p("w/in")]);
        let g = gather_(vec![Item::Dir(Some(p("w/in")))]);
        let found: Vec<&str> = g.scan.tree.keys().map(|p| p.as_str()).collect();
        assert_eq!(found, ["w/in", "w/in/1", "w/in/2"]);

        // A directory's entries: stable subdirectories come back for later.
        let g = gather_(vec![Item::Dir(Some(p("x")))]);
        assert_eq!(g.next_dirs, [p("x/z")]);
        assert!(g.stored.contains_key(&p("x/y")), "the vanished directory is covered whole");

        // A directory only the journal has (pulled, not fetched when the agent stopped): a full
        // pass visits it, and so covers its entries.
        let mut b = Batch::default();
        for (path, kind) in [("x/new", EntryKind::Dir), ("x/new/5", EntryKind::File)] {
            b.put_remote(&shoal_protocol::Entry {
                path: p(path),
                kind,
                manifest: None,
                exec: false,
                mtime_ns: 0,
                deleted: false,
                version: 2,
                base: None,
                device: shoal_protocol::DeviceId([1; 16]),
                time_ms: 0,
            });
        }
        store.apply(b).unwrap();
        let g = gather_(vec![Item::Dir(Some(p("x")))]);
        assert_eq!(g.next_dirs, [p("x/new"), p("x/z")]);
        let g = gather_(vec![Item::Dir(Some(p("x/new")))]);
        assert!(g.stored.contains_key(&p("x/new/5")), "its entries are covered");

        // A path below a symlinked directory is not in the folder.
        std::os::unix::fs::symlink(root.join("x"), root.join("alias")).unwrap();
        let g = gather_(vec![Item::Path(p("alias")), Item::Path(p("alias/z"))]);
        assert!(g.scan.tree.is_empty() && g.scan.busy.contains(&p("alias")));
    }
}
