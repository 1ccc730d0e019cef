//! The emulated network: one network namespace per site, each with one TUN device (`up0`) holding
//! the site's one address, and a user-space core that carries packets between the TUN devices
//! along the site's uplink, the links between regions, and the far site's uplink, each applied
//! as a `LinkState` (latency, jitter, loss, bandwidth, partition) in the packet's direction.
//!
//! Inside a site, every process shares the namespace: they reach each other over its loopback
//! interface, unshaped (a LAN, fast next to any uplink), multicast included (mDNS), and the
//! outside sees the whole site behind its one address, as with NAT. Only IPv4 unicast to
//! another site's address crosses the core; anything else that reaches a TUN device is dropped
//! (the namespaces route only 10.0.0.0/8, to `up0`), so nothing leaves the namespaces netsim made.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::link::{LinkCounters, LinkParams, LinkState};

/// How long a reader waits for a packet before it looks whether the fabric is stopping.
const POLL: Duration = Duration::from_millis(100);

/// Why the fabric could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FabricError {
    let what = what.into();
    move |source| FabricError::Io { what, source }
}

/// Runs `ip ARGS`; an error carries what it printed.
pub fn ip(args: &[&str]) -> Result<(), FabricError> {
    let out = Command::new("ip").args(args).output().map_err(io("running ip (iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FabricError::Setup(format!(
            "ip {} failed (network namespaces need root): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) -> Result<(), FabricError> {
    let path = format!("/var/run/netns/{ns}");
    let netns = std::fs::File::open(&path).map_err(io(format!("opening {path}")))?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&netns),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| FabricError::Io { what: format!("entering namespace {ns}"), source: e.into() })
}

/// Starts a thread inside network namespace `ns` running `f`.
pub fn spawn_in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T, FabricError>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        Ok(f())
    })
}

/// Runs `f` (which may borrow from the caller) on a thread inside network namespace `ns`, and
/// returns what it returns.
pub fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, FabricError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| FabricError::Setup(format!("a thread in namespace {ns} panicked")))?
    })
}

/// A link between two points, one state per direction.
#[derive(Debug, Clone)]
struct Link {
    name: String,
    kind: LinkKind,
    /// Away from the site (or from the first region named), and towards it.
    out: LinkState,
    back: LinkState,
}

/// What a link stands for, for the per-kind byte counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// A site's connection to its region.
    Uplink,
    /// Between two regions.
    InterRegion,
}

/// A link's counters, by direction.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkReport {
    pub name: String,
    pub kind: LinkKind,
    pub out: LinkCounters,
    pub back: LinkCounters,
}

/// Names a link of the fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkId(usize);

struct Site {
    name: String,
    ns: String,
    addr: Ipv4Addr,
    region: usize,
    uplink: usize,
    tun: Arc<tun::Device>,
}

/// A packet due at the far end at `at`.
struct Due {
    at: Instant,
    seq: u64,
    to: Arc<tun::Device>,
    packet: Vec<u8>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    // Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Due>,
    seq: u64,
}

/// One end of a UDP flow.
type End = (Ipv4Addr, u16);

struct Core {
    links: Mutex<Vec<Link>>,
    /// Between regions `(a, b)` with `a < b`.
    between: Mutex<HashMap<(usize, usize), usize>>,
    sites: Mutex<Vec<Site>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    stop: AtomicBool,
    /// UDP flows seen, by their two ends (the lower first), whichever way they were seen.
    flows: Mutex<HashSet<(End, End)>>,
}

/// An emulated network of regions and sites. Dropping it stops the core and deletes the
/// namespaces.
pub struct Fabric {
    prefix: String,
    regions: Vec<String>,
    core: Arc<Core>,
    threads: Vec<std::thread::JoinHandle<()>>,
    seed: u64,
}

impl Fabric {
    /// An empty fabric whose namespaces are named `PREFIX-SITE`.
    pub fn new(prefix: &str, seed: u64) -> Fabric {
        let core = Arc::new(Core {
            links: Mutex::default(),
            between: Mutex::default(),
            sites: Mutex::default(),
            queue: Mutex::default(),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            flows: Mutex::default(),
        });
        let deliver = core.clone();
        let threads = vec![std::thread::spawn(move || deliver_loop(&deliver))];
        Fabric { prefix: prefix.to_string(), regions: Vec::new(), core, threads, seed }
    }

    fn region_index(&self, region: &str) -> Result<usize, FabricError> {
        self.regions.iter().position(|r| r == region).ok_or_else(|| FabricError::Setup(format!("no region {region}")))
    }

    pub fn add_region(&mut self, name: &str) -> Result<(), FabricError> {
        if self.regions.len() >= 200 {
            return Err(FabricError::Setup("at most 200 regions".into()));
        }
        if self.regions.iter().any(|r| r == name) {
            return Err(FabricError::Setup(format!("region {name} is named twice")));
        }
        self.regions.push(name.to_string());
        Ok(())
    }

