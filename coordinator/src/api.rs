//! The `/v1` HTTPS API: routing, authentication and the handlers. Handlers validate everything
//! from the network before touching the store; a refused request changes nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use shoal_protocol::api::*;
use shoal_protocol::path::Escaped;
use shoal_protocol::{CHUNK_PARAMS, ChunkId, DeviceId, Entry, Seq, SyncPath};
use shoal_sys::clock::now_ms;

use crate::error::{ApiError, ApiResult};
use crate::revocation::{self, Decision, Standing};
use crate::service::blocking;
use crate::store::{CommitOutcome, DeviceRec, UserId};
use crate::{Actor, App};

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/enroll", post(enroll))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{id}/revoke", post(revoke))
        .route("/v1/chunks/missing", post(missing))
        .route("/v1/chunks", post(upload_batch))
        .route("/v1/chunks/fetch", post(fetch_batch))
        .route("/v1/chunks/{id}", put(upload_one).get(download_one))
        .route("/v1/commit", post(commit))
        .route("/v1/changes", get(changes))
        .route("/v1/subscribe", get(subscribe))
        .route("/v1/tree", get(tree))
        .route("/v1/history", get(history))
        .route("/v1/cursor", post(cursor))
        .route("/v1/peers", post(peers))
        .route("/v1/pending", get(pending))
        .route("/v1/usage", get(usage))
        .route("/v1/pending/withdraw", post(withdraw))
        .merge(crate::relays::routes())
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

/// The routes of the separate metrics listener: `/metrics` and `/healthz`. Kept off the public
/// listener because the counters describe every user's activity.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .with_state(app)
}

async fn count_requests(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    app.metrics.requests.inc();
    let resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        app.metrics.errors.inc();
    }
    resp
}

/// The authenticated device behind a request's bearer token.
pub struct Auth {
    pub device: DeviceRec,
}

impl Auth {
    pub(crate) fn user(&self) -> UserId {
        self.device.user
    }
}

impl FromRequestParts<Arc<App>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let unauthorized =
            || ApiError::new(ErrorCode::Unauthorized, "missing or invalid device token; re-enroll the device");
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(unauthorized)?;
        let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(unauthorized)?;
        let hash = *blake3::hash(token.trim().as_bytes()).as_bytes();
        let device = app.store.device_by_token(&hash)?.ok_or_else(unauthorized)?;
        if device.revoked {
            return Err(ApiError::new(ErrorCode::Unauthorized, "this device has been revoked"));
        }
        Ok(Auth { device })
    }
}

/// A JSON body read with a size limit (`LIMIT` bytes, checked against the declared length before
/// anything is read); malformed JSON is `invalid_json`, too big is `body_too_large`.
pub struct ApiJson<T, const LIMIT: usize = MAX_JSON_BODY>(pub T);

/// Bodies past this size are parsed on a blocking thread: a commit of thousands of long paths
/// takes a while to parse and validate, and must not hold up the async threads meanwhile.
const PARSE_INLINE_BYTES: usize = 64 * 1024;

impl<T: DeserializeOwned + Send + 'static, S: Send + Sync, const LIMIT: usize> FromRequest<S> for ApiJson<T, LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req, LIMIT).await?;
        if bytes.len() <= PARSE_INLINE_BYTES {
            return parse_json(&bytes).map(ApiJson);
        }
        blocking(move || parse_json(&bytes)).await.map(ApiJson)
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        // SyncPath's deserializer prefixes its errors with "invalid path".
        let code =
            if e.to_string().starts_with("invalid path") { ErrorCode::InvalidPath } else { ErrorCode::InvalidJson };
        ApiError::new(code, format!("malformed request body: {e}"))
    })
}

async fn read_body(req: Request, limit: usize) -> ApiResult<Bytes> {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(len) = declared
        && len > limit as u64
    {
        // Read and drop a moderately oversized body so an HTTP/1.1 client sees the 413 instead of
        // a reset connection; anything larger is cut off at once.
        if len <= 4 * limit as u64 {
            let mut body = req.into_body().into_data_stream();
            while let Some(Ok(_)) = futures::StreamExt::next(&mut body).await {}
        }
        return Err(too_large(limit));
    }
    axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| too_large(limit))
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::BodyTooLarge, format!("request body exceeds {limit} bytes"))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t).map_err(|e| ApiError::bad(format!("bad query string: {e}")))
}

