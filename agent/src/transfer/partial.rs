//! Chunks of downloads in progress: verified, written into a temp file, not yet installed. A
//! device serves them to its peers like chunks of its own files, so a third device can take from
//! the second what it already has of a file the first is still sending.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use shoal_protocol::ChunkId;

/// The downloads in progress, by temp file. Cheap to clone; clones share the registry.
#[derive(Clone, Default)]
pub struct Partials(Arc<Mutex<HashMap<PathBuf, PartialFile>>>);

struct PartialFile {
    chunks: HashMap<ChunkId, (u64, u32)>,
    /// Bytes at the start of the temp file that are written: only chunks below it are readable.
    written: Arc<AtomicU64>,
}

impl Partials {
    /// Registers the download into `tmp` until the returned guard is dropped.
    pub fn start(&self, tmp: &Path, written: Arc<AtomicU64>) -> PartialGuard {
        let file = PartialFile { chunks: HashMap::new(), written };
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(tmp.to_path_buf(), file);
        PartialGuard { partials: self.clone(), tmp: tmp.to_path_buf() }
    }

    /// Where chunk `id` can be read now: a temp file, the offset and the length.
    pub fn find(&self, id: &ChunkId) -> Option<(PathBuf, u64, u32)> {
        let files = self.0.lock().unwrap_or_else(|p| p.into_inner());
        files.iter().find_map(|(tmp, f)| {
            let &(off, len) = f.chunks.get(id)?;
            (off + u64::from(len) <= f.written.load(Ordering::Acquire)).then(|| (tmp.clone(), off, len))
        })
    }
}

/// One download's entry in `Partials`; removed when dropped (the file is installed or given up).
pub struct PartialGuard {
    partials: Partials,
    tmp: PathBuf,
}

impl PartialGuard {
    /// Notes that the verified chunk `id` is at `offset` of the temp file (readable once written).
    pub fn add(&self, id: ChunkId, offset: u64, len: u32) {
        let mut files = self.partials.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get_mut(&self.tmp) {
            f.chunks.insert(id, (offset, len));
        }
    }
}

impl Drop for PartialGuard {
    fn drop(&mut self) {
        self.partials.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_found_once_written_and_forgotten_with_their_download() {
        let p = Partials::default();
        let written = Arc::new(AtomicU64::new(0));
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let guard = p.start(Path::new("/tmp/x.part"), written.clone());
        guard.add(a, 0, 10);
        guard.add(b, 10, 5);
        assert_eq!(p.find(&a), None, "not written yet");
        written.store(12, Ordering::Release);
        assert_eq!(p.find(&a), Some((PathBuf::from("/tmp/x.part"), 0, 10)));
        assert_eq!(p.find(&b), None, "only partly written");
        drop(guard);
        assert_eq!(p.find(&a), None);
    }
}
