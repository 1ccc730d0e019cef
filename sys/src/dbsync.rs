//! Making a sled database durable without syncing the whole file system.
//!
//! sled 0.34's `flush` writes its log with `sync_file_range`, which neither flushes the drive's
//! write cache nor makes a grown file's size durable, and it writes values too large for the log
//! to blob files it never syncs. A whole-file-system `syncfs` covers both but waits for every
//! dirty page on that file system: right after a user wrote a 1 GiB file next to the database,
//! each flush took 0.3–0.7 s. [`DbFiles::sync`] syncs exactly the database's own files instead:
//! the log (`db`), the blob files that are new or have grown since the last sync, and the blob
//! directory when it gained entries.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The files of one sled database directory, and which of its blob files are synced already.
#[derive(Debug)]
pub struct DbFiles {
    dir: PathBuf,
    /// Blob files synced so far, with the length each had then (sled writes a blob once, at a
    /// new name: one seen still growing is synced again at its final length).
    blobs: Mutex<HashMap<OsString, u64>>,
}

impl DbFiles {
    /// For the sled database in `dir`, already opened: syncs every file sled has made there so
    /// far, and the directories that hold them, so that what came before is durable too.
    pub fn new(dir: &Path) -> io::Result<Self> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                sync_file(&e.path())?;
            }
        }
        File::open(dir)?.sync_all()?;
        let files = DbFiles { dir: dir.to_path_buf(), blobs: Mutex::default() };
        files.sync()?;
        Ok(files)
    }

    /// Makes what sled's last completed `flush` wrote durable. Call after each flush returns.
    pub fn sync(&self) -> io::Result<()> {
        File::open(self.dir.join("db"))?.sync_data()?;
        // One blob listing at a time: a caller holding an older listing must not replace the
        // record a newer one made.
        let mut synced = self.blobs.lock().unwrap_or_else(PoisonError::into_inner);
        let blob_dir = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blob_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut now = HashMap::with_capacity(synced.len());
        let mut added = false;
        for e in entries {
            let e = e?;
            let len = match e.metadata() {
                Ok(md) => md.len(),
                // Removed by sled since the listing: nothing left to make durable.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            let name = e.file_name();
            if synced.get(&name) != Some(&len) {
                match sync_file(&e.path()) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                }
                added |= !synced.contains_key(&name);
            }
            now.insert(name, len);
        }
        if added {
            File::open(&blob_dir)?.sync_all()?;
        }
        *synced = now;
        Ok(())
    }
}

/// Opens a sled database with `open`, waiting up to two seconds for its file lock: a database
/// closed a moment ago in this process (sled's background threads let go of the lock just after
/// the last handle drops) opens instead of failing; one held by another process still fails,
/// with sled's error. Generic over the error so that this crate need not depend on sled: sled
/// reports the lock as an I/O error of kind `Other` whose message carries the OS's WouldBlock.
pub fn open_waiting<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match open() {
            Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_new_and_grown_blobs_and_forgets_removed_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        std::fs::write(dir.path().join("conf"), b"segment_size: 524288").unwrap();
        let files = DbFiles::new(dir.path()).unwrap();
        assert!(files.blobs.lock().unwrap().is_empty(), "no blob directory yet");

        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(blobs.join("17"), b"half").unwrap();
        files.sync().unwrap();
        assert_eq!(files.blobs.lock().unwrap().get(&OsString::from("17")), Some(&4));

        std::fs::write(blobs.join("17"), b"half and the rest").unwrap();
        std::fs::write(blobs.join("42"), b"x").unwrap();
        files.sync().unwrap();
        {
            let synced = files.blobs.lock().unwrap();
            assert_eq!(synced.get(&OsString::from("17")), Some(&17), "a grown blob is synced again");
            assert_eq!(synced.get(&OsString::from("42")), Some(&1));
        }

        std::fs::remove_file(blobs.join("17")).unwrap();
        files.sync().unwrap();
        assert_eq!(files.blobs.lock().unwrap().keys().collect::<Vec<_>>(), [&OsString::from("42")]);
    }

    #[test]
    fn opening_waits_for_a_lock_let_go_of_and_not_for_other_errors() {
        let mut tries = 0;
        let r: Result<u8, String> = open_waiting(|| {
            tries += 1;
            if tries < 3 { Err("could not acquire lock on \"db\"".into()) } else { Ok(7) }
        });
        assert_eq!((r, tries), (Ok(7), 3));
        let mut tries = 0;
        let r: Result<u8, String> = open_waiting(|| {
            tries += 1;
            Err("corrupted".into())
        });
        assert_eq!((r, tries), (Err("corrupted".into()), 1), "other errors come back at once");
        let start = std::time::Instant::now();
        let r: Result<u8, String> = open_waiting(|| Err("could not acquire lock".into()));
        assert!(r.is_err() && start.elapsed() >= std::time::Duration::from_secs(2), "a lock held on fails");
    }

    #[test]
    fn a_missing_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DbFiles::new(dir.path()).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
