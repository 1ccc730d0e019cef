//! Asking a peer for chunks (`shoal_protocol::peer`), one request per stream. Whatever a peer
//! sends is checked here before anyone sees it: frames must name requested chunks in request
//! order, each at most the largest chunk, each verified against its id; a peer that sends less
//! than `MIN_PROGRESS` bytes in a `STALL_TIMEOUT` without finishing a frame has failed (silent,
//! or trickling a byte now and then), and so has one slower than the floor the caller sets while
//! it knows another source holds the chunks (`Slow`). A failure names what went wrong, and the
//! caller stops asking that peer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use shoal_protocol::peer::{MAX_PEER_IDS, PeerRequest, bitmap_get, bitmap_len};
use shoal_protocol::{ChunkId, DeviceId};
use tokio_util::codec::FramedRead;
use tokio_util::io::InspectReader;

use crate::limit::Limiter;
use crate::peer::node::PeerNode;
use crate::transfer::{ChunkSource, Source, SourceFailed, verify};
use shoal_net::frames::FrameDecoder;

/// How long each step of a request may take (opening its stream, sending it, a `have`
/// answer), and the window a `get` answer's progress is judged in (`MIN_PROGRESS`).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Least a peer must send of an answer in each `STALL_TIMEOUT` in which no frame completes
/// (~200 bytes a second; a device under a `lan_limit` of 1 KiB/s sends 512 bytes every half
/// second). A peer trickling a byte now and then would otherwise hold a download for days.
const MIN_PROGRESS: u64 = 1024;

/// Why a peer's answer was not usable.
#[derive(Debug, thiserror::Error)]
pub enum PeerFetchError {
    #[error("the connection failed: {0}")]
    Connection(String),
    #[error("less than {MIN_PROGRESS} bytes of answer in {}s", STALL_TIMEOUT.as_secs())]
    Stalled,
    #[error("bad answer: {0}")]
    Bad(String),
    #[error("{rate} bytes a second, where other sources deliver {floor} or more")]
    Slow { rate: u64, floor: u64 },
}

async fn in_time<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, PeerFetchError> {
    match tokio::time::timeout(STALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(PeerFetchError::Connection(e.to_string())),
        Err(_) => Err(PeerFetchError::Stalled),
    }
}

async fn request(
    conn: &quinn::Connection,
    req: &PeerRequest,
) -> Result<(quinn::SendStream, quinn::RecvStream), PeerFetchError> {
    let (mut send, recv) = in_time(conn.open_bi()).await?;
    in_time(send.write_all(&req.encode())).await?;
    send.finish().map_err(|e| PeerFetchError::Connection(e.to_string()))?;
    Ok((send, recv))
}

/// Which of `ids` the peer says it can serve.
pub async fn have(conn: &quinn::Connection, ids: &[ChunkId]) -> Result<Vec<bool>, PeerFetchError> {
    let mut out = Vec::with_capacity(ids.len());
    for part in ids.chunks(MAX_PEER_IDS) {
        let (_send, mut recv) = request(conn, &PeerRequest::Have(part.to_vec())).await?;
        let want = bitmap_len(part.len());
        let map = in_time(recv.read_to_end(want)).await?;
        if map.len() != want {
            return Err(PeerFetchError::Bad(format!("{} bytes of bitmap for {} chunks", map.len(), part.len())));
        }
        out.extend((0..part.len()).map(|i| bitmap_get(&map, i)));
    }
    Ok(out)
}

/// Fetches `ids` from the peer, calling `each` with every chunk that arrives verified. A peer may
/// skip chunks it can no longer serve; `Ok` then just means the answer was well formed. While
/// `floor` (bytes a second) is above zero, a peer that sends less than that over a
/// `STALL_TIMEOUT` has failed (`Slow`): the caller sets it once it knows another source has the
/// chunks, and may set it at any time.
pub async fn get(
    conn: &quinn::Connection,
    ids: &[ChunkId],
    lan: &Limiter,
    floor: &AtomicU64,
    mut each: impl FnMut(ChunkId, Bytes),
) -> Result<(), PeerFetchError> {
    for part in ids.chunks(MAX_PEER_IDS) {
        let (_send, recv) = request(conn, &PeerRequest::Get(part.to_vec())).await?;
        // Bytes received so far: a slow peer (a `lan_limit`) sends a frame in many pieces, and
        // only a peer that sends less than `MIN_PROGRESS` in a `STALL_TIMEOUT` has stalled.
        let received = AtomicU64::new(0);
        let recv = InspectReader::new(recv, |b: &[u8]| {
            received.fetch_add(b.len() as u64, Ordering::Relaxed);
        });
        let mut frames = FramedRead::new(recv, FrameDecoder::default());
        let mut next = 0usize;
        // The window the rate is judged over: its start, and what had arrived by then.
        let mut window = (Instant::now(), 0u64);
        loop {
            let low = floor.load(Ordering::Relaxed);
            if low > 0 && window.0.elapsed() >= STALL_TIMEOUT {
                let now = received.load(Ordering::Relaxed);
                let rate = (now - window.1) * 1000 / (window.0.elapsed().as_millis().max(1) as u64);
                if rate < low {
                    return Err(PeerFetchError::Slow { rate, floor: low });
                }
                window = (Instant::now(), now);
            }
            // `next()` keeps what it has read in the decoder's buffer when it times out.
            let before = received.load(Ordering::Relaxed);
            let frame = match tokio::time::timeout(STALL_TIMEOUT, frames.next()).await {
                Err(_) if received.load(Ordering::Relaxed) - before >= MIN_PROGRESS => continue,
                Err(_) => return Err(PeerFetchError::Stalled),
                Ok(None) => break,
                Ok(Some(f)) => f.map_err(|e| PeerFetchError::Bad(e.to_string()))?,
            };
            let (id, data) = frame;
            let Some(at) = part[next..].iter().position(|x| *x == id) else {
                return Err(PeerFetchError::Bad(format!("chunk {id} was not asked for here")));
            };
            let data = verify(&id, data, Source::Peer).map_err(|e| PeerFetchError::Bad(e.to_string()))?;
            lan.take(data.len()).await;
            each(id, data);
            next += at + 1;
        }
    }
    Ok(())
}

/// A connected peer as a chunk source for downloads.
pub struct PeerSource {
    node: PeerNode,
    device: DeviceId,
    conn: quinn::Connection,
}

impl PeerSource {
    pub fn new(node: PeerNode, device: DeviceId, conn: quinn::Connection) -> PeerSource {
        PeerSource { node, device, conn }
    }
}

impl ChunkSource for PeerSource {
    fn kind(&self) -> Source {
        Source::Peer
    }

    fn describe(&self) -> String {
        format!("peer {}", self.node.describe(&self.device))
    }

    fn key(&self) -> String {
        format!("peer {}", self.device)
    }

    fn own_limit(&self) -> Option<u64> {
        self.node.lan_limit().rate()
    }

    fn holds<'a>(&'a self, ids: &'a [ChunkId]) -> BoxFuture<'a, Result<Vec<bool>, SourceFailed>> {
        Box::pin(async move { have(&self.conn, ids).await.map_err(|e| SourceFailed(e.to_string())) })
    }

    fn get<'a>(
        &'a self,
        ids: &'a [ChunkId],
        floor: &'a AtomicU64,
        each: &'a mut (dyn FnMut(ChunkId, Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), SourceFailed>> {
        Box::pin(async move {
            get(&self.conn, ids, self.node.lan_limit(), floor, each).await.map_err(|e| SourceFailed(e.to_string()))
        })
    }
}
