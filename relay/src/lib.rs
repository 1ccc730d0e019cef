//! A Shoal relay: a cache of chunks in one region, between the user's devices and the
//! coordinator. It serves a chunk only to a request carrying a ticket the coordinator signed
//! for it (checked offline with the coordinator's public key, fetched at registration), keeps
//! what it fetched in a bounded disk cache that survives restarts, verifies every byte it
//! serves, and fetches each missing chunk once however many devices ask for it at the same time.
//! It depends on the shared crates only (`shoal-protocol`, `shoal-sys`, `shoal-net`,
//! `shoal-packs`), never on the coordinator's or the agent's.

pub mod cache;
pub mod config;
pub mod metrics;
pub mod origin;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_protocol::ChunkId;
use shoal_protocol::api::RelayRegistered;
use shoal_sys::fs::{Durability, write_atomic};
use tokio_util::sync::CancellationToken;

/// Where a relay listens by default.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7444";
/// Where its metrics are served by default: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7445";

/// How a relay runs (from flags and the config file, see `config`).
#[derive(Debug, Clone)]
pub struct Options {
    pub region: String,
    /// The coordinator, `HOST:PORT`.
    pub coordinator: String,
    /// BLAKE3 of the coordinator's certificate, which the relay pins.
    pub coordinator_fingerprint: ChunkId,
    /// The token `shoal-coordinator relay add` printed.
    pub token: String,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// `https://HOST:PORT` as devices should reach the relay; by default its listen address.
    pub public_url: Option<String>,
}

/// What a running relay writes to `CACHE_DIR/relay.json`, for operators and tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayInfo {
    pub name: String,
    pub region: String,
    pub addr: String,
    pub url: String,
    pub metrics_addr: Option<String>,
    pub fingerprint: ChunkId,
    pub pid: u32,
}

pub struct Server {
    pub info: RelayInfo,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

fn parse_key(hex: &str) -> anyhow::Result<[u8; 32]> {
    let id: ChunkId = hex.parse().map_err(|e| anyhow::anyhow!("the coordinator sent a bad ticket key: {e}"))?;
    Ok(id.0)
}

/// Registers with the coordinator, waiting for it while it cannot be reached (a relay started
/// while its coordinator is down or restarting comes up with it); a refusal is final.
async fn register(origin: &origin::Origin, url: &str, fingerprint: ChunkId) -> anyhow::Result<RelayRegistered> {
    let mut wait = Duration::from_millis(500);
    loop {
        match origin.register(url, fingerprint).await {
            Ok(r) => return Ok(r),
            Err(origin::RegisterError::Refused(e)) => anyhow::bail!("registering: {e}"),
            Err(e @ origin::RegisterError::Unreachable(..)) => {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot register yet; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Opens the cache, registers with the coordinator (waiting for it while it cannot be reached),
/// binds, and serves until shut down.
pub async fn start(opts: Options) -> anyhow::Result<Server> {
    std::fs::create_dir_all(&opts.cache_dir).with_context(|| format!("creating {}", opts.cache_dir.display()))?;
    let identity = shoal_net::identity::Identity::load_or_create(
        &opts.cache_dir.join("tls"),
        &["localhost", "shoal-relay", &opts.listen.ip().to_string()],
    )?;
    let fingerprint = identity.fingerprint();
    let (dir, size) = (opts.cache_dir.join("segments"), opts.cache_size);
    let cache = tokio::task::spawn_blocking(move || cache::Cache::open(&dir, size))
        .await?
        .with_context(|| format!("opening the cache in {}", opts.cache_dir.display()))?;
    let cache = Arc::new(cache);
    let (listener, metrics_listener) = shoal_net::listener::bind_with_metrics(opts.listen, opts.metrics_listen).await?;
    let addr = listener.local_addr()?;
    let metrics_addr = metrics_listener.as_ref().map(tokio::net::TcpListener::local_addr).transpose()?;
    let url = opts.public_url.clone().unwrap_or_else(|| format!("https://{addr}"));
    let origin = origin::Origin::new(&opts.coordinator, opts.coordinator_fingerprint, &opts.token)?;
    let registered = register(&origin, &url, fingerprint).await?;
    anyhow::ensure!(
        registered.region == opts.region,
        "the coordinator has this relay ({}) in region {:?}, not {:?}",
        registered.name,
        registered.region,
        opts.region
    );
    let key = parse_key(&registered.ticket_key)?;
    let metrics = Arc::new(metrics::Metrics::default());
    let corrupt = shoal_sys::failpoints::value("relay-serve").as_deref() == Some("corrupt");
    let relay = Arc::new(server::Relay::new(cache, origin.clone(), key, metrics.clone(), corrupt));

    let info = RelayInfo {
        name: registered.name.clone(),
        region: registered.region.clone(),
        addr: addr.to_string(),
        url: url.clone(),
        metrics_addr: metrics_addr.map(|a| a.to_string()),
        fingerprint,
        pid: std::process::id(),
    };
    let info_path = opts.cache_dir.join("relay.json");
    write_atomic(&info_path, &serde_json::to_vec_pretty(&info)?, Durability::Synced)
        .with_context(|| format!("writing {}", info_path.display()))?;

    let cancel = CancellationToken::new();
    let heartbeat = {
        let (cancel, every) = (cancel.clone(), Duration::from_secs(registered.heartbeat_secs.clamp(1, 3600)));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                if let Err(e) = origin.register(&url, fingerprint).await {
                    tracing::warn!(error = %e, "heartbeat to the coordinator failed; trying again");
                }
            }
        })
    };
    let metrics_task = metrics_listener.map(|l| {
        tokio::spawn(shoal_net::listener::serve_plain(l, server::metrics_router(relay.clone()), cancel.clone()))
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config()?);
    let router = server::router(relay);
    let refused = metrics.refused_connections.clone();
    let max = shoal_net::listener::connection_budget();
    let token = cancel.clone();
    let task = tokio::spawn(async move {
        shoal_net::listener::serve(listener, acceptor, router, refused, max, token).await;
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        heartbeat.abort();
    });
    tracing::info!(
        relay = %info.name, region = %info.region, %addr, %fingerprint, metrics = ?metrics_addr,
        cache = %opts.cache_dir.display(), "relay listening"
    );
    Ok(Server { info, cancel, task })
}
