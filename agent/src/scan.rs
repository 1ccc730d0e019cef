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
use crate::store::IndexRec;

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

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
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

/// Walks `root` and returns the local tree, reusing `index` where stat data shows no change.
/// Receives batches of chunk frames cut from large files while they are hashed, so their upload
/// overlaps the hashing (see `Engine::cycle`). Sending is best effort: the commit path still
/// uploads whatever the coordinator lacks.
pub type EarlyChunks = tokio::sync::mpsc::Sender<Vec<u8>>;

/// Files at least this large send their chunks early.
pub const EARLY_UPLOAD_MIN: u64 = 8 * 1024 * 1024;
/// Bytes per early batch.
const EARLY_BATCH: usize = 4 * 1024 * 1024;

/// Walks `root` and returns the local tree, reusing `index` where stat data shows no change. An
/// unreadable root is an error: an empty scan of it would read as "everything was deleted".
pub fn scan(
    root: &Path,
    ignore: &Ignore,
    index: &BTreeMap<SyncPath, IndexRec>,
    early: Option<&EarlyChunks>,
) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    let mut to_hash: Vec<(SyncPath, PathBuf, IndexRec)> = Vec::new();
    let mut stack = vec![(root.to_path_buf(), None::<SyncPath>)];
    while let Some((dir, dir_path)) = stack.pop() {
        let rd = match (std::fs::read_dir(&dir), &dir_path) {
            (Ok(rd), _) => rd,
            (Err(e), None) => return Err(e),
            (Err(e), Some(p)) => {
                tracing::warn!(dir = %shoal_protocol::path::Escaped(&dir.display().to_string()), error = %e, "cannot read directory; leaving it alone");
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
            let Some(name) = name.to_str() else {
                out.skipped.push(format!("{}: name is not UTF-8", ent.path().display()));
                continue;
            };
            let joined = match &dir_path {
                Some(d) => format!("{d}/{name}"),
                None => name.to_string(),
            };
            let path = match SyncPath::parse(&joined) {
                Ok(p) if p.as_str() == joined => p,
                Ok(_) => {
                    out.skipped.push(format!("{joined}: name is not in Unicode NFC form"));
                    continue;
                }
                Err(e) => {
                    out.skipped.push(format!("{joined}: {e}"));
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
            let ft = md.file_type();
            if ignore.is_ignored(&path, ft.is_dir()) {
                continue;
            }
            if ft.is_dir() {
                out.tree.insert(path.clone(), stat_rec(&md));
                stack.push((ent.path(), Some(path)));
            } else if ft.is_file() {
                let rec = stat_rec(&md);
                match index.get(&path) {
                    Some(old) if old.same_stat(&rec) && old.manifest.is_some() && settled(old) => {
                        out.tree.insert(path, old.clone());
                    }
                    _ => to_hash.push((path, ent.path(), rec)),
                }
            } else {
                // Symlinks, sockets, devices: not synced, and never replaced.
                out.busy.insert(path);
            }
        }
    }
    hash_files(to_hash, index, early, &mut out);
    Ok(out)
}

/// Chunks and hashes `files` on two threads.
fn hash_files(
    files: Vec<(SyncPath, PathBuf, IndexRec)>,
    index: &BTreeMap<SyncPath, IndexRec>,
    early: Option<&EarlyChunks>,
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
                    let r = hash_file(local, rec, early.filter(|_| rec.size >= EARLY_UPLOAD_MIN));
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

/// Reads and hashes one file, checking before and after that nobody was writing it.
fn hash_file(path: &Path, before: &IndexRec, early: Option<&EarlyChunks>) -> Result<IndexRec, HashError> {
    let hashed_ns = now_ns();
    let f = std::fs::File::open(path).map_err(HashError::Io)?;
    let opened = stat_rec(&f.metadata().map_err(HashError::Io)?);
    if !opened.same_stat(before) {
        return Err(HashError::Unstable);
    }
    let mut batch = Vec::new();
    let manifest = Chunker::default()
        .chunk(&f, |c, _, bytes| {
            if let Some(tx) = early {
                shoal_protocol::api::encode_frame(&mut batch, &c.id, bytes);
                if batch.len() >= EARLY_BATCH {
                    let _ = tx.blocking_send(std::mem::take(&mut batch));
                }
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
    Ok(IndexRec { manifest: Some(manifest), hashed_ns, ..before.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(root: &Path, index: &BTreeMap<SyncPath, IndexRec>) -> Scan {
        scan(root, &Ignore::load(root), index, None).unwrap()
    }

    #[test]
    fn unreadable_root_is_an_error_not_an_empty_tree() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("not-there");
        assert!(scan(&gone, &Ignore::load(&gone), &BTreeMap::new(), None).is_err());
    }

    #[test]
    fn scans_ignores_and_reuses_index() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".shoal/tmp")).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f.txt"), b"hello").unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join(".DS_Store"), b"junk").unwrap();
        std::fs::write(root.join("notes.log"), b"x").unwrap();
        std::fs::write(root.join(IGNORE_FILE), b"*.log\n").unwrap();
        std::os::unix::fs::symlink("a", root.join("link")).unwrap();
        let s = check(root, &BTreeMap::new());
        let names: Vec<&str> = s.tree.keys().map(|p| p.as_str()).collect();
        assert_eq!(names, [".shoalignore", "a", "a/b", "a/b/f.txt", "empty"]);
        assert!(s.busy.contains(&SyncPath::parse("link").unwrap()), "symlinks are left alone");
        let f = &s.tree[&SyncPath::parse("a/b/f.txt").unwrap()];
        assert_eq!(f.manifest.as_ref().unwrap().hash, shoal_protocol::ChunkId::of(b"hello"));
        assert_eq!(s.tree[&SyncPath::parse("empty").unwrap()].manifest, Some(shoal_protocol::Manifest::empty()));
        assert_eq!(s.hashed_bytes, 5 + 6);

        // A fresh index entry (mtime near the hash time) is hashed again; an old one is reused.
        let again = check(root, &s.tree);
        assert_eq!(again.hashed_bytes, 11, "racy entries are re-hashed");
        let mut aged = again.tree.clone();
        for r in aged.values_mut().filter(|r| r.kind == EntryKind::File) {
            r.hashed_ns += 10 * MTIME_TICK_NS;
        }
        assert_eq!(check(root, &aged).hashed_bytes, 0, "unchanged files are not re-read");
        assert_eq!(check(root, &aged).tree, aged);
    }
}
