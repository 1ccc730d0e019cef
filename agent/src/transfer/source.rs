//! Where downloaded chunks come from. A `Fetcher` answers every chunk a download needs: from the
//! device's own files first (through the chunk map), then from remote sources (`Remote`): tiers
//! of [`ChunkSource`]s, nearest first (the user's other devices on the LAN that have the chunk),
//! each chunk planned to a source by `assign`, then the origin, the coordinator's chunk store,
//! for the rest. Every chunk is checked against its BLAKE3 id in `verify`, whatever its source,
//! before anyone may write it; failures are typed by source and say whether asking again later
//! can help; delivered bytes are counted per source.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use shoal_protocol::api::{ErrorBody, ErrorCode};
use shoal_protocol::{ChunkId, ChunkRef};
use tokio_util::task::AbortOnDropHandle;

use super::assign::{Holds, assign};
use crate::client::{Client, ClientError};
use crate::peer::fetch::{PeerSource, STALL_TIMEOUT};
use crate::peer::node::PeerNode;

/// Times the chunks a tier's sources should have are asked for again, from the sources still in
/// good standing, after one failed or skipped some, before the next tier is asked.
const TIER_ROUNDS: usize = 2;

/// Files kept open at once for reading local chunks.
const OPEN_FILES: usize = 64;

/// A source of chunk bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Another file in this device's folder.
    Local,
    /// Another device of the same user on the LAN.
    Peer,
    /// A regional cache.
    Relay,
    /// The coordinator's chunk store.
    Origin,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Local => "local files",
            Source::Peer => "peer",
            Source::Relay => "relay",
            Source::Origin => "coordinator",
        })
    }
}

pub use shoal_protocol::status::BytesBySource;

/// Live counters behind `BytesBySource`, shared by every download of an agent, and the rate
/// sources have been delivering at (what a peer is judged against).
#[derive(Debug, Default)]
pub struct SourceCounts([AtomicU64; 4], AtomicU64);

/// Least a transfer must move to count towards the reference rate: below it, round trips
/// dominate.
const RATE_SAMPLE_MIN: u64 = 256 * 1024;
/// A peer slower than the reference rate divided by this, while another source holds its
/// chunks, is left for that source.
const SLOWER_THAN: u64 = 16;
/// How often, while peers are slow to deliver, the origin is asked whether it now holds what
/// they were asked for.
const ORIGIN_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

impl SourceCounts {
    pub fn add(&self, from: Source, n: u64) {
        self.0[from as usize].fetch_add(n, Relaxed);
    }

    /// Notes a transfer of `bytes` in `elapsed` (any source), for the reference rate: a moving
    /// average of recent transfers large enough to tell.
    pub fn observe(&self, bytes: u64, elapsed: std::time::Duration) {
        if bytes < RATE_SAMPLE_MIN {
            return;
        }
        let rate = bytes * 1000 / (elapsed.as_millis().max(1) as u64);
        let _ = self.1.fetch_update(Relaxed, Relaxed, |old| Some(if old == 0 { rate } else { (old * 3 + rate) / 4 }));
    }

    /// Bytes a second that recent transfers achieved (0 before any was measured).
    pub fn reference_rate(&self) -> u64 {
        self.1.load(Relaxed)
    }

    pub fn snapshot(&self) -> BytesBySource {
        let [local, peer, relay, origin] = [0, 1, 2, 3].map(|i| self.0[i].load(Relaxed));
        BytesBySource { local, peer, relay, origin }
    }
}

/// Why a chunk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The origin cannot be reached, or no longer accepts this device: nothing more can be
    /// fetched this round; the whole round is tried again later.
    #[error(transparent)]
    Offline(ClientError),
    /// `from` could not deliver the chunk intact. `retry`: asking the same source again later
    /// may succeed (a server error, bytes that failed their check), as opposed to a refusal.
    #[error("chunk {id} is unavailable from the {from}: {reason}")]
    Unavailable { id: ChunkId, from: Source, retry: bool, reason: String },
}

