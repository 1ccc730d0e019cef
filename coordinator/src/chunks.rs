//! The chunk store on local disk: `<data>/chunks/ab/cd/<id>`, written through a temp file and a
//! rename so a reader never sees a partial chunk. The coordinator never interprets chunk bytes
//! beyond checking that their BLAKE3 matches the name.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shoal_protocol::ChunkId;

/// Content-addressed chunk files under one directory.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
    tmp: PathBuf,
    /// Chunks written, and how many of those were covered by the last completed sync.
    written: Arc<AtomicU64>,
    synced: Arc<AtomicU64>,
    /// A background writeback is running.
    flushing: Arc<AtomicBool>,
}

impl ChunkStore {
    pub fn open(root: &Path) -> io::Result<Self> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        // Leftovers of writes interrupted by a crash are garbage: they were never acknowledged.
        for e in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(e?.path());
        }
        Ok(ChunkStore {
            root: root.to_path_buf(),
            tmp,
            written: Arc::default(),
            synced: Arc::default(),
            flushing: Arc::default(),
        })
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(&hex[2..4]).join(hex)
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.path(id).exists()
    }

    /// The stored length of `id`, if present.
    pub fn len(&self, id: &ChunkId) -> Option<u64> {
        std::fs::metadata(self.path(id)).ok().map(|m| m.len())
    }

    /// Stores `data` under `id` (the caller has verified the hash). Does not sync: a commit that
    /// references the chunk calls [`ChunkStore::sync`] first, and [`ChunkStore::start_writeback`]
    /// lets the disk catch up meanwhile.
    pub fn put(&self, id: &ChunkId, data: &[u8]) -> io::Result<()> {
        let dest = self.path(id);
        if dest.exists() {
            return Ok(());
        }
        let mut name = [0u8; 8];
        getrandom::fill(&mut name).map_err(io::Error::other)?;
        let tmp = self.tmp.join(shoal_protocol::ids::to_hex(&name));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        drop(f);
        let parent = dest.parent().expect("chunk paths have two parent levels");
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            if e.kind() != io::ErrorKind::NotFound {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::create_dir_all(parent)?;
            std::fs::rename(&tmp, &dest)?;
        }
        self.written.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Starts flushing written chunks to disk on a background thread, unless one is running, so
    /// the sync a commit waits for has little left to do.
    pub fn start_writeback(&self) {
        if self.flushing.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = self.clone();
        std::thread::spawn(move || {
            let _ = store.sync();
            store.flushing.store(false, Ordering::SeqCst);
        });
    }

    /// `true` when chunks were written since the last completed sync.
    pub fn needs_sync(&self) -> bool {
        self.written.load(Ordering::SeqCst) > self.synced.load(Ordering::SeqCst)
    }

    /// Makes every chunk written so far durable: one `syncfs` for the file system holding the
    /// store, which costs far less than an fsync per chunk for a batch of thousands.
    pub fn sync(&self) -> io::Result<()> {
        let covered = self.written.load(Ordering::SeqCst);
        let dir = std::fs::File::open(&self.root)?;
        rustix::fs::syncfs(&dir)?;
        self.synced.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    pub fn get(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        std::fs::read(self.path(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path()).unwrap();
        let id = ChunkId::of(b"abc");
        assert!(!s.contains(&id));
        s.put(&id, b"abc").unwrap();
        s.put(&id, b"abc").unwrap();
        s.sync().unwrap();
        assert!(s.contains(&id));
        assert_eq!(s.len(&id), Some(3));
        assert!(!s.needs_sync());
        assert_eq!(s.get(&id).unwrap(), b"abc");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
