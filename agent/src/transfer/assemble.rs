//! Writing a downloaded file: its chunks, from whichever source the fetcher finds them in, go in
//! manifest order into a temp file whose whole-file BLAKE3 is verified before anyone may rename
//! it into place.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use shoal_protocol::{ChunkId, Manifest};
use tokio_util::task::AbortOnDropHandle;

use super::source::{FetchError, Fetcher, Source};
use super::system_time;
use super::writer::Writer;
use crate::client::ClientError;

/// Most chunks, and bytes, per fetch request when streaming a file.
const FETCH_WINDOW: usize = 128;
const FETCH_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Fetch requests in flight ahead of the writer.
const FETCH_AHEAD: usize = 3;

/// Why a file could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// The coordinator could not be reached (or refused the device): retry the round later.
    #[error(transparent)]
    Offline(ClientError),
    /// No source could deliver a chunk intact; other files are unaffected.
    #[error(transparent)]
    ChunkUnavailable(FetchError),
    /// Writing the temp file failed: a full disk, most likely.
    #[error("{}", disk_message(path, source))]
    Disk { path: PathBuf, source: std::io::Error },
    #[error("assembled file does not match its manifest hash")]
    HashMismatch,
}

impl From<FetchError> for AssembleError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Offline(e) => AssembleError::Offline(e),
            e => AssembleError::ChunkUnavailable(e),
        }
    }
}

impl AssembleError {
    /// `true` when the device's disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, AssembleError::Disk { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
    }
}

fn disk_message(path: &Path, e: &std::io::Error) -> String {
    let dir = path.parent().unwrap_or(path).display();
    if e.kind() == std::io::ErrorKind::StorageFull {
        format!("no space left on the file system holding {dir} (writing {}): {e}", path.display())
    } else {
        format!("writing {} failed: {e}", path.display())
    }
}

fn disk(path: &Path) -> impl Fn(std::io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Disk { path: path.to_path_buf(), source }
}

/// How to finish an assembled file.
pub struct AssembleOpts<'a> {
    /// The file's permission bits; see `file_mode`.
    pub mode: u32,
    pub mtime_ns: i64,
    /// Sync the file's data before returning (callers that sync a whole batch at once pass false).
    pub fsync: bool,
    /// Counts bytes written, for progress bars.
    pub progress: Option<&'a AtomicU64>,
    /// `tmp` holds an earlier, interrupted attempt: keep the chunks at its start that still
    /// verify and fetch only the rest (first checking that the disk has room for it).
    pub resume: bool,
}

/// Totals of an assembly.
#[derive(Debug, Default, Clone, Copy)]
pub struct Assembled {
    pub downloaded: u64,
    pub local: u64,
    /// Bytes kept from an interrupted attempt (also counted in `local`).
    pub resumed: u64,
}

