//! `shoal run`: the long-lived loop. Watcher events (debounced, as hints) and push notices from
//! the coordinator's subscription wake it; a periodic full rescan is the backstop; failures back
//! off exponentially. After every cycle it writes `status.json` for `shoal status`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_protocol::api::DeviceInfo;
use shoal_protocol::{Seq, SyncPath};
use shoal_sys::clock::now_ms;
use shoal_sys::fs::{Durability, write_atomic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::config::Config;
use crate::engine::{CycleReport, Engine};
use crate::own::OwnWrites;
use crate::peer::node::PeerNode;

pub use shoal_protocol::status::{RelayInUse, Status, SyncState};

/// Where `status.json` is.
pub fn status_path(home: &Path) -> PathBuf {
    home.join("status.json")
}

/// The daemon's last status, if it wrote one that reads.
pub fn load_status(home: &Path) -> Option<Status> {
    serde_json::from_slice(&std::fs::read(status_path(home)).ok()?).ok()
}

/// Best effort and not synced: the status is rewritten after every cycle, and a lost one only
/// shows an older state until the next.
fn save_status(status: &Status, home: &Path) {
    if let Ok(b) = serde_json::to_vec_pretty(status) {
        let _ = write_atomic(&status_path(home), &b, Durability::Unsynced);
    }
}

/// Why the loop woke up.
#[derive(Debug)]
enum Hint {
    /// Paths that changed (or a request to look at everything).
    Local {
        rescan: bool,
        paths: Vec<PathBuf>,
        /// Directories that appeared: their entries are to be looked at.
        new_dirs: Vec<PathBuf>,
    },
    Remote(Seq),
    /// Run a cycle to learn where this device stands (the push subscription closed: the
    /// coordinator went away, or revoked this device).
    Wake,
}

/// Passes a hint to the engine: changed paths become dirty; a rescan request starts a full pass.
fn take_hint(engine: &mut Engine, root: &Path, hint: Hint) {
    match hint {
        Hint::Local { rescan, paths, new_dirs } => {
            if rescan {
                tracing::info!("watcher asked for a full rescan");
                engine.start_full_pass();
            }
            // Names that cannot be synced are reported by the scans; events for them are noise.
            let sync_path = |p: &PathBuf| SyncPath::from_relative(p.strip_prefix(root).ok()?).ok();
            engine.mark_dirty(paths.iter().filter_map(sync_path));
            engine.mark_new_dirs(new_dirs.iter().filter_map(sync_path));
        }
        Hint::Remote(head) => tracing::debug!(head, "coordinator head moved"),
        Hint::Wake => {}
    }
}

/// How `run` is told to stop: `cancel` ends syncing, after which the daemon finishes the uploads
/// it owes for at most `shutdown_grace`; `now` ends that too.
#[derive(Clone, Default)]
pub struct Stop {
    pub cancel: CancellationToken,
    pub now: CancellationToken,
}

/// Runs until `stop.cancel` fires, then finishes what it owes (see [`Stop`]).
pub async fn run(home: &Path, cfg: Config, stop: Stop) -> anyhow::Result<()> {
    // Peers, the watcher, open files and connections to the coordinator all take descriptors:
    // as many as the system allows, so that a busy LAN cannot starve the rest.
    if let (_, Some(e)) = shoal_sys::limits::raise_open_files() {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    let cancel = stop.cancel.clone();
    let root = cfg.root()?.to_path_buf();
    let grace = cfg.shutdown_grace;
    let debounce = cfg.debounce;
    let rescan_every = cfg.rescan_interval;
    let (me, server, peer_listen, lan_limit, mdns, lan_sync) =
        (cfg.device_id, cfg.server.clone(), cfg.peer_listen(), cfg.lan_limit, cfg.mdns, cfg.lan_sync);
    let mut engine = Engine::open(home, cfg)?;
    let (tx, mut rx) = mpsc::channel::<Hint>(256);
    let hints = Arc::new(AtomicU64::new(0));
    // Set when a watcher hint could not be queued: its paths are lost, so a full pass runs.
    let overflow = Arc::new(AtomicBool::new(false));
    let _watcher = watch(&root, debounce, tx.clone(), engine.own_writes(), hints.clone(), overflow.clone())?;
    // Signalled when the push subscription says the user's device list changed.
    let devices_changed = Arc::new(tokio::sync::Notify::new());
    let subscriber =
        tokio::spawn(subscribe(engine.client().clone(), tx.clone(), devices_changed.clone(), cancel.clone()));
    let _abort = tokio_util::task::AbortOnDropHandle::new(subscriber);
    let roster = crate::peer::tls::Roster::load(home).unwrap_or_else(|e| {
        tracing::warn!(error = %format!("{e:#}"), "ignoring the saved device list; fetching it anew");
        crate::peer::tls::Roster::default()
    });
    // Without a usable identity or port the folder still syncs, through the coordinator only.
    let lan = crate::limit::Limiter::new(lan_limit);
    let chunks = crate::peer::serve::ChunkServer::new(
        engine.store().clone(),
        root.clone(),
        lan.clone(),
        engine.partials(),
        engine.recent(),
        engine.client().serving(),
    );
    let node = lan_sync
        .then(|| {
            crate::peer::tls::Identity::load(home)
                .and_then(|id| PeerNode::start(id, peer_listen, roster.clone(), me, home, chunks, lan))
                .inspect_err(|e| {
                    tracing::warn!(error = %format!("{e:#}"), "no peer endpoint; syncing through the coordinator only")
                })
                .ok()
        })
        .flatten();
    // Set once the first round of dials to the devices the coordinator names is over (or
    // when there is no peer endpoint): downloads wait for it, at most `FIRST_DIALS`.
    let (peers_met, met) = tokio::sync::watch::channel(node.is_none());
    if let Some(n) = &node {
        engine.set_peers(n.clone(), met);
    }
    // LAN discovery beside the coordinator's hints (nothing found on a loopback-only machine).
    let _mdns = match (&node, mdns) {
        (Some(n), true) => {
            let (n, roster) = (n.clone(), roster.clone());
            let local = n.local_addr()?;
            Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                if let Err(e) = crate::peer::mdns::run(n, roster, me, local).await {
                    tracing::warn!(error = %format!("{e:#}"), "no LAN discovery (mDNS); devices are found through the coordinator only");
                }
            })))
        }
        _ => None,
    };
    let _roster = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(refresh_roster(
        engine.client().clone(),
        roster,
        node.clone().map(|n| (n, server)),
        home.to_path_buf(),
        devices_changed,
        peers_met,
        cancel.clone(),
    )));
    let stalled_until = Arc::new(AtomicU64::new(0));
    let _stalls = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch_for_stalls(
        stalled_until.clone(),
        debounce + STALL_SETTLE,
    )));
    let mut status = Status { pid: std::process::id(), ..Status::default() };
    let mut backoff = retry_delays();
    let mut next_rescan = tokio::time::Instant::now() + rescan_every;
    tracing::info!(root = %root.display(), "syncing");
    loop {
        if cancel.is_cancelled() {
            break;
        }
        while let Ok(h) = rx.try_recv() {
            take_hint(&mut engine, &root, h);
        }
        if overflow.swap(false, Ordering::Relaxed) {
            tracing::info!("too many watcher events at once; rescanning");
            engine.start_full_pass();
        }
        if tokio::time::Instant::now() >= next_rescan {
            engine.start_full_pass();
            next_rescan = tokio::time::Instant::now() + rescan_every;
        }
        let started = now_ms();
        let counters = engine.counters.clone();
        let mut looked = tokio::time::interval(BUSY_STATUS_EVERY);
        let result = {
            let cycle = engine.cycle();
            tokio::pin!(cycle);
            loop {
                tokio::select! {
                    r = &mut cycle => break Some(r),
                    _ = cancel.cancelled() => break None,
                    // A cycle that applies changes for a while (a large download) shows as
                    // syncing meanwhile, not as the last cycle's verdict.
                    _ = looked.tick() => {
                        let applying = counters.applying.load(Ordering::Relaxed);
                        if applying > 0 && status.state != SyncState::Syncing {
                            status.state = SyncState::Syncing;
                            status.in_sync = false;
                            status.pending_downloads = applying as usize;
                            status.updated_ms = now_ms();
                            save_status(&status, home);
                        }
                    }
                }
            }
        };
        let Some(result) = result else { break };
        status.cycle_started_ms = started;
        let wait = match result {
            Ok(mut report) => {
                // Changes noticed while the cycle ran are not covered by its verdict, and any
                // hint taken here (a head that moved, a subscription that closed) calls for
                // another cycle at once, as it would have woken the wait below.
                let mut woken = false;
                while let Ok(h) = rx.try_recv() {
                    take_hint(&mut engine, &root, h);
                    woken = true;
                }
                if engine.has_work() {
                    report.in_sync = false;
                    report.more_work = true;
                }
                // Just after the daemon did not run for a while (paused, the machine asleep),
                // what changed meanwhile is still on its way from the watcher: no verdict yet.
                let settling = stalled_until.load(Ordering::Relaxed).saturating_sub(now_ms());
                if report.in_sync && settling > 0 {
                    report.in_sync = false;
                }
                update_status(&mut status, &report);
                if report.over_quota {
                    status.state = SyncState::OverQuota;
                    status.quota = engine.client().usage().await.ok();
                }
                if woken {
                    Duration::ZERO
                } else if settling > 0 {
                    Duration::from_millis(settling)
                } else if report.in_sync {
                    backoff = retry_delays();
                    let idle = next_rescan.saturating_duration_since(tokio::time::Instant::now());
                    report.recheck.map_or(idle, |r| r.min(idle))
                } else if report.made_progress() || report.more_work {
                    backoff = retry_delays();
                    Duration::ZERO
                } else {
                    // Not in sync and nothing moved (a file still being written, a refusal that
                    // repeats): try again, but back off instead of spinning.
                    next_delay(&mut backoff)
                }
            }
            Err(e) => {
                let client_error = match e.downcast_ref::<crate::engine::EngineError>() {
                    Some(crate::engine::EngineError::Offline(c)) => Some(c),
                    _ => e.downcast_ref::<crate::client::ClientError>(),
                };
                let w = next_delay(&mut backoff);
                tracing::warn!(error = %shoal_protocol::path::Escaped(&format!("{e:#}")), retry_in = ?w, "sync cycle failed");
                let over_quota =
                    client_error.is_some_and(|c| c.code() == Some(shoal_protocol::api::ErrorCode::QuotaExceeded));
                status.quota = match over_quota {
                    true => engine.client().usage().await.ok(),
                    false => None,
                };
                status.state = match client_error {
                    // Revoked (or a token the coordinator does not know): nothing syncs until the
                    // operator reinstates the device.
                    Some(c) if c.code() == Some(shoal_protocol::api::ErrorCode::Unauthorized) => {
                        SyncState::Unauthorized
                    }
                    _ if over_quota => SyncState::OverQuota,
                    Some(c) if c.is_retryable() => SyncState::Offline,
                    _ => SyncState::Error,
                };
                status.in_sync = false;
                status.last_error = Some(format!("{e:#}"));
                w
            }
        };
        status.updated_ms = now_ms();
        status.watcher_hints = hints.load(Ordering::Relaxed);
        status.reads_total = engine.store().reads();
        status.bytes_by_source = engine.counters.by_source.snapshot();
        status.relay = engine.relay_in_use().map(|(name, url)| RelayInUse { name, url });
        save_status(&status, home);
        // The peer list's counters (round-trip time, bytes) follow the status.
        if let Some(n) = &node {
            n.save();
        }
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            h = rx.recv() => {
                if let Some(h) = h {
                    take_hint(&mut engine, &root, h);
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if !stop.now.is_cancelled() {
        status.state = SyncState::Stopping;
        status.in_sync = false;
        status.updated_ms = now_ms();
        save_status(&status, home);
        finish_uploads(&mut engine, grace, &stop.now).await;
    }
    tracing::info!("stopped");
    if let Some(n) = &node {
        n.close().await;
    }
    engine.store().flush().await?;
    status.state = SyncState::Stopped;
    status.updated_ms = now_ms();
    save_status(&status, home);
    Ok(())
}

/// On the way out: sends what this device owes the coordinator (its unsent commits, uploads for
/// its own pending versions, other devices' pending versions it holds: their authors may be
/// stopping too), trying again while the coordinator does not answer, for at most `grace` or
/// until `now` fires. Says what it leaves.
async fn finish_uploads(engine: &mut Engine, grace: Duration, now: &CancellationToken) {
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(
        grace = ?grace,
        "stopping: finishing the uploads this device owes first (another Ctrl-C or SIGTERM stops at once)"
    );
    let mut backoff = retry_delays();
    let left = loop {
        let attempt = tokio::select! {
            r = tokio::time::timeout_at(deadline, engine.finish_uploads()) => r,
            _ = now.cancelled() => break None,
        };
        match attempt {
            Ok(Ok(left)) if left.is_empty() => break Some(left),
            Ok(Ok(left)) => tracing::debug!(?left, "uploads left; trying again"),
            Ok(Err(e)) if retryable(&e) => {
                tracing::debug!(error = %shoal_protocol::path::Escaped(&format!("{e:#}")), "finishing uploads failed; trying again")
            }
            Ok(Err(e)) => {
                // Refused outright (revoked, say): trying again changes nothing.
                tracing::warn!(error = %shoal_protocol::path::Escaped(&format!("{e:#}")), "cannot finish the uploads");
                break None;
            }
            Err(_) => break None,
        }
        let wait = next_delay(&mut backoff).min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = now.cancelled() => break None,
        }
        if tokio::time::Instant::now() >= deadline {
            break None;
        }
    };
    match left {
        Some(_) => tracing::info!("every upload this device owed is done"),
        None => match engine.uploads_left() {
            Ok(left) if left.is_empty() => tracing::info!("every upload this device owed is done"),
            Ok(left) => tracing::warn!(
                unsent_commits = left.unsent_changes,
                owed_versions = left.owed_versions,
                "stopping with uploads still owed: they are sent when the agent runs again (`shoal status` lists versions not yet backed up)"
            ),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "stopping; could not count the uploads left"),
        },
    }
}

