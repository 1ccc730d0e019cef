//! Answering a peer's chunk requests (`shoal_protocol::peer`). Chunks are served from this
//! device's own files, found through the chunk map, or from memory if hashed lately
//! (`transfer::RecentChunks`: small files a scan just committed, which peers ask for at once).
//! The open file's stat (size, mtime, ctime, inode, mode) is checked against its index record
//! when it is opened and again after each chunk is read: a file changed since it was hashed is
//! not served (from then on), and the peer asks another source for those chunks. (The receiver
//! verifies every chunk anyway; the check keeps a changed file from costing the peer a round.
//! Hashing each chunk again here cost a third of this device's CPU per transfer.) Chunks of
//! downloads still in progress are served from their temp files (`transfer::Partials`), once
//! written. Only connections the roster admitted get here.
//!
//! Per peer, the transport bounds the requests open at once (`PEER_STREAMS`) and the bytes in
//! flight (`PEER_WINDOW`); each request reads at most `READ_AHEAD` batches of chunks ahead of the
//! network. Chunks pass from the reading thread to the sending task in batches (`Batcher`): one
//! handoff per small chunk cost a thread wakeup each, which was most of what serving a small file
//! from disk added over serving it from memory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use shoal_protocol::ChunkId;
use shoal_protocol::api::FRAME_HEADER;
use shoal_protocol::peer::{MAX_PEER_REQUEST, PeerRequest, encode_bitmap};

use crate::limit::{Limiter, PeerServing};
use crate::store::{IndexRec, Store};
use crate::transfer::{Partials, RecentChunks};

/// How long a peer may take to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches of chunks read ahead of the network, per request.
const READ_AHEAD: usize = 4;
/// A batch is handed to the sending task once it holds this many chunks or bytes (a large chunk
/// goes alone).
const BATCH_CHUNKS: usize = 64;
const BATCH_BYTES: usize = 256 * 1024;
/// Files kept open per request.
const OPEN_FILES: usize = 16;
/// Most bytes written at a time under a `lan_limit` (less at low rates: `Limiter::piece`).
const LIMITED_PIECE: usize = 16 * 1024;

/// What this device can serve to its peers. Cheap to clone.
#[derive(Clone)]
pub struct ChunkServer {
    store: Store,
    root: PathBuf,
    /// Chunks of downloads in progress.
    partials: Partials,
    /// Chunks of small files hashed lately: served without opening the files.
    recent: RecentChunks,
    /// `lan_limit`, shared with what this device fetches from peers.
    lan: Limiter,
    /// Noted at every chunk sent: origin uploads give way to it.
    serving: PeerServing,
}

impl ChunkServer {
    pub fn new(
        store: Store,
        root: PathBuf,
        lan: Limiter,
        partials: Partials,
        recent: RecentChunks,
        serving: PeerServing,
    ) -> ChunkServer {
        ChunkServer { store, root, lan, partials, recent, serving }
    }