    fn add_link(&mut self, name: String, kind: LinkKind, out: LinkParams, back: LinkParams) -> usize {
        let mut links = self.core.links.lock().unwrap_or_else(|p| p.into_inner());
        let n = links.len() as u64;
        let seed = self.seed.wrapping_add(n * 2);
        links.push(Link { name, kind, out: LinkState::new(out, seed), back: LinkState::new(back, seed + 1) });
        links.len() - 1
    }

    /// Joins regions `a` and `b` (parameters from `a` towards `b`, and back).
    pub fn connect_regions(
        &mut self,
        a: &str,
        b: &str,
        out: LinkParams,
        back: LinkParams,
    ) -> Result<LinkId, FabricError> {
        let (ia, ib) = (self.region_index(a)?, self.region_index(b)?);
        if ia == ib {
            return Err(FabricError::Setup(format!("region {a} joined to itself")));
        }
        let (lo, hi, out, back) = if ia < ib { (ia, ib, out, back) } else { (ib, ia, back, out) };
        let link =
            self.add_link(format!("{}-{}", self.regions[lo], self.regions[hi]), LinkKind::InterRegion, out, back);
        self.core.between.lock().unwrap_or_else(|p| p.into_inner()).insert((lo, hi), link);
        Ok(LinkId(link))
    }

    /// Adds site `name` in `region`: a namespace whose one address reaches the region through
    /// an uplink (`up` away from the site, `down` towards it). Returns the site's address and
    /// its uplink.
    pub fn add_site(
        &mut self,
        name: &str,
        region: &str,
        up: LinkParams,
        down: LinkParams,
    ) -> Result<(Ipv4Addr, LinkId), FabricError> {
        let r = self.region_index(region)?;
        let index = {
            let sites = self.core.sites.lock().unwrap_or_else(|p| p.into_inner());
            if sites.iter().any(|s| s.name == name) {
                return Err(FabricError::Setup(format!("site {name} is named twice")));
            }
            sites.iter().filter(|s| s.region == r).count()
        };
        if index >= 250 {
            return Err(FabricError::Setup(format!("at most 250 sites in region {region}")));
        }
        let addr = Ipv4Addr::new(10, 1 + r as u8, 1 + index as u8, 1);
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns])?;
        let made = (|| {
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "tuntap", "add", "mode", "tun", "name", "up0"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/32"), "dev", "up0"])?;
            ip(&["-n", &ns, "link", "set", "up0", "up"])?;
            ip(&["-n", &ns, "route", "add", "10.0.0.0/8", "dev", "up0", "src", &addr.to_string()])?;
            in_namespace(&ns, || {
                let mut config = tun::Configuration::default();
                config.tun_name("up0");
                tun::create(&config)
            })?
            .map_err(|e| FabricError::Setup(format!("opening up0 in {ns}: {e}")))
        })();
        let tun = match made {
            Ok(t) => Arc::new(t),
            Err(e) => {
                let _ = ip(&["netns", "delete", &ns]);
                return Err(e);
            }
        };
        let uplink = self.add_link(format!("{name}-uplink"), LinkKind::Uplink, up, down);
        self.core.sites.lock().unwrap_or_else(|p| p.into_inner()).push(Site {
            name: name.to_string(),
            ns: ns.clone(),
            addr,
            region: r,
            uplink,
            tun: tun.clone(),
        });
        let core = self.core.clone();
        self.threads.push(std::thread::spawn(move || read_loop(&core, &tun)));
        Ok((addr, LinkId(uplink)))
    }

    /// The namespace of site `name`, for running its processes.
    pub fn namespace(&self, site: &str) -> Option<String> {
        self.core.sites.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|s| s.name == site).map(|s| s.ns.clone())
    }

    /// Cuts (`true`) or heals (`false`) a link, both directions.
    pub fn partition(&self, link: LinkId, cut: bool) {
        let mut links = self.core.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = links.get_mut(link.0) {
            l.out.partitioned = cut;
            l.back.partitioned = cut;
        }
    }

    /// Sets a link's loss probability, both directions.
    pub fn set_loss(&self, link: LinkId, loss: f64) {
        let mut links = self.core.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = links.get_mut(link.0) {
            l.out.params.loss = loss;
            l.back.params.loss = loss;
        }
    }

    /// Every link's counters.
    pub fn report(&self) -> Vec<LinkReport> {
        let links = self.core.links.lock().unwrap_or_else(|p| p.into_inner());
        links
            .iter()
            .map(|l| LinkReport { name: l.name.clone(), kind: l.kind, out: l.out.counters, back: l.back.counters })
            .collect()
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.core.stop.store(true, Ordering::SeqCst);
        self.core.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let sites = std::mem::take(&mut *self.core.sites.lock().unwrap_or_else(|p| p.into_inner()));
        for s in sites {
            let _ = ip(&["netns", "delete", &s.ns]);
        }
    }
}

