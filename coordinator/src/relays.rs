//! The coordinator's side of relays. An operator adds a relay (`relay add NAME --region R`, which
//! prints its token once); the relay registers with that token, saying where it listens and its
//! certificate's fingerprint, and again every heartbeat; devices list the live ones. Devices ask
//! for tickets for the chunks they want, and the coordinator signs one only for chunks the
//! user may read from the origin itself (`api::readable`: a hash is a name, never a
//! permission). A relay fetches its misses with its own token *and* the device's ticket, so a
//! relay can take from the origin only what a ticket it was shown covers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use shoal_protocol::api::{
    ChunkList, ErrorCode, MAX_CHUNK_IDS, MAX_UNAUTH_BODY, RelayInfo, RelayRegister, RelayRegistered, TicketResponse,
    TicketedFetch,
};
use shoal_protocol::ticket::{MAX_TICKET_LIST, TicketBody};
use shoal_protocol::{ChunkId, ids::to_hex};
use shoal_sys::clock::now_ms;

use crate::App;
use crate::api::{ApiJson, Auth, frames_response, readable};
use crate::error::{ApiError, ApiResult};
use crate::store::RelayRec;

/// How often a relay registers again.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A relay not heard from for this long is not listed to devices.
pub const RELAY_TTL: Duration = Duration::from_secs(3 * 30);
/// How long a ticket lets its bearer fetch: a revoked device's tickets stop working at most this
/// long after the revocation.
pub const TICKET_TTL: Duration = Duration::from_secs(10 * 60);

/// Where a registered relay listens, and when it last said so.
#[derive(Debug, Clone)]
pub(crate) struct LiveRelay {
    pub url: String,
    pub fingerprint: ChunkId,
    pub at: Instant,
}

pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/relays", get(list))
        .route("/v1/tickets", post(tickets))
        .route("/v1/relay/register", post(register))
        .route("/v1/relay/fetch", post(relay_fetch))
}

/// `true` for a relay or region name: what user names allow.
pub fn valid_relay_name(name: &str) -> bool {
    shoal_protocol::api::valid_user_name(name)
}

/// The relay behind a request's bearer token.
pub(crate) struct RelayAuth {
    relay: RelayRec,
}

impl FromRequestParts<Arc<App>> for RelayAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let unauthorized = || ApiError::new(ErrorCode::Unauthorized, "missing or invalid relay token");
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(unauthorized)?;
        let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(unauthorized)?;
        let hash = *blake3::hash(token.trim().as_bytes()).as_bytes();
        let relay = app.store.relay_by_token(&hash)?.ok_or_else(unauthorized)?;
        Ok(RelayAuth { relay })
    }
}

/// `https://HOST:PORT` with a plausible host and a port: where devices are told to connect.
fn check_url(url: &str) -> ApiResult<()> {
    let bad = || ApiError::bad(format!("relay url {url:?} is not https://HOST:PORT"));
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b));
    match port.parse::<u16>() {
        Ok(p) if p != 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

async fn register(
    State(app): State<Arc<App>>,
    auth: RelayAuth,
    ApiJson(req): ApiJson<RelayRegister, MAX_UNAUTH_BODY>,
) -> ApiResult<Json<RelayRegistered>> {
    check_url(&req.url)?;
    let RelayRec { name, region, .. } = auth.relay;
    let live = LiveRelay { url: req.url, fingerprint: req.fingerprint, at: Instant::now() };
    let fresh = app.relays.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), live.clone());
    if fresh.is_none_or(|old| old.url != live.url || old.fingerprint != live.fingerprint) {
        tracing::info!(relay = %name, region = %region, url = %live.url, fingerprint = %live.fingerprint, "relay registered");
    }
    Ok(Json(RelayRegistered {
        name,
        region,
        ticket_key: to_hex(&app.ticket_key.public_key()),
        heartbeat_secs: HEARTBEAT.as_secs(),
    }))
}

/// The relays an operator added that registered within [`RELAY_TTL`].
pub(crate) fn live_relays(app: &App) -> ApiResult<Vec<(RelayRec, LiveRelay)>> {
    let added = app.store.relays()?;
    let live = app.relays.lock().unwrap_or_else(|p| p.into_inner());
    Ok(added
        .into_iter()
        .filter_map(|r| {
            let l = live.get(&r.name).filter(|l| l.at.elapsed() < RELAY_TTL)?.clone();
            Some((r, l))
        })
        .collect())
}

async fn list(State(app): State<Arc<App>>, _auth: Auth) -> ApiResult<Json<Vec<RelayInfo>>> {
    let relays = live_relays(&app)?
        .into_iter()
        .map(|(r, l)| RelayInfo { name: r.name, region: r.region, url: l.url, fingerprint: l.fingerprint })
        .collect();
    Ok(Json(relays))
}

async fn tickets(
    State(app): State<Arc<App>>,
    auth: Auth,
    ApiJson(req): ApiJson<ChunkList>,
) -> ApiResult<Json<TicketResponse>> {
    if req.chunks.is_empty() || req.chunks.len() > MAX_TICKET_LIST {
        return Err(ApiError::bad(format!("a ticket covers 1 to {MAX_TICKET_LIST} chunks")));
    }
    for id in &req.chunks {
        readable(&app, auth.user(), id)?;
    }
    let expires_ms = now_ms() + TICKET_TTL.as_millis() as u64;
    let body = TicketBody::for_chunks(auth.user(), expires_ms, &req.chunks)
        .ok_or_else(|| ApiError::bad("no ticket for these chunks"))?;
    Ok(Json(TicketResponse { ticket: app.ticket_key.sign(&body), expires_ms }))
}

/// A relay's fetch of its misses: the device's ticket must be the coordinator's, unexpired, and
/// cover every chunk asked for, and the ticket's user must still be able to read each of them.
async fn relay_fetch(
    State(app): State<Arc<App>>,
    _auth: RelayAuth,
    ApiJson(req): ApiJson<TicketedFetch>,
) -> ApiResult<Response> {
    if req.chunks.len() > MAX_CHUNK_IDS || req.list.as_ref().is_some_and(|l| l.len() > MAX_TICKET_LIST) {
        return Err(ApiError::bad(format!("at most {MAX_CHUNK_IDS} chunk ids per request")));
    }
    let forbidden = |e: shoal_protocol::ticket::TicketError| ApiError::new(ErrorCode::Forbidden, e.to_string());
    let body = shoal_net::ticket::verify(&req.ticket, &app.ticket_key.public_key()).map_err(forbidden)?;
    body.allows_all(&req.chunks, req.list.as_deref(), now_ms()).map_err(forbidden)?;
    for id in &req.chunks {
        readable(&app, body.user, id)?;
    }
    Ok(frames_response(app, req.chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_are_https_host_and_port() {
        for ok in ["https://relay.example:8443", "https://127.0.1.1:4000", "https://[::1]:443"] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://relay:1",
            "https://relay",
            "https://:1",
            "https://relay:0",
            "https://relay:99999",
            "https://a/b:1",
            "https://a b:1",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
