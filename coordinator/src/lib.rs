//! The Shoal coordinator: authoritative, versioned metadata and the per-user journal that every
//! device catches up from, the chunk store, and the HTTPS API over both. `start` runs a server
//! in-process (used by the binary, the demo and tests); `invite` mints enrollment invites.

pub mod admin;
mod api;
mod chunk_records;
pub mod chunks;
mod commit;
pub mod config;
mod error;
pub mod gc;
mod metrics;
pub mod relays;
mod revocation;
#[cfg(test)]
mod s3_tests;
mod service;
pub mod store;
mod trim;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
pub use shoal_protocol::api::ServerInfo;
use shoal_protocol::api::{Invite, valid_user_name};
use shoal_protocol::{ChunkId, DeviceId, Seq};
use shoal_sys::clock::now_ms;
use shoal_sys::fs::{Durability, write_atomic};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::chunks::ChunkStore;
use crate::error::ApiResult;
use crate::metrics::Metrics;
use crate::store::{DeviceRec, InviteRec, Store, UserId};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
/// Default address of the metrics listener (plain HTTP): loopback, since the counters describe
/// every user's activity.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7444";
/// Default of [`ServeOptions::gc_interval`].
pub const DEFAULT_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);
/// Default of [`ServeOptions::pending_stuck_after`].
pub const DEFAULT_PENDING_STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Data directory: metadata, chunks, TLS identity, admin socket.
    pub data: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address devices should dial, written into invites. Defaults to the bound address.
    pub public_addr: Option<String>,
    /// Address of the plain-HTTP listener for `/metrics` and `/healthz`; `None` serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a pending version may go without any of its chunks arriving before it counts as
    /// stuck (devices stop trying to fetch it; see `PendingVersion::stuck`).
    pub pending_stuck_after: std::time::Duration,
    /// Chunks in this S3 bucket; `None`: pack files in `DATA/chunks`.
    pub s3: Option<shoal_packs::s3::S3Config>,
    /// What is kept, and how garbage collection deletes the rest.
    pub retention: gc::Policy,
    /// How often garbage collection runs in the background; `None`: only when asked (`gc`).
    pub gc_interval: Option<std::time::Duration>,
}

/// Shared state of the API handlers.
pub(crate) struct App {
    pub store: Store,
    pub chunks: ChunkStore,
    pub metrics: Arc<Metrics>,
    /// One commit at a time per user (see `api::commit`); users never wait for each other.
    commit_locks: Mutex<HashMap<UserId, Arc<tokio::sync::Mutex<()>>>>,
    /// Each user's durable journal head: what `changes`, pushes and history serve up to.
    heads: Mutex<HashMap<UserId, watch::Sender<Seq>>>,
    /// Bumped whenever any user's device list changes (see `device_list_changed`), so open
    /// subscriptions and long-polls re-check their device and tell it of the change.
    pub device_changes: watch::Sender<u64>,
    /// Per user, how often its device list changed since start (`HeadNotice::devices`).
    device_lists: Mutex<HashMap<UserId, u64>>,
    /// Requests to revoke a device that wait for a second device (see `revocation`), by the
    /// device to be revoked. In memory: a restart forgets them, and they are asked for again.
    pub revoke_requests: Mutex<HashMap<DeviceId, shoal_protocol::api::RevokeRequest>>,
    /// Where each user's devices said their peer endpoints listen, and the address they said it
    /// from (in memory only: presence is not worth a disk write, and a restart forgets nothing
    /// that the next announcement does not bring back).
    pub presence: Mutex<HashMap<UserId, HashMap<DeviceId, Presence>>>,
    /// Devices holding a push subscription now, with how many: "online" for pending versions.
    pub online: Mutex<HashMap<DeviceId, u32>>,
    /// [`ServeOptions::pending_stuck_after`], in milliseconds.
    pub stuck_after_ms: u64,
    /// [`ServeOptions::retention`].
    pub retention: gc::Policy,
    /// One garbage collection at a time (the background one, or one an operator asked for).
    pub gc_lock: tokio::sync::Mutex<()>,
    /// Signs relay tickets (`DATA/tls/ticket.key`).
    pub ticket_key: shoal_net::ticket::TicketKey,
    /// Relays that registered since start, by name (see `relays`).
    pub relays: Mutex<HashMap<String, relays::LiveRelay>>,
}

/// A device's last announcement.
pub(crate) struct Presence {
    pub observed: std::net::IpAddr,
    pub addrs: Vec<String>,
    pub at: std::time::Instant,
}

