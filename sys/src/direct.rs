//! Direct I/O (`O_DIRECT`) helpers: write large sequential data straight to the device instead of
//! through the page cache. On the VMs this project is measured on, filling fresh page-cache pages
//! costs ~2.5 s of CPU per GiB, most of the cost of storing or downloading a large file; direct
//! writes skip it. Direct I/O needs aligned buffers, offsets and lengths; `AlignedBuf` provides
//! the buffer in safe code, and callers fall back to buffered I/O where the file system refuses
//! direct I/O (tmpfs, for one).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of direct I/O buffers, offsets and lengths (the common logical block size).
pub const ALIGN: usize = 4096;

/// A byte buffer whose contents start at an `ALIGN`-aligned address.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `cap` bytes (rounded up to a multiple of `ALIGN`).
    pub fn new(cap: usize) -> Self {
        let cap = cap.div_ceil(ALIGN).max(1) * ALIGN;
        let raw = vec![0u8; cap + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start, cap, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.cap
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// Copies as much of `data` as fits; returns how much.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.cap - self.len);
        let at = self.start + self.len;
        self.raw[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// Zero-fills up to the next multiple of `ALIGN`; returns the number of bytes added.
    pub fn pad(&mut self) -> usize {
        let target = self.len.div_ceil(ALIGN) * ALIGN;
        let at = self.start + self.len;
        self.raw[at..self.start + target].fill(0);
        let added = target - self.len;
        self.len = target;
        added
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Fills the buffer with `len` bytes (at most its capacity) read at `offset` of `f`.
    pub fn fill_from(&mut self, f: &File, offset: u64, len: usize) -> io::Result<()> {
        let len = len.min(self.cap);
        f.read_exact_at(&mut self.raw[self.start..self.start + len], offset)?;
        self.len = len;
        Ok(())
    }

    /// The bytes in `range` of the contents, without copying.
    pub fn into_bytes(self, range: std::ops::Range<usize>) -> bytes::Bytes {
        let start = self.start;
        bytes::Bytes::from(self.raw).slice(start + range.start..start + range.end)
    }
}

/// Opens `path` for direct reads, or `None` when the file system does not support direct I/O.
pub fn open_direct_read(path: &Path) -> io::Result<Option<File>> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    match o.open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens `path` for direct writes (created new if `create_new`), or `None` when the file system
/// does not support direct I/O.
pub fn open_direct(path: &Path, create_new: bool) -> io::Result<Option<File>> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    if create_new {
        o.create_new(true);
    }
    match o.open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            if create_new {
                let _ = std::fs::remove_file(path);
            }
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `len` bytes of `f` from `offset`, read into fresh memory that is not zeroed first (zeroing
/// costs as much as the copy from the page cache).
pub fn read_exact_at(f: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        // Reads into the spare capacity and extends the length by what was read.
        let at = offset + buf.len() as u64;
        let n = rustix::io::pread(f, rustix::buffer::spare_capacity(&mut buf), at)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file ends before the bytes asked for"));
        }
    }
    // The capacity, and so a read, may pass `len`.
    buf.truncate(len);
    Ok(buf)
}

/// Writes `buf` (a multiple of `ALIGN` long) at `offset` (aligned) with a direct-I/O handle, or
/// with a buffered one.
pub fn write_at(f: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    f.write_all_at(buf, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exactly_what_is_asked_or_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(read_exact_at(&f, 0, data.len()).unwrap(), data);
        assert_eq!(read_exact_at(&f, 12_345, 4_321).unwrap(), &data[12_345..12_345 + 4_321]);
        assert_eq!(read_exact_at(&f, 100_000, 0).unwrap(), Vec::<u8>::new());
        let e = read_exact_at(&f, 99_000, 2_000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn aligned_buffer() {
        let mut b = AlignedBuf::new(5000);
        assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.push(&[1; 10_000]), 8192);
        assert!(b.is_full());
        b.clear();
        b.push(b"abc");
        assert_eq!(b.pad(), ALIGN - 3);
        assert_eq!(b.len(), ALIGN);
        assert_eq!(&b.as_slice()[..4], b"abc\0");
    }

    #[test]
    fn direct_write_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = match open_direct(&path, true).unwrap() {
            Some(f) => f,
            None => std::fs::File::create(&path).unwrap(),
        };
        let mut b = AlignedBuf::new(ALIGN * 2);
        b.push(&[7u8; 5000]);
        b.pad();
        write_at(&f, b.as_slice(), 0).unwrap();
        f.set_len(5000).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 5000]);
    }
}