impl FetchError {
    fn from_origin(id: ChunkId, e: ClientError) -> FetchError {
        if ends_round(&e) {
            return FetchError::Offline(e);
        }
        let retry = e.is_retryable() || matches!(e, ClientError::Protocol(_));
        FetchError::Unavailable { id, from: Source::Origin, retry, reason: e.to_string() }
    }
}

/// `true` for errors that no other request would escape this round: the coordinator is
/// unreachable, or no longer accepts this device.
fn ends_round(e: &ClientError) -> bool {
    matches!(e, ClientError::Network { .. }) || e.code() == Some(ErrorCode::Unauthorized)
}

/// The one place chunk bytes are checked: `data` is returned only if it hashes to `id`.
pub fn verify(id: &ChunkId, data: Bytes, from: Source) -> Result<Bytes, FetchError> {
    if ChunkId::of(&data) == *id {
        Ok(data)
    } else {
        Err(FetchError::Unavailable { id: *id, from, retry: true, reason: "wrong bytes".into() })
    }
}

/// Why a source could not be used; it is not asked again this round.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceFailed(pub String);

/// A remote source of chunks short of the origin: a LAN peer (`peer::fetch::PeerSource`), a
/// relay. `Remote` asks the sources of a tier which chunks they hold, plans each chunk to one
/// (`assign`), and asks the next tier, then the origin, for whatever they did not deliver.
pub trait ChunkSource: Send + Sync {
    /// What it is, for the per-source byte counts.
    fn kind(&self) -> Source;

    /// The source as logs name it.
    fn describe(&self) -> String;

    /// Tells it apart from the other sources of its tier, across rounds (the sources that failed
    /// are remembered by it).
    fn key(&self) -> String;

    /// The rate (bytes a second) this device itself holds the source to, if any: the floor a
    /// slow source is held to stays below half of it.
    fn own_limit(&self) -> Option<u64> {
        None
    }

    /// Which of `ids` it holds, a flag for each.
    fn holds<'a>(&'a self, ids: &'a [ChunkId]) -> BoxFuture<'a, Result<Vec<bool>, SourceFailed>>;

    /// Fetches `ids`, calling `each` with every chunk that arrives verified; it may skip chunks
    /// it cannot serve. While `floor` (bytes a second) is above zero, a source that delivers
    /// slower than that has failed (the caller sets it once the origin is known to hold the
    /// chunks, and may set it at any time).
    fn get<'a>(
        &'a self,
        ids: &'a [ChunkId],
        floor: &'a AtomicU64,
        each: &'a mut (dyn FnMut(ChunkId, Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), SourceFailed>>;
}

/// Where a chunk sits in a local file.
#[derive(Debug, Clone)]
pub struct LocalChunk {
    pub file: PathBuf,
    pub offset: u64,
    pub len: u32,
}

/// The origin as a chunk source: cheap to clone into the tasks that fetch windows ahead.
#[derive(Clone)]
pub struct Origin {
    client: Client,
    counts: Arc<SourceCounts>,
}