fn parse_path(s: &str) -> ApiResult<SyncPath> {
    SyncPath::parse(s).map_err(|e| ApiError::new(ErrorCode::InvalidPath, format!("invalid path {s:?}: {e}")))
}

fn chunk_id(p: Result<Path<String>, PathRejection>) -> ApiResult<ChunkId> {
    let Path(s) = p.map_err(|e| ApiError::bad(e.to_string()))?;
    s.parse().map_err(|e| ApiError::bad(format!("bad chunk id: {e}")))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let (pending_versions, oldest) = app.store.pending_stats().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "pending versions not counted");
        (0, None)
    });
    let store = app.store.clone();
    let stalled_before = now_ms().saturating_sub(app.stuck_after_ms);
    let stuck = blocking(move || Ok(store.stuck_count(stalled_before)?)).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e.0.message, "stuck pending versions not counted");
        0
    });
    let text = app.metrics.render(crate::metrics::Scraped {
        users: app.store.user_count(),
        corrupt_chunks: app.chunks.corrupt_count(),
        pending_versions,
        pending_stuck: stuck,
        pending_oldest_seconds: oldest.map_or(0, |t| now_ms().saturating_sub(t) / 1000),
        storage_requests: app.chunks.request_counts(),
        storage_cache_reads: app.chunks.cache_reads(),
    });
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

/// Largest certificate request accepted at enrollment.
const MAX_CSR_BYTES: usize = 8 * 1024;

// ---- enrollment and devices ----

async fn enroll(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<EnrollRequest, MAX_UNAUTH_BODY>,
) -> ApiResult<Json<EnrollResponse>> {
    if !valid_device_name(&req.device_name) {
        return Err(ApiError::bad("device name must be 1-64 printable characters"));
    }
    if req.csr.len() > MAX_CSR_BYTES {
        return Err(ApiError::bad("certificate request too large"));
    }
    // The invite is checked before anything that depends on the user, and every refusal reads the
    // same, so the answer reveals neither which users nor which invites exist.
    let invalid = || {
        ApiError::new(
            ErrorCode::InviteInvalid,
            "the invite is unknown, already used, expired, or for another user; ask for a new one",
        )
    };
    let secret_hash = *blake3::hash(req.secret.as_bytes()).as_bytes();
    let user = match app.store.invite(&secret_hash, now_ms())? {
        Ok(user) if user.name == req.user => user,
        Ok(_) | Err(_) => return Err(invalid()),
    };
    let token = shoal_sys::random::hex(32);
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
    let ca = shoal_net::ca::UserCa { cert: user.ca_cert.clone(), key: user.ca_key.clone() };
    let cert = match shoal_net::ca::sign_device(&ca, &req.csr, &DeviceId(id)) {
        Ok(c) => c,
        Err(shoal_net::ca::CaError::BadRequest(e)) => {
            return Err(ApiError::bad(format!("bad certificate request: {e}")));
        }
        Err(e) => {
            tracing::error!(error = %e, "signing a device certificate failed");
            return Err(ApiError::new(ErrorCode::Internal, "could not sign the device certificate"));
        }
    };
    let now = now_ms();
    let dev = DeviceRec {
        id: DeviceId(id),
        user: user.id,
        name: req.device_name,
        token_hash: *blake3::hash(token.as_bytes()).as_bytes(),
        enrolled_ms: now,
        last_seen_ms: now,
        cursor: 0,
        revoked: false,
        cert,
    };
    if !app.store.enroll(&secret_hash, &dev)? {
        return Err(invalid());
    }
    app.store.flush().await?;
    app.device_list_changed(user.id);
    tracing::info!(user = %user.name, device = %dev.id, name = %Escaped(&dev.name), "device enrolled");
    Ok(Json(EnrollResponse {
        device_id: dev.id,
        token,
        cert: shoal_sys::identity::cert_pem(&dev.cert),
        ca: shoal_sys::identity::cert_pem(&user.ca_cert),
    }))
}

fn device_info(app: &App, d: &DeviceRec) -> DeviceInfo {
    DeviceInfo {
        id: d.id,
        name: d.name.clone(),
        enrolled_ms: d.enrolled_ms,
        last_seen_ms: d.last_seen_ms,
        cursor: d.cursor,
        revoked: d.revoked,
        cert_fingerprint: ChunkId::of(&d.cert),
        revoke_requested: if d.revoked { None } else { app.revoke_request(&d.id) },
    }
}

