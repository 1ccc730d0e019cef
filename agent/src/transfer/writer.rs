//! Writing an assembled file to its temp file: buffered, or with direct I/O on a writer thread
//! for large files, hashing the whole file as it goes; and reopening an interrupted attempt to
//! continue after the chunks it holds that still verify.

use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shoal_protocol::{ChunkId, Manifest};
use shoal_sys::direct::AlignedBuf;

use super::offsets;
use super::source::read_chunk;

/// Writes an assembled file. Large files (those synced on their own) go straight to the device
/// with direct I/O where the file system allows it, skipping the page cache; otherwise the
/// buffered file is flushed on a helper thread every `WRITEBACK_EVERY` bytes so the final sync
/// waits for little.
pub(super) enum Writer {
    Buffered {
        f: std::fs::File,
        /// Bytes at the start of the file that are written (readable by others).
        written: Arc<AtomicU64>,
        hasher: Box<blake3::Hasher>,
        background: bool,
        since_flush: u64,
        flushing: Option<std::thread::JoinHandle<()>>,
    },
    /// Full buffers go to a writer thread, so the device write overlaps the download.
    Direct {
        to_disk: Option<std::sync::mpsc::SyncSender<(AlignedBuf, u64, usize)>>,
        spare: std::sync::mpsc::Receiver<AlignedBuf>,
        buffers: usize,
        cur: AlignedBuf,
        flushed: u64,
        len: u64,
        /// `None` once joined, after it failed.
        worker: Option<std::thread::JoinHandle<std::io::Result<(std::fs::File, ChunkId)>>>,
        /// Bytes at the start of the file the writer thread has written.
        written: Arc<AtomicU64>,
    },
}

/// Staging buffers a direct-I/O file may use at once.
const DIRECT_BUFFERS: usize = 3;

/// Bytes written between background flushes of a large buffered file.
const WRITEBACK_EVERY: u64 = 64 * 1024 * 1024;
/// Staging buffer of a direct-I/O file.
const DIRECT_STAGING: usize = 4 * 1024 * 1024;

impl Writer {
    /// Creates `path`; `large` files are written directly or flushed in the background.
    pub(super) fn create(path: &Path, large: bool) -> std::io::Result<Writer> {
        use std::os::unix::fs::OpenOptionsExt;
        if large && let Some(f) = shoal_sys::direct::open_direct(path, true)? {
            // Private until it is complete and gets its final mode.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            let (to_disk, from_writer) = std::sync::mpsc::sync_channel::<(AlignedBuf, u64, usize)>(DIRECT_BUFFERS);
            let (give_back, spare) = std::sync::mpsc::channel();
            let written = Arc::new(AtomicU64::new(0));
            let done = written.clone();
            // The writer thread also computes the whole-file hash, off the download's thread.
            let worker = std::thread::spawn(move || {
                let mut hasher = blake3::Hasher::new();
                for (mut buf, offset, valid) in from_writer {
                    hasher.update(&buf.as_slice()[..valid]);
                    f.write_all_at(buf.as_slice(), offset)?;
                    done.store(offset + valid as u64, Ordering::Release);
                    buf.clear();
                    let _ = give_back.send(buf);
                }
                Ok((f, hasher.finalize().into()))
            });
            return Ok(Writer::Direct {
                to_disk: Some(to_disk),
                spare,
                buffers: 1,
                cur: AlignedBuf::new(DIRECT_STAGING),
                flushed: 0,
                len: 0,
                worker: Some(worker),
                written,
            });
        }
        let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        Ok(Writer::Buffered {
            f,
            written: Arc::default(),
            hasher: Box::default(),
            background: large,
            since_flush: 0,
            flushing: None,
        })
    }

