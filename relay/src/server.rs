//! What the relay serves. `POST /v1/chunks/fetch` takes a [`TicketedFetch`] (the coordinator's
//! framing: the chunks' frames in request order, ending early after an error) and
//! `GET /v1/chunks/{id}` a single chunk with its ticket in the `x-shoal-ticket` header.
//!
//! Access control comes first and alone: the ticket's signature (the coordinator's key), its
//! expiry, and that it covers every chunk asked for, are checked before the cache is looked at,
//! and every refusal is the same 403 with the same body, so a refused request learns nothing of
//! what the cache holds, by its answer or by its timing. Then each chunk comes from the cache
//! (verified as it is read) or from the origin: concurrent misses for one chunk share one
//! origin fetch, which runs in a task of its own and fills the cache whoever waits for it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::{StreamExt, stream};
use shoal_protocol::ChunkId;
use shoal_protocol::api::{ErrorBody, ErrorCode, FRAME_HEADER, MAX_CHUNK_IDS, TicketedFetch};
use shoal_protocol::ticket::{MAX_TICKET_LIST, TicketBody};

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::origin::Origin;

/// Chunks looked up, and fetched from the origin, at once.
const GROUP: usize = 32;
/// Origin fetches (of a group each) that may run at once.
const ORIGIN_FETCHES: usize = 4;
/// Groups of one request read ahead of the one being sent.
const READ_AHEAD: usize = 2;
/// Largest request body: a full id list and a ticket, in JSON.
const MAX_BODY: usize = 1024 * 1024;

type Flight = Shared<BoxFuture<'static, Arc<HashMap<ChunkId, Bytes>>>>;

pub struct Relay {
    pub cache: Arc<Cache>,
    pub origin: Origin,
    pub ticket_key: [u8; 32],
    pub metrics: Arc<Metrics>,
    /// Origin fetches under way, by the chunks each will bring.
    inflight: Mutex<Flights>,
    /// Origin fetches that may run at once.
    origin_slots: tokio::sync::Semaphore,
    /// Test-only: serve every chunk with a byte flipped.
    corrupt: bool,
}

impl Relay {
    pub fn new(cache: Arc<Cache>, origin: Origin, ticket_key: [u8; 32], metrics: Arc<Metrics>, corrupt: bool) -> Relay {
        let origin_slots = tokio::sync::Semaphore::new(ORIGIN_FETCHES);
        Relay { cache, origin, ticket_key, metrics, inflight: Mutex::default(), origin_slots, corrupt }
    }
}

pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/chunks/fetch", post(fetch))
        .route("/v1/chunks/{id}", get(fetch_one))
        .fallback(|| async { error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such endpoint") })
        .with_state(relay)
}

pub fn metrics_router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(relay): State<Arc<Relay>>| async move {
                let text = relay.metrics.render(relay.cache.stats());
                ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            }),
        )
        .with_state(relay)
}

fn error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body = ErrorBody { code, message: message.to_string(), conflicts: Vec::new() };
    (status, axum::Json(body)).into_response()
}

/// The one refusal: the same status and body whatever was wrong with the ticket.
fn refused(relay: &Relay) -> Response {
    relay.metrics.rejected_tickets.inc();
    error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, "ticket refused")
}

/// `true` if `ticket` lets its bearer have every chunk of `ids` now.
fn permitted(relay: &Relay, ticket: &str, list: Option<&[ChunkId]>, ids: &[ChunkId]) -> bool {
    let Ok(body) = shoal_net::ticket::verify(ticket, &relay.ticket_key) else {
        return false;
    };
    let now = shoal_sys::clock::now_ms();
    covers(&body, list, ids, now)
}

fn covers(body: &TicketBody, list: Option<&[ChunkId]>, ids: &[ChunkId], now: u64) -> bool {
    !ids.is_empty() && body.allows_all(ids, list, now).is_ok()
}

async fn fetch(State(relay): State<Arc<Relay>>, req: Request) -> Response {
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), MAX_BODY).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::BodyTooLarge, "request body too large");
    };
    let req: TicketedFetch = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, ErrorCode::InvalidJson, &format!("malformed request body: {e}"));
        }
    };
    if req.chunks.len() > MAX_CHUNK_IDS || req.list.as_ref().is_some_and(|l| l.len() > MAX_TICKET_LIST) {
        return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "too many chunk ids");
    }
    if !permitted(&relay, &req.ticket, req.list.as_deref(), &req.chunks) {
        return refused(&relay);
    }
    let groups: Vec<Vec<ChunkId>> = req.chunks.chunks(GROUP).map(<[ChunkId]>::to_vec).collect();
    let ticket: Arc<(String, Option<Vec<ChunkId>>)> = Arc::new((req.ticket, req.list));
    let body = stream::iter(groups)
        .map(move |ids| {
            let (relay, ticket) = (relay.clone(), ticket.clone());
            async move { relay.obtain(&ticket.0, ticket.1.as_deref(), &ids).await }
        })
        .buffered(READ_AHEAD)
        .scan(false, |failed, got| {
            // Nothing is sent after a failure: the frames that follow would be out of order.
            if *failed {
                return futures::future::ready(None);
            }
            let mut items: Vec<Result<Bytes, std::io::Error>> = Vec::with_capacity(got.len());
            for item in got {
                match item {
                    Ok((_, frame)) => items.push(Ok(frame)),
                    Err(e) => {
                        *failed = true;
                        items.push(Err(std::io::Error::other(e)));
                        break;
                    }
                }
            }
            futures::future::ready(Some(stream::iter(items)))
        })
        .flatten();
    ([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(body)).into_response()
}

