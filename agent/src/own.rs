//! The agent's own writes, remembered briefly so the watcher can tell them from the user's. After
//! every install, conflicted copy, directory creation or removal the engine notes the path with
//! its stat at that moment (or that it is absent); a watcher event for a path whose stat still
//! matches is the echo of that write and is dropped. Any later change by someone else changes the
//! ctime (or the inode, or presence), so it never matches. Correctness does not rest on this: a
//! dropped event only skips a cycle that would have found nothing, and the periodic rescan is the
//! backstop.
//!
//! A note stands for what the engine knows of the path, so it lasts only until someone else is
//! seen to change the path: the engine then learns another state, and a later return to the noted
//! one (a file the agent removed, made again and removed again by the user; a directory moved out
//! and back) is a change to it, not an echo. So a path found unlike its note is forgotten
//! (`is_own`), a noted absence is forgotten as soon as the path appears again (`appeared`), and
//! the notes under a directory that someone else made or moved in are forgotten with it
//! (`forget_under`): its entries are scanned anew, and their events must be answered.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a noted write is remembered: far longer than the watcher's debounce and any delay in
/// delivering its events, short enough that the map stays small.
const REMEMBER: Duration = Duration::from_secs(60);
/// Most paths remembered; past this the oldest are forgotten first (their events then cost one
/// cycle each, as without this filter).
const MAX_PATHS: usize = 200_000;

/// What a path looked like right after the agent wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Absent,
    /// A directory's times move with every entry written into it (each tracked on its own), so
    /// only its identity and mode count: the inode, and the birth time, since a directory removed
    /// and made again at once often gets the same inode back.
    Dir {
        ino: u64,
        born: Option<std::time::SystemTime>,
        mode: u32,
    },
    Present {
        ino: u64,
        size: u64,
        mtime_ns: i64,
        ctime_ns: i64,
        mode: u32,
    },
}

fn look(path: &Path) -> Option<Seen> {
    match path.symlink_metadata() {
        Ok(md) => Some(seen(&md)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Seen::Absent),
        Err(_) => None,
    }
}