    /// Answers the requests a peer opens on `conn` until the connection closes.
    pub async fn serve(self, conn: quinn::Connection) {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.answer(send, recv).await {
                    tracing::debug!(error = %format!("{e:#}"), "peer request failed");
                }
            });
        }
    }

    async fn answer(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> anyhow::Result<()> {
        let req = match tokio::time::timeout(REQUEST_TIMEOUT, recv.read_to_end(MAX_PEER_REQUEST)).await {
            Ok(Ok(b)) => PeerRequest::decode(&b),
            Ok(Err(e)) => anyhow::bail!("reading the request: {e}"),
            Err(_) => anyhow::bail!("request not sent in time"),
        };
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                let _ = send.reset(1u32.into());
                anyhow::bail!("bad request: {e}");
            }
        };
        match req {
            PeerRequest::Have(ids) => {
                let server = self.clone();
                let map = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
                    let held = server.store.chunk_locations(&ids)?;
                    Ok(encode_bitmap(ids.iter().map(|id| {
                        held.contains_key(id) || server.recent.contains(id) || server.partials.find(id).is_some()
                    })))
                })
                .await??;
                send.write_all(&map).await?;
            }
            PeerRequest::Get(ids) => self.send_chunks(&mut send, ids).await?,
        }
        send.finish()?;
        // Lets the last bytes reach the peer before the stream is dropped.
        let _ = send.stopped().await;
        Ok(())
    }

    /// Streams the frames of the chunks of `ids` this device can read intact now, in order.
    async fn send_chunks(&self, send: &mut quinn::SendStream, ids: Vec<ChunkId>) -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(ChunkId, Bytes)>>(READ_AHEAD);
        let server = self.clone();
        let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut out = Batcher { tx, chunks: Vec::new(), bytes: 0 };
            let mut recent = server.recent.get_many(&ids);
            let rest: Vec<ChunkId> = ids.iter().filter(|id| !recent.contains_key(id)).copied().collect();
            let locs = server.store.chunk_locations(&rest)?;
            // Each file opened once per request, and only if it is as indexed (else `None`).
            let mut open: HashMap<PathBuf, Option<(std::fs::File, IndexRec)>> = HashMap::new();
            // Index pages decoded once per request: a request for many small files of one
            // directory reads its page once.
            let mut pages = crate::store::PageCache::default();
            for id in ids {
                if let Some(data) = recent.remove(&id) {
                    if !out.push(id, data) {
                        break;
                    }
                    continue;
                }
                let Some(at) = locs.get(&id) else {
                    // A chunk of a download in progress, verified when it was written.
                    let Some((tmp, offset, len)) = server.partials.find(&id) else { continue };
                    let Ok(f) = std::fs::File::open(&tmp) else { continue };
                    let Some(data) = read_at(&f, offset, len) else { continue };
                    if !out.push(id, data) {
                        break;
                    }
                    continue;
                };
                let path = at.path.to_local(&server.root);
                if !open.contains_key(&path) {
                    if open.len() >= OPEN_FILES {
                        open.clear();
                    }
                    let f = server.open_unchanged(&at.path, &path, &mut pages);
                    open.insert(path.clone(), f);
                }
                let Some(Some((f, rec))) = open.get(&path) else { continue };
                let Some(data) = read_at(f, at.offset, at.len) else { continue };
                // Written to while it was read (in place, same inode): no more of it is served.
                if !unchanged(f, rec) {
                    open.insert(path, None);
                    continue;
                }
                if !out.push(id, data) {
                    break;
                }
            }
            out.flush();
            Ok(())
        });
        #[cfg(feature = "test-faults")]
        let fault = faults::current();
        let mut header = [0u8; FRAME_HEADER];
        while let Some(batch) = rx.recv().await {
            for (id, data) in batch {
                header[..32].copy_from_slice(id.as_bytes());
                header[32..].copy_from_slice(&(data.len() as u32).to_be_bytes());
                #[cfg(feature = "test-faults")]
                if let Some(f) = fault {
                    return faults::misbehave(f, send, &header, &data).await;
                }
                // Under a `lan_limit`, paced piece by piece so a slow limit never leaves the peer
                // waiting in silence for a whole frame; otherwise one piece. Handed over without a copy.
                let size = self.lan.piece(LIMITED_PIECE).unwrap_or(data.len()).max(1);
                self.serving.note();
                self.lan.take(FRAME_HEADER).await;
                send.write_all(&header).await?;
                let mut at = 0;
                while at < data.len() {
                    let piece = data.slice(at..data.len().min(at + size));
                    at += piece.len();
                    self.lan.take(piece.len()).await;
                    send.write_chunk(piece).await?;
                }
            }
        }
        reader.await??;
        Ok(())
    }
}

/// Chunks on their way from the reading thread to the sending task, handed over in batches.
struct Batcher {
    tx: tokio::sync::mpsc::Sender<Vec<(ChunkId, Bytes)>>,
    chunks: Vec<(ChunkId, Bytes)>,
    bytes: usize,
}