/// Writes the file `manifest` describes to `tmp`: chunks the fetcher has ready (fetched ahead, or
/// in local files) where possible, the rest fetched from peers or the origin in windows. Verifies the whole-file hash, sets the mode and
/// mtime, and syncs the data when `fsync` is set. Never touches the destination.
pub async fn assemble(
    fetcher: &mut Fetcher,
    manifest: &Manifest,
    tmp: &Path,
    opts: AssembleOpts<'_>,
) -> Result<Assembled, AssembleError> {
    let AssembleOpts { mode, mtime_ns, fsync, progress, resume } = opts;
    let tick = |n: usize| {
        if let Some(p) = progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let mut stats = Assembled::default();
    let chunks = &manifest.chunks;
    let (mut out, mut i) = match resume.then(|| Writer::resume(tmp, manifest)).transpose().map_err(disk(tmp))? {
        Some((w, kept, bytes)) => {
            stats.local += bytes;
            stats.resumed += bytes;
            tick(bytes as usize);
            ensure_room(tmp, manifest.size - bytes).map_err(disk(tmp))?;
            (w, kept)
        }
        None => (Writer::create(tmp, fsync).map_err(disk(tmp))?, 0),
    };

    // Peers may take the chunks of this file from the temp file as soon as they are written.
    let partial = fetcher.partials().start(tmp, out.written());
    let mut at = 0u64;
    for c in &chunks[..i] {
        partial.add(c.id, at, c.len);
        at += u64::from(c.len);
    }
    let mut next = i;
    // Plan the file as chunks the fetcher has ready and windows fetched from remote sources; a few
    // windows are fetched ahead while earlier ones are written.
    enum Seg {
        Ready(usize),
        Remote,
    }
    let mut segs = Vec::new();
    let mut windows: Vec<Vec<ChunkId>> = Vec::new();
    while i < chunks.len() {
        if fetcher.is_ready(&chunks[i].id) {
            segs.push(Seg::Ready(i));
            i += 1;
            continue;
        }
        let (mut ids, mut bytes) = (Vec::new(), 0u64);
        while i < chunks.len()
            && ids.len() < FETCH_WINDOW
            && bytes < FETCH_WINDOW_BYTES
            && !fetcher.is_ready(&chunks[i].id)
        {
            ids.push(chunks[i].id);
            bytes += u64::from(chunks[i].len);
            i += 1;
        }
        windows.push(ids);
        segs.push(Seg::Remote);
    }
    // Each window is its own task, so verification of windows in flight uses every core;
    // `buffered` still hands them over in order. Sources deliver a window's chunks in any order,
    // each distinct chunk once; they are put back in manifest order here.
    let remote = fetcher.remote();
    let mut fetched = futures::stream::iter(windows)
        .map(|ids| {
            let remote = remote.clone();
            AbortOnDropHandle::new(tokio::spawn(async move {
                let mut got = HashMap::with_capacity(ids.len());
                let failed = remote
                    .fetch(&ids, |id, data| {
                        got.insert(id, data);
                    })
                    .await
                    .map_err(AssembleError::Offline)?;
                if let Some((_, e)) = failed.into_iter().next() {
                    return Err(AssembleError::from(e));
                }
                ids.iter()
                    .map(|id| {
                        got.get(id).cloned().ok_or_else(|| {
                            AssembleError::Offline(ClientError::Protocol(format!("chunk {id} was not delivered")))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            }))
        })
        .buffered(FETCH_AHEAD);
    for seg in segs {
        let datas = match seg {
            Seg::Ready(i) => match fetcher.take_ready(&chunks[i]) {
                Some((d, from)) => {
                    if from == Some(Source::Local) {
                        stats.local += d.len() as u64;
                    } else {
                        stats.downloaded += d.len() as u64;
                    }
                    vec![d]
                }
                None => {
                    // A local copy that went stale since the chunk map was read.
                    let d = remote.fetch_one(chunks[i].id).await?;
                    stats.downloaded += d.len() as u64;
                    vec![d]
                }
            },
            Seg::Remote => {
                let got = fetched
                    .next()
                    .await
                    .ok_or_else(|| AssembleError::Offline(ClientError::Protocol("chunk windows ran out".into())))?
                    .map_err(|e| AssembleError::Offline(ClientError::Protocol(format!("fetch task failed: {e}"))))??;
                stats.downloaded += got.iter().map(|d| d.len() as u64).sum::<u64>();
                got
            }
        };
        for d in datas {
            out.write(&d).map_err(disk(tmp))?;
            tick(d.len());
            partial.add(chunks[next].id, at, chunks[next].len);
            at += d.len() as u64;
            next += 1;
        }
    }
    let (f, hash) = out.finish().map_err(disk(tmp))?;
    if hash != manifest.hash {
        return Err(AssembleError::HashMismatch);
    }
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(disk(tmp))?;
    f.set_modified(system_time(mtime_ns)).map_err(disk(tmp))?;
    if fsync {
        f.sync_all().map_err(disk(tmp))?;
    }
    Ok(stats)
}

/// Fails with "no space left" when the file system holding `path` has less than `need` bytes
/// free for this user, so a retry on a disk that is still full fetches nothing.
fn ensure_room(path: &Path, need: u64) -> std::io::Result<()> {
    let st = rustix::fs::statvfs(path)?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < need {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("No space left on device: {need} more bytes needed, {free} free"),
        ));
    }
    Ok(())
}
