//! The coordinator client: HTTPS with the server certificate pinned by fingerprint (no CA), bearer
//! token auth, one method per API endpoint, chunk batches as frame streams, and the WebSocket
//! push subscription. Errors say whether a retry can help.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use rustls_pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_protocol::api::*;
use shoal_protocol::{ChunkId, DeviceId, Entry, Seq, SyncPath};

use crate::config::Config;
use crate::limit::{Limiter, PeerServing};
use shoal_net::frames::{FrameDecoder, FrameReadError};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `addr` says what could not be reached: "the coordinator at HOST:PORT", "the relay at ...".
    #[error("cannot reach {addr}: {source}")]
    Network { addr: String, source: reqwest::Error },
    #[error("coordinator refused the request ({code:?}): {message}", code = .0.code, message = .0.message)]
    Api(ErrorBody),
    #[error("unexpected reply from the coordinator: {0}")]
    Protocol(String),
    #[error("subscription failed: {0}")]
    Subscribe(String),
}

impl ClientError {
    /// `true` when trying again later can succeed (the coordinator is down or busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Network { .. } | ClientError::Subscribe(_) => true,
            ClientError::Api(b) => b.code == ErrorCode::Internal,
            ClientError::Protocol(_) => false,
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(b) => Some(b.code),
            _ => None,
        }
    }
}

pub type ClientResult<T> = Result<T, ClientError>;

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence in a relay's answer.
const RELAY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most of an error answer's body read.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Opens the agent's outgoing connections — the HTTP client's and the push subscription's — from
/// one local address when `bind` is set (config.toml), so a device can be given its own source
/// address; otherwise the OS picks one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dialer {
    bind: Option<IpAddr>,
}

impl Dialer {
    pub fn new(bind: Option<IpAddr>) -> Self {
        Dialer { bind }
    }

    fn http(&self, tls: rustls::ClientConfig) -> reqwest::Result<reqwest::Client> {
        self.builder(tls).build()
    }

    fn builder(&self, tls: rustls::ClientConfig) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(4))
            .local_address(self.bind)
    }

    /// A TCP connection to `addr` (`HOST:PORT`), trying its addresses of the bind address's family.
    pub async fn tcp(&self, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
        let mut last = None;
        for to in tokio::net::lookup_host(addr).await? {
            let sock = if to.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            if let Some(ip) = self.bind {
                if ip.is_ipv4() != to.is_ipv4() {
                    continue;
                }
                sock.bind(SocketAddr::new(ip, 0)).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot use {ip} as the local address (bind): {e}"))
                })?;
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(to)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last =
                        Some(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {to} timed out")))
                }
            }
        }
        Err(last.unwrap_or_else(|| match self.bind {
            Some(ip) => std::io::Error::other(format!("{addr} has no address of the bind address {ip}'s family")),
            None => std::io::Error::other(format!("{addr} resolves to no address")),
        }))
    }
}

/// A connection to one coordinator as one device (or anonymous, for enrollment).
/// Pieces a rate-limited upload body is sent in.
const LIMITED_PIECE: usize = 64 * 1024;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    dialer: Dialer,
    addr: String,
    /// What errors call the server: "the coordinator at HOST:PORT".
    who: String,
    base: String,
    token: Option<String>,
    tls: Arc<rustls::ClientConfig>,
    /// `upload_limit` and `download_limit`: chunk bytes to and from the coordinator.
    up: Limiter,
    down: Limiter,
    /// Chunks sent to LAN peers, which uploads give way to.
    serving: PeerServing,
}

impl Client {
    /// A client without a token: only `enroll` works.
    pub fn anonymous(addr: &str, fingerprint: ChunkId, dialer: Dialer) -> anyhow::Result<Self> {
        let tls = shoal_net::pinned::client_config(fingerprint)?;
        let http = dialer.http(tls.clone())?;
        Ok(Client {
            http,
            dialer,
            addr: addr.to_string(),
            who: format!("the coordinator at {addr}"),
            base: format!("https://{addr}"),
            token: None,
            tls: Arc::new(tls),
            up: Limiter::default(),
            down: Limiter::default(),
            serving: PeerServing::default(),
        })
    }

    pub fn new(cfg: &Config) -> anyhow::Result<Self> {
        let mut c = Self::anonymous(&cfg.server, cfg.fingerprint, Dialer::new(cfg.bind))?;
        c.token = Some(cfg.token.clone());
        c.up = Limiter::new(cfg.upload_limit);
        c.down = Limiter::new(cfg.download_limit);
        Ok(c)
    }

