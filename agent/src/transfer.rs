//! Moving chunk bytes: reading chunks back out of local files (for uploads, and as a download
//! source that saves a transfer when another local file already holds the chunk), uploading
//! missing chunks in framed batches, and assembling a file from its manifest into a temp file
//! whose whole-file BLAKE3 is verified before anyone may rename it into place.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use shoal_protocol::api::ErrorCode;
use shoal_protocol::{ChunkId, ChunkRef, Manifest};

use crate::client::{Client, ClientError};
use writer::Writer;

mod writer;

/// Bytes per upload request: large enough to amortize a round trip, small enough to hold a few
/// in memory at once.
const UPLOAD_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Upload requests in flight at once.
const UPLOAD_PARALLEL: usize = 3;
/// Most chunks, and bytes, per fetch request when streaming a file.
const FETCH_WINDOW: usize = 128;
const FETCH_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Fetch requests in flight ahead of the writer.
const FETCH_AHEAD: usize = 3;

/// Where a chunk sits in a local file.
#[derive(Debug, Clone)]
pub struct LocalChunk {
    pub file: PathBuf,
    pub offset: u64,
    pub len: u32,
}

/// Chunk offsets of a manifest, in order.
pub fn offsets(m: &Manifest) -> impl Iterator<Item = (u64, &ChunkRef)> {
    m.chunks.iter().scan(0u64, |off, c| {
        let at = *off;
        *off += u64::from(c.len);
        Some((at, c))
    })
}

/// Reads `len` bytes at `offset` of `file` and returns them only if they hash to `id`.
pub fn read_chunk(file: &std::fs::File, offset: u64, len: u32, id: &ChunkId) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).ok()?;
    (ChunkId::of(&buf) == *id).then_some(buf)
}

/// Appends the frame of chunk `c`, read from `file` at `offset` straight into `body`; `false`
/// (and `body` unchanged) when the file no longer holds those bytes.
fn append_frame(body: &mut Vec<u8>, file: &std::fs::File, offset: u64, c: &ChunkRef) -> bool {
    let start = body.len();
    body.extend_from_slice(c.id.as_bytes());
    body.extend_from_slice(&c.len.to_be_bytes());
    let data_at = body.len();
    body.resize(data_at + c.len as usize, 0);
    if file.read_exact_at(&mut body[data_at..], offset).is_ok() && ChunkId::of(&body[data_at..]) == c.id {
        return true;
    }
    body.truncate(start);
    false
}

/// Why an upload stopped.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// A source file no longer holds the content its manifest names.
    #[error("{0} changed since it was scanned")]
    SourceChanged(PathBuf),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Uploads the chunks in `missing` that `files` (local path + manifest) hold, in framed batches
