//! The Shoal coordinator: authoritative, versioned metadata and the per-user journal that every
//! device catches up from, the chunk store, and the HTTPS API over both. `start` runs a server
//! in-process (used by the binary, the demo and tests); `invite` mints enrollment invites.

pub mod admin;
mod api;
pub mod ca;
pub mod chunks;
pub mod direct;
mod error;
mod metrics;
pub mod store;
pub mod tls;
pub mod trim;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use shoal_protocol::api::{Invite, valid_user_name};
use shoal_protocol::{ChunkId, Seq};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::chunks::ChunkStore;
use crate::metrics::Metrics;
use crate::store::{InviteRec, Store, UserId};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Data directory: metadata, chunks, TLS identity, admin socket.
    pub data: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address devices should dial, written into invites. Defaults to the bound address.
    pub public_addr: Option<String>,
}

/// What a running coordinator writes to `DATA/server.json` so that `user add` and scripts can
/// find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub addr: String,
    pub public_addr: String,
    pub fingerprint: ChunkId,
    pub pid: u32,
}

/// Shared state of the API handlers.
pub(crate) struct App {
    pub store: Store,
    pub chunks: ChunkStore,
    pub metrics: Arc<Metrics>,
    pub commit_lock: tokio::sync::Mutex<()>,
    heads: Mutex<HashMap<UserId, watch::Sender<Seq>>>,
}

impl App {
    /// The channel that announces `user`'s journal head.
    pub fn head_sender(&self, user: UserId) -> Result<watch::Sender<Seq>, store::StoreError> {
        let mut heads = self.heads.lock().expect("the heads map is never poisoned: no code panics under it");
        if let Some(tx) = heads.get(&user) {
            return Ok(tx.clone());
        }
        let tx = watch::Sender::new(self.store.head_seq(user)?);
        heads.insert(user, tx.clone());
        Ok(tx)
    }
}

/// A running coordinator. Dropping it does not stop it; call `shutdown`.
pub struct Server {
    pub addr: SocketAddr,
    pub fingerprint: ChunkId,
    pub public_addr: String,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    store: Store,
}

impl Server {
    /// Mints an invite for `user`, creating the user when `create` is set.
    pub fn invite(&self, user: &str, create: bool) -> anyhow::Result<Invite> {
        invite(&self.store, user, create, &self.public_addr, self.fingerprint)
    }

    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        let _ = self.store.flush().await;
    }
}

/// Opens the data directory, binds, and serves until `shutdown`.
pub async fn start(opts: ServeOptions) -> anyhow::Result<Server> {
    std::fs::create_dir_all(&opts.data).with_context(|| format!("creating {}", opts.data.display()))?;
    let identity = tls::Identity::load_or_create(&opts.data)?;
    let store = Store::open(&opts.data.join("meta"))
        .context("is another shoal-coordinator already running on this data directory?")?;
    let chunks = ChunkStore::open(&opts.data.join("chunks"), store.clone()).context("opening the chunk store")?;
    let listener =
        tokio::net::TcpListener::bind(opts.listen).await.with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let public_addr = opts.public_addr.clone().unwrap_or_else(|| addr.to_string());
    let fingerprint = identity.fingerprint();
    let app = Arc::new(App {
        store: store.clone(),
        chunks,
        metrics: Arc::default(),
        commit_lock: tokio::sync::Mutex::new(()),
        heads: Mutex::new(HashMap::new()),
    });
    let cancel = CancellationToken::new();
    let admin = admin::spawn(&opts.data, store.clone(), public_addr.clone(), fingerprint, cancel.clone())?;
    let info =
        ServerInfo { addr: addr.to_string(), public_addr: public_addr.clone(), fingerprint, pid: std::process::id() };
    write_atomic(&opts.data.join("server.json"), &serde_json::to_vec_pretty(&info)?)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config()?);
    let trimmer = trim::spawn(app.metrics.clone(), app.chunks.clone(), cancel.clone());
    let router = api::router(app);
    let token = cancel.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (sock, peer) = tokio::select! {
                _ = token.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = sock.set_nodelay(true);
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            let token = token.clone();
            conns.spawn(async move {
                let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(sock)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                tokio::select! {
                    r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended with an error") },
                    _ = token.cancelled() => {}
                }
            });
            while conns.try_join_next().is_some() {}
        }
        conns.shutdown().await;
        admin.abort();
        trimmer.abort();
    });
    tracing::info!(%addr, %fingerprint, "coordinator listening");
    Ok(Server { addr, fingerprint, public_addr, cancel, task, store })
}

/// Mints a one-time enrollment invite for `name`, creating the user when `create` is set.
pub fn invite(store: &Store, name: &str, create: bool, addr: &str, fingerprint: ChunkId) -> anyhow::Result<Invite> {
    if !valid_user_name(name) {
        anyhow::bail!("invalid user name {name:?}: use 1-32 of a-z, 0-9, '_' and '-', starting with a letter or digit");
    }
    let user = match (store.user(name)?, create) {
        (Some(_), true) => {
            anyhow::bail!("user {name:?} already exists; use `user invite {name}` to enroll another device")
        }
        (Some(u), false) => u,
        (None, true) => {
            let ca = ca::new_user_ca(name)?;
            store.add_user(name, now_ms(), ca)?.context("user was created concurrently")?
        }
        (None, false) => anyhow::bail!("no user {name:?}; create it with `user add {name}`"),
    };
    let secret = random_hex(16);
    store.add_invite(blake3::hash(secret.as_bytes()).as_bytes(), &InviteRec { user: user.id, created_ms: now_ms() })?;
    Ok(Invite { addr: addr.to_string(), user: name.to_string(), secret, fingerprint })
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `n` random bytes as hex.
pub(crate) fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the OS random source is available");
    shoal_protocol::ids::to_hex(&b)
}

/// Writes a file only the owner can read (keys, tokens).
pub(crate) fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
