//! The folder watcher. notify watches the folder's root on its own and every top-level directory
//! but `.shoal/` recursively, so the agent's temp files (written, chmodded, timed and renamed away
//! for every download) raise no events at all. Events are gathered for `debounce` after the first
//! of a batch, then passed on as one batch of distinct paths: opens and reads are dropped on
//! arrival, echoes of the agent's own writes when the batch goes out (after the write was noted).
//! A directory that appears at the top level is watched before its batch goes out, so the cycle
//! that looks at it sees everything created in it before its watch existed, and events after.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use shoal_protocol::path::RESERVED_DIR;

use crate::own::OwnWrites;

/// Longest a batch waits for the agent's writes in progress to be noted (they take
/// microseconds, unless the machine is busy).
const OWN_SETTLE: Duration = Duration::from_millis(250);

/// One debounced batch: the distinct paths that changed, and whether everything must be looked
/// at (the OS dropped events, or a watch could not be set).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub rescan: bool,
    pub paths: Vec<PathBuf>,
    /// Those of `paths` that are directories that appeared (made, or moved in): what is inside
    /// one may have been written before any watch covered it, so its entries must be looked at.
    pub new_dirs: Vec<PathBuf>,
}

/// Events gathered since the last batch went out.
#[derive(Default)]
struct Gathered {
    paths: Vec<PathBuf>,
    rescan: bool,
    /// Entries that appeared at the top level (directories among them get a watch).
    tops: Vec<PathBuf>,
    /// Entries that appeared anywhere (the directories among them are `Batch::new_dirs`).
    appeared: Vec<PathBuf>,
    /// When the first event of the batch arrived.
    since: Option<Instant>,
    closed: bool,
}

struct Shared {
    gathered: Mutex<Gathered>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Gathered> {
        self.gathered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Watches the folder until dropped.
pub struct FolderWatcher {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FolderWatcher {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

/// Starts watching `root`; `emit` receives each batch on the watcher's own thread.
pub fn start(
    root: &Path,
    debounce: Duration,
    own: OwnWrites,
    emit: impl FnMut(Batch) + Send + 'static,
) -> anyhow::Result<FolderWatcher> {
    let shared = Arc::new(Shared { gathered: Mutex::default(), wake: Condvar::new() });
    let reserved = root.join(RESERVED_DIR);
    let handler = {
        let (shared, root, reserved, own) = (shared.clone(), root.to_path_buf(), reserved.clone(), own.clone());
        move |res: notify::Result<notify::Event>| {
            // inotify reports opens too, the agent's own reads included: only changes count.
            if let Ok(e) = &res
                && !e.need_rescan()
                && matches!(e.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
            {
                return;
            }
            let mut g = shared.lock();
            match res {
                Ok(e) => {
                    g.rescan |= e.need_rescan();
                    let appeared = matches!(e.kind, EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_)));
                    // Which of the paths surely exist since (a rename's source does not).
                    let arrived = |i: usize| match e.kind {
                        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => false,
                        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => i == 1,
                        _ => appeared,
                    };
                    for (i, p) in e.paths.into_iter().enumerate() {
                        if p.starts_with(&reserved) {
                            continue;
                        }
                        if appeared && p.parent() == Some(root.as_path()) {
                            g.tops.push(p.clone());
                        }
                        if arrived(i) {
                            // At once, in the order of events: a removal the agent noted is no
                            // echo once the path is back, even if it goes again in this batch.
                            own.appeared(&p);
                        }
                        if appeared {
                            g.appeared.push(p.clone());
                        }
                        g.paths.push(p);
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "watcher error; rescanning");
                    g.rescan = true;
                }
            }
            if g.since.is_none() && (g.rescan || !g.paths.is_empty()) {
                g.since = Some(Instant::now());
                shared.wake.notify_all();
            }
        }
    };
    let mut watcher = RecommendedWatcher::new(handler, notify::Config::default())?;
    // The root first: a directory made while the others are being watched is then reported.
    watcher.watch(root, RecursiveMode::NonRecursive)?;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) && entry.path() != reserved {
            match watcher.watch(&entry.path(), RecursiveMode::Recursive) {
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {}
                r => r?,
            }
        }
    }
    let flusher = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("shoal-watch".into())
            .spawn(move || flush(shared, watcher, debounce, own, emit))?
    };
    Ok(FolderWatcher { shared, flusher: Some(flusher) })
}