async fn fetch_one(State(relay): State<Arc<Relay>>, id: Path<String>, headers: HeaderMap) -> Response {
    let ticket = headers.get("x-shoal-ticket").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let Ok(id) = id.0.parse::<ChunkId>() else {
        return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "bad chunk id");
    };
    if !permitted(&relay, ticket, None, &[id]) {
        return refused(&relay);
    }
    match relay.obtain(ticket, None, &[id]).await.pop() {
        Some(Ok((_, frame))) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], frame.slice(FRAME_HEADER..)).into_response()
        }
        Some(Err(e)) => error(StatusCode::BAD_GATEWAY, ErrorCode::ChunkUnavailable, &e),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "no answer"),
    }
}

impl Relay {
    /// The frames of `ids` (a ticket covering them was checked), in order, each from the cache
    /// or the origin; the first chunk that cannot be had ends the list with why.
    async fn obtain(
        self: &Arc<Self>,
        ticket: &str,
        list: Option<&[ChunkId]>,
        ids: &[ChunkId],
    ) -> Vec<Result<(ChunkId, Bytes), String>> {
        let cache = self.cache.clone();
        let look: Vec<ChunkId> = ids.to_vec();
        let cached: Vec<Option<Bytes>> = tokio::task::spawn_blocking(move || cache.read_frames(&look))
            .await
            .unwrap_or_else(|_| vec![None; ids.len()]);
        let misses: Vec<ChunkId> = ids.iter().zip(&cached).filter(|(_, c)| c.is_none()).map(|(id, _)| *id).collect();
        let fetched = if misses.is_empty() { HashMap::new() } else { self.from_origin(ticket, list, &misses).await };
        let mut out = Vec::with_capacity(ids.len());
        for (id, hit) in ids.iter().zip(cached) {
            let frame = match hit {
                Some(f) => {
                    self.metrics.cache_hits.inc();
                    f
                }
                None => {
                    self.metrics.cache_misses.inc();
                    match fetched.get(id) {
                        Some(f) => f.clone(),
                        None => {
                            out.push(Err(format!("chunk {id} is unavailable from the origin")));
                            return out;
                        }
                    }
                }
            };
            self.metrics.bytes_served.inc_by((frame.len() - FRAME_HEADER) as u64);
            out.push(Ok((*id, self.maybe_corrupt(frame))));
        }
        out
    }

    /// Test-only (`corrupt`): the frame with its first byte of data flipped.
    fn maybe_corrupt(&self, frame: Bytes) -> Bytes {
        if !self.corrupt || frame.len() <= FRAME_HEADER {
            return frame;
        }
        let mut v = frame.to_vec();
        v[FRAME_HEADER] ^= 0xff;
        Bytes::from(v)
    }