/// with a few requests in flight. Returns the bytes sent.
pub async fn upload_chunks(
    client: &Client,
    files: Vec<(PathBuf, Manifest)>,
    missing: HashSet<ChunkId>,
    sent_counter: &AtomicU64,
) -> Result<u64, UploadError> {
    if missing.is_empty() {
        return Ok(0);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(UPLOAD_PARALLEL);
    let reader = tokio::task::spawn_blocking(move || -> Result<(), UploadError> {
        let mut wanted = missing;
        let mut body = Vec::with_capacity(UPLOAD_BATCH_BYTES + 300_000);
        for (path, manifest) in &files {
            if !manifest.chunks.iter().any(|c| wanted.contains(&c.id)) {
                continue;
            }
            let f = std::fs::File::open(path).map_err(|_| UploadError::SourceChanged(path.clone()))?;
            for (off, c) in offsets(manifest) {
                if !wanted.remove(&c.id) {
                    continue;
                }
                if !append_frame(&mut body, &f, off, c) {
                    return Err(UploadError::SourceChanged(path.clone()));
                }
                if body.len() >= UPLOAD_BATCH_BYTES {
                    let full = std::mem::replace(&mut body, Vec::with_capacity(UPLOAD_BATCH_BYTES + 300_000));
                    if tx.blocking_send(full).is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if !body.is_empty() {
            let _ = tx.blocking_send(body);
        }
        Ok(())
    });
    // Boxed so that dropping it on failure really drops the receiver and unblocks the reader.
    let mut uploads = Box::pin(
        tokio_stream_from(rx)
            .map(|body| async move {
                let n = body.len() as u64;
                client.upload_frames(body).await.map(|_| n)
            })
            .buffer_unordered(UPLOAD_PARALLEL),
    );
    let mut total = 0u64;
    let mut failure = None;
    while let Some(r) = uploads.next().await {
        match r {
            Ok(n) => {
                total += n;
                sent_counter.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(uploads);
    let read = reader.await.context("chunk reader panicked").map_err(|e| ClientError::Protocol(e.to_string()))?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    read?;
    Ok(total)
}

fn tokio_stream_from<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Uploads the chunk batches the scanner cuts from large files while it hashes them (two
/// requests in flight), sending only what the coordinator lacks. Best effort: failures are left
/// to the commit path, which uploads whatever is still missing. Returns the bytes sent.
pub async fn upload_early(
    client: Client,
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    counters: std::sync::Arc<crate::engine::Counters>,
) -> u64 {
    tokio_stream_from(rx)
        .map(|body| {
            let client = client.clone();
            async move { send_missing_frames(&client, body).await.unwrap_or(0) }
        })
        .buffer_unordered(2)
        .fold(0u64, |total, n| {
            counters.uploaded.fetch_add(n, Ordering::Relaxed);
            async move { total + n }
        })
        .await
}

/// Uploads the frames of `body` whose chunks the coordinator is missing.
async fn send_missing_frames(client: &Client, body: Vec<u8>) -> Result<u64, ClientError> {
    // (id, frame start, frame end) of each frame in `body`.
    let mut frames = Vec::new();
    let mut at = 0;
    while let Ok(Some((id, _, used))) = shoal_protocol::api::decode_frame(&body[at..], u32::MAX) {
        frames.push((id, at, at + used));
        at += used;
    }
    let ids: Vec<ChunkId> = frames.iter().map(|(id, _, _)| *id).collect();
    let missing: HashSet<ChunkId> = client.missing(&ids).await?.into_iter().collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let out = if missing.len() == frames.len() {
        body
    } else {
        let mut out = Vec::new();
        for (id, start, end) in frames {
            if missing.contains(&id) {
                out.extend_from_slice(&body[start..end]);
            }
        }
        out
    };
    let n = out.len() as u64;
    client.upload_frames(out).await?;
    Ok(n)
}

/// Fetches `ids` from the coordinator, calling `each` with every chunk that arrives verified, and
/// returns the chunks it could not get, each with its error. A batch that breaks (a chunk with
/// the wrong bytes, a response that ends early or with an error) keeps the frames verified
/// before the break; the first chunk it did not deliver, the one it broke on, is asked for alone
/// through the single-chunk endpoint, and the rest as a batch again. So one bad chunk costs two
/// extra requests and fails only itself. `Err` only when the coordinator cannot be reached (or
/// no longer accepts this device): then nothing more can be fetched this round.
pub async fn fetch_verified(
    client: &Client,
    ids: &[ChunkId],
    mut each: impl FnMut(ChunkId, Bytes),
) -> Result<Vec<(ChunkId, ClientError)>, ClientError> {
    let mut failed = Vec::new();
    let mut rest = ids;
    while !rest.is_empty() {
        let mut got = 0usize;
        let batch = client
            .fetch(rest, |id, data| {
                each(id, data);
                got += 1;
                Ok(())
            })
            .await;
        let err = match batch {
            Ok(()) => break,
            Err(e) if e.code() == Some(ErrorCode::Unauthorized) => return Err(e),
            Err(e) => e,
        };
        rest = &rest[got.min(rest.len())..];
        let Some((&suspect, tail)) = rest.split_first() else { break };
        tracing::debug!(chunk = %suspect, error = %err, "chunk batch broke; fetching its next chunk alone");
        match client.fetch_one(suspect).await {
            Ok(data) => each(suspect, data),
            Err(e) if ends_round(&e) => return Err(e),
            Err(e) => failed.push((suspect, e)),
        }
        rest = tail;
    }
    Ok(failed)
}

/// `true` for errors that no other request would escape this round: the coordinator is
/// unreachable, or no longer accepts this device.
fn ends_round(e: &ClientError) -> bool {
    matches!(e, ClientError::Network { .. }) || e.code() == Some(ErrorCode::Unauthorized)
}

/// Why a file could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// The coordinator could not be reached (or refused the device): retry the round later.
    #[error(transparent)]
    Offline(ClientError),
    /// The coordinator could not deliver a chunk intact; other files are unaffected.
    #[error("chunk {id} is unavailable from the coordinator: {source}")]
    ChunkUnavailable { id: ChunkId, source: ClientError },
    /// Writing the temp file failed: a full disk, most likely.
    #[error("{}", disk_message(path, source))]
    Disk { path: PathBuf, source: std::io::Error },
    #[error("assembled file does not match its manifest hash")]
    HashMismatch,
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

/// Sources for assembling files: chunks other local files hold, and chunks already fetched.
#[derive(Default)]
pub struct Sources {
    pub local: HashMap<ChunkId, LocalChunk>,
    pub fetched: HashMap<ChunkId, Bytes>,
    open: HashMap<PathBuf, std::fs::File>,
    /// Chunks whose local copy turned out stale, so the origin is asked instead.
    stale: HashSet<ChunkId>,
}

impl Sources {
    pub fn has_local(&self, id: &ChunkId) -> bool {
        self.fetched.contains_key(id) || (self.local.contains_key(id) && !self.stale.contains(id))
    }

    /// The chunk from a local source, verified, or `None`.
    fn take_local(&mut self, c: &ChunkRef) -> Option<Vec<u8>> {
        if let Some(b) = self.fetched.get(&c.id) {
            return Some(b.to_vec());
        }
        if self.stale.contains(&c.id) {
            return None;
        }
        let loc = self.local.get(&c.id)?.clone();
        if !self.open.contains_key(&loc.file) {
            if self.open.len() > 64 {
                self.open.clear();
            }
            match std::fs::File::open(&loc.file) {
                Ok(f) => {
                    self.open.insert(loc.file.clone(), f);
                }
                Err(_) => {
                    self.stale.insert(c.id);
                    return None;
                }
            }
        }
        let f = self.open.get(&loc.file)?;
        let data = read_chunk(f, loc.offset, loc.len, &c.id);
        if data.is_none() {
            self.stale.insert(c.id);
        }
        data
    }
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

/// A spawned task that is aborted if its handle is dropped before it finishes, so an abandoned
/// assembly leaves no fetches running.
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let handle = self.0.as_mut().expect("polled after completion");
        let out = std::pin::Pin::new(handle).poll(cx);
        if out.is_ready() {
            self.0 = None;
        }
        out
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Totals of an assembly.
#[derive(Debug, Default, Clone, Copy)]
pub struct Assembled {
    pub downloaded: u64,
    pub local: u64,
    /// Bytes kept from an interrupted attempt (also counted in `local`).
    pub resumed: u64,
}

/// Writes the file `manifest` describes to `tmp`: chunks from local sources where possible, the
/// rest fetched from the coordinator in windows. Verifies the whole-file hash, sets the mode and
/// mtime, and syncs the data when `fsync` is set. Never touches the destination.
pub async fn assemble(
    client: &Client,
    sources: &mut Sources,
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

    // Plan the file as chunks served locally and windows fetched from the coordinator; a few
    // windows are fetched ahead while earlier ones are written.
    enum Seg {
        Local(usize),
        Remote,
    }
    let mut segs = Vec::new();
    let mut windows: Vec<Vec<ChunkId>> = Vec::new();
    while i < chunks.len() {
        if sources.has_local(&chunks[i].id) {
            segs.push(Seg::Local(i));
            i += 1;
            continue;
        }
        let (mut ids, mut bytes) = (Vec::new(), 0u64);
        while i < chunks.len()
            && ids.len() < FETCH_WINDOW
            && bytes < FETCH_WINDOW_BYTES
            && !sources.has_local(&chunks[i].id)
        {
            ids.push(chunks[i].id);
            bytes += u64::from(chunks[i].len);
            i += 1;
        }
        windows.push(ids);
        segs.push(Seg::Remote);
    }
    // Each window is its own task, so decryption and verification of windows in flight use
    // every core; `buffered` still hands them over in order.
    let mut fetched = futures::stream::iter(windows)
        .map(|ids| {
            let client = client.clone();
            let task = tokio::spawn(async move {
                let mut got = Vec::with_capacity(ids.len());
                match fetch_verified(&client, &ids, |_, data| got.push(data)).await {
                    Ok(failed) => match failed.into_iter().next() {
                        None => Ok(got),
                        Some((id, source)) => Err(AssembleError::ChunkUnavailable { id, source }),
                    },
                    Err(e) => Err(AssembleError::Offline(e)),
                }
            });
            AbortOnDrop(Some(task))
        })
        .buffered(FETCH_AHEAD);
    for seg in segs {
        let datas = match seg {
            Seg::Local(i) => match sources.take_local(&chunks[i]) {
                Some(d) => {
                    stats.local += d.len() as u64;
                    vec![Bytes::from(d)]
                }
                None => {
                    let id = chunks[i].id;
                    let d = match client.fetch_one(id).await {
                        Ok(d) => d,
                        Err(e) if ends_round(&e) => return Err(AssembleError::Offline(e)),
                        Err(source) => return Err(AssembleError::ChunkUnavailable { id, source }),
                    };
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

/// The permission bits of a downloaded file. Only the exec bit syncs: replacing a file keeps its
/// `existing` permission bits (so a local `chmod 600` survives updates) with the exec bits set
/// where it is readable, or cleared; a new file gets the process umask's defaults, 0666 (0777
/// when `exec`) without the `umask` bits. Never wider than the existing file, or the umask, allows.
pub fn file_mode(existing: Option<u32>, exec: bool, umask: u32) -> u32 {
    match existing {
        Some(m) => {
            let rw = m & 0o666;
            if exec { rw | (rw & 0o444) >> 2 } else { rw }
        }
        None => (if exec { 0o777 } else { 0o666 }) & !umask,
    }
}

/// The umask of this process, read once from `/proc/self/status` (setting it to read it back
/// would race with threads creating files).
pub fn process_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok()))
            })
            // Linux older than 4.7 does not show it: assume the common default, which never
            // opens a file to writes by others.
            .unwrap_or(0o022)
    })
}

pub fn system_time(ns: i64) -> std::time::SystemTime {
    let d = std::time::Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 { std::time::UNIX_EPOCH + d } else { std::time::UNIX_EPOCH - d }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let check = |existing, exec, umask, want: u32| {
            let got = file_mode(existing, exec, umask);
            assert_eq!(got, want, "{existing:?} exec={exec} umask={umask:o}: got {got:o}, want {want:o}");
        };
        check(None, false, 0o022, 0o644);
        check(None, true, 0o022, 0o755);
        check(None, false, 0o077, 0o600);
        check(None, true, 0o077, 0o700);
        check(None, true, 0o000, 0o777);
        check(Some(0o600), false, 0o022, 0o600);
        check(Some(0o600), true, 0o022, 0o700);
        check(Some(0o755), false, 0o000, 0o644);
        check(Some(0o640), true, 0o000, 0o750);
        check(Some(0o4755), true, 0o022, 0o755);
        assert_eq!(process_umask() & !0o777, 0);
    }
}