impl App {
    /// Notes that `user`'s device list changed: the user's devices are told at once (their push
    /// subscriptions carry the new count), and subscriptions and long-polls of every revoked
    /// device end.
    pub fn device_list_changed(&self, user: UserId) {
        *self.device_lists.lock().unwrap_or_else(|p| p.into_inner()).entry(user).or_default() += 1;
        self.device_changes.send_modify(|g| *g += 1);
    }

    /// How often `user`'s device list changed since start.
    pub fn device_list_generation(&self, user: UserId) -> u64 {
        self.device_lists.lock().unwrap_or_else(|p| p.into_inner()).get(&user).copied().unwrap_or(0)
    }

    /// The waiting request to revoke device `id`, if one has not expired.
    pub fn revoke_request(&self, id: &DeviceId) -> Option<shoal_protocol::api::RevokeRequest> {
        let reqs = self.revoke_requests.lock().unwrap_or_else(|p| p.into_inner());
        reqs.get(id).filter(|r| r.expires_ms > now_ms()).copied()
    }

    /// `user`'s commit lock.
    pub fn user_lock(&self, user: UserId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.commit_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(user).or_default().clone()
    }

    /// The channel that announces `user`'s durable journal head. Made, from the store, before the
    /// user's first commit since start appends anything (the commit handler asks for it first), so
    /// its first value is durable too.
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
    pub metrics_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    store: Store,
}

impl Server {
    /// Mints an invite for `user`, creating the user when `create` is set.
    pub fn invite(&self, user: &str, create: bool) -> anyhow::Result<Invite> {
        invite(&self.store, user, create, &self.public_addr, self.fingerprint, store::DEFAULT_INVITE_TTL_MS)
    }

    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        let _ = self.store.flush().await;
    }
}

/// Opens the chunk store on the backend `opts` name, after checking it is the one this data
/// directory's chunks are in: a chunk index opened on another backend would find none of its
/// packs and forget them all.
async fn open_chunks(opts: &ServeOptions, store: &Store) -> anyhow::Result<ChunkStore> {
    let (want, what) = match &opts.s3 {
        Some(s3) => (format!("s3://{}/{}", s3.bucket, s3.prefix), "S3 storage"),
        None => ("local".to_string(), "the chunk store"),
    };
    let recorded = store.chunk_backend()?;
    if let Some(have) = recorded.as_ref().filter(|have| **have != want) {
        anyhow::bail!(
            "this data directory's chunks are in {have}, not {want}: start with the same storage settings \
             (moving chunks between backends is not supported)"
        );
    }
    let app_store = store.clone();
    let (opts, store) = (opts.clone(), store.clone());
    let rt = tokio::runtime::Handle::current();
    let chunks = tokio::task::spawn_blocking(move || -> anyhow::Result<ChunkStore> {
        let chunks = match opts.s3 {
            Some(cfg) => {
                let backend = shoal_packs::s3::S3Packs::open(cfg, &opts.data.join("s3"), rt)?;
                ChunkStore::open(Arc::new(backend), store)?
            }
            None => ChunkStore::open_local(&opts.data.join("chunks"), store)?,
        };
        tracing::info!(backend = chunks.describe(), "chunk store open");
        Ok(chunks)
    })
    .await?
    .with_context(|| format!("opening {what}"))?;
    // Recorded once the backend answered: a typo in a first start's settings pins nothing.
    if recorded.is_none() {
        app_store.set_chunk_backend(&want)?;
    }
    Ok(chunks)
}

/// The coordinator's TLS identity, `DATA/tls/{cert,key}.der`, made on first start.
pub fn tls_identity(data: &std::path::Path) -> anyhow::Result<shoal_net::identity::Identity> {
    shoal_net::identity::Identity::load_or_create(&data.join("tls"), &["localhost", "127.0.0.1", "shoal-coordinator"])
}