/// `true` for a failure that may pass: the coordinator unreachable or busy.
fn retryable(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<crate::engine::EngineError>() {
        Some(crate::engine::EngineError::Offline(c)) => c.is_retryable(),
        _ => e.downcast_ref::<crate::client::ClientError>().is_some_and(|c| c.is_retryable()),
    }
}

fn update_status(s: &mut Status, r: &CycleReport) {
    s.state = if r.in_sync { SyncState::InSync } else { SyncState::Syncing };
    s.quota = None;
    s.in_sync = r.in_sync;
    s.cursor = r.cursor;
    s.pending_uploads = r.pending_uploads;
    s.pending_downloads = r.planned.saturating_sub(r.fetched_files + r.committed_changes);
    s.skipped = r.skipped.clone();
    s.last_cycle_reads = r.reads;
    s.last_cycle_scope = r.scope;
    s.full_pass = r.more_work;
    s.owed_uploads = r.owed_uploads;
    if let Some(p) = &r.pending_versions {
        s.pending_versions = p.clone();
    }
    if r.in_sync {
        s.last_sync_ms = now_ms();
    }
    s.last_error = r.errors.last().cloned().or(if r.in_sync { None } else { s.last_error.take() });
}

/// Starts the file watcher: each batch becomes a hint, counted in `hints` when it carries a
/// change (one naming only directories the agent made, whose entries are to be looked at, is
/// not); a batch that cannot be queued sets `overflow` (its paths are lost, so a full pass runs).
fn watch(
    root: &Path,
    debounce: Duration,
    tx: mpsc::Sender<Hint>,
    own: OwnWrites,
    hints: Arc<AtomicU64>,
    overflow: Arc<AtomicBool>,
) -> anyhow::Result<crate::watch::FolderWatcher> {
    crate::watch::start(root, debounce, own, move |b| {
        if b.rescan || !b.paths.is_empty() {
            hints.fetch_add(1, Ordering::Relaxed);
        }
        if tx.try_send(Hint::Local { rescan: b.rescan, paths: b.paths, new_dirs: b.new_dirs }).is_err() {
            overflow.store(true, Ordering::Relaxed);
        }
    })
}