impl Origin {
    /// Fetches `ids`, calling `each` with every chunk that arrives verified, and returns the
    /// chunks it could not get, each with its error. A batch that breaks (a chunk with the wrong
    /// bytes, a response that ends early or with an error) keeps the chunks delivered before the
    /// break; the chunk it broke on is asked for alone, and the rest as a batch again. So one bad
    /// chunk costs two extra requests and fails only itself. A batch refused because the origin
    /// does not hold some of its chunks (those of a pending version, say) is answered by asking
    /// which, once: those fail, the rest come as a batch. `Err` when the origin cannot be
    /// reached or refuses the device: nothing more can be fetched this round.
    pub async fn fetch(
        &self,
        ids: &[ChunkId],
        mut each: impl FnMut(ChunkId, Bytes),
    ) -> Result<Vec<(ChunkId, FetchError)>, ClientError> {
        let mut failed = Vec::new();
        let mut queue: Vec<ChunkId> = ids.to_vec();
        let mut at = 0usize;
        let mut asked_missing = false;
        while at < queue.len() {
            let rest = &queue[at..];
            let mut got = 0usize;
            let mut bytes = 0u64;
            let started = std::time::Instant::now();
            let batch = self
                .client
                .fetch(rest, |id, data| {
                    let data = verify(&id, data, Source::Origin).map_err(|e| e.to_string())?;
                    self.counts.add(Source::Origin, data.len() as u64);
                    bytes += data.len() as u64;
                    each(id, data);
                    got += 1;
                    Ok(())
                })
                .await;
            self.counts.observe(bytes, started.elapsed());
            let err = match batch {
                Ok(()) => break,
                Err(e) if e.code() == Some(ErrorCode::Unauthorized) => return Err(e),
                Err(e) if got == 0 && e.code() == Some(ErrorCode::NotFound) && !asked_missing => {
                    asked_missing = true;
                    let lacking: HashSet<ChunkId> = match self.client.missing(rest).await {
                        Ok(ids) => ids.into_iter().collect(),
                        Err(e) if ends_round(&e) => return Err(e),
                        // Unanswered: the chunks are tried one by one, as for any broken batch.
                        Err(_) => HashSet::new(),
                    };
                    if !lacking.is_empty() {
                        for id in rest.iter().filter(|id| lacking.contains(*id)) {
                            let message = format!("chunk {id} not found");
                            let body = ErrorBody { code: ErrorCode::NotFound, message, conflicts: Vec::new() };
                            failed.push((*id, FetchError::from_origin(*id, ClientError::Api(body))));
                        }
                        queue = rest.iter().filter(|id| !lacking.contains(*id)).copied().collect();
                        at = 0;
                        continue;
                    }
                    e
                }
                Err(e) => e,
            };
            at += got.min(rest.len());
            let Some(&suspect) = queue.get(at) else { break };
            tracing::debug!(chunk = %suspect, error = %err, "chunk batch broke; fetching its next chunk alone");
            match self.fetch_one(suspect).await {
                Ok(data) => each(suspect, data),
                Err(FetchError::Offline(e)) => return Err(e),
                Err(e) => failed.push((suspect, e)),
            }
            at += 1;
        }
        Ok(failed)
    }

    /// One chunk, verified.
    pub async fn fetch_one(&self, id: ChunkId) -> Result<Bytes, FetchError> {
        let data = self.client.fetch_one(id).await.map_err(|e| FetchError::from_origin(id, e))?;
        let data = verify(&id, data, Source::Origin)?;
        self.counts.add(Source::Origin, data.len() as u64);
        Ok(data)
    }
}

/// The remote sources for one round of downloads: connected peers, the relay, then the origin. Cheap to
/// clone into the tasks that fetch windows ahead; clones share which sources have failed.
#[derive(Clone)]
pub struct Remote {
    origin: Origin,
    peers: Option<PeerNode>,
    /// The regional relay, asked after the peers.
    relay: Option<Arc<dyn ChunkSource>>,
    /// Sources (by `ChunkSource::key`) that failed this round (bad bytes or frames, a stall, a
    /// broken connection): not asked again until the next round.
    dropped: Arc<Mutex<HashSet<String>>>,
}

