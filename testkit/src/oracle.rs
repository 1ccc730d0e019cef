//! What every test checks: the folders' trees by content, convergence of all devices to the
//! coordinator's tree, and the daemons' own reports (`shoal status --json`, `shoal peers`).

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use shoal_protocol::status::{PeerStatus, Status, StatusReport};
use shoal_protocol::{Entry, EntryKind};

use crate::Device;

/// What a path holds, by content.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    Dir,
    /// BLAKE3 hex and exec bit.
    File(String, bool),
}

pub type Tree = BTreeMap<String, Node>;

/// The synced content of a folder (without `.shoal`), by content hash.
pub fn local_tree(root: &Path) -> Tree {
    fn walk(dir: &Path, prefix: &str, out: &mut Tree) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if prefix.is_empty() && name == ".shoal" {
                continue;
            }
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            let Ok(md) = e.path().symlink_metadata() else { continue };
            if md.is_dir() {
                out.insert(rel.clone(), Node::Dir);
                walk(&e.path(), &rel, out);
            } else if md.is_file() {
                let Ok(data) = std::fs::read(e.path()) else { continue };
                let exec = md.permissions().mode() & 0o111 != 0;
                out.insert(rel, Node::File(blake3::hash(&data).to_hex().to_string(), exec));
            }
        }
    }
    let mut out = Tree::new();
    walk(root, "", &mut out);
    out
}

/// `n` bytes that look random (xorshift from `seed`): content that neither compresses nor
/// dedups against another seed's.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn file_hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// An API client acting as device `d`.
pub fn client_of(d: &Device) -> shoal_agent::client::Client {
    shoal_agent::client::Client::new(&shoal_agent::config::Config::load(&d.home).unwrap()).unwrap()
}

/// Runs a future to completion on a fresh runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// Every journal entry of `d`'s user (pending versions' included), asked as `d`.
pub fn journal(d: &Device) -> Result<Vec<Entry>, String> {
    let client = client_of(d);
    block_on(async {
        let mut out = Vec::new();
        let mut since = 0;
        loop {
            let page = client.changes(since, 5000, Duration::ZERO).await.map_err(|e| e.to_string())?;
            if page.entries.is_empty() {
                return Ok(out);
            }
            since = page.next;
            out.extend(page.entries);
            if since >= page.head {
                return Ok(out);
            }
        }
    })
}

/// The coordinator's live tree as `d` sees it, asked through the API in this process (where
/// `shoal ls` would run in `d`'s own network namespace).
pub fn api_tree(d: &Device) -> Result<Tree, String> {
    let (_, entries) = block_on(client_of(d).tree(None)).map_err(|e| e.to_string())?;
    Ok(entries
        .into_iter()
        .filter(|e| !e.deleted)
        .filter_map(|e| {
            let node = match e.kind {
                EntryKind::Dir => Node::Dir,
                _ => Node::File(e.hash()?.to_string(), e.exec),
            };
            Some((e.path.to_string(), node))
        })
        .collect())
}

/// Every content the coordinator keeps as a durable version, at any path and time (its history;
/// versions still pending, whose bytes are only on a device, left out), asked as `d`.
pub fn durable_contents(d: &Device) -> Result<HashSet<String>, String> {
    let journal = journal(d)?;
    let pending: HashSet<u64> =
        block_on(client_of(d).pending()).map_err(|e| e.to_string())?.versions.into_iter().map(|v| v.version).collect();
    Ok(journal
        .iter()
        .filter(|e| !pending.contains(&e.version))
        .filter_map(|e| e.hash().map(|h| h.to_string()))
        .collect())
}

/// What `shoal status --json` of `d` prints.
pub fn status_report(d: &Device) -> StatusReport {
    let out = d.shoal(&["status", "--json"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}'s status does not read ({e}): {}", d.name, String::from_utf8_lossy(&out.stdout)))
}

/// The daemon's last status (`shoal status --json`).
pub fn daemon_status(d: &Device) -> Status {
    status_report(d).status
}

/// The daemon's downloaded chunk bytes by source: `[local, peer, relay, origin]`.
pub fn by_source(d: &Device) -> [u64; 4] {
    let b = daemon_status(d).bytes_by_source;
    [b.local, b.peer, b.relay, b.origin]
}

/// `shoal peers --json` of `d`.
pub fn peers_of(d: &Device) -> Vec<PeerStatus> {
    let out = d.shoal(&["peers", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until each device is connected to every other one as a peer.
pub fn wait_for_peers(devices: &[&Device]) {
    if let Err(e) = try_wait_for_peers(devices, SETTLE) {
        panic!("{e}");
    }
}

/// `wait_for_peers` within `timeout`, saying who is not connected to whom if they are not.
pub fn try_wait_for_peers(devices: &[&Device], timeout: Duration) -> Result<(), String> {
    let until = Instant::now() + timeout;
    for d in devices {
        let others: Vec<&str> = devices.iter().filter(|o| o.name != d.name).map(|o| o.name.as_str()).collect();
        wait_for(until.saturating_duration_since(Instant::now()), || {
            let names: Vec<String> = peers_of(d).into_iter().map(|p| p.name).collect();
            others.iter().all(|o| names.iter().any(|n| n == o)).then_some(())
        })
        .ok_or_else(|| format!("{} is not connected to {others:?}: {:?}", d.name, peers_of(d)))?;
    }
    Ok(())
}

/// Polls `f` until it returns `Some`, or `None` after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every device's folder equals the coordinator's tree, by content; returns it.
pub fn converge(devices: &[&Device], timeout: Duration) -> Tree {
    try_converge(devices, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// `converge`, saying how the devices differ if they did not within `timeout`.
pub fn try_converge(devices: &[&Device], timeout: Duration) -> Result<Tree, String> {
    try_converge_with(devices, timeout, Device::try_remote_tree)
}

/// `try_converge`, reading the coordinator's tree with `remote` (given the first device).
pub fn try_converge_with(
    devices: &[&Device],
    timeout: Duration,
    remote: impl Fn(&Device) -> Result<Tree, String>,
) -> Result<Tree, String> {
    let mut last = String::new();
    let done = wait_for(timeout, || {
        // The coordinator may be out of reach for a moment (restarting, a link just healed).
        let remote = match remote(devices[0]) {
            Ok(t) => t,
            Err(e) => {
                last = format!("the coordinator's tree could not be read: {e}");
                return None;
            }
        };
        for d in devices {
            let local = d.local_tree();
            if local != remote {
                last = describe_diff(&d.name, &local, &remote);
                return None;
            }
        }
        Some(remote)
    });
    done.ok_or_else(|| format!("devices did not converge within {timeout:?}: {last}"))
}

/// Runs `sync --once` on each device in turn until all agree with the coordinator.
pub fn sync_all(devices: &[&Device]) -> Tree {
    for _ in 0..2 {
        for d in devices {
            d.sync();
        }
    }
    converge(devices, Duration::from_secs(5))
}

fn describe_diff(name: &str, local: &Tree, remote: &Tree) -> String {
    let mut s = format!("{name} differs from the coordinator:");
    for (p, n) in local {
        match remote.get(p) {
            None => s += &format!(" +{p}"),
            Some(r) if r != n => s += &format!(" ~{p}"),
            _ => {}
        }
    }
    for p in remote.keys() {
        if !local.contains_key(p) {
            s += &format!(" -{p}");
        }
    }
    s
}

/// Seconds a convergence may take in these tests: generous, since CI machines are slow.
pub const SETTLE: Duration = Duration::from_secs(60);