/// The network namespaces named `PREFIX-…` (none if `ip` cannot list them).
pub fn namespaces(prefix: &str) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&format!("{prefix}-")))
        .map(String::from)
        .collect()
}

/// Stops every process in the namespaces named `PREFIX-…` (SIGTERM, then SIGKILL a second
/// later) and deletes the namespaces: what dropping a fabric and its processes does, for a
/// program interrupted before it could.
pub fn remove_namespaces(prefix: &str) {
    let mine = namespaces(prefix);
    let pids = |ns: &str| -> Vec<String> {
        Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(String::from).collect())
            .unwrap_or_default()
    };
    for signal in ["-TERM", "-KILL"] {
        let all: Vec<String> = mine.iter().flat_map(|ns| pids(ns)).collect();
        if all.is_empty() {
            break;
        }
        let _ = Command::new("kill").arg(signal).args(&all).output();
        std::thread::sleep(Duration::from_secs(1));
    }
    for ns in &mine {
        let _ = ip(&["netns", "delete", ns]);
    }
}

/// Reads packets leaving a site and schedules each at the far end, or drops it.
fn read_loop(core: &Core, tun: &tun::Device) {
    let mut buf = vec![0u8; 65_536];
    while !core.stop.load(Ordering::SeqCst) {
        let n = match tun.recv_timeout(&mut buf, POLL) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let packet = &buf[..n];
        // IPv4 only: version 4, and a header of at least 20 bytes.
        if n < 20 || packet[0] >> 4 != 4 {
            continue;
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let now = Instant::now();
        let route = {
            let sites = core.sites.lock().unwrap_or_else(|p| p.into_inner());
            let from = sites.iter().find(|s| s.addr == src);
            let to = sites.iter().find(|s| s.addr == dst);
            match (from, to) {
                (Some(f), Some(t)) if f.addr != t.addr => Some((f.region, f.uplink, t.region, t.uplink, t.tun.clone())),
                _ => None,
            }
        };
        let Some((from_region, from_uplink, to_region, to_uplink, to)) = route else { continue };
        let opens = opens_connection(core, packet, src, dst);
        let at = {
            let mut links = core.links.lock().unwrap_or_else(|p| p.into_inner());
            if opens {
                links[from_uplink].out.counters.connections += 1;
                links[to_uplink].back.counters.connections += 1;
                if from_region != to_region {
                    let key = (from_region.min(to_region), from_region.max(to_region));
                    if let Some(l) = core.between.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied() {
                        let dir = if from_region < to_region { &mut links[l].out } else { &mut links[l].back };
                        dir.counters.connections += 1;
                    }
                }
            }
            let mut t = links[from_uplink].out.admit(now, n);
            if from_region != to_region {
                let key = (from_region.min(to_region), from_region.max(to_region));
                let between = core.between.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
                t = match (t, between) {
                    (Some(t), Some(l)) if from_region < to_region => links[l].out.admit(t, n),
                    (Some(t), Some(l)) => links[l].back.admit(t, n),
                    // Regions not joined: unreachable.
                    _ => None,
                };
            }
            t.and_then(|t| links[to_uplink].back.admit(t, n))
        };
        if let Some(at) = at {
            let mut q = core.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.seq += 1;
            let seq = q.seq;
            q.heap.push(Due { at, seq, to, packet: packet.to_vec() });
            core.wake.notify_one();
        }
    }
}

/// Whether an IPv4 packet opens a connection: a TCP SYN without ACK, or the first packet of a
/// UDP flow either way (a QUIC connection counts once, where it started).
fn opens_connection(core: &Core, packet: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    match packet[9] {
        6 => packet.get(ihl + 13).is_some_and(|flags| flags & 0x02 != 0 && flags & 0x10 == 0),
        17 => {
            let Some(ports) = packet.get(ihl..ihl + 4) else { return false };
            let (sport, dport) = (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
            let (a, b) = ((src, sport), (dst, dport));
            core.flows.lock().unwrap_or_else(|p| p.into_inner()).insert((a.min(b), a.max(b)))
        }
        _ => false,
    }
}

/// Hands each scheduled packet to its far end when it is due.
fn deliver_loop(core: &Core) {
    let mut q = core.queue.lock().unwrap_or_else(|p| p.into_inner());
    while !core.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        match q.heap.peek().map(|d| d.at) {
            Some(at) if at <= now => {
                let due = q.heap.pop().expect("peeked");
                drop(q);
                // A far end that cannot take it (its queue is full) loses it, as a link would.
                let _ = due.to.send(&due.packet);
                q = core.queue.lock().unwrap_or_else(|p| p.into_inner());
            }
            Some(at) => {
                q = core.wake.wait_timeout(q, at - now).unwrap_or_else(|p| p.into_inner()).0;
            }
            None => {
                q = core.wake.wait_timeout(q, POLL).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
    }
}