    /// Reopens the interrupted attempt at `path` to continue it: keeps the leading chunks of
    /// `manifest` that still verify, cuts the rest off, and returns the writer positioned after
    /// them with how many chunks and bytes it kept.
    pub(super) fn resume(path: &Path, manifest: &Manifest) -> std::io::Result<(Writer, usize, u64)> {
        use std::io::Seek;
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let mut hasher = Box::<blake3::Hasher>::default();
        let (mut kept, mut at) = (0, 0u64);
        for (off, c) in offsets(manifest) {
            let Some(data) = read_chunk(&f, off, c.len, &c.id) else { break };
            hasher.update(&data);
            kept += 1;
            at = off + u64::from(c.len);
        }
        f.set_len(at)?;
        f.seek(std::io::SeekFrom::Start(at))?;
        let written = Arc::new(AtomicU64::new(at));
        Ok((Writer::Buffered { f, written, hasher, background: true, since_flush: 0, flushing: None }, kept, at))
    }

    pub(super) fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Buffered { f, written, hasher, background, since_flush, flushing } => {
                f.write_all(data)?;
                written.fetch_add(data.len() as u64, Ordering::Release);
                hasher.update(data);
                *since_flush += data.len() as u64;
                if *background && *since_flush >= WRITEBACK_EVERY && flushing.as_ref().is_none_or(|h| h.is_finished()) {
                    *since_flush = 0;
                    let f = f.try_clone()?;
                    *flushing = Some(std::thread::spawn(move || {
                        let _ = f.sync_data();
                    }));
                }
            }
            Writer::Direct { to_disk, spare, buffers, cur, flushed, len, worker, .. } => {
                while !data.is_empty() {
                    let n = cur.push(data);
                    data = &data[n..];
                    *len += n as u64;
                    if cur.is_full() {
                        let next = match spare.try_recv() {
                            Ok(b) => b,
                            Err(_) if *buffers < DIRECT_BUFFERS => {
                                *buffers += 1;
                                AlignedBuf::new(DIRECT_STAGING)
                            }
                            Err(_) => spare.recv().map_err(|_| writer_failed(worker))?,
                        };
                        let full = std::mem::replace(cur, next);
                        let (at, valid) = (*flushed, full.len());
                        *flushed += full.len() as u64;
                        to_disk
                            .as_ref()
                            .expect("open until finish")
                            .send((full, at, valid))
                            .map_err(|_| writer_failed(worker))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// How many bytes at the start of the file are written, as a counter that follows the writes.
    pub(super) fn written(&self) -> Arc<AtomicU64> {
        match self {
            Writer::Buffered { written, .. } | Writer::Direct { written, .. } => written.clone(),
        }
    }

    /// Writes what is left and returns the file, at its exact length, and its BLAKE3.
    pub(super) fn finish(self) -> std::io::Result<(std::fs::File, ChunkId)> {
        match self {
            Writer::Buffered { f, hasher, flushing, .. } => {
                if let Some(h) = flushing {
                    let _ = h.join();
                }
                Ok((f, hasher.finalize().into()))
            }
            Writer::Direct { mut to_disk, mut cur, flushed, len, mut worker, .. } => {
                let tx = to_disk.take().expect("open until finish");
                if !cur.is_empty() {
                    let valid = cur.len();
                    cur.pad();
                    tx.send((cur, flushed, valid)).map_err(|_| writer_failed(&mut worker))?;
                }
                drop(tx);
                let (f, hash) = worker.take().ok_or_else(writer_gone)?.join().map_err(|_| writer_gone())??;
                f.set_len(len)?;
                Ok((f, hash))
            }
        }
    }
}

/// The error that stopped the writer thread (a full disk, say), which hung up on the writer.
fn writer_failed(
    worker: &mut Option<std::thread::JoinHandle<std::io::Result<(std::fs::File, ChunkId)>>>,
) -> std::io::Error {
    match worker.take().map(|w| w.join()) {
        Some(Ok(Err(e))) => e,
        _ => writer_gone(),
    }
}

fn writer_gone() -> std::io::Error {
    std::io::Error::other("the file writer thread failed")
}
