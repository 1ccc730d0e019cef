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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
    inflight: Mutex<HashMap<ChunkId, Flight>>,
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
    !ids.is_empty() && ids.iter().all(|id| body.allows(id, list, now).is_ok())
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

    /// The frames of `misses` from the origin, joining fetches already under way for any of them: each chunk
    /// is fetched once however many requests want it at the same time.
    async fn from_origin(
        self: &Arc<Self>,
        ticket: &str,
        list: Option<&[ChunkId]>,
        misses: &[ChunkId],
    ) -> HashMap<ChunkId, Bytes> {
        let mut flights: Vec<Flight> = Vec::new();
        // Fetched by a flight that ended after this request looked in the cache (a flight
        // fills the cache before it leaves the table).
        let mut landed = Vec::new();
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            let mut mine = Vec::new();
            for id in misses {
                match inflight.get(id) {
                    Some(f) if !flights.iter().any(|g| g.ptr_eq(f)) => flights.push(f.clone()),
                    Some(_) => {}
                    None if self.cache.contains(id) => landed.push(*id),
                    None if !mine.contains(id) => mine.push(*id),
                    None => {}
                }
            }
            if !mine.is_empty() {
                let flight = self.start_flight(ticket.to_string(), list.map(<[ChunkId]>::to_vec), mine.clone());
                for id in mine {
                    inflight.insert(id, flight.clone());
                }
                flights.push(flight);
            }
        }
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
            for (id, data) in read {
                match data {
                    Some(f) => {
                        out.insert(id, f);
                    }
                    None => lost.push(id),
                }
            }
            // Gone again (evicted, or failed its check): fetched after all.
            if !lost.is_empty() {
                flights.push(self.start_flight(ticket.to_string(), list.map(<[ChunkId]>::to_vec), lost));
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

    /// One origin fetch of `ids`, in a task of its own: it fills the cache and leaves the
    /// in-flight table even if every request waiting for it goes away.
    fn start_flight(self: &Arc<Self>, ticket: String, list: Option<Vec<ChunkId>>, ids: Vec<ChunkId>) -> Flight {
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
            let mut inflight = relay.inflight.lock().unwrap_or_else(|p| p.into_inner());
            for id in &ids {
                inflight.remove(id);
            }
            Arc::new(got.into_iter().collect::<HashMap<_, _>>())
        });
        task.map(|r| r.unwrap_or_default()).boxed().shared()
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