fn seen(md: &std::fs::Metadata) -> Seen {
    if md.is_dir() {
        return Seen::Dir { ino: md.ino(), born: md.created().ok(), mode: md.mode() };
    }
    Seen::Present {
        ino: md.ino(),
        size: md.size(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        mode: md.mode(),
    }
}

/// Recently written paths; cheap to clone, shared by the engine and the watcher.
#[derive(Clone, Default)]
pub struct OwnWrites(Arc<Shared>);

#[derive(Default)]
struct Shared {
    /// Ordered, so that the notes under a directory are one range.
    map: Mutex<BTreeMap<PathBuf, (Seen, Instant)>>,
    /// Writes between their first system call and their note (`WriteGuard`s alive).
    writing: AtomicUsize,
}

/// A write in progress, from before its first system call until after it is noted.
pub struct WriteGuard(Arc<Shared>);

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.0.writing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl OwnWrites {
    /// Marks a write in progress until the guard drops: the watcher checks a batch only once
    /// every write whose events it may hold has been noted (`settle`).
    pub fn writing(&self) -> WriteGuard {
        self.0.writing.fetch_add(1, Ordering::SeqCst);
        WriteGuard(self.0.clone())
    }

    /// Waits until no write is between its system calls and its note, at most `limit`. Events
    /// gathered before this returns are then for writes already noted, or for someone else's.
    pub fn settle(&self, limit: Duration) {
        let started = Instant::now();
        while self.0.writing.load(Ordering::SeqCst) > 0 && started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Notes that the agent just wrote (or removed) `path`.
    pub fn note(&self, path: &Path) {
        if let Some(seen) = look(path) {
            self.remember(path, seen);
        }
    }

    /// Notes that the agent just wrote `path`, which `md` (taken since) describes.
    pub fn note_stat(&self, path: &Path, md: &std::fs::Metadata) {
        self.remember(path, seen(md));
    }

    /// `true` if `path` was noted recently enough to be remembered for a while yet.
    pub fn knows(&self, path: &Path) -> bool {
        let map = self.0.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(path).is_some_and(|(_, at)| at.elapsed() < REMEMBER / 2)
    }

    fn remember(&self, path: &Path, seen: Seen) {
        let mut map = self.0.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_PATHS {
            let cutoff = Instant::now() - REMEMBER / 2;
            map.retain(|_, (_, at)| *at > cutoff);
            if map.len() >= MAX_PATHS {
                map.clear();
            }
        }
        map.insert(path.to_path_buf(), (seen, Instant::now()));
    }

    /// `Some` if `path` is as the agent last left it, recently: `Some(true)` for a directory
    /// (the stat was taken anyway). A path found otherwise was changed by someone else: its note
    /// is forgotten, so that a later return to the noted state is not taken for an echo (the
    /// engine will have learned the state in between).
    pub fn echo(&self, path: &Path) -> Option<bool> {
        let recorded = {
            let mut map = self.0.map.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(path) {
                Some((_, at)) if at.elapsed() > REMEMBER => {
                    map.remove(path);
                    return None;
                }
                Some((seen, _)) => *seen,
                None => return None,
            }
        };
        let now = look(path);
        if now == Some(recorded) {
            return Some(matches!(recorded, Seen::Dir { .. }));
        }
        let mut map = self.0.map.lock().unwrap_or_else(|p| p.into_inner());
        // Unless the agent noted it again meanwhile.
        if map.get(path).is_some_and(|(seen, _)| *seen == recorded) {
            map.remove(path);
        }
        None
    }

    /// Called for every event saying `path` appeared (made, or moved in): a noted absence is
    /// over. (An appearance reported late, from before the agent's removal, only costs a cycle.)
    pub fn appeared(&self, path: &Path) {
        let mut map = self.0.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(path).is_some_and(|(seen, _)| *seen == Seen::Absent) {
            map.remove(path);
        }
    }

    /// Forgets the notes of everything under `dir` (not of `dir` itself): someone else made or
    /// moved in a directory there, whose entries raised no events of their own.
    pub fn forget_under(&self, dir: &Path) {
        let mut map = self.0.map.lock().unwrap_or_else(|p| p.into_inner());
        let under: Vec<PathBuf> = map
            .range::<Path, _>((std::ops::Bound::Excluded(dir), std::ops::Bound::Unbounded))
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(dir))
            .cloned()
            .collect();
        for p in under {
            map.remove(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl OwnWrites {
        fn is_own(&self, path: &Path) -> bool {
            self.echo(path).is_some()
        }
    }

    #[test]
    fn settling_waits_for_writes_in_progress_to_be_noted() {
        let dir = tempfile::tempdir().unwrap();
        let own = OwnWrites::default();
        let f = dir.path().join("f");
        let guard = own.writing();
        std::fs::write(&f, b"ours").unwrap();
        let writer = {
            let (own, f) = (own.clone(), f.clone());
            std::thread::spawn(move || {
                // Held up between the write and its note, as a busy machine may.
                std::thread::sleep(Duration::from_millis(100));
                own.note(&f);
                drop(guard);
            })
        };
        own.settle(Duration::from_secs(10));
        assert!(own.is_own(&f), "settled only once the write was noted");
        writer.join().unwrap();
        // With nothing in progress it returns at once; a guard never dropped holds it `limit`.
        let started = Instant::now();
        own.settle(Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(1));
        let _stuck = own.writing();
        let started = Instant::now();
        own.settle(Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn own_writes_match_until_someone_else_changes_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let own = OwnWrites::default();
        let f = dir.path().join("f");
        std::fs::write(&f, b"ours").unwrap();
        assert!(!own.is_own(&f), "not noted yet");
        own.note(&f);
        assert!(own.is_own(&f));
        assert_eq!(own.echo(&f), Some(false), "a file");
        // Someone else rewrites it: ctime moves, so it is no longer ours.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&f, b"user").unwrap();
        assert!(!own.is_own(&f));
        // Removals are noted as absence.
        std::fs::remove_file(&f).unwrap();
        own.note(&f);
        assert!(own.is_own(&f));
        std::fs::write(&f, b"back").unwrap();
        assert!(!own.is_own(&f));
        // A directory stays ours while entries come and go, not once its mode changes.
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        own.note(&d);
        std::fs::write(d.join("x"), b"").unwrap();
        assert!(own.is_own(&d));
        assert_eq!(own.echo(&d), Some(true), "a directory");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(own.is_own(&d), "same mode again");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert!(!own.is_own(&d));
    }

    #[test]
    fn a_note_lasts_until_someone_else_changes_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let own = OwnWrites::default();
        let f = dir.path().join("f");
        // Removed by the agent, made again by someone else: the absence noted is forgotten, so a
        // later removal is a change.
        own.note(&f);
        assert!(own.is_own(&f));
        std::fs::write(&f, b"user").unwrap();
        assert!(!own.is_own(&f));
        std::fs::remove_file(&f).unwrap();
        assert!(!own.is_own(&f), "absent again, yet not as the agent left it");
        // An appearance ends a noted absence at once; a note of a present file stays.
        own.note(&f);
        own.appeared(&f);
        assert!(!own.is_own(&f));
        std::fs::write(&f, b"ours").unwrap();
        own.note(&f);
        own.appeared(&f);
        assert!(own.is_own(&f));
        // The notes under a directory go with it, not its own nor its neighbours'.
        let d = dir.path().join("d");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let (inner, deep, next) = (d.join("x"), d.join("sub/y"), dir.path().join("d-next"));
        for p in [&d, &inner, &deep, &next] {
            own.note(p);
        }
        own.forget_under(&d);
        assert!(own.is_own(&d) && own.is_own(&next));
        assert!(!own.is_own(&inner) && !own.is_own(&deep));
    }
}