async fn devices(State(app): State<Arc<App>>, auth: Auth) -> ApiResult<Json<DevicesResponse>> {
    let devices = app.store.devices(auth.user())?.iter().map(|d| device_info(&app, d)).collect();
    Ok(Json(DevicesResponse { devices, lan: Some(app.store.lan_keys(auth.user(), now_ms())?) }))
}

/// A device asks to revoke a device of its user: itself, or another with a second device's
/// confirmation (the rule is in `revocation`). Answers the device as it now stands: revoked, or
/// with the request that waits for confirmation.
async fn revoke(
    State(app): State<Arc<App>>,
    auth: Auth,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<DeviceInfo>> {
    let Path(id) = id.map_err(|e| ApiError::bad(e.to_string()))?;
    let id: DeviceId = id.parse().map_err(|e| ApiError::bad(format!("bad device id: {e}")))?;
    let (user, caller) = (auth.user(), auth.device.id);
    // One decision at a time per user: two devices revoking themselves at once must not both
    // count the other as still active.
    let guard = app.user_lock(user).lock_owned().await;
    let devices = app.store.devices(user)?;
    let target =
        devices.iter().find(|d| d.id == id).ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such device"))?;
    let standing: Vec<Standing> = devices.iter().map(|d| Standing { id: d.id, revoked: d.revoked }).collect();
    let waiting = app.revoke_request(&id);
    match revocation::decide(caller, id, &standing, waiting, now_ms()) {
        Decision::AlreadyRevoked => Ok(Json(device_info(&app, target))),
        Decision::Refuse(why) => Err(ApiError::new(ErrorCode::Forbidden, why)),
        Decision::Request(req) => {
            app.revoke_requests.lock().unwrap_or_else(|p| p.into_inner()).insert(id, req);
            app.device_list_changed(user);
            tracing::info!(
                user,
                device = %id,
                name = %Escaped(&target.name),
                by = %caller,
                "revocation requested; it takes effect when another of the user's devices confirms it"
            );
            Ok(Json(device_info(&app, target)))
        }
        Decision::Revoke { requested_by } => {
            let by = match requested_by {
                Some(requested_by) => Actor::Devices { requested_by, confirmed_by: caller },
                None => Actor::Itself,
            };
            let dev = crate::revoke_device(app.clone(), id, user, by, guard)
                .await?
                .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such device"))?;
            Ok(Json(device_info(&app, &dev)))
        }
    }
}

async fn cursor(
    State(app): State<Arc<App>>,
    auth: Auth,
    ApiJson(req): ApiJson<CursorRequest>,
) -> ApiResult<Json<DeviceInfo>> {
    let head = *app.head_sender(auth.user())?.borrow();
    if req.seq > head {
        return Err(ApiError::bad(format!("cursor {} is past the journal head {head}", req.seq)));
    }
    let now = now_ms();
    // Changes only this device's cursor and last-seen time, and only while it is not revoked: a
    // request in flight during a revocation can never bring the device back.
    let dev = app.store.update_device(&auth.device.id, |d| {
        if d.revoked {
            return false;
        }
        d.cursor = req.seq;
        d.last_seen_ms = now;
        true
    })?;
    let dev = dev.ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "this device has been revoked"))?;
    Ok(Json(device_info(&app, &dev)))
}

// ---- chunks ----

fn check_ids(ids: &[ChunkId]) -> ApiResult<()> {
    if ids.len() > MAX_CHUNK_IDS {
        return Err(ApiError::bad(format!("at most {MAX_CHUNK_IDS} chunk ids per request")));
    }
    Ok(())
}

async fn missing(
    State(app): State<Arc<App>>,
    auth: Auth,
    ApiJson(req): ApiJson<ChunkList>,
) -> ApiResult<Json<MissingResponse>> {
    check_ids(&req.chunks)?;
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    // Chunks a pending version awaits are missing (an author paying what it owes asks for them).
    let awaited = app.store.awaited(auth.user(), &req.chunks);
    for id in req.chunks {
        // Answered per user: whether another user stores a chunk is never revealed. A chunk the
        // store lost or quarantined is missing again, so a device sends it anew.
        // A chunk garbage collection condemned is missing too: the device sends it again (which
        // revives it) instead of counting on a copy that may be deleted before its commit.
        if seen.insert(id)
            && (awaited.contains(&id)
                || app.store.is_condemned(&id)
                || !(app.store.user_has_chunk(auth.user(), &id)? && app.chunks.contains(&id)?))
        {
            missing.push(id);
        }
    }
    Ok(Json(MissingResponse { missing }))
}