/// Sends out a batch `debounce` after its first event, until the watcher is dropped.
fn flush(
    shared: Arc<Shared>,
    mut watcher: RecommendedWatcher,
    debounce: Duration,
    own: OwnWrites,
    mut emit: impl FnMut(Batch),
) {
    loop {
        let taken = {
            let mut g = shared.lock();
            loop {
                if g.closed {
                    return;
                }
                match g.since {
                    Some(since) if since.elapsed() >= debounce => break,
                    Some(since) => {
                        let wait = debounce.saturating_sub(since.elapsed());
                        g = shared.wake.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner()).0;
                    }
                    None => g = shared.wake.wait(g).unwrap_or_else(|p| p.into_inner()),
                }
            }
            std::mem::take(&mut *g)
        };
        // Not under the lock: notify's thread takes it for every event, and `watch` waits for
        // that thread.
        let mut rescan = taken.rescan;
        for top in taken.tops.iter().collect::<HashSet<_>>() {
            // `.shoal/` never gets here: the handler drops its events.
            if !top.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                continue;
            }
            match watcher.watch(top, RecursiveMode::Recursive) {
                Ok(()) => {}
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {}
                Err(e) => {
                    tracing::warn!(path = %top.display(), error = %e, "cannot watch a new directory; rescanning");
                    rescan = true;
                }
            }
        }
        let mut paths = taken.paths;
        paths.sort_unstable();
        paths.dedup();
        if !paths.is_empty() {
            // An install's rename raises its event before the engine notes it: a batch taken
            // in between would pass the echo on as the user's change.
            own.settle(OWN_SETTLE);
        }
        // Parents sort before their entries: the notes under a directory someone else made or
        // moved in are forgotten before its entries' events are looked at.
        let appeared: HashSet<&PathBuf> = taken.appeared.iter().collect();
        let mut new_dirs = Vec::new();
        paths.retain(|p| {
            let new = appeared.contains(p);
            if let Some(dir) = own.echo(p) {
                tracing::trace!(path = %p.display(), "dropped the echo of the agent's own write");
                // A directory the agent made is no change, but what someone else wrote into it
                // before its watch existed (set here for a top-level one, by notify for one
                // below, both after its event; the process may also have been stopped in
                // between) raised no event: its entries are looked at all the same.
                if new && dir {
                    new_dirs.push(p.clone());
                }
                return false;
            }
            if new && p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                own.forget_under(p);
                new_dirs.push(p.clone());
            }
            true
        });
        if rescan || !paths.is_empty() || !new_dirs.is_empty() {
            emit(Batch { rescan, paths, new_dirs });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects batches until one holds `want` (or five seconds pass).
    fn wait_for(rx: &std::sync::mpsc::Receiver<Batch>, want: &Path) -> Vec<Batch> {
        wait_until(rx, |b| b.paths.iter().any(|p| p == want))
    }

    /// Collects batches until one passes `done` (or five seconds pass).
    fn wait_until(rx: &std::sync::mpsc::Receiver<Batch>, done: impl Fn(&Batch) -> bool) -> Vec<Batch> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(b) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            let stop = done(&b);
            got.push(b);
            if stop {
                break;
            }
        }
        got
    }

    #[test]
    fn reports_changes_everywhere_but_the_reserved_dir_and_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(RESERVED_DIR).join("tmp")).unwrap();
        std::fs::create_dir_all(root.join("old/deep")).unwrap();
        let own = OwnWrites::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let _w = start(root, Duration::from_millis(20), own.clone(), move |b| {
            let _ = tx.send(b);
        })
        .unwrap();

        // Temp files and their rename out of `.shoal/` raise nothing but the rename's arrival.
        let tmp = root.join(RESERVED_DIR).join("tmp").join("x.part");
        std::fs::write(&tmp, b"fetched").unwrap();
        let installed = root.join("old/deep/installed");
        std::fs::rename(&tmp, &installed).unwrap();
        let user = root.join("old/deep/user");
        std::fs::write(&user, b"typed").unwrap();
        let got = wait_for(&rx, &user);
        let all: Vec<&PathBuf> = got.iter().flat_map(|b| &b.paths).collect();
        assert!(all.iter().all(|p| !p.starts_with(root.join(RESERVED_DIR))), "{all:?}");
        assert!(all.contains(&&installed) && all.contains(&&user), "{all:?}");
        assert_eq!(all.iter().filter(|p| ***p == user).count(), 1, "one path once per batch: {got:?}");

        // A noted write of the agent's is dropped; the user's next write to it is not.
        let ours = root.join("old/ours");
        std::fs::write(&ours, b"installed").unwrap();
        own.note(&ours);
        let marker = root.join("old/marker");
        std::fs::write(&marker, b"").unwrap();
        let got = wait_for(&rx, &marker);
        assert!(!got.iter().flat_map(|b| &b.paths).any(|p| *p == ours), "{got:?}");

        // Reading a file is no change.
        std::fs::read(&user).unwrap();
        let after_read = root.join("old/after-read");
        std::fs::write(&after_read, b"").unwrap();
        let got = wait_for(&rx, &after_read);
        assert!(!got.iter().flat_map(|b| &b.paths).any(|p| *p == user), "{got:?}");

        // A new top-level directory is watched, including what was made in it at once.
        std::fs::create_dir_all(root.join("new/sub")).unwrap();
        std::fs::write(root.join("new/sub/early"), b"").unwrap();
        wait_for(&rx, &root.join("new"));
        std::thread::sleep(Duration::from_millis(100));
        let late = root.join("new/sub/late");
        std::fs::write(&late, b"").unwrap();
        assert!(wait_for(&rx, &late).iter().flat_map(|b| &b.paths).any(|p| *p == late));

        // A directory made again where one was (often with the same inode) is reported as new,
        // so that what was written in it before its watch existed is looked at.
        let again = root.join("old/deep");
        std::fs::remove_dir_all(&again).unwrap();
        std::fs::create_dir(&again).unwrap();
        // (The removal may come in a batch of its own before the making.)
        let got = wait_until(&rx, |b| b.new_dirs.contains(&again));
        assert!(got.iter().any(|b| b.new_dirs.contains(&again)), "{got:?}");

        // So is one renamed in from outside the folder.
        let outside = tempfile::tempdir_in(root.parent().unwrap()).unwrap();
        std::fs::create_dir(outside.path().join("moved")).unwrap();
        std::fs::rename(outside.path().join("moved"), root.join("moved")).unwrap();
        wait_for(&rx, &root.join("moved"));
        std::thread::sleep(Duration::from_millis(100));
        let inside = root.join("moved/inside");
        std::fs::write(&inside, b"").unwrap();
        assert!(wait_for(&rx, &inside).iter().flat_map(|b| &b.paths).any(|p| *p == inside));
    }

    /// Every change a user makes after the agent's own write is reported, also one that brings
    /// the path back to the state the agent left it in (the randomized test's seed 1796575103495:
    /// a file the agent removed, made again by the user, then removed by the user too).
    #[test]
    fn a_return_to_the_state_the_agent_left_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("c")).unwrap();
        let own = OwnWrites::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let _w = start(root, Duration::from_millis(20), own.clone(), move |b| {
            let _ = tx.send(b);
        })
        .unwrap();
        let reported = |got: &[Batch], p: &Path| got.iter().flat_map(|b| &b.paths).any(|q| q == p);
        let marker = |n: &str| {
            let m = root.join(n);
            std::fs::write(&m, b"").unwrap();
            m
        };

        // The agent removes c/f1 (a remote delete): its echo is dropped.
        let f1 = root.join("c/f1");
        std::fs::write(&f1, b"user").unwrap();
        wait_for(&rx, &f1);
        {
            let _writing = own.writing();
            std::fs::remove_file(&f1).unwrap();
            own.note(&f1);
        }
        let m = marker("m1");
        assert!(!reported(&wait_for(&rx, &m), &f1), "the agent's removal is no change");
        // The user makes it again, then (in a later batch) removes it: both are changes.
        std::fs::write(&f1, b"again").unwrap();
        assert!(reported(&wait_for(&rx, &f1), &f1));
        std::fs::remove_file(&f1).unwrap();
        assert!(reported(&wait_for(&rx, &f1), &f1), "the user's removal was taken for the agent's");

        // The same within one batch (a cycle may have seen the file meanwhile).
        {
            let _writing = own.writing();
            std::fs::write(&f1, b"installed").unwrap();
            std::fs::remove_file(&f1).unwrap();
            own.note(&f1);
        }
        let m = marker("m2");
        wait_for(&rx, &m);
        std::fs::write(&f1, b"user").unwrap();
        std::fs::remove_file(&f1).unwrap();
        assert!(reported(&wait_for(&rx, &f1), &f1), "made and removed in one batch");

        // A directory the agent made, moved out and back by the user.
        let d = root.join("c/d");
        {
            let _writing = own.writing();
            std::fs::create_dir(&d).unwrap();
            own.note(&d);
        }
        let m = marker("m3");
        assert!(!reported(&wait_for(&rx, &m), &d), "the agent's directory is no change");
        let outside = tempfile::tempdir_in(root.parent().unwrap()).unwrap();
        std::fs::rename(&d, outside.path().join("d")).unwrap();
        assert!(reported(&wait_for(&rx, &d), &d));
        std::fs::rename(outside.path().join("d"), &d).unwrap();
        let got = wait_for(&rx, &d);
        assert!(got.iter().any(|b| b.new_dirs.contains(&d)), "the directory moved back: {got:?}");

        // A file the agent removed in a directory the user then replaces with one holding it:
        // its removal by the user is a change (no event told of its arrival).
        let g = root.join("c/e/g");
        std::fs::create_dir(root.join("c/e")).unwrap();
        std::fs::write(&g, b"user").unwrap();
        wait_for(&rx, &g);
        {
            let _writing = own.writing();
            std::fs::remove_file(&g).unwrap();
            own.note(&g);
        }
        let m = marker("m4");
        assert!(!reported(&wait_for(&rx, &m), &g));
        std::fs::remove_dir(root.join("c/e")).unwrap();
        std::fs::create_dir(outside.path().join("e")).unwrap();
        std::fs::write(outside.path().join("e/g"), b"moved in").unwrap();
        std::fs::rename(outside.path().join("e"), root.join("c/e")).unwrap();
        wait_until(&rx, |b| b.new_dirs.contains(&root.join("c/e")));
        std::fs::remove_file(&g).unwrap();
        assert!(reported(&wait_for(&rx, &g), &g), "the user's removal under a moved-in directory");
    }

    /// A directory the agent made is no change, but a file someone else writes into it before
    /// its watch exists raises no event of its own: the directory's entries are looked at.
    #[test]
    fn what_is_written_into_a_directory_the_agent_just_made_is_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let own = OwnWrites::default();
        let (tx, rx) = std::sync::mpsc::channel();
        // A long debounce: a top-level directory's watch is set when its batch goes out, well
        // after the user's file is written into it.
        let _w = start(root, Duration::from_millis(300), own.clone(), move |b| {
            let _ = tx.send(b);
        })
        .unwrap();
        let d = root.join("photos");
        {
            let _writing = own.writing();
            std::fs::create_dir(&d).unwrap();
            own.note(&d);
        }
        std::fs::write(d.join("new.jpg"), b"the user's").unwrap();
        let got = wait_until(&rx, |b| b.new_dirs.contains(&d));
        assert!(got.iter().any(|b| b.new_dirs.contains(&d)), "{got:?}");
        assert!(
            !got.iter().flat_map(|b| &b.paths).any(|p| p == &d),
            "the agent's directory itself is no change: {got:?}"
        );
    }
}