    /// The frames of `misses` from the origin, joining fetches already under way for any of
    /// them: each chunk is fetched once however many requests want it at the same time. A chunk
    /// whose fetch ended since this request looked in the cache (it is `Landed` in the table for
    /// a while) is read from the cache instead; the cache itself is never consulted under the
    /// table's lock, which async workers take.
    async fn from_origin(
        self: &Arc<Self>,
        ticket: &str,
        list: Option<&[ChunkId]>,
        misses: &[ChunkId],
    ) -> HashMap<ChunkId, Bytes> {
        let (mut flights, landed) = self.join_or_start(ticket, list, misses, true);
        let mut out = HashMap::new();
        if !landed.is_empty() {
            let cache = self.cache.clone();
            let read = tokio::task::spawn_blocking(move || {
                let frames = cache.read_frames(&landed);
                landed.into_iter().zip(frames).collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let mut lost = Vec::new();
            for (id, frame) in read {
                match frame {
                    Some(f) => {
                        out.insert(id, f);
                    }
                    None => lost.push(id),
                }
            }
            // Gone again (evicted, or failed its check): fetched after all.
            if !lost.is_empty() {
                flights.extend(self.join_or_start(ticket, list, &lost, false).0);
            }
        }
        for got in futures::future::join_all(flights).await {
            for id in misses {
                if let Some(d) = got.get(id) {
                    out.insert(*id, d.clone());
                }
            }
        }
        out
    }

    /// Under the table's lock: the fetches under way that bring any of `ids`, a new one for the
    /// rest, and (if `use_landed`) the ids whose fetch ended lately, to read from the cache.
    fn join_or_start(
        self: &Arc<Self>,
        ticket: &str,
        list: Option<&[ChunkId]>,
        ids: &[ChunkId],
        use_landed: bool,
    ) -> (Vec<Flight>, Vec<ChunkId>) {
        let mut table = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        table.sweep();
        let (mut flights, mut landed, mut mine): (Vec<Flight>, Vec<ChunkId>, Vec<ChunkId>) = Default::default();
        for id in ids {
            match table.slots.get(id) {
                Some(Slot::Flying(_, f)) if !flights.iter().any(|g| g.ptr_eq(f)) => flights.push(f.clone()),
                Some(Slot::Flying(..)) => {}
                Some(Slot::Landed(_)) if use_landed => landed.push(*id),
                _ if !mine.contains(id) => mine.push(*id),
                _ => {}
            }
        }
        if !mine.is_empty() {
            table.next += 1;
            let number = table.next;
            let flight = self.start_flight(number, ticket.to_string(), list.map(<[ChunkId]>::to_vec), mine.clone());
            for id in mine {
                table.slots.insert(id, Slot::Flying(number, flight.clone()));
            }
            flights.push(flight);
        }
        (flights, landed)
    }

    /// Origin fetch `number` of `ids`, in a task of its own: it fills the cache, then marks its
    /// chunks landed in the table, even if every request waiting for it goes away.
    fn start_flight(
        self: &Arc<Self>,
        number: u64,
        ticket: String,
        list: Option<Vec<ChunkId>>,
        ids: Vec<ChunkId>,
    ) -> Flight {
        let relay = self.clone();
        let task = tokio::spawn(async move {
            let got = {
                // A few fetches at a time: each holds its answer in memory until it is cached.
                let _slot = relay.origin_slots.acquire().await;
                relay.metrics.origin_requests.inc();
                let (got, err) = relay.origin.fetch(&ticket, list.as_deref(), &ids).await;
                if let Some(e) = err {
                    tracing::warn!(chunks = ids.len(), delivered = got.len(), error = %e, "origin fetch fell short");
                }
                relay.metrics.origin_bytes.inc_by(got.iter().map(|(_, f)| (f.len() - FRAME_HEADER) as u64).sum());
                let cache = relay.cache.clone();
                let store: Vec<(ChunkId, Bytes)> = got.iter().map(|(id, f)| (*id, f.slice(FRAME_HEADER..))).collect();
                let stored = tokio::task::spawn_blocking(move || cache.insert(&store)).await;
                if let Ok(Err(e)) = stored {
                    tracing::warn!(error = %e, "could not cache fetched chunks");
                }
                got
            };
            relay.inflight.lock().unwrap_or_else(|p| p.into_inner()).land(number, &ids);
            Arc::new(got.into_iter().collect::<HashMap<_, _>>())
        });
        let relay = self.clone();
        task.map(move |r| {
            // The task only ends early if it panicked: its chunks must not stay "in flight".
            if r.is_err() {
                relay.inflight.lock().unwrap_or_else(|p| p.into_inner()).forget(number);
            }
            r.unwrap_or_default()
        })
        .boxed()
        .shared()
    }
}

/// How long a chunk whose fetch ended stays `Landed` in the table.
const LANDED_FOR: Duration = Duration::from_secs(10);

enum Slot {
    /// Being fetched by flight number `.0`.
    Flying(u64, Flight),
    /// Fetched (and cached) at this time.
    Landed(Instant),
}

/// The origin fetches under way, by chunk, and the chunks fetched lately.
#[derive(Default)]
struct Flights {
    slots: HashMap<ChunkId, Slot>,
    /// Landed chunks in the order they landed, for `sweep`.
    landed: VecDeque<(Instant, ChunkId)>,
    next: u64,
}

impl Flights {
    /// Marks flight `number`'s chunks landed (those another flight took over are left alone).
    fn land(&mut self, number: u64, ids: &[ChunkId]) {
        let now = Instant::now();
        for id in ids {
            if matches!(self.slots.get(id), Some(Slot::Flying(n, _)) if *n == number) {
                self.slots.insert(*id, Slot::Landed(now));
                self.landed.push_back((now, *id));
            }
        }
    }

    /// Drops every slot of flight `number`.
    fn forget(&mut self, number: u64) {
        self.slots.retain(|_, s| !matches!(s, Slot::Flying(n, _) if *n == number));
    }

    /// Drops the chunks that landed more than `LANDED_FOR` ago.
    fn sweep(&mut self) {
        while let Some((at, id)) = self.landed.front().copied() {
            if at.elapsed() < LANDED_FOR {
                break;
            }
            self.landed.pop_front();
            if matches!(self.slots.get(&id), Some(Slot::Landed(t)) if *t == at) {
                self.slots.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use shoal_protocol::ticket::TicketBody;

    use super::*;

    #[test]
    fn a_ticket_covers_a_request_only_whole_and_unexpired() {
        let ids: Vec<ChunkId> = (0..3u8).map(|i| ChunkId::of(&[i])).collect();
        let t = TicketBody::for_chunks(1, 100, &ids[..2]).unwrap();
        assert!(covers(&t, None, &ids[..2], 99));
        assert!(!covers(&t, None, &ids, 99), "one chunk not covered refuses the request");
        assert!(!covers(&t, None, &ids[..1], 100), "expired");
        assert!(!covers(&t, None, &[], 0), "nothing asked, nothing granted");
    }
}