impl Batcher {
    /// Adds a chunk, handing the batch over once it is full. `false` once the sender is gone.
    fn push(&mut self, id: ChunkId, data: Bytes) -> bool {
        self.bytes += data.len();
        self.chunks.push((id, data));
        self.chunks.len() < BATCH_CHUNKS && self.bytes < BATCH_BYTES || self.flush()
    }

    /// Hands over what the batch holds. `false` once the sender is gone.
    fn flush(&mut self) -> bool {
        self.bytes = 0;
        self.chunks.is_empty() || self.tx.blocking_send(std::mem::take(&mut self.chunks)).is_ok()
    }
}

impl ChunkServer {
    /// The file at `local`, open, if it still has the stat its index record (for `path`) was
    /// taken with; with that record.
    fn open_unchanged(
        &self,
        path: &shoal_protocol::SyncPath,
        local: &std::path::Path,
        pages: &mut crate::store::PageCache,
    ) -> Option<(std::fs::File, IndexRec)> {
        let rec = self.store.get_cached(path, pages).ok()?.index?;
        let f = std::fs::File::open(local).ok()?;
        unchanged(&f, &rec).then_some((f, rec))
    }
}

/// `true` if the open file still has the stat of its index record.
fn unchanged(f: &std::fs::File, rec: &IndexRec) -> bool {
    f.metadata().is_ok_and(|m| crate::scan::stat_rec(&m).same_stat(rec))
}

/// `len` bytes at `offset` of `file` (`None` if the file is shorter).
fn read_at(file: &std::fs::File, offset: u64, len: u32) -> Option<Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(Bytes::from(buf))
}

/// Test-only ways for a device to serve bad bytes, chosen by failpoint `peer-serve`
/// (`corrupt`, `truncate`, `endless`, `stall`, `trickle` or `slow`). Compiled only with the `test-faults` feature,
/// which the end-to-end tests enable.
#[cfg(feature = "test-faults")]
mod faults {
    #[derive(Debug, Clone, Copy)]
    pub enum Fault {
        /// Every chunk with one byte flipped.
        Corrupt,
        /// The first frame cut off halfway, then the stream ends.
        Truncate,
        /// Bytes forever.
        Endless,
        /// The first frame's header, then nothing, with the stream held open.
        Stall,
        /// The first frame's header, then one byte of it a second.
        Trickle,
        /// Every frame, a KiB every four seconds: never silent for long, hopelessly slow.
        Slow,
    }

    pub fn current() -> Option<Fault> {
        match shoal_sys::failpoints::value("peer-serve")?.as_str() {
            "corrupt" => Some(Fault::Corrupt),
            "truncate" => Some(Fault::Truncate),
            "endless" => Some(Fault::Endless),
            "stall" => Some(Fault::Stall),
            "trickle" => Some(Fault::Trickle),
            "slow" => Some(Fault::Slow),
            _ => None,
        }
    }

    pub async fn misbehave(f: Fault, send: &mut quinn::SendStream, header: &[u8], data: &[u8]) -> anyhow::Result<()> {
        match f {
            Fault::Corrupt => {
                let mut bad = data.to_vec();
                if let Some(b) = bad.first_mut() {
                    *b ^= 0xff;
                }
                send.write_all(header).await?;
                send.write_all(&bad).await?;
            }
            Fault::Truncate => {
                send.write_all(header).await?;
                send.write_all(&data[..data.len() / 2]).await?;
            }
            Fault::Endless => loop {
                send.write_all(header).await?;
                send.write_all(data).await?;
            },
            Fault::Stall => {
                send.write_all(header).await?;
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            }
            Fault::Slow => {
                send.write_all(header).await?;
                for piece in data.chunks(1024) {
                    send.write_all(piece).await?;
                    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
                }
            }
            Fault::Trickle => {
                send.write_all(header).await?;
                for b in data.chunks(1) {
                    send.write_all(b).await?;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        Ok(())
    }
}