/// Holds the push subscription open, reconnecting with backoff; forwards head moves as hints and
/// device-list changes to the roster's refresher (`devices_changed`). A subscription that closes
/// wakes the loop, so a revocation shows in the status at once.
async fn subscribe(
    client: crate::client::Client,
    tx: mpsc::Sender<Hint>,
    devices_changed: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let mut backoff = retry_delays();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match client.subscribe().await {
            Ok(mut sub) => {
                backoff = retry_delays();
                // The first notice after (re)connecting also wakes the loop and refreshes the
                // roster: anything missed while disconnected is picked up.
                let mut last: Option<shoal_protocol::api::HeadNotice> = None;
                while let Some(notice) = sub.next_notice().await {
                    if last.is_none_or(|l| l.devices != notice.devices) {
                        devices_changed.notify_one();
                    }
                    if last.is_some_and(|l| l.head == notice.head) {
                        last = Some(notice);
                        continue;
                    }
                    last = Some(notice);
                    if tx.send(Hint::Remote(notice.head)).await.is_err() {
                        return;
                    }
                }
                if tx.send(Hint::Wake).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "subscription failed"),
        }
        tokio::time::sleep(next_delay(&mut backoff)).await;
    }
}

/// A gap this long between the ticks of `watch_for_stalls` means the daemon did not run.
const STALL_GAP: Duration = Duration::from_secs(1);
/// After such a gap, how long (beyond the watcher's debounce) no cycle reports in sync: the
/// watcher reads the events queued meanwhile and waits for the agent's own writes to settle
/// (`watch::settle`, 250 ms at most) before handing them over.
const STALL_SETTLE: Duration = Duration::from_millis(500);