/// Opens the data directory, binds, and serves until `shutdown`.
pub async fn start(opts: ServeOptions) -> anyhow::Result<Server> {
    prepare_data_dir(&opts.data)?;
    let identity = tls_identity(&opts.data)?;
    let ticket_key = shoal_net::ticket::TicketKey::load_or_create(&opts.data.join("tls").join("ticket.key"))
        .map_err(anyhow::Error::msg)?;
    let store = Store::open(&opts.data.join("meta"))
        .context("is another shoal-coordinator already running on this data directory?")?;
    let chunks = open_chunks(&opts, &store).await?;
    // After a crash of the process alone, the store may hold writes that never reached the disk;
    // make them durable before any of them is served as such.
    store.flush_blocking().context("flushing the metadata store")?;
    let (listener, metrics_listener) = shoal_net::listener::bind_with_metrics(opts.listen, opts.metrics_listen).await?;
    let addr = listener.local_addr()?;
    let metrics_addr = metrics_listener.as_ref().map(tokio::net::TcpListener::local_addr).transpose()?;
    let public_addr = opts.public_addr.clone().unwrap_or_else(|| addr.to_string());
    let fingerprint = identity.fingerprint();
    let app = Arc::new(App {
        store: store.clone(),
        chunks,
        metrics: Arc::default(),
        commit_locks: Mutex::new(HashMap::new()),
        heads: Mutex::new(HashMap::new()),
        device_changes: watch::Sender::new(0),
        device_lists: Mutex::new(HashMap::new()),
        revoke_requests: Mutex::new(HashMap::new()),
        presence: Mutex::new(HashMap::new()),
        online: Mutex::new(HashMap::new()),
        stuck_after_ms: u64::try_from(opts.pending_stuck_after.as_millis()).unwrap_or(u64::MAX),
        retention: opts.retention,
        gc_lock: tokio::sync::Mutex::new(()),
        ticket_key,
        relays: Mutex::new(HashMap::new()),
    });
    let cancel = CancellationToken::new();
    let admin = admin::spawn(&opts.data, app.clone(), public_addr.clone(), fingerprint, cancel.clone())?;
    let info = ServerInfo {
        addr: addr.to_string(),
        public_addr: public_addr.clone(),
        fingerprint,
        pid: std::process::id(),
        metrics_addr: metrics_addr.map(|a| a.to_string()),
    };
    let info_path = opts.data.join("server.json");
    write_atomic(&info_path, &serde_json::to_vec_pretty(&info)?, Durability::Synced)
        .with_context(|| format!("writing {}", info_path.display()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config()?);
    let trimmer = trim::spawn(app.metrics.clone(), app.chunks.clone(), cancel.clone());
    let collector = opts.gc_interval.map(|every| gc_worker(app.clone(), every, cancel.clone()));
    let max_connections = shoal_net::listener::connection_budget();
    let metrics_task = metrics_listener
        .map(|l| tokio::spawn(shoal_net::listener::serve_plain(l, api::metrics_router(app.clone()), cancel.clone())));
    let refused = app.metrics.refused_connections.clone();
    let router = api::router(app);
    let token = cancel.clone();
    let task = tokio::spawn(async move {
        shoal_net::listener::serve(listener, acceptor, router, refused, max_connections, token).await;
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        admin.abort();
        trimmer.abort();
        if let Some(c) = collector {
            c.abort();
        }
    });
    tracing::info!(%addr, %fingerprint, max_connections, metrics = ?metrics_addr, "coordinator listening");
    Ok(Server { addr, fingerprint, public_addr, metrics_addr, cancel, task, store })
}

/// Runs one garbage collection (or a dry run) under the collection lock, with its progress and
/// outcome in `/metrics` and the log.
pub(crate) async fn run_gc(app: &Arc<App>, dry_run: bool) -> anyhow::Result<gc::Report> {
    let _one = app.gc_lock.lock().await;
    app.metrics.gc_running.set(1);
    let (store, chunks, policy) = (app.store.clone(), app.chunks.clone(), app.retention);
    let res =
        tokio::task::spawn_blocking(move || gc::collect(&store, &chunks, &policy, shoal_sys::clock::now_ms(), dry_run))
            .await;
    app.metrics.gc_running.set(0);
    let report = res?.context("garbage collection")?;
    if !dry_run {
        app.metrics.gc_finished(&report, shoal_sys::clock::now_ms());
        tracing::info!(
            versions_expired = report.versions_expired,
            chunks_condemned = report.chunks_condemned,
            chunks_deleted = report.chunks_deleted,
            packs_repacked = report.packs_repacked,
            packs_deleted = report.packs_deleted,
            bytes_reclaimed = report.bytes_reclaimed,
            millis = report.millis,
            "garbage collection done"
        );
    }
    Ok(report)
}

/// Collects garbage every `every`, the first time one period after start.
fn gc_worker(app: Arc<App>, every: std::time::Duration, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = run_gc(&app, false).await {
                app.metrics.gc_failures.inc();
                tracing::error!(error = format!("{e:#}"), "garbage collection failed; trying again next period");
            }
        }
    })
}

/// Who revoked or reinstated a device, for the log.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Actor {
    /// The operator, through `shoal-coordinator device ...`.
    Operator,
    /// The device itself.
    Itself,
    /// `confirmed_by`, confirming `requested_by`'s request.
    Devices { requested_by: DeviceId, confirmed_by: DeviceId },
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Operator => write!(f, "the operator"),
            Actor::Itself => write!(f, "the device itself"),
            Actor::Devices { requested_by, confirmed_by } => {
                write!(f, "device {confirmed_by}, confirming device {requested_by}'s request")
            }
        }
    }
}