/// Verifies and stores chunks, then records them as this user's. The user gains a chunk only by
/// sending its bytes, even when the store already holds them for someone else.
async fn store_chunks(app: &Arc<App>, user: UserId, chunks: Vec<(ChunkId, Bytes)>) -> ApiResult<u64> {
    let mut total = 0u64;
    for (id, data) in &chunks {
        if ChunkId::of(data) != *id {
            return Err(ApiError::new(ErrorCode::HashMismatch, format!("chunk {id} does not match its BLAKE3 hash")));
        }
        total += data.len() as u64;
    }
    // What the upload adds to the user's storage: chunks the user does not hold yet and no
    // pending version of its awaits (those were counted when committed).
    let awaited = app.store.awaited(user, &chunks.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    let mut seen = HashSet::new();
    let mut adding = 0u64;
    for (id, data) in &chunks {
        if seen.insert(*id) && !awaited.contains(id) && !app.store.user_has_chunk(user, id)? {
            adding += data.len() as u64;
        }
    }
    let quota_store = app.store.clone();
    blocking(move || crate::commit::check_quota(&quota_store, user, adding)).await?;
    let (store, meta) = (app.chunks.clone(), app.store.clone());
    let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
    let revive = ids.clone();
    blocking(move || {
        // Revived before the store decides a copy it holds will do: a condemned copy kept is
        // then never deleted under this upload.
        meta.revive(&revive)?;
        let refs: Vec<(ChunkId, &[u8])> = chunks.iter().map(|(id, d)| (*id, &d[..])).collect();
        store.put_many(&refs)?;
        store.start_writeback();
        Ok(())
    })
    .await?;
    app.metrics.bytes_in.inc_by(total);
    crate::service::chunks_stored(app, user, ids).await?;
    Ok(total)
}

/// What counts against the user's quota, and the quota.
async fn usage(State(app): State<Arc<App>>, auth: Auth) -> ApiResult<Json<UsageResponse>> {
    let (store, user) = (app.store.clone(), auth.user());
    blocking(move || Ok(Json(UsageResponse { used: store.usage(user)?, quota: store.quota(user)? }))).await
}

/// The user's pending versions.
#[derive(Deserialize)]
struct PendingQuery {
    /// Only this path's pending versions.
    path: Option<String>,
}

/// The user's pending versions (or one path's), live ones first, each oldest first; a page at
/// most.
async fn pending(
    State(app): State<Arc<App>>,
    auth: Auth,
    q: Result<Query<PendingQuery>, QueryRejection>,
) -> ApiResult<Json<PendingResponse>> {
    let path = query(q)?.path.map(|p| parse_path(&p)).transpose()?;
    list_pending(&app, &auth, path).await
}

async fn list_pending(app: &App, auth: &Auth, path: Option<SyncPath>) -> ApiResult<Json<PendingResponse>> {
    let user = auth.user();
    let store = app.store.clone();
    let recs = blocking(move || Ok(store.pending(user)?)).await?;
    let head = *app.head_sender(user)?.borrow();
    let online = app.online.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let visible =
        recs.into_iter().filter(|(seq, p)| *seq <= head && path.as_ref().is_none_or(|want| *want == p.rec.path));
    let stalled_before = now_ms().saturating_sub(app.stuck_after_ms);
    let mut versions: Vec<PendingVersion> = visible
        .map(|(version, p)| PendingVersion {
            stuck: p.rec.withdrawn || p.progress_ms < stalled_before,
            path: p.rec.path,
            version,
            device: p.rec.device,
            since_ms: p.rec.since_ms,
            missing_chunks: p.rec.missing,
            withdrawn: p.rec.withdrawn,
            author_online: online.get(&p.rec.device).is_some_and(|n| *n > 0),
        })
        .collect();
    // Live versions before withdrawn ones (each oldest first), so withdrawn records that pile up
    // never push a live one off the page.
    versions.sort_by_key(|v| v.withdrawn);
    let more = versions.len() > MAX_PAGE;
    versions.truncate(MAX_PAGE);
    Ok(Json(PendingResponse { versions, more }))
}

/// The author's pending versions it can no longer supply.
async fn withdraw(
    State(app): State<Arc<App>>,
    auth: Auth,
    ApiJson(req): ApiJson<WithdrawRequest>,
) -> ApiResult<Json<PendingResponse>> {
    if req.versions.len() > MAX_PAGE {
        return Err(ApiError::bad(format!("at most {MAX_PAGE} versions at once")));
    }
    let (user, device) = (auth.user(), auth.device.id);
    {
        let lock = app.user_lock(user);
        let _guard = lock.lock().await;
        let store = app.store.clone();
        let n = blocking(move || Ok(store.withdraw(user, device, &req.versions)?)).await?;
        if n > 0 {
            app.store.flush().await?;
            tracing::info!(user, %device, versions = n, "pending versions withdrawn by their author");
        }
    }
    list_pending(&app, &auth, None).await
}

async fn upload_batch(State(app): State<Arc<App>>, auth: Auth, req: Request) -> ApiResult<Json<UploadResponse>> {
    let body = read_body(req, MAX_CHUNK_BATCH_BODY).await?;
    let mut chunks = Vec::new();
    let mut rest = &body[..];
    while !rest.is_empty() {
        if chunks.len() == MAX_CHUNK_IDS {
            return Err(ApiError::bad(format!("at most {MAX_CHUNK_IDS} chunks per batch")));
        }
        match decode_frame(rest, CHUNK_PARAMS.max as u32) {
            Ok(Some((id, data, used))) => {
                chunks.push((id, body.slice_ref(data)));
                rest = &rest[used..];
            }
            Ok(None) => return Err(ApiError::bad("chunk batch ends inside a frame")),
            Err(e) => return Err(ApiError::bad(format!("bad chunk batch: {e}"))),
        }
    }
    let stored = store_chunks(&app, auth.user(), chunks).await?;
    Ok(Json(UploadResponse { stored }))
}

async fn upload_one(
    State(app): State<Arc<App>>,
    auth: Auth,
    id: Result<Path<String>, PathRejection>,
    req: Request,
) -> ApiResult<Json<UploadResponse>> {
    let id = chunk_id(id)?;
    let body = read_body(req, CHUNK_PARAMS.max).await?;
    let stored = store_chunks(&app, auth.user(), vec![(id, body)]).await?;
    Ok(Json(UploadResponse { stored }))
}

pub(crate) fn readable(app: &App, user: UserId, id: &ChunkId) -> ApiResult<()> {
    // A hash is a name, never a permission: only chunks this user uploaded are served.
    if !app.store.user_has_chunk(user, id)? {
        return Err(ApiError::new(ErrorCode::NotFound, format!("chunk {id} not found")));
    }
    Ok(())
}

async fn download_one(
    State(app): State<Arc<App>>,
    auth: Auth,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = chunk_id(id)?;
    readable(&app, auth.user(), &id)?;
    let store = app.chunks.clone();
    let data = blocking(move || Ok(store.get(&id)?)).await?;
    app.metrics.bytes_out.inc_by(data.len() as u64);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

/// Streams the requested chunks as frames, in request order, a group at a time. Every chunk is
/// verified as it is read; at the first one that cannot be served intact the response ends with an
/// error after the complete frames before it, so a client keeps what it got and asks again for
/// the rest.
async fn fetch_batch(State(app): State<Arc<App>>, auth: Auth, ApiJson(req): ApiJson<ChunkList>) -> ApiResult<Response> {
    check_ids(&req.chunks)?;
    for id in &req.chunks {
        readable(&app, auth.user(), id)?;
    }
    Ok(frames_response(app, req.chunks))
}

/// The frames of `chunks` (each already checked readable) as a streamed response body, as
/// [`fetch_batch`] describes.
pub(crate) fn frames_response(app: Arc<App>, chunks: Vec<ChunkId>) -> Response {
    // Chunks are read a few dozen at a time per blocking task: one task per chunk costs more than
    // the read, and runs stored back to back are read at once.
    let groups: Vec<Vec<ChunkId>> = chunks.chunks(32).map(<[ChunkId]>::to_vec).collect();
    // From S3 several groups are read at once (in order): a ranged GET's latency, not its bytes,
    // is what a sequential read waits for.
    let ahead = app.chunks.read_ahead();
    let stream = futures::stream::iter(groups)
        .map(move |ids| {
            let app = app.clone();
            async move {
                let store = app.chunks.clone();
                let frames = tokio::task::spawn_blocking(move || store.read_frames(&ids))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                app.metrics.bytes_out.inc_by(frames.chunk_bytes);
                Ok::<_, std::io::Error>(frames)
            }
        })
        .buffered(ahead)
        .scan(false, |failed, r| {
            // Nothing is sent after a failure: the frames that follow would be out of order.
            if *failed {
                return futures::future::ready(None);
            }
            let items: Vec<Result<Bytes, std::io::Error>> = match r {
                Ok(frames) => {
                    let mut items: Vec<_> = frames.pieces.into_iter().map(Ok).collect();
                    if let Some(e) = frames.error {
                        *failed = true;
                        items.push(Err(std::io::Error::other(e)));
                    }
                    items
                }
                Err(e) => {
                    *failed = true;
                    vec![Err(e)]
                }
            };
            futures::future::ready(Some(futures::stream::iter(items)))
        })
        .flatten();
    ([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response()
}

// ---- peer hints ----

/// Records where the caller's peer endpoint listens and answers with the user's other devices
/// that announced recently from the same address as this request. Only addresses are shared,
/// only between one user's devices, and only with those that look to be on the same network.
async fn peers(
    State(app): State<Arc<App>>,
    auth: Auth,
    axum::extract::ConnectInfo(from): axum::extract::ConnectInfo<std::net::SocketAddr>,
    ApiJson(req): ApiJson<PeersRequest, MAX_UNAUTH_BODY>,
) -> ApiResult<Json<PeersResponse>> {
    if req.addrs.len() > MAX_PEER_ADDRS {
        return Err(ApiError::bad(format!("at most {MAX_PEER_ADDRS} peer addresses")));
    }
    let observed = from.ip().to_canonical();
    for a in &req.addrs {
        match a.parse::<std::net::SocketAddr>() {
            Ok(sa) if sa.port() != 0 && lan_address(sa.ip().to_canonical(), observed) => {}
            Ok(_) => {
                return Err(ApiError::bad(format!(
                    "peer address {a:?} is not one a device can have on a LAN (private, link-local, loopback, or the address this request came from)"
                )));
            }
            Err(_) => return Err(ApiError::bad(format!("bad peer address {a:?}: expected IP:PORT"))),
        }
    }
    let (user, me) = (auth.user(), auth.device.id);
    let ttl = Duration::from_secs(PEER_TTL_SECS);
    let candidates: Vec<(DeviceId, Vec<String>)> = {
        let mut presence = app.presence.lock().unwrap_or_else(|p| p.into_inner());
        let mine = presence.entry(user).or_default();
        mine.retain(|_, p| p.at.elapsed() < ttl);
        mine.insert(me, crate::Presence { observed, addrs: req.addrs, at: std::time::Instant::now() });
        mine.iter()
            .filter(|(id, p)| **id != me && p.observed == observed)
            .map(|(id, p)| (*id, p.addrs.clone()))
            .collect()
    };
    let mut peers = Vec::new();
    for (id, addrs) in candidates {
        // Revoked since it announced: not a peer.
        if let Some(d) = app.store.device(&id)?.filter(|d| !d.revoked && d.user == user) {
            peers.push(PeerHint { device: id, name: d.name, addrs, cert_fingerprint: ChunkId::of(&d.cert) });
        }
    }
    peers.sort_by_key(|p| p.device.0);
    Ok(Json(PeersResponse { peers }))
}

/// `true` for an address a device can have on its LAN, so peers may send it QUIC packets: a
/// private, shared (carrier-grade NAT), link-local or loopback IPv4 address; a unique-local,
/// link-local or loopback IPv6 one; or, for a LAN numbered with public addresses (IPv6 without
/// NAT, mostly), the address the announcement came from or, for IPv6, one in its /64. Never an
/// unspecified, broadcast, multicast or other public address.
fn lan_address(ip: std::net::IpAddr, observed: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match (ip, observed) {
        (IpAddr::V4(v4), _) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => false,
        (IpAddr::V4(v4), _) if v4.is_private() || v4.is_loopback() || v4.is_link_local() => true,
        // 100.64.0.0/10, shared address space behind carrier-grade NAT (RFC 6598).
        (IpAddr::V4(v4), _) if v4.octets()[0] == 100 && v4.octets()[1] & 0xc0 == 64 => true,
        (IpAddr::V6(v6), _) if v6.is_unspecified() || v6.is_multicast() => false,
        (IpAddr::V6(v6), _) if v6.is_loopback() || v6.is_unique_local() || v6.is_unicast_link_local() => true,
        (IpAddr::V6(v6), IpAddr::V6(seen)) => v6.segments()[..4] == seen.segments()[..4],
        (ip, seen) => ip == seen,
    }
}

// ---- commits and the journal ----

async fn commit(
    State(app): State<Arc<App>>,
    auth: Auth,
    ApiJson(req): ApiJson<CommitRequest>,
) -> ApiResult<Json<CommitResponse>> {
    crate::commit::validate(&req)?;
    let started = std::time::Instant::now();
    let outcome = crate::service::commit(&app, auth.user(), auth.device.id, req).await?;
    match outcome {
        CommitOutcome::Replayed(resp) => Ok(Json(resp)),
        CommitOutcome::Stale(conflicts) => Err(ApiError::stale(conflicts)),
        CommitOutcome::Applied(resp) => {
            app.metrics.commits.inc();
            app.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
            app.metrics.entries.inc_by(resp.entries.len() as u64);
            Ok(Json(resp))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    #[serde(default)]
    since: Seq,
    limit: Option<usize>,
    /// Seconds to wait for new entries when there are none (long-poll).
    #[serde(default)]
    wait: u64,
}

async fn changes(
    State(app): State<Arc<App>>,
    auth: Auth,
    q: Result<Query<ChangesQuery>, QueryRejection>,
) -> ApiResult<Json<ChangesResponse>> {
    let q = query(q)?;
    let user = auth.user();
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_PAGE);
    let mut rx = app.head_sender(user)?.subscribe();
    let mut revoked = app.device_changes.subscribe();
    // A revocation between authentication and the subscription above is caught here.
    ensure_not_revoked(&app, &auth.device.id)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.min(MAX_WAIT_SECS));
    loop {
        // The durable head: entries past it are not served until their commit is acknowledged.
        let head = *rx.borrow_and_update();
        if head > q.since || tokio::time::Instant::now() >= deadline {
            let store = app.store.clone();
            let since = q.since;
            let entries = blocking(move || Ok(store.changes(user, since, head, limit, MAX_PAGE_BYTES)?)).await?;
            let next = entries.last().map_or(q.since.min(head), |e| e.version);
            return Ok(Json(ChangesResponse { entries, next, head }));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = rx.changed() => {}
            _ = revoked.changed() => ensure_not_revoked(&app, &auth.device.id)?,
        }
    }
}

fn ensure_not_revoked(app: &App, id: &DeviceId) -> ApiResult<()> {
    match app.store.device(id)? {
        Some(d) if !d.revoked => Ok(()),
        _ => Err(ApiError::new(ErrorCode::Unauthorized, "this device has been revoked")),
    }
}

/// Keep-alive pings on idle subscriptions, so dead peers and NAT timeouts are noticed.
const PING_EVERY: Duration = Duration::from_secs(20);

/// A WebSocket that sends `{"head": N, "devices": G}` now and whenever the user's durable journal
/// head moves or the user's device list changes. Closed when the device is revoked.
async fn subscribe(State(app): State<Arc<App>>, auth: Auth, ws: WebSocketUpgrade) -> ApiResult<Response> {
    let rx = app.head_sender(auth.user())?.subscribe();
    let (device, user) = (auth.device.id, auth.user());
    Ok(ws.on_upgrade(move |socket| push_heads(app, socket, rx, device, user)))
}

async fn push_heads(
    app: Arc<App>,
    mut socket: WebSocket,
    mut rx: tokio::sync::watch::Receiver<Seq>,
    device: DeviceId,
    user: UserId,
) {
    app.metrics.subscribers.inc();
    *app.online.lock().unwrap_or_else(|p| p.into_inner()).entry(device).or_default() += 1;
    let mut changes = app.device_changes.subscribe();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut sent = None;
    // A revocation between authentication and here is caught by this first check.
    let mut check_revoked = true;
    loop {
        if check_revoked && ensure_not_revoked(&app, &device).is_err() {
            tracing::info!(%device, "closing the push subscription of a revoked device");
            let _ = socket.send(Message::Close(None)).await;
            break;
        }
        check_revoked = false;
        let notice = HeadNotice { head: *rx.borrow_and_update(), devices: app.device_list_generation(user) };
        if sent != Some(notice) {
            let text = serde_json::to_string(&notice).unwrap_or_default();
            if socket.send(Message::Text(text.into())).await.is_err() {
                break;
            }
            sent = Some(notice);
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            _ = changes.changed() => check_revoked = true,
            _ = ping.tick() => if socket.send(Message::Ping(Bytes::new())).await.is_err() { break },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    app.metrics.subscribers.dec();
    let mut online = app.online.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = online.get_mut(&device) {
        *n -= 1;
        if *n == 0 {
            online.remove(&device);
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeQuery {
    at: Option<Seq>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn tree(
    State(app): State<Arc<App>>,
    auth: Auth,
    q: Result<Query<TreeQuery>, QueryRejection>,
) -> ApiResult<Json<TreeResponse>> {
    let q = query(q)?;
    let user = auth.user();
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let after = q.after.as_deref().map(parse_path).transpose()?;
    // Read between commits, so the heads are all durable ones.
    let lock = app.user_lock(user);
    let _guard = lock.lock().await;
    let head = *app.head_sender(user)?.borrow();
    let store = app.store.clone();
    blocking(move || {
        // After a failed flush the stored heads can run ahead of the durable head; read as of it.
        let at = q.at.unwrap_or(head).min(head);
        if at < store.head_seq(user)? {
            let all = store.tree_at(user, at)?;
            let mut iter = all.into_iter().filter(|e| after.as_ref().is_none_or(|a| e.path > *a));
            let entries: Vec<Entry> = iter.by_ref().take(limit).collect();
            let more_after = iter.next().and(entries.last().map(|e| e.path.clone()));
            return Ok(Json(TreeResponse { at, entries, more_after }));
        }
        let (entries, more) = store.tree_head(user, after.as_ref(), limit)?;
        let more_after = if more { entries.last().map(|e| e.path.clone()) } else { None };
        Ok(Json(TreeResponse { at: head, entries, more_after }))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    path: String,
    after: Option<Seq>,
    limit: Option<usize>,
}

async fn history(
    State(app): State<Arc<App>>,
    auth: Auth,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<Json<HistoryResponse>> {
    let q = query(q)?;
    let path = parse_path(&q.path)?;
    let user = auth.user();
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let head = *app.head_sender(user)?.borrow();
    let store = app.store.clone();
    let policy = app.retention;
    blocking(move || {
        let (mut entries, mut more) = store.history(user, &path, q.after, limit)?;
        if entries.last().is_some_and(|e| e.version > head) {
            entries.retain(|e| e.version <= head);
            more = false;
        }
        let more_after = if more { entries.last().map(|e| e.version) } else { None };
        // A version expires once a version after it that is not pending replaced it longer ago
        // than the retention period (the rule collection applies).
        let expired = if policy.keep.is_some() && !entries.is_empty() {
            let all = store.path_versions(user, &path)?;
            let pending: HashSet<Seq> = store.pending(user)?.into_iter().map(|(seq, _)| seq).collect();
            let now = now_ms();
            let page: HashSet<Seq> = entries.iter().map(|e| e.version).collect();
            all.iter()
                .zip(crate::store::superseded(&all, &pending))
                .filter(|(e, replaced)| page.contains(&e.version) && !policy.retains(*replaced, now))
                .map(|(e, _)| e.version)
                .collect()
        } else {
            Vec::new()
        };
        Ok(Json(HistoryResponse { path, entries, more_after, expired }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_must_be_ones_a_device_can_have_on_a_lan() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let seen_v4 = ip("203.0.113.7");
        let seen_v6 = ip("2001:db8:1:2::99");
        for (addr, seen, ok) in [
            ("192.168.1.20", seen_v4, true),
            ("10.0.0.5", seen_v4, true),
            ("172.16.3.4", seen_v4, true),
            ("169.254.1.1", seen_v4, true),
            ("127.0.0.1", seen_v4, true),
            ("100.72.1.2", seen_v4, true),
            ("203.0.113.7", seen_v4, true),
            ("fd12:3456::1", seen_v6, true),
            ("fe80::1", seen_v6, true),
            ("::1", seen_v6, true),
            ("2001:db8:1:2::1234", seen_v6, true),
            // Broadcast, multicast, unspecified, and public addresses of someone else.
            ("255.255.255.255", seen_v4, false),
            ("224.0.0.251", seen_v4, false),
            ("239.1.2.3", seen_v4, false),
            ("0.0.0.0", seen_v4, false),
            ("8.8.8.8", seen_v4, false),
            ("203.0.113.8", seen_v4, false),
            ("100.128.0.1", seen_v4, false),
            ("ff02::1", seen_v6, false),
            ("::", seen_v6, false),
            ("2001:db8:1:3::1", seen_v6, false),
            ("2001:db8:1:2::1", seen_v4, false),
        ] {
            assert_eq!(lan_address(ip(addr), seen), ok, "{addr} announced from {seen}");
        }
    }
}