/// Notes in `until` (ms since the epoch) when the daemon may trust a verdict again after not
/// running for a while: the wall clock, read every 200 ms, jumped by `STALL_GAP` or more (SIGSTOP,
/// a suspended machine, a starved process). The wall clock, because the monotonic one stops while
/// the machine sleeps.
async fn watch_for_stalls(until: Arc<AtomicU64>, settle: Duration) {
    let mut last = now_ms();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let now = now_ms();
        if now.saturating_sub(last) >= STALL_GAP.as_millis() as u64 {
            until.store(now + settle.as_millis() as u64, Ordering::Relaxed);
        }
        last = now;
    }
}

/// How often the status is looked at during a cycle, to show one applying changes as syncing.
const BUSY_STATUS_EVERY: Duration = Duration::from_millis(500);

/// How long the first downloads of a daemon wait for its first dials to the devices the
/// coordinator names: they take a round trip or two on a LAN, and a device that started a moment
/// too early would otherwise take from the origin what its peers hold.
const FIRST_DIALS: Duration = Duration::from_secs(3);

/// How often the user's device list is fetched while the coordinator is reachable: a revoked
/// device is refused by this device's peers within this time.
const ROSTER_REFRESH: Duration = Duration::from_secs(30);

/// Keeps the roster (the user's devices, with revocations) current and saved for offline use;
/// announces the peer endpoint (`node`, with the coordinator's address to route by) and greets
/// the devices the coordinator hints at.
async fn refresh_roster(
    client: crate::client::Client,
    roster: crate::peer::tls::Roster,
    node: Option<(PeerNode, String)>,
    home: PathBuf,
    devices_changed: Arc<tokio::sync::Notify>,
    peers_met: tokio::sync::watch::Sender<bool>,
    cancel: CancellationToken,
) {
    loop {
        let refreshed = tokio::time::Instant::now();
        match client.roster().await {
            Ok(answer) => {
                let (before, lan_before) = (roster.devices(), roster.lan());
                roster.replace(answer.devices, answer.lan);
                let key =
                    |v: &[DeviceInfo]| v.iter().map(|d| (d.id, d.revoked, d.cert_fingerprint)).collect::<Vec<_>>();
                let fresh = !home.join(crate::peer::tls::ROSTER_FILE).exists();
                if fresh || key(&before) != key(&roster.devices()) || lan_before != roster.lan() {
                    let (roster, home) = (roster.clone(), home.clone());
                    match tokio::task::spawn_blocking(move || roster.save(&home)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "could not save the device list"),
                        Err(e) => tracing::warn!(error = %e, "could not save the device list"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "device list not refreshed"),
        }
        if let Some((node, server)) = &node {
            node.recheck();
            node.save();
            let dials = announce(&client, node, server).await;
            if !*peers_met.borrow() {
                // The first round: downloads wait (a little) for these dials, so that a device
                // that starts takes what its LAN peers have from them.
                let _ = tokio::time::timeout(FIRST_DIALS, futures::future::join_all(dials)).await;
                peers_met.send_replace(true);
            }
        }
        let unknown_caller = node.as_ref().map(|(n, _)| n.unknown_caller.clone()).unwrap_or_default();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ROSTER_REFRESH) => {}
            // A device was revoked (or enrolled, or reinstated): connections it no longer may
            // hold close at once.
            _ = devices_changed.notified() => {}
            // A caller the roster does not know yet: refresh now, but at most once a second.
            _ = unknown_caller.notified() => tokio::time::sleep_until(refreshed + Duration::from_secs(1)).await,
        }
    }
}