impl Remote {
    /// Fetches `ids` (each distinct chunk once, in no particular order), calling `each` with
    /// every chunk that arrives verified: what the peers have from them, spread across them, what
    /// they do not from the relay, the rest from the origin. Returns the chunks no source could deliver, each with its error;
    /// `Err` when the origin had to be asked and cannot be reached or refuses the device.
    pub async fn fetch(
        &self,
        ids: &[ChunkId],
        mut each: impl FnMut(ChunkId, Bytes),
    ) -> Result<Vec<(ChunkId, FetchError)>, ClientError> {
        let mut seen = HashSet::new();
        let mut rest: Vec<ChunkId> = ids.iter().filter(|id| seen.insert(**id)).copied().collect();
        if let Some(node) = &self.peers {
            let peers = || -> Vec<Arc<dyn ChunkSource>> {
                node.connections()
                    .into_iter()
                    .map(|(device, conn)| Arc::new(PeerSource::new(node.clone(), device, conn)) as Arc<dyn ChunkSource>)
                    .collect()
            };
            rest = self.ask_tier(peers, rest, &mut each).await;
        }
        if let Some(relay) = &self.relay
            && !rest.is_empty()
        {
            rest = self.ask_tier(|| vec![relay.clone()], rest, &mut each).await;
        }
        if rest.is_empty() {
            return Ok(Vec::new());
        }
        self.origin.fetch(&rest, each).await
    }

    /// One chunk, verified, from a peer or the origin.
    pub async fn fetch_one(&self, id: ChunkId) -> Result<Bytes, FetchError> {
        let mut got = None;
        let failed = self.fetch(&[id], |_, d| got = Some(d)).await.map_err(FetchError::Offline)?;
        match (got, failed.into_iter().next()) {
            (Some(d), _) => Ok(d),
            (None, Some((_, e))) => Err(e),
            (None, None) => Err(FetchError::Unavailable {
                id,
                from: Source::Origin,
                retry: true,
                reason: "no source delivered it".into(),
            }),
        }
    }

    /// Sets `floor` to a fraction of the rate sources have been delivering at, once the origin
    /// holds every chunk of `want` (asked after one `STALL_TIMEOUT`, then every
    /// `ORIGIN_RECHECK`): from then on a source much slower than the others is left for the
    /// origin. Nothing is asked while no rate has been measured; under a limit of this device's
    /// own (`cap`, its `lan_limit` for peers) the floor stays below half of it. Never returns:
    /// the caller drops it when the sources are done.
    async fn arm_floors(&self, cap: Option<u64>, want: &[ChunkId], floor: &AtomicU64) {
        let mut low = self.origin.counts.reference_rate() / SLOWER_THAN;
        if let Some(own) = cap {
            low = low.min(own / 2);
        }
        if low > 0 {
            loop {
                tokio::time::sleep(STALL_TIMEOUT).await;
                if self.origin.client.missing(want).await.is_ok_and(|m| m.is_empty()) {
                    floor.store(low, Relaxed);
                    break;
                }
                tokio::time::sleep(ORIGIN_RECHECK - STALL_TIMEOUT).await;
            }
        }
        std::future::pending::<()>().await
    }

    fn drop_source(&self, source: &dyn ChunkSource, why: &SourceFailed) {
        tracing::warn!(source = %source.describe(), reason = %why, "not asking this source again this round");
        self.dropped.lock().unwrap_or_else(|p| p.into_inner()).insert(source.key());
    }

