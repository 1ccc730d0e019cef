//! Local administration while the server runs: a Unix socket in the data directory (mode 0600, so
//! only the operator's account can use it) that mints invites and lists and revokes devices.
//! sled allows one process per database, so the CLI talks to the running server here and opens
//! the store itself only when no server is running.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_protocol::ChunkId;
use shoal_protocol::path::Escaped;
use shoal_protocol::size::format_bytes;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::App;
use crate::store::{DeviceRec, Store};

/// What the operator asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// A one-time invite for `user` (created first when `create`), valid for `expires_secs`.
    Invite { user: String, create: bool, expires_secs: u64 },
    /// The user's devices.
    DeviceList { user: String },
    /// Revoke one of the user's devices, by id or by (unique) name.
    DeviceRevoke { user: String, device: String },
    /// Undo a revocation: the device's token and certificate work again.
    DeviceReinstate { user: String, device: String },
    /// Collect garbage now, or report what a collection would do.
    Gc { dry_run: bool },
    /// Set (or with `None`, remove) a user's storage quota, in bytes.
    SetQuota { user: String, quota: Option<u64> },
    /// Every user with its usage and quota.
    UserList,
    /// Add a relay in `region`; the reply's last line is its token.
    RelayAdd { name: String, region: String },
    /// Every relay, and whether it is live.
    RelayList,
    /// Remove a relay: its token stops working and devices stop being offered it.
    RelayRemove { name: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    output: Option<String>,
    error: Option<String>,
}

/// Longest request line the socket reads.
const MAX_LINE: u64 = 4096;

fn socket_path(data: &Path) -> PathBuf {
    data.join("admin.sock")
}

/// Binds the admin socket and serves it until `cancel`. The socket is bound inside a fresh
/// private directory, given mode 0600 there, and only then renamed into place, so it is never
/// reachable with looser permissions, whatever the umask.
pub(crate) fn spawn(
    data: &Path,
    app: Arc<App>,
    addr: String,
    fingerprint: ChunkId,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data);
    let staging = tempfile::Builder::new()
        .prefix(".admin-")
        .tempdir_in(data)
        .with_context(|| format!("creating a private directory in {}", data.display()))?;
    std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o700))?;
    let tmp = staging.path().join("admin.sock");
    let listener = tokio::net::UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("placing {}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let sock = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (app, addr) = (app.clone(), addr.clone());
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut line = String::new();
                let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_LINE));
                if rd.read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => match execute(&app.store.clone(), Some(app), req, &addr, fingerprint).await {
                        Ok(output) => Reply { output: Some(output), error: None },
                        Err(e) => Reply { output: None, error: Some(format!("{e:#}")) },
                    },
                    Err(e) => Reply { output: None, error: Some(format!("bad admin request: {e}")) },
                };
                let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                out.push(b'\n');
                let _ = wr.write_all(&out).await;
            });
        }
    }))
}