    /// What the peer server notes its sending in (uploads give way to it).
    pub fn serving(&self) -> PeerServing {
        self.serving.clone()
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where this client's connections leave from.
    pub fn dialer(&self) -> Dialer {
        self.dialer
    }

    /// A raw authenticated request to `path` (for tools and tests that need the bare API).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.req(method, path)
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn net(&self, source: reqwest::Error) -> ClientError {
        ClientError::Network { addr: self.who.clone(), source }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> ClientResult<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| self.net(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(piece) = resp.chunk().await.map_err(|e| self.net(e))? {
            body.extend_from_slice(&piece);
            if body.len() > MAX_ERROR_BODY {
                return Err(ClientError::Protocol(format!(
                    "HTTP {status} with an error body over {MAX_ERROR_BODY} bytes"
                )));
            }
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) => Err(ClientError::Api(b)),
            Err(_) => Err(ClientError::Protocol(format!("HTTP {status} without an error body"))),
        }
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> ClientResult<T> {
        let resp = self.send(rb).await?;
        let bytes = resp.bytes().await.map_err(|e| self.net(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("bad JSON: {e}")))
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> ClientResult<T> {
        self.json(self.req(reqwest::Method::POST, path).json(body)).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> ClientResult<T> {
        self.json(self.req(reqwest::Method::GET, path).query(query)).await
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> ClientResult<EnrollResponse> {
        self.post("/v1/enroll", req).await
    }

    pub async fn devices(&self) -> ClientResult<Vec<DeviceInfo>> {
        Ok(self.get::<DevicesResponse>("/v1/devices", &[]).await?.devices)
    }

    /// The user's devices and LAN keys.
    pub async fn roster(&self) -> ClientResult<DevicesResponse> {
        self.get("/v1/devices", &[]).await
    }

    /// Announces this device's peer endpoint addresses; the user's devices that seem to be on
    /// the same network, with theirs.
    pub async fn peers(&self, addrs: Vec<String>) -> ClientResult<Vec<PeerHint>> {
        Ok(self.post::<_, PeersResponse>("/v1/peers", &PeersRequest { addrs }).await?.peers)
    }

    /// The user's pending versions (committed before the origin had their chunks), oldest first
    /// (`more`: there are others past the page).
    /// What counts against the user's storage quota, and the quota.
    pub async fn usage(&self) -> ClientResult<shoal_protocol::api::UsageResponse> {
        self.get("/v1/usage", &[]).await
    }

    pub async fn pending(&self) -> ClientResult<PendingResponse> {
        self.get("/v1/pending", &[]).await
    }

    /// The pending versions of one path.
    pub async fn pending_of(&self, path: &SyncPath) -> ClientResult<PendingResponse> {
        self.get("/v1/pending", &[("path", path.to_string())]).await
    }

    /// Tells the coordinator this device can no longer supply these pending versions of its own.
    pub async fn withdraw(&self, versions: Vec<Seq>) -> ClientResult<Vec<PendingVersion>> {
        Ok(self.post::<_, PendingResponse>("/v1/pending/withdraw", &WithdrawRequest { versions }).await?.versions)
    }

    pub async fn revoke(&self, id: DeviceId) -> ClientResult<DeviceInfo> {
        self.post(&format!("/v1/devices/{id}/revoke"), &serde_json::json!({})).await
    }

    /// The chunks among `ids` the coordinator still needs from this user.
    pub async fn missing(&self, ids: &[ChunkId]) -> ClientResult<Vec<ChunkId>> {
        let mut out = Vec::new();
        for part in ids.chunks(MAX_CHUNK_IDS) {
            let r: MissingResponse = self.post("/v1/chunks/missing", &ChunkList { chunks: part.to_vec() }).await?;
            out.extend(r.missing);
        }
        Ok(out)
    }

    /// Uploads a body of frames (see `shoal_protocol::api::encode_frame`), after giving way to
    /// chunks this device is sending to LAN peers (`PeerServing`).
    pub async fn upload_frames(&self, body: Vec<u8>) -> ClientResult<u64> {
        // A small request takes nothing from the peers worth waiting for, and waiting would hold
        // up the cycle that sends it (and with it the next change's commit).
        if body.len() >= crate::limit::GIVE_WAY_MIN_BYTES {
            self.serving.give_way().await;
        }
        let body = if self.up.is_limited() {
            // Sent in pieces, each when the upload limit allows it.
            let up = self.up.clone();
            let body = Bytes::from(body);
            let pieces = (0..body.len())
                .step_by(LIMITED_PIECE)
                .map(move |at| body.slice(at..(at + LIMITED_PIECE).min(body.len())));
            reqwest::Body::wrap_stream(futures::stream::iter(pieces).then(move |p| {
                let up = up.clone();
                async move {
                    up.take(p.len()).await;
                    Ok::<_, std::io::Error>(p)
                }
            }))
        } else {
            reqwest::Body::from(body)
        };
        let r: UploadResponse = self.json(self.req(reqwest::Method::POST, "/v1/chunks").body(body)).await?;
        Ok(r.stored)
    }

    /// Fetches `ids` from the coordinator, calling `each(id, bytes)` for each frame, in order.
    /// The bytes are not checked here: `transfer::source::verify` checks every chunk from every
    /// source, and `each` stops the stream (with its error) on a chunk that fails.
    pub async fn fetch<F>(&self, ids: &[ChunkId], each: F) -> ClientResult<()>
    where
        F: FnMut(ChunkId, Bytes) -> Result<(), String>,
    {
        let req = self.req(reqwest::Method::POST, "/v1/chunks/fetch").json(&ChunkList { chunks: ids.to_vec() });
        self.fetch_frames(req, ids, each).await
    }

    /// A relay's `fetch`: the chunks `req` asks for under its ticket, as `fetch` delivers them.
    pub async fn fetch_ticketed<F>(&self, req: &TicketedFetch, each: F) -> ClientResult<()>
    where
        F: FnMut(ChunkId, Bytes) -> Result<(), String>,
    {
        let rb = self.req(reqwest::Method::POST, "/v1/chunks/fetch").json(req);
        self.fetch_frames(rb, &req.chunks, each).await
    }

    async fn fetch_frames<F>(&self, req: reqwest::RequestBuilder, ids: &[ChunkId], mut each: F) -> ClientResult<()>
    where
        F: FnMut(ChunkId, Bytes) -> Result<(), String>,
    {
        let resp = self.send(req).await?;
        let body = tokio_util::io::StreamReader::new(resp.bytes_stream().map(|r| r.map_err(std::io::Error::other)));
        let mut frames = tokio_util::codec::FramedRead::new(body, FrameDecoder::default());
        let mut next = 0usize;
        while let Some(frame) = frames.next().await {
            let (id, data) = match frame {
                Ok(f) => f,
                Err(FrameReadError::Io(e)) => {
                    // The body's own error (a broken connection) is a network error.
                    let msg = e.to_string();
                    return Err(match e.into_inner().and_then(|e| e.downcast::<reqwest::Error>().ok()) {
                        Some(e) => self.net(*e),
                        None => ClientError::Protocol(format!("chunk stream failed: {msg}")),
                    });
                }
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            };
            if ids.get(next) != Some(&id) {
                return Err(ClientError::Protocol(format!("{} sent chunk {id} out of order", self.who)));
            }
            self.down.take(data.len()).await;
            each(id, data).map_err(ClientError::Protocol)?;
            next += 1;
        }
        if next != ids.len() {
            return Err(ClientError::Protocol(format!("chunk stream ended after {next} of {} chunks", ids.len())));
        }
        Ok(())
    }

    /// The relays the coordinator lists as live.
    pub async fn relays(&self) -> ClientResult<Vec<RelayInfo>> {
        self.json(self.req(reqwest::Method::GET, "/v1/relays")).await
    }

    /// A ticket for `ids`, which a relay asks for before serving them.
    pub async fn ticket(&self, ids: &[ChunkId]) -> ClientResult<TicketResponse> {
        self.post("/v1/tickets", &ChunkList { chunks: ids.to_vec() }).await
    }

    /// A client for the relay at `url` whose certificate has `fingerprint`: connections leave
    /// from the same address and share the download limit; it holds no device token (a relay is
    /// shown tickets, never the token).
    pub fn relay(&self, url: &str, fingerprint: ChunkId) -> anyhow::Result<Client> {
        let tls = shoal_net::pinned::client_config(fingerprint)?;
        // A relay that goes silent is left for the origin, not waited for.
        let http = self.dialer.builder(tls.clone()).read_timeout(RELAY_READ_TIMEOUT).build()?;
        let base = url.trim_end_matches('/').to_string();
        let addr = base.strip_prefix("https://").unwrap_or(&base).to_string();
        Ok(Client {
            http,
            dialer: self.dialer,
            who: format!("the relay at {addr}"),
            addr,
            base,
            token: None,
            tls: Arc::new(tls),
            up: self.up.clone(),
            down: self.down.clone(),
            serving: self.serving.clone(),
        })
    }

    /// One chunk's bytes, unchecked (see `fetch`).
    pub async fn fetch_one(&self, id: ChunkId) -> ClientResult<Bytes> {
        let resp = self.send(self.req(reqwest::Method::GET, &format!("/v1/chunks/{id}"))).await?;
        let data = resp.bytes().await.map_err(|e| self.net(e))?;
        self.down.take(data.len()).await;
        Ok(data)
    }

    pub async fn commit(&self, req: &CommitRequest) -> ClientResult<CommitResponse> {
        self.post("/v1/commit", req).await
    }

    pub async fn changes(&self, since: Seq, limit: usize, wait: Duration) -> ClientResult<ChangesResponse> {
        let q = [("since", since.to_string()), ("limit", limit.to_string()), ("wait", wait.as_secs().to_string())];
        self.get("/v1/changes", &q).await
    }

    /// The live tree at `at` (default: head), all pages.
    pub async fn tree(&self, at: Option<Seq>) -> ClientResult<(Seq, Vec<Entry>)> {
        let mut out = Vec::new();
        let mut after: Option<SyncPath> = None;
        loop {
            let mut q = Vec::new();
            if let Some(at) = at {
                q.push(("at", at.to_string()));
            }
            if let Some(a) = &after {
                q.push(("after", a.to_string()));
            }
            let page: TreeResponse = self.get("/v1/tree", &q).await?;
            out.extend(page.entries);
            match page.more_after {
                Some(a) => after = Some(a),
                None => return Ok((page.at, out)),
            }
        }
    }

    /// Every version of `path`, oldest first (read page by page).
    pub async fn history(&self, path: &SyncPath) -> ClientResult<Vec<Entry>> {
        Ok(self.history_with_expired(path).await?.0)
    }

    /// Every version of `path`, oldest first, and which of them are past the coordinator's
    /// retention (no longer restorable).
    pub async fn history_with_expired(&self, path: &SyncPath) -> ClientResult<(Vec<Entry>, Vec<Seq>)> {
        let mut out = Vec::new();
        let mut expired = Vec::new();
        let mut after: Option<Seq> = None;
        loop {
            let mut q = vec![("path", path.to_string())];
            if let Some(a) = after {
                q.push(("after", a.to_string()));
            }
            let page: HistoryResponse = self.get("/v1/history", &q).await?;
            out.extend(page.entries);
            expired.extend(page.expired);
            match page.more_after {
                Some(a) => after = Some(a),
                None => return Ok((out, expired)),
            }
        }
    }

    pub async fn report_cursor(&self, seq: Seq) -> ClientResult<()> {
        let _: DeviceInfo = self.post("/v1/cursor", &CursorRequest { seq }).await?;
        Ok(())
    }

    /// Opens the push subscription: a WebSocket that yields the journal head now and on every
    /// change.
    pub async fn subscribe(&self) -> ClientResult<Subscription> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let err = |e: &dyn std::fmt::Display| ClientError::Subscribe(e.to_string());
        let tcp = self.dialer.tcp(&self.addr).await.map_err(|e| err(&e))?;
        let host = self.addr.rsplit_once(':').map_or(self.addr.as_str(), |(h, _)| h);
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|_| ServerName::try_from("shoal-coordinator").expect("a valid DNS name"));
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.map_err(|e| err(&e))?;
        let mut req = format!("wss://{}/v1/subscribe", self.addr).into_client_request().map_err(|e| err(&e))?;
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}").parse().map_err(|_| ClientError::Subscribe("bad token".into()))?;
            req.headers_mut().insert("authorization", v);
        }
        let (ws, _) = tokio_tungstenite::client_async(req, tls).await.map_err(|e| err(&e))?;
        Ok(Subscription { ws })
    }
}

/// An open push subscription.
pub struct Subscription {
    ws: tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl Subscription {
    /// The journal head of the next notice; `None` when the connection closed.
    pub async fn next_head(&mut self) -> Option<Seq> {
        self.next_notice().await.map(|n| n.head)
    }

    /// The next notice (the journal head and the device list's change count); `None` when the
    /// connection closed.
    pub async fn next_notice(&mut self) -> Option<HeadNotice> {
        use tokio_tungstenite::tungstenite::Message;
        while let Some(msg) = self.ws.next().await {
            match msg {
                Ok(Message::Text(t)) => {
                    if let Ok(n) = serde_json::from_str::<HeadNotice>(&t) {
                        return Some(n);
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        None
    }
}