    /// Fetches what the sources of one tier (listed afresh each round by `sources`, less those
    /// that failed) have of `want` (distinct chunks): each source says which it holds, each
    /// chunk is asked of one holder (`assign`), all sources at once. A sole source is asked for
    /// everything straight away, and what it skips it does not hold. Returns the chunks (in the
    /// order of `want`) that no source of the tier delivered.
    async fn ask_tier(
        &self,
        sources: impl Fn() -> Vec<Arc<dyn ChunkSource>>,
        want: Vec<ChunkId>,
        each: &mut impl FnMut(ChunkId, Bytes),
    ) -> Vec<ChunkId> {
        let order = want.clone();
        let mut want = want;
        let mut unheld = HashSet::new();
        for _ in 0..TIER_ROUNDS {
            let usable: Vec<Arc<dyn ChunkSource>> = {
                let dropped = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
                sources().into_iter().filter(|s| !dropped.contains(&s.key())).collect()
            };
            if usable.is_empty() || want.is_empty() {
                break;
            }
            let sole = usable.len() == 1;
            let holds: Vec<Holds> = if sole {
                vec![Holds::Unasked]
            } else {
                let answers = futures::future::join_all(usable.iter().map(|s| s.holds(&want))).await;
                answers
                    .into_iter()
                    .zip(&usable)
                    .map(|(answer, s)| match answer {
                        Ok(bits) => Holds::These(bits),
                        Err(e) => {
                            self.drop_source(s.as_ref(), &e);
                            Holds::Failed
                        }
                    })
                    .collect()
            };
            let plan = assign(want.len(), &holds);
            unheld.extend(plan.unheld.iter().map(|i| want[*i]));
            // Each source is held to a floor once the origin is known to hold everything asked
            // of the tier (see `arm_floors`); until then, a slow source is the only one there is.
            let floor = AtomicU64::new(0);
            let gets = plan.per_source.iter().zip(&usable).filter(|(list, _)| !list.is_empty()).map(|(list, s)| {
                let ids: Vec<ChunkId> = list.iter().map(|i| want[*i]).collect();
                let floor = &floor;
                async move {
                    let mut got = Vec::with_capacity(ids.len());
                    let started = std::time::Instant::now();
                    let r = s.get(&ids, floor, &mut |id, d| got.push((id, d))).await;
                    if r.is_ok() {
                        self.origin.counts.observe(got.iter().map(|(_, d)| d.len() as u64).sum(), started.elapsed());
                    }
                    (s, got, r)
                }
            });
            let cap = usable.iter().filter_map(|s| s.own_limit()).min();
            let results = tokio::select! {
                r = futures::future::join_all(gets) => r,
                () = self.arm_floors(cap, &want, &floor) => unreachable!("arm_floors never returns"),
            };
            let mut delivered = HashSet::new();
            let mut failed = false;
            for (source, got, r) in results {
                if let Err(e) = r {
                    self.drop_source(source.as_ref(), &e);
                    failed = true;
                }
                for (id, d) in got {
                    self.origin.counts.add(source.kind(), d.len() as u64);
                    delivered.insert(id);
                    each(id, d);
                }
            }
            if sole && !failed {
                // What the sole source skipped, it does not hold.
                unheld.extend(want.iter().filter(|id| !delivered.contains(id)));
            }
            want.retain(|id| !delivered.contains(id) && !unheld.contains(id));
        }
        let left: HashSet<ChunkId> = want.into_iter().chain(unheld).collect();
        order.into_iter().filter(|id| left.contains(id)).collect()
    }
}

/// Chunks being fetched ahead (`Fetcher::fetch_ahead`): what arrived, and what no source could
/// deliver. Dropping it stops the fetch.
pub struct Ahead(AbortOnDropHandle<Result<Fetched, ClientError>>);

type Fetched = (HashMap<ChunkId, Bytes>, Vec<(ChunkId, FetchError)>);

/// Answers the chunks of one round of downloads. Chunks held by local files are read (and
/// verified) when a file needs them; remote chunks are fetched ahead, a group at a time, into a
/// buffer (`fetch_ahead`), or streamed in windows by `assemble` through `remote()`.
pub struct Fetcher {
    remote: Remote,
    /// Where downloads in progress register their chunks, for peers to take.
    partials: super::Partials,
    local: HashMap<ChunkId, LocalChunk>,
    open: HashMap<PathBuf, std::fs::File>,
    /// Chunks whose local copy turned out stale, so a remote source is asked instead.
    stale: HashSet<ChunkId>,
    fetched: HashMap<ChunkId, Bytes>,
}

impl Fetcher {
    /// A fetcher for one round of downloads, asking `peers`, then `relay` (if any) before the
    /// origin.
    pub fn new(
        client: Client,
        counts: Arc<SourceCounts>,
        peers: Option<PeerNode>,
        relay: Option<Arc<dyn ChunkSource>>,
        partials: super::Partials,
    ) -> Fetcher {
        Fetcher {
            partials,
            remote: Remote { origin: Origin { client, counts }, peers, relay, dropped: Arc::default() },
            local: HashMap::new(),
            open: HashMap::new(),
            stale: HashSet::new(),
            fetched: HashMap::new(),
        }
    }