/// Carries out `req` through the running server's admin socket, or directly in the data
/// directory when no server is running. Returns what to print.
pub async fn request(data: &Path, req: &Request) -> anyhow::Result<String> {
    match tokio::net::UnixStream::connect(socket_path(data)).await {
        Ok(sock) => {
            let (rd, mut wr) = sock.into_split();
            let mut line = serde_json::to_vec(req)?;
            line.push(b'\n');
            wr.write_all(&line).await?;
            let mut line = String::new();
            BufReader::new(rd).read_line(&mut line).await?;
            let reply: Reply = serde_json::from_str(&line).context("bad reply from the admin socket")?;
            match (reply.output, reply.error) {
                (Some(out), _) => Ok(out),
                (None, Some(e)) => anyhow::bail!(e),
                (None, None) => anyhow::bail!("empty reply from the admin socket"),
            }
        }
        Err(_) => {
            let identity = crate::tls_identity(data)?;
            let addr = std::fs::read(data.join("server.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<crate::ServerInfo>(&b).ok())
                .map_or_else(|| crate::DEFAULT_LISTEN.to_string(), |i| i.public_addr);
            let store = Store::open(&data.join("meta"))
                .context("the server is not answering on its admin socket and its database is locked")?;
            execute(&store, None, req.clone(), &addr, identity.fingerprint()).await
        }
    }
}

async fn execute(
    store: &Store,
    app: Option<Arc<App>>,
    req: Request,
    addr: &str,
    fingerprint: ChunkId,
) -> anyhow::Result<String> {
    match req {
        Request::Invite { user, create, expires_secs } => {
            let ttl_ms = Duration::from_secs(expires_secs).as_millis().try_into().unwrap_or(u64::MAX);
            let inv = crate::invite(store, &user, create, addr, fingerprint, ttl_ms)?;
            store.flush().await?;
            Ok(inv.to_string())
        }
        Request::DeviceList { user } => {
            let u = store.user(&user)?.with_context(|| format!("no user {user:?}"))?;
            Ok(render_devices(&store.devices(u.id)?))
        }
        Request::DeviceRevoke { user, device } => {
            let u = store.user(&user)?.with_context(|| format!("no user {user:?}"))?;
            let devices = store.devices(u.id)?;
            let dev = find_device(&devices, &device)?;
            let revoked = match app {
                Some(app) => {
                    let guard = app.user_lock(u.id).lock_owned().await;
                    crate::revoke_device(app, dev.id, u.id, crate::Actor::Operator, guard)
                        .await
                        .map_err(|e| anyhow::anyhow!(e.0.message))?
                }
                None => {
                    let d = store.update_device(&dev.id, |d| {
                        d.revoked = true;
                        true
                    })?;
                    store.withdraw_device(u.id, dev.id)?;
                    store.rotate_lan_key(u.id, shoal_sys::clock::now_ms())?;
                    store.flush().await?;
                    if let Some(d) = &d {
                        tracing::info!(user = d.user, device = %d.id, by = %crate::Actor::Operator, "device revoked");
                    }
                    d
                }
            };
            let d = revoked.with_context(|| format!("device {device:?} disappeared"))?;
            Ok(format!("revoked device {} ({}) of user {user}", d.id, Escaped(&d.name)))
        }
        Request::SetQuota { user, quota } => {
            let u = store.user(&user)?.with_context(|| format!("no user {user:?}"))?;
            store.set_quota(u.id, quota)?;
            let used = store.usage(u.id)?;
            tracing::info!(user = %user, quota = ?quota, by = %crate::Actor::Operator, "quota set");
            Ok(match quota {
                Some(q) => format!(
                    "quota of {user}: {} ({} used{})",
                    format_bytes(q),
                    format_bytes(used),
                    if used > q { "; over it: uploads that add data are refused until space is freed" } else { "" }
                ),
                None => format!("quota of {user}: none ({} used)", format_bytes(used)),
            })
        }
        Request::UserList => {
            let mut out = format!("{:<24}  {:>12}  {:>12}  devices", "user", "used", "quota");
            for u in store.users()? {
                let devices = store.devices(u.id)?.iter().filter(|d| !d.revoked).count();
                let quota = store.quota(u.id)?.map_or("none".to_string(), format_bytes);
                out += &format!(
                    "\n{:<24}  {:>12}  {:>12}  {devices}",
                    Escaped(&u.name).to_string(),
                    format_bytes(store.usage(u.id)?),
                    quota
                );
            }
            Ok(out)
        }
        Request::Gc { dry_run } => {
            let app = app.context(
                "the coordinator is not running: garbage collection runs inside it, with its storage and retention settings",
            )?;
            let r = crate::run_gc(&app, dry_run).await?;
            Ok(render_gc(&r, app.retention))
        }
        Request::RelayAdd { name, region } => {
            anyhow::ensure!(
                crate::relays::valid_relay_name(&name) && crate::relays::valid_relay_name(&region),
                "relay and region names are 1-32 characters: lowercase letters, digits, '_' and '-'"
            );
            let token = shoal_sys::random::hex(32);
            let rec = crate::store::RelayRec {
                name: name.clone(),
                region: region.clone(),
                token_hash: *blake3::hash(token.as_bytes()).as_bytes(),
                added_ms: shoal_sys::clock::now_ms(),
            };
            store.add_relay(&rec)?.with_context(|| format!("there is already a relay {name:?}"))?;
            store.flush().await?;
            tracing::info!(relay = %name, region = %region, by = %crate::Actor::Operator, "relay added");
            Ok(format!(
                "relay {name} added in region {region}; start it with\n  \
                 SHOAL_RELAY_TOKEN=TOKEN shoal-relay serve --region {region} --coordinator {addr} \
                 --coordinator-fingerprint {fingerprint} --cache-dir DIR --cache-size SIZE\n\
                 (the token in the environment or the config file, not on the command line, where \
                 other local users can read it); its token (shown once, kept only as a hash):\n{token}"
            ))
        }
        Request::RelayList => {
            let live = match &app {
                Some(app) => crate::relays::live_relays(app).map_err(|e| anyhow::anyhow!(e.0.message))?,
                None => Vec::new(),
            };
            let mut out = format!("{:<24}  {:<16}  state", "relay", "region");
            for r in store.relays()? {
                let state = match live.iter().find(|(l, _)| l.name == r.name) {
                    Some((_, l)) => format!("live at {} (certificate {})", l.url, l.fingerprint),
                    None if app.is_some() => "not heard from lately".to_string(),
                    None => "unknown (the coordinator is not running)".to_string(),
                };
                out += &format!("\n{:<24}  {:<16}  {state}", r.name, r.region);
            }
            Ok(out)
        }
        Request::RelayRemove { name } => {
            anyhow::ensure!(store.remove_relay(&name)?, "no relay {name:?}; `relay list` shows them");
            store.flush().await?;
            if let Some(app) = &app {
                app.relays.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            }
            tracing::info!(relay = %name, by = %crate::Actor::Operator, "relay removed");
            Ok(format!("relay {name} removed; its token no longer works"))
        }
        Request::DeviceReinstate { user, device } => {
            let u = store.user(&user)?.with_context(|| format!("no user {user:?}"))?;
            let devices = store.devices(u.id)?;
            let dev = find_device(&devices, &device)?;
            anyhow::ensure!(dev.revoked, "device {} ({}) is not revoked", dev.id, Escaped(&dev.name));
            let d = store.reinstate_device(&dev.id)?.with_context(|| format!("device {device:?} disappeared"))?;
            store.flush().await?;
            if let Some(app) = app {
                app.device_list_changed(d.user);
            }
            tracing::info!(user = d.user, device = %d.id, name = %Escaped(&d.name), by = %crate::Actor::Operator, "device reinstated");
            Ok(format!("reinstated device {} ({}) of user {user}", d.id, Escaped(&d.name)))
        }
    }
}

fn render_gc(r: &crate::gc::Report, policy: crate::gc::Policy) -> String {
    let keep = policy.keep.map_or("forever".to_string(), |k| humantime::format_duration(k).to_string());
    let grace = humantime::format_duration(policy.grace);
    let mut out = String::new();
    if r.dry_run {
        out += "dry run, nothing changed: the figures are what a collection would do now\n";
    }
    out += &format!("retention: every version for {keep} after it was replaced; heads always; grace {grace}\n");
    out += &format!("versions: {} (expired, not restorable: {})\n", r.versions, r.versions_expired);
    out += &format!(
        "chunks stored: {}, referenced: {}, unreferenced: {} ({})\n",
        r.chunks_stored,
        r.chunks_referenced,
        r.chunks_unreferenced,
        format_bytes(r.bytes_unreferenced)
    );
    out += &format!(
        "chunks condemned now: {}, chunks deleted: {} ({}), chunks revived: {}\n",
        r.chunks_condemned,
        r.chunks_deleted,
        format_bytes(r.bytes_deleted),
        r.chunks_revived
    );
    out += &format!(
        "packs repacked: {} (chunks moved: {}), packs retired: {}, packs deleted: {} (reclaimed {})\n",
        r.packs_repacked,
        r.chunks_moved,
        r.packs_retired,
        r.packs_deleted,
        format_bytes(r.bytes_reclaimed)
    );
    out += &format!("took {} ms", r.millis);
    out
}

/// The device named `which`: by id, or by a name only one of them has.
fn find_device<'a>(devices: &'a [DeviceRec], which: &str) -> anyhow::Result<&'a DeviceRec> {
    if let Some(d) = devices.iter().find(|d| d.id.to_string() == which) {
        return Ok(d);
    }
    let named: Vec<&DeviceRec> = devices.iter().filter(|d| d.name == which).collect();
    match named[..] {
        [d] => Ok(d),
        [] => anyhow::bail!("no device {which:?} for this user; `device list` shows them"),
        _ => anyhow::bail!(
            "{} devices are named {which:?}; name one by id: {}",
            named.len(),
            named.iter().map(|d| d.id.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn render_devices(devices: &[DeviceRec]) -> String {
    let mut out = format!("{:<32}  {:<20}  {:>8}  {:<7}  last seen (UTC)", "id", "name", "cursor", "state");
    for d in devices {
        out.push_str(&format!(
            "\n{:<32}  {:<20}  {:>8}  {:<7}  {}",
            d.id,
            Escaped(&d.name).to_string(),
            d.cursor,
            if d.revoked { "revoked" } else { "active" },
            crate::utc(d.last_seen_ms)
        ));
    }
    out
}