/// Tells the coordinator where this device's peer endpoint listens and connects to the devices
/// it names.
async fn announce(client: &crate::client::Client, node: &PeerNode, server: &str) -> Vec<tokio::task::JoinHandle<()>> {
    let addr = match node.local_addr() {
        Ok(l) => crate::peer::node::announce_addr(l, server).await,
        Err(e) => Err(e),
    };
    let addrs = match addr {
        Ok(a) => vec![a.to_string()],
        Err(e) => {
            tracing::debug!(error = %e, "no peer address to announce");
            Vec::new()
        }
    };
    // The coordinator's answer taking a while (a slow link to it), for the end-to-end tests.
    if let Some(ms) = shoal_sys::failpoints::value("announce-delay").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match client.peers(addrs).await {
        // Each dial on its own: one unreachable device does not hold up the others, nor the
        // next roster refresh.
        Ok(hints) => hints
            .into_iter()
            .map(|h| {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.greet_retrying(&h).await {
                        tracing::debug!(peer = %h.device, error = %format!("{e:#}"), "hinted peer not reached");
                    }
                })
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "peer hints not fetched");
            Vec::new()
        }
    }
}

/// Longest wait between failed attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Waits between failed attempts (a cycle that fails or makes no progress, a subscription that
/// drops): a base delay from 250 ms doubling up to half of `RETRY_MAX`, plus a random part of up
/// to the same again, so that devices that lost the coordinator together do not all come back
/// at the same instant.
fn retry_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(RETRY_MAX / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

fn next_delay(delays: &mut backon::ExponentialBackoff) -> Duration {
    delays.next().unwrap_or(RETRY_MAX).min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_with_jitter_and_stay_bounded() {
        let runs: Vec<Vec<Duration>> = (0..8)
            .map(|_| {
                let mut d = retry_delays();
                (0..20).map(|_| next_delay(&mut d)).collect()
            })
            .collect();
        for run in &runs {
            assert!(run[0] >= Duration::from_millis(250) && run[0] < Duration::from_millis(500), "{run:?}");
            assert!(run.iter().all(|d| *d <= RETRY_MAX), "{run:?}");
            assert!(run[19] >= RETRY_MAX / 2, "reaches the top: {run:?}");
        }
        // Jitter: eight devices starting together do not all wait the same.
        assert!(runs.iter().any(|r| r[5] != runs[0][5]), "{runs:?}");
    }
}