/// Revokes device `id` of user `owner`, whose commit lock the caller holds (`_locked`): durable
/// before returning, its pending versions withdrawn, and every open subscription or long-poll of
/// the device ended. `None` if the user has no such device. Runs in a task of its own, so a
/// caller that goes away midway cannot leave a revocation stored but not announced.
pub(crate) async fn revoke_device(
    app: Arc<App>,
    id: DeviceId,
    owner: UserId,
    by: Actor,
    _locked: tokio::sync::OwnedMutexGuard<()>,
) -> ApiResult<Option<DeviceRec>> {
    let task = tokio::spawn(async move {
        let _locked = _locked;
        let dev = app.store.update_device(&id, |d| {
            if d.user != owner {
                return false;
            }
            d.revoked = true;
            true
        })?;
        if let Some(d) = &dev {
            // It will upload none of its pending versions now: a device that holds one does.
            let withdrawn = app.store.withdraw_device(d.user, d.id)?;
            // It knows the LAN key: the others move to a new one.
            app.store.rotate_lan_key(d.user, now_ms())?;
            app.store.flush().await?;
            if withdrawn > 0 {
                tracing::info!(user = d.user, device = %d.id, versions = withdrawn, "the revoked device's pending versions are withdrawn");
            }
            app.revoke_requests.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            app.device_list_changed(d.user);
            tracing::info!(user = d.user, device = %d.id, name = %shoal_protocol::path::Escaped(&d.name), by = %by, "device revoked");
        }
        Ok(dev)
    });
    task.await.map_err(|e| error::ApiError::from(std::io::Error::other(e.to_string())))?
}

/// Makes sure the data directory is private before anything is written to it: created 0700 when
/// new; refused when group or others can write to it (anyone could then swap the database or the
/// keys); a warning when they can read it. The directories the coordinator creates inside it are
/// made 0700 whatever the umask.
fn prepare_data_dir(data: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::metadata(data) {
        Ok(md) => {
            anyhow::ensure!(md.is_dir(), "{} is not a directory", data.display());
            let mode = md.permissions().mode() & 0o777;
            anyhow::ensure!(
                mode & 0o022 == 0,
                "the data directory {} is writable by other users (mode {mode:03o}); run `chmod 700 {}` and start again",
                data.display(),
                data.display()
            );
            if mode & 0o044 != 0 {
                tracing::warn!(
                    dir = %data.display(),
                    mode = format!("{mode:03o}"),
                    "the data directory is readable by other users; `chmod 700` it"
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data)
                .with_context(|| format!("creating {}", data.display()))?;
            std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))?;
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", data.display())),
    }
    for sub in ["meta", "chunks", "tls"] {
        let dir = data.join(sub);
        match std::fs::metadata(&dir) {
            Ok(md) if md.permissions().mode() & 0o077 == 0 => continue,
            Ok(_) => tracing::info!(dir = %dir.display(), "making the directory private (0700)"),
            Err(_) => std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?,
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    Ok(())
}

/// Mints a one-time enrollment invite for `name`, valid for `ttl_ms`, creating the user when
/// `create` is set.
pub fn invite(
    store: &Store,
    name: &str,
    create: bool,
    addr: &str,
    fingerprint: ChunkId,
    ttl_ms: u64,
) -> anyhow::Result<Invite> {
    if !valid_user_name(name) {
        anyhow::bail!("invalid user name {name:?}: use 1-32 of a-z, 0-9, '_' and '-', starting with a letter or digit");
    }
    let user = match (store.user(name)?, create) {
        (Some(_), true) => {
            anyhow::bail!("user {name:?} already exists; use `user invite {name}` to enroll another device")
        }
        (Some(u), false) => u,
        (None, true) => {
            let ca = shoal_net::ca::new_user_ca(name)?;
            store.add_user(name, now_ms(), ca)?.context("user was created concurrently")?
        }
        (None, false) => anyhow::bail!("no user {name:?}; create it with `user add {name}`"),
    };
    let secret = shoal_sys::random::hex(16);
    let now = now_ms();
    let rec = InviteRec { user: user.id, created_ms: now, expires_ms: now.saturating_add(ttl_ms) };
    store.add_invite(blake3::hash(secret.as_bytes()).as_bytes(), &rec)?;
    Ok(Invite { addr: addr.to_string(), user: name.to_string(), secret, fingerprint })
}

/// A Unix time in milliseconds as `YYYY-MM-DD HH:MM:SS`, UTC.
pub(crate) fn utc(ms: u64) -> String {
    let t = shoal_sys::clock::utc(ms / 1000);
    format!("{} {:02}:{:02}:{:02}", shoal_sys::clock::ymd(&t), t.hour(), t.minute(), t.second())
}