    /// Notes that a local file holds chunk `id` (a hint: it is verified when read).
    pub fn add_local(&mut self, id: ChunkId, at: LocalChunk) {
        self.local.insert(id, at);
    }

    pub fn partials(&self) -> &super::Partials {
        &self.partials
    }

    pub fn remote(&self) -> Remote {
        self.remote.clone()
    }

    /// `true` when the chunk can be had without a request: fetched already, or in a local file
    /// not yet found stale.
    pub fn is_ready(&self, id: &ChunkId) -> bool {
        self.fetched.contains_key(id) || (self.local.contains_key(id) && !self.stale.contains(id))
    }

    /// Starts fetching, in a task of its own, the chunks of `ids` that no local file holds, so
    /// that a group's chunks arrive while the group before it is written. `take_ahead` makes
    /// them the buffer.
    pub fn fetch_ahead(&self, ids: &[ChunkId]) -> Ahead {
        let mut seen = HashSet::new();
        // Not the buffer: it is the current group's, dropped before this one is taken.
        let local = |id: &ChunkId| self.local.contains_key(id) && !self.stale.contains(id);
        let need: Vec<ChunkId> = ids.iter().filter(|id| !local(id) && seen.insert(**id)).copied().collect();
        let remote = self.remote.clone();
        Ahead(AbortOnDropHandle::new(tokio::spawn(async move {
            let mut fetched = HashMap::new();
            let mut failed = Vec::new();
            for part in need.chunks(4096) {
                failed.extend(
                    remote
                        .fetch(part, |id, data| {
                            fetched.insert(id, data);
                        })
                        .await?,
                );
            }
            Ok((fetched, failed))
        })))
    }

    /// Drops the fetched buffer (before files that stream their chunks, to bound memory).
    pub fn clear_fetched(&mut self) {
        self.fetched.clear();
    }

    /// Waits for chunks fetched ahead and makes them the buffer, in place of the previous one.
    /// Returns the chunks no source could deliver; `Err` when the origin cannot be reached (see
    /// `Origin::fetch`).
    pub async fn take_ahead(&mut self, ahead: Ahead) -> Result<Vec<(ChunkId, FetchError)>, ClientError> {
        let (fetched, failed) =
            ahead.0.await.map_err(|e| ClientError::Protocol(format!("chunk fetch task failed: {e}")))??;
        self.fetched = fetched;
        Ok(failed)
    }

    /// The chunk from the buffer or a local file, verified; `None` if neither has it intact.
    /// The second value is the source it was read from now (`None` for the buffer, whose bytes
    /// were counted when fetched).
    pub fn take_ready(&mut self, c: &ChunkRef) -> Option<(Bytes, Option<Source>)> {
        if let Some(b) = self.fetched.get(&c.id) {
            return Some((b.clone(), None));
        }
        if self.stale.contains(&c.id) {
            return None;
        }
        let data = self.read_local(c);
        match &data {
            Some(d) => self.remote.origin.counts.add(Source::Local, d.len() as u64),
            None => {
                self.stale.insert(c.id);
            }
        }
        data.map(|d| (d, Some(Source::Local)))
    }

    fn read_local(&mut self, c: &ChunkRef) -> Option<Bytes> {
        let at = self.local.get(&c.id)?;
        if !self.open.contains_key(&at.file) {
            if self.open.len() >= OPEN_FILES {
                self.open.clear();
            }
            let f = std::fs::File::open(&at.file).ok()?;
            self.open.insert(at.file.clone(), f);
        }
        read_chunk(self.open.get(&at.file)?, at.offset, at.len, &c.id)
    }
}

/// Reads `len` bytes at `offset` of `file` and returns them only if they hash to `id`.
pub(super) fn read_chunk(file: &std::fs::File, offset: u64, len: u32, id: &ChunkId) -> Option<Bytes> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).ok()?;
    verify(id, Bytes::from(buf), Source::Local).ok()
}
