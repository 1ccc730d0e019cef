//! Packs as files under `<data>/chunks/`, `NNNNNNNN.pack`, written with direct I/O where the
//! file system allows (whole aligned blocks from a staging buffer, so gigabytes of uploads do
//! not evict the metadata store's pages from the page cache) and read the same way; or, for a
//! cache that wants recent chunks kept in memory (the relay), through the page cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_sys::direct::{self, AlignedBuf};

use super::{MakeDurable, PackBackend, PackError, PackId, PackInfo, PackWriter};

/// A pack file is closed and a new one started past this size.
const PACK_BYTES: u64 = 512 * 1024 * 1024;
/// Bytes staged in memory between writes to a pack.
const STAGING_BYTES: usize = 4 * 1024 * 1024;
/// Open pack handles kept for reads.
const OPEN_PACKS: usize = 64;

/// An open pack for reads, and whether it does direct I/O.
type Reader = (Arc<std::fs::File>, bool);

/// Pack files in one directory.
pub struct LocalPacks {
    dir: PathBuf,
    /// Direct I/O where the file system allows it (else through the page cache).
    direct: bool,
    readers: Mutex<HashMap<PackId, Reader>>,
}

fn pack_path(dir: &Path, pack: PackId) -> PathBuf {
    dir.join(format!("{pack:08}.pack"))
}

impl LocalPacks {
    pub fn open(dir: &Path) -> Result<Self, PackError> {
        std::fs::create_dir_all(dir)?;
        Ok(LocalPacks { dir: dir.to_path_buf(), direct: true, readers: Mutex::default() })
    }

    /// Packs read and written through the page cache, which keeps what was read or written
    /// lately in memory the kernel can take back: for a cache whose recent chunks are the ones
    /// asked for again.
    pub fn open_buffered(dir: &Path) -> Result<Self, PackError> {
        Ok(LocalPacks { direct: false, ..LocalPacks::open(dir)? })
    }

    /// The file that holds `pack`.
    pub fn path(&self, pack: PackId) -> PathBuf {
        pack_path(&self.dir, pack)
    }

    fn reader(&self, pack: PackId) -> Result<Reader, PackError> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = readers.get(&pack) {
            return Ok(r.clone());
        }
        if readers.len() >= OPEN_PACKS {
            readers.clear();
        }
        let path = self.path(pack);
        let r = match self.direct.then(|| direct::open_direct_read(&path)).transpose()?.flatten() {
            Some(f) => (Arc::new(f), true),
            None => (Arc::new(std::fs::File::open(&path)?), false),
        };
        readers.insert(pack, r.clone());
        Ok(r)
    }
}

impl PackBackend for LocalPacks {
    fn describe(&self) -> String {
        format!("local packs in {}", self.dir.display())
    }

    fn create(&self, pack: PackId) -> Result<Box<dyn PackWriter>, PackError> {
        let path = self.path(pack);
        let (file, direct) = match self.direct.then(|| direct::open_direct(&path, true)).transpose()?.flatten() {
            Some(f) => (f, true),
            None => (std::fs::OpenOptions::new().create_new(true).write(true).open(&path)?, false),
        };
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(Box::new(LocalWriter {
            file: Arc::new(file),
            dir: self.dir.clone(),
            direct,
            buf: None,
            flushed: 0,
            entry_durable: Arc::default(),
        }))
    }

    fn read(&self, pack: PackId, offset: u64, len: usize) -> Result<Bytes, PackError> {
        let (file, is_direct) = self.reader(pack)?;
        let end = offset + len as u64;
        if is_direct {
            let align = direct::ALIGN as u64;
            let from = offset / align * align;
            let to = end.div_ceil(align) * align;
            let mut buf = AlignedBuf::new((to - from) as usize);
            buf.fill_from(&file, from, (to - from) as usize)?;
            Ok(buf.into_bytes((offset - from) as usize..(end - from) as usize))
        } else {
            Ok(Bytes::from(direct::read_exact_at(&file, offset, len)?))
        }
    }

    fn list(&self) -> Result<Vec<PackInfo>, PackError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".pack")).and_then(|n| n.parse::<u32>().ok()) {
                out.push(PackInfo { pack: n, len: e.metadata()?.len() });
            }
        }
        Ok(out)
    }

    fn pack_bytes(&self) -> u64 {
        PACK_BYTES
    }

    fn release_memory(&self) {
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn delete(&self, pack: PackId) -> Result<(), PackError> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).remove(&pack);
        match std::fs::remove_file(self.path(pack)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

struct LocalWriter {
    file: Arc<std::fs::File>,
    dir: PathBuf,
    /// The file takes direct writes: every write is whole aligned blocks.
    direct: bool,
    /// Staging buffer (allocated on first use, dropped when idle).
    buf: Option<AlignedBuf>,
    /// Bytes written to the file.
    flushed: u64,
    /// The pack's directory entry is durable.
    entry_durable: Arc<AtomicBool>,
}

impl LocalWriter {
    fn write_staged(&mut self) -> Result<(), PackError> {
        if let Some(buf) = self.buf.as_mut().filter(|b| !b.is_empty()) {
            let res = direct::write_at(&self.file, buf.as_slice(), self.flushed);
            let n = buf.len() as u64;
            buf.clear();
            res?;
            self.flushed += n;
        }
        Ok(())
    }
}

impl PackWriter for LocalWriter {
    fn alignment(&self) -> usize {
        if self.direct { direct::ALIGN } else { 1 }
    }

    fn append(&mut self, mut data: &[u8]) -> Result<(), PackError> {
        while !data.is_empty() {
            let buf = self.buf.get_or_insert_with(|| AlignedBuf::new(STAGING_BYTES));
            let n = buf.push(data);
            data = &data[n..];
            if buf.is_full() {
                self.write_staged()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), PackError> {
        self.write_staged()
    }

    fn release_memory(&mut self) {
        self.buf = None;
    }

    fn readable_before_durable(&self) -> bool {
        true
    }

    fn seals(&self) -> bool {
        false
    }

    fn make_durable(&mut self) -> Result<MakeDurable, PackError> {
        let (file, dir, entry) = (self.file.clone(), self.dir.clone(), self.entry_durable.clone());
        Ok(Box::new(move || {
            file.sync_data()?;
            if !entry.load(Ordering::SeqCst) {
                std::fs::File::open(&dir)?.sync_all()?;
                entry.store(true, Ordering::SeqCst);
            }
            Ok(())
        }))
    }
}
