//! The `shoal` subcommands. Each parses its arguments, loads the config from the home directory
//! and calls into the engine, the daemon or the one-shot operations.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_protocol::Seq;
use shoal_protocol::api::{EnrollRequest, Invite};
use shoal_protocol::path::Escaped;

use crate::client::Client;
use crate::config::{self, Config};
use crate::daemon::{self, Status};
use crate::engine::{self, Engine};
use crate::oneshot::{self, EntryJson};
use crate::progress::Progress;
use shoal_protocol::status::{StatusReport, SyncState};

#[derive(Parser)]
#[command(name = "shoal", version, about = "Keep a folder identical on all your devices")]
pub struct Cli {
    /// Where this device's config and state live (default: $SHOAL_HOME, else the platform data dir).
    #[arg(long, global = true, env = "SHOAL_HOME")]
    home: Option<PathBuf>,
    /// No progress bars or summaries.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enroll this device with an invite and set up its sync folder.
    Init {
        /// The invite line printed by `shoal-coordinator user add` / `user invite`.
        #[arg(long)]
        invite: String,
        /// The folder to keep in sync (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// A name for this device (default: the host name).
        #[arg(long)]
        device: Option<String>,
        /// Make every connection from this local address (saved as `bind` in config.toml).
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        /// Fetch through this region's relay (saved as `region` in config.toml); without it, the
        /// nearest relay.
        #[arg(long)]
        region: Option<String>,
    },
    /// Watch the folder and keep it in sync until Ctrl-C or SIGTERM.
    Run,
    /// Reconcile both ways once, then exit (0 when in sync).
    Sync {
        /// Required: run one reconciliation instead of the daemon.
        #[arg(long)]
        once: bool,
    },
    /// Is the folder in sync? Pending work and the last error.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List files on the coordinator (whole tree, or under PATH).
    Ls {
        path: Option<String>,
        /// List the tree as of this journal sequence number.
        #[arg(long)]
        at: Option<Seq>,
        #[arg(long)]
        json: bool,
    },
    /// Every version of a path.
    History {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Download a file (the head, or --version N) to a local path.
    Get {
        remote: String,
        local: PathBuf,
        #[arg(long)]
        version: Option<Seq>,
    },
    /// Upload a local file as the new version of a remote path.
    Put { local: PathBuf, remote: String },
    /// Make an old version the new head (history keeps everything).
    Restore {
        path: String,
        #[arg(long)]
        version: Seq,
    },
    /// This user's devices.
    Devices {
        #[arg(long)]
        json: bool,
        /// Revoke a device (by id, or by a name only one device has). This device may revoke
        /// itself (unless it is the user's last); revoking another device takes a second device:
        /// run the same on another of your devices within 10 minutes.
        #[arg(long)]
        revoke: Option<String>,
    },
    /// The user's other devices this device's daemon is connected to directly: how each was
    /// found, its address, round-trip time and bytes sent and received.
    Peers {
        #[arg(long)]
        json: bool,
    },
    /// Run a local coordinator and two synced folders, ./shoal-demo/{laptop,desktop}, until Ctrl-C.
    Demo {
        /// Where to put the demo (default ./shoal-demo).
        #[arg(long, default_value = "shoal-demo")]
        dir: PathBuf,
    },
}

impl Cli {
    /// Long-running commands log at info level by default.
    pub fn wants_info_logs(&self) -> bool {
        matches!(self.cmd, Cmd::Run | Cmd::Demo { .. })
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let home = config::resolve_home(cli.home.clone())?;
    let quiet = cli.quiet || !std::io::stdout().is_terminal();
    if !matches!(cli.cmd, Cmd::Demo { .. })
        && let Err(e) = config::secure_home(&home)
    {
        tracing::warn!(error = %format!("{e:#}"), "the agent's home may be readable by other users");
    }
    match cli.cmd {
        Cmd::Init { invite, dir, device, bind, region } => init(&home, &invite, &dir, device, bind, region).await,
        Cmd::Run => {
            // Before anything else: a stop asked for while the daemon starts is still graceful.
            let signals = crate::signals::StopSignals::listen().context("listening for stop signals")?;
            let stop = daemon::Stop::default();
            let _signals =
                tokio_util::task::AbortOnDropHandle::new(signals.spawn(stop.cancel.clone(), stop.now.clone()));
            let cfg = Config::load(&home)?;
            daemon::run(&home, cfg, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sync { once } => {
            if !once {
                anyhow::bail!("use `shoal sync --once` for one reconciliation, or `shoal run` to keep syncing");
            }
            sync_once(&home, quiet).await
        }
        Cmd::Status { json } => status(&home, json),
        Cmd::Ls { path, at, json } => {
            let client = Client::new(&Config::load(&home)?)?;
            let prefix =
                path.as_deref().filter(|p| !p.is_empty() && *p != "/").map(oneshot::parse_remote).transpose()?;
            let entries = oneshot::ls(&client, prefix.as_ref(), at).await?;
            if json {
                let v: Vec<EntryJson> = entries.iter().map(EntryJson::from).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in &entries {
                    let kind = if e.kind == shoal_protocol::EntryKind::Dir { "dir " } else { "file" };
                    println!("{kind} {:>12} v{:<6} {}", e.size(), e.version, e.path.escaped());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::History { path, json } => {
            let client = Client::new(&Config::load(&home)?)?;
            let path = oneshot::parse_remote(&path)?;
            let (entries, expired) = client.history_with_expired(&path).await?;
            let pending = client.pending_of(&path).await?.versions;
            if json {
                let v: Vec<EntryJson> = entries
                    .iter()
                    .map(|e| EntryJson {
                        state: oneshot::version_state(e.version, &pending, &expired),
                        ..EntryJson::from(e)
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if entries.is_empty() {
                println!("{}: no versions", path.escaped());
            } else {
                for e in &entries {
                    let what = if e.deleted { "deleted".to_string() } else { format!("{} bytes", e.size()) };
                    let hash = e.hash().map(|h| h.to_string()[..16].to_string()).unwrap_or_default();
                    let state = match oneshot::version_state(e.version, &pending, &expired) {
                        "durable" => "",
                        "pending" => "  pending: not yet backed up, on the devices only",
                        "stuck" => "  stuck: not backed up, and no device has sent it for a while",
                        "expired" => "  expired: past the coordinator's retention, no longer restorable",
                        _ => "  withdrawn: never backed up, its author no longer has it",
                    };
                    println!(
                        "v{:<6} {:<16} {hash:16} device {} at {}{state}",
                        e.version,
                        what,
                        &e.device.to_string()[..8],
                        fmt_time(e.time_ms)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Get { remote, local, version } => {
            let client = Client::new(&Config::load(&home)?)?;
            let e = oneshot::get(&client, &oneshot::parse_remote(&remote)?, version, &local, quiet).await?;
            if !quiet {
                println!(
                    "{} v{} -> {} ({} bytes)",
                    e.path.escaped(),
                    e.version,
                    Escaped(&local.display().to_string()),
                    e.size()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Put { local, remote } => {
            let client = Client::new(&Config::load(&home)?)?;
            let e = oneshot::put(&client, &local, &oneshot::parse_remote(&remote)?, quiet).await?;
            if !quiet {
                println!(
                    "{} -> {} v{} ({} bytes)",
                    Escaped(&local.display().to_string()),
                    e.path.escaped(),
                    e.version,
                    e.size()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore { path, version } => {
            let client = Client::new(&Config::load(&home)?)?;
            let e = oneshot::restore(&client, &oneshot::parse_remote(&path)?, version).await?;
            if !quiet {
                println!("restored {} v{version} as v{}", e.path.escaped(), e.version);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Peers { json } => peers(&home, json),
        Cmd::Devices { json, revoke } => {
            let cfg = Config::load(&home)?;
            let client = Client::new(&cfg)?;
            let devices = client.devices().await?;
            if let Some(which) = revoke {
                return revoke_device(&client, &cfg, &devices, &which, json).await;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                for d in &devices {
                    let me = if d.id == cfg.device_id { " (this device)" } else { "" };
                    let state = match (d.revoked, d.revoke_requested) {
                        (true, _) => " [revoked]".to_string(),
                        (false, Some(r)) => format!(
                            " [revocation asked for by {}, to be confirmed by another device before {}]",
                            device_label(&devices, &r.by),
                            fmt_time(r.expires_ms)
                        ),
                        (false, None) => String::new(),
                    };
                    println!(
                        "{} {:<24} cursor {:<8} last seen {}{me}{state}",
                        d.id,
                        Escaped(&d.name).to_string(),
                        d.cursor,
                        fmt_time(d.last_seen_ms)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { dir } => {
            crate::demo::run(&dir).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `shoal devices --revoke WHICH` (an id, or a name only one device has): revokes this device,
/// or asks to revoke another, which takes a second device's confirmation (or the operator).
async fn revoke_device(
    client: &Client,
    cfg: &Config,
    devices: &[shoal_protocol::api::DeviceInfo],
    which: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let target = match which.parse::<shoal_protocol::DeviceId>() {
        Ok(id) => id,
        Err(_) => {
            let named: Vec<_> = devices.iter().filter(|d| d.name == which).collect();
            match named[..] {
                [d] => d.id,
                [] => anyhow::bail!("no device {} for this user; `shoal devices` lists them", Escaped(which)),
                _ => anyhow::bail!("{} devices are named {}; name one by id", named.len(), Escaped(which)),
            }
        }
    };
    let d = client.revoke(target).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    let label = device_label(devices, &d.id);
    match (d.revoked, d.revoke_requested) {
        (true, _) if d.id == cfg.device_id => println!("revoked this device, {label}: it no longer syncs"),
        (true, _) => println!("revoked {label}"),
        (false, Some(r)) => println!(
            "asked to revoke {label}. A second device must confirm: run `shoal devices --revoke {}` on another of \
             your devices (not {label}) before {}. Or ask the operator: shoal-coordinator device revoke USER {}",
            d.id,
            fmt_time(r.expires_ms),
            d.id
        ),
        (false, None) => anyhow::bail!("{label} was not revoked"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A device as messages name it: its name (escaped) and id.
fn device_label(devices: &[shoal_protocol::api::DeviceInfo], id: &shoal_protocol::DeviceId) -> String {
    match devices.iter().find(|d| d.id == *id) {
        Some(d) => format!("{} ({id})", Escaped(&d.name)),
        None => id.to_string(),
    }
}

/// Enrolls a device: redeems the invite, creates the folder and its marker, writes the config.
pub async fn init(
    home: &Path,
    invite: &str,
    dir: &Path,
    device: Option<String>,
    bind: Option<std::net::IpAddr>,
    region: Option<String>,
) -> anyhow::Result<ExitCode> {
    if let Some(r) = &region {
        anyhow::ensure!(
            shoal_protocol::api::valid_user_name(r),
            "bad region {r:?}: 1-32 characters, lowercase letters, digits, '_' and '-'"
        );
    }
    if Config::path(home).exists() {
        anyhow::bail!("{} already holds a configured device; use another --home", home.display());
    }
    let invite: Invite = invite.parse()?;
    let device_name = device.unwrap_or_else(default_device_name);
    let client = Client::anonymous(&invite.addr, invite.fingerprint, crate::client::Dialer::new(bind))?;
    // The device's own key never leaves it: the coordinator signs a request for it.
    let (key, csr) = shoal_sys::identity::device_request()?;
    let resp = client
        .enroll(&EnrollRequest {
            user: invite.user.clone(),
            secret: invite.secret.clone(),
            device_name: device_name.clone(),
            csr,
        })
        .await?;
    config::save_identity(home, &key.serialize_pem(), &resp.cert, &resp.ca)?;
    engine::init_root(dir)?;
    let root = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let cfg = Config {
        server: invite.addr,
        fingerprint: invite.fingerprint,
        user: invite.user,
        device_id: resp.device_id,
        device_name,
        token: resp.token,
        root: Some(root.clone()),
        rescan_interval: std::time::Duration::from_secs(600),
        debounce: std::time::Duration::from_millis(50),
        bind,
        peer_listen: None,
        lan_sync: true,
        mdns: true,
        relays: true,
        region,
        upload_limit: None,
        download_limit: None,
        lan_limit: None,
        shutdown_grace: std::time::Duration::from_secs(30),
    };
    cfg.save(home)?;
    println!("enrolled device {:?} ({}) for user {}", cfg.device_name, cfg.device_id, cfg.user);
    println!("sync folder: {}", root.display());
    println!("start syncing with: shoal run");
    Ok(ExitCode::SUCCESS)
}

/// Runs cycles until the folder is in sync (or gives up after a bounded number).
pub async fn sync_once(home: &Path, quiet: bool) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(home)?;
    let mut engine = Engine::open(home, cfg)?;
    let spinner = Progress::spinner("syncing", quiet);
    let mut total = engine::CycleReport::default();
    // Rounds that end with nothing queued yet not in sync; a full pass's steps do not count.
    let mut rounds = 0;
    while rounds < 20 {
        let r = engine.cycle().await?;
        if !r.more_work {
            rounds += 1;
        }
        total.bytes_uploaded += r.bytes_uploaded;
        total.bytes_downloaded += r.bytes_downloaded;
        total.fetched_files += r.fetched_files;
        total.committed_changes += r.committed_changes;
        total.conflicts += r.conflicts;
        spinner.set_message(format!("syncing: {} up, {} down", r.committed_changes, r.fetched_files));
        if r.in_sync {
            spinner.finish();
            engine.store().flush().await?;
            if !quiet {
                println!(
                    "in sync at {}: {} changes committed ({} bytes up), {} files fetched ({} bytes down), {} conflicts",
                    r.cursor,
                    total.committed_changes,
                    total.bytes_uploaded,
                    total.fetched_files,
                    total.bytes_downloaded,
                    total.conflicts
                );
            }
            for s in &r.skipped {
                eprintln!("skipped: {}", Escaped(s));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(e) = r.errors.last() {
            tracing::warn!(error = %Escaped(e), "cycle reported an error");
        }
    }
    spinner.finish();
    engine.store().flush().await?;
    eprintln!("not in sync after 20 rounds (files keep changing, or errors; see `shoal status`)");
    Ok(ExitCode::from(2))
}

/// Whether the daemon that wrote `st` is still running.
fn daemon_running(st: &Status) -> bool {
    st.pid != 0 && st.state != SyncState::Stopped && Path::new(&format!("/proc/{}", st.pid)).exists()
}

/// The peers the running daemon is connected to (none if it is not running).
fn connected_peers(home: &Path, running: bool) -> anyhow::Result<Vec<crate::peer::node::PeerStatus>> {
    match std::fs::read(home.join(crate::peer::node::PEERS_FILE)) {
        Ok(b) if running => serde_json::from_slice(&b).context("peers.json is not a peer list"),
        _ => Ok(Vec::new()),
    }
}

fn peers(home: &Path, json: bool) -> anyhow::Result<ExitCode> {
    Config::load(home)?;
    let st = crate::daemon::load_status(home).unwrap_or_default();
    let running = daemon_running(&st);
    let peers = connected_peers(home, running)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
    } else if !running {
        println!("the daemon is not running (shoal run): no peers");
    } else if peers.is_empty() {
        println!("no peers connected");
    } else {
        for p in &peers {
            println!(
                "{} ({})  found by {}  {}  rtt {:.1} ms  sent {} B  received {} B",
                shoal_protocol::path::Escaped(&p.name),
                p.device,
                p.found,
                p.addr,
                p.rtt_ms,
                p.bytes_sent,
                p.bytes_received
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(home: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(home)?;
    let mut st = crate::daemon::load_status(home).unwrap_or_default();
    let running = daemon_running(&st);
    if !running && st.state != SyncState::NeverSynced {
        st.state = SyncState::Stopped;
    }
    if json {
        let report = StatusReport {
            device: cfg.device_name,
            device_id: cfg.device_id,
            root: cfg.root,
            daemon_running: running,
            status: st,
            peers: connected_peers(home, running)?,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("device:  {} ({})", cfg.device_name, cfg.device_id);
        if let Some(r) = &cfg.root {
            println!("folder:  {}", Escaped(&r.display().to_string()));
        }
        println!("daemon:  {}", if running { "running" } else { "not running (start it with `shoal run`)" });
        let state = st.state.describe();
        let quota = st.quota.map(|q| {
            use shoal_protocol::size::format_bytes;
            format!(" ({} used / {} quota)", format_bytes(q.used), q.quota.map_or("none".into(), format_bytes))
        });
        println!("state:   {}{}{}", state, quota.unwrap_or_default(), if st.in_sync { " (in sync)" } else { "" });
        println!("cursor:  {}", st.cursor);
        println!("pending: {} uploads, {} downloads", st.pending_uploads, st.pending_downloads);
        if let Some(r) = st.relay.as_ref().filter(|_| running) {
            println!("relay:   {} ({})", Escaped(&r.name), Escaped(&r.url));
        }
        // Versions the devices hold but the coordinator does not yet: not backed up.
        for v in st.pending_versions.iter().filter(|_| running) {
            let whose = if v.device == cfg.device_id { "this device" } else { "another device" };
            let state = if v.withdrawn {
                "withdrawn: its author no longer has it".to_string()
            } else if v.stuck {
                format!("stuck: no device has sent its {} missing chunks for a while; not fetched", v.missing_chunks)
            } else {
                format!("not yet backed up ({} chunks to upload from {whose})", v.missing_chunks)
            };
            println!("version: {} v{} {state}", v.path.escaped(), v.version);
        }
        if st.last_sync_ms > 0 {
            println!("last in sync: {}", fmt_time(st.last_sync_ms));
        }
        // Errors and skipped entries name files, whose names may hold control characters.
        if let Some(e) = &st.last_error {
            println!("last error: {}", Escaped(e));
        }
        for s in &st.skipped {
            println!("skipped: {}", Escaped(s));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn default_device_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| shoal_protocol::api::valid_device_name(s))
        .unwrap_or_else(|| "device".to_string())
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn fmt_time(ms: u64) -> String {
    let (date, (h, m, s)) = engine::utc(ms / 1000);
    format!("{date} {h:02}:{m:02}:{s:02} UTC")
}
