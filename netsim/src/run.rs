//! Running a scenario: the fabric from its topology, the real coordinator, relays and agents in
//! their sites' namespaces (through `shoal-testkit`), the timeline step by step, and a report of
//! what it took and what crossed which link, with every assertion checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use shoal_protocol::status::BytesBySource;
use shoal_testkit::{
    Coordinator, Device, Node, Relay, Tree, api_tree, daemon_status, durable_contents, file_hash, noise,
    try_converge_with, try_wait_for_peers, wait_for,
};

use crate::fabric::{Fabric, FabricError, LinkId, LinkKind, LinkReport, in_namespace};
use crate::scenario::{self, LinkRef, Process, Scenario};

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Multiplies every file size (the shipped scenarios run smaller in the test suite).
    pub scale: f64,
    /// Where the run's folders go; kept when the run fails.
    pub work_dir: Option<PathBuf>,
    /// A line on standard error as each step starts and ends.
    pub progress: bool,
    /// After each step, a line on standard error of what it moved over which kind of link and
    /// where each device's downloads came from.
    pub narrate: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { scale: 1.0, work_dir: None, progress: true, narrate: false }
    }
}

/// Bytes by kind of link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ByLinkKind {
    /// Between devices at one site.
    pub lan: u64,
    /// Up and down sites' uplinks.
    pub uplink: u64,
    /// Between regions.
    pub inter_region: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub action: String,
    pub seconds: f64,
    /// Why the step failed (a convergence that timed out, say).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkLine {
    pub name: String,
    pub kind: LinkKind,
    /// Away from the site (or towards the region declared second), and back.
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub dropped_packets: u64,
    /// Connections opened across it, either way: TCP connection attempts and UDP (QUIC) flows.
    pub connections: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssertReport {
    pub assertion: String,
    pub passed: bool,
    pub measured: String,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub scale: f64,
    pub seconds: f64,
    pub steps: Vec<StepReport>,
    pub bytes_by_link_kind: ByLinkKind,
    pub links: Vec<LinkLine>,
    /// Each device's downloaded chunk bytes by source, over the whole run.
    pub bytes_by_source: BTreeMap<String, BytesBySource>,
    pub asserts: Vec<AssertReport>,
    pub passed: bool,
}

/// Why a run could not be made (as opposed to a run whose assertions failed).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Fabric(#[from] FabricError),
    #[error("{0}")]
    Setup(String),
}

/// The running daemon's download counts: none yet if the status is still its predecessor's
/// (a daemon writes its first status as its first cycle ends).
fn current_counts(d: &Device) -> BytesBySource {
    let st = daemon_status(d);
    if st.pid == d.pid() { st.bytes_by_source } else { BytesBySource::default() }
}

fn add(a: &mut BytesBySource, b: BytesBySource) {
    a.local += b.local;
    a.peer += b.peer;
    a.relay += b.relay;
    a.origin += b.origin;
}

/// Bytes through the loopback interface of namespace `ns`: its LAN.
fn lan_bytes(ns: &str) -> u64 {
    let out = std::process::Command::new("ip").args(["-n", ns, "-s", "-j", "link", "show", "lo"]).output();
    let Ok(out) = out else { return 0 };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["stats64"]["rx"]["bytes"].as_u64().unwrap_or(0)
}

struct World {
    fabric: Fabric,
    sites: HashMap<String, (String, std::net::Ipv4Addr, LinkId)>,
    betweens: HashMap<(String, String), LinkId>,
    coord: Coordinator,
    relays: HashMap<String, Relay>,
    devices: Vec<Device>,
    online: HashMap<String, bool>,
    /// Counts of daemons that were stopped, added to what they count after.
    carried: HashMap<String, BytesBySource>,
    /// Every content the timeline wrote (BLAKE3 hex).
    written: HashSet<String>,
    /// Contents that must survive, by user and BLAKE3 hex, with where they were seen: what each
    /// running device held when a convergence was asked for.
    required: BTreeMap<(String, String), String>,
    /// Each device's user.
    user_of: HashMap<String, String>,
    /// The coordinator's site's namespace, where its tree and history are read from.
    coord_ns: String,
    /// Each device's site.
    site_of: HashMap<String, String>,
    /// Files found holding bytes the timeline never wrote, on a converged tree.
    foreign: Vec<String>,
    /// The tree of the last convergence with every device running, and its step.
    settled: Option<(usize, Tree)>,
    /// Paths the timeline wrote, modified, deleted or renamed (from or to) since then.
    touched: Vec<String>,
    /// Files of a settled tree that nothing touched and the next one changed or lost.
    changed: Vec<String>,
    /// How many untouched files the settled trees were checked for.
    untouched_checked: usize,
}

impl World {
    fn link(&self, l: &LinkRef) -> LinkId {
        match (&l.site, &l.regions) {
            (Some(s), _) => self.sites[s].2,
            (None, Some([a, b])) => self
                .betweens
                .get(&(a.clone(), b.clone()))
                .or_else(|| self.betweens.get(&(b.clone(), a.clone())))
                .copied()
                .expect("checked"),
            (None, None) => unreachable!("checked: a link names a site or two regions"),
        }
    }

    fn device(&mut self, name: &str) -> &mut Device {
        self.devices.iter_mut().find(|d| d.name == name).expect("checked")
    }

    fn stop(&mut self, name: &str, hard: bool) {
        if self.online.get(name) == Some(&true) {
            let counts = current_counts(self.device(name));
            add(self.carried.entry(name.to_string()).or_default(), counts);
        }
        self.device(name).stop(hard);
        self.online.insert(name.to_string(), false);
    }

    fn start(&mut self, name: &str) {
        if self.online.get(name) != Some(&true) {
            self.device(name).start();
            self.online.insert(name.to_string(), true);
        }
    }

    /// Writes `data` at `rel` on `device`, remembering the content.
    fn write(&mut self, device: &str, rel: &str, data: &[u8]) {
        self.touched.push(rel.to_string());
        self.written.insert(file_hash(data));
        self.device(device).write(rel, data);
    }

    /// The namespaces of the sites with devices, whose loopback is their LAN. Sites without
    /// devices are left out: the coordinator's, where the run reads the coordinator's tree (at a
    /// site with both, that reading counts as LAN), and relays'.
    fn lan_sites(&self) -> Vec<&str> {
        self.sites
            .iter()
            .filter(|(name, _)| self.site_of.values().any(|s| s == *name))
            .map(|(_, (ns, _, _))| ns.as_str())
            .collect()
    }

    fn running(&self) -> Vec<&Device> {
        self.devices.iter().filter(|d| self.online.get(&d.name) == Some(&true)).collect()
    }

    /// What every running device holds now must survive the run.
    fn require_held(&mut self, step: usize) {
        let mut seen = Vec::new();
        for d in self.running() {
            for (p, n) in d.local_tree() {
                if let Node::File(h, _) = n {
                    seen.push(((self.user_of[&d.name].clone(), h), format!("{p} on {} at step {step}", d.name)));
                }
            }
        }
        for (key, what) in seen {
            self.required.entry(key).or_insert(what);
        }
    }

    /// A device just stopped with SIGTERM: the contents in its folder that the coordinator keeps
    /// as durable versions must survive the run. (Its pending versions are not required: with its
    /// uplink cut it cannot pay them on the way out, and the timeline may then remove the only
    /// copy.) Nothing is required while the coordinator cannot be asked.
    fn require_committed(&mut self, name: &str, step: usize) {
        let d = self.devices.iter().find(|d| d.name == name).expect("checked");
        let Ok(Ok(durable)) = in_namespace(&self.coord_ns, || durable_contents(d)) else { return };
        let user = self.user_of[name].clone();
        for (p, n) in d.local_tree() {
            if let Node::File(h, _) = n
                && durable.contains(&h)
            {
                self.required.entry((user.clone(), h)).or_insert(format!("{p} on {name}, stopped at step {step}"));
            }
        }
    }

    /// Files of a converged tree whose bytes the timeline never wrote.
    fn check_written(&mut self, tree: &Tree, step: usize) {
        for (p, n) in tree {
            if let Node::File(h, _) = n
                && !self.written.contains(h)
            {
                self.foreign.push(format!("{p} on the tree converged at step {step}"));
            }
        }
    }

    /// A tree converged with every device running: checked against the previous such tree, and
    /// the anchor for the next.
    fn check_untouched(&mut self, tree: Tree, step: usize) {
        if let Some((before, old)) = &self.settled {
            let (changed, checked) = untouched_changes((*before, old), &self.touched, (step, &tree));
            self.changed.extend(changed);
            self.untouched_checked += checked;
        }
        self.settled = Some((step, tree));
        self.touched.clear();
    }

    fn by_source(&self) -> BTreeMap<String, BytesBySource> {
        self.devices
            .iter()
            .map(|d| {
                let mut total = self.carried.get(&d.name).copied().unwrap_or_default();
                if self.online.get(&d.name) == Some(&true) {
                    add(&mut total, current_counts(d));
                }
                (d.name.clone(), total)
            })
            .collect()
    }
}

/// Counters at one moment, for narrating what a step moved.
struct Moved {
    lan: u64,
    links: Vec<LinkReport>,
    by_source: BTreeMap<String, BytesBySource>,
}

impl Moved {
    fn now(w: &World) -> Moved {
        let lan = w.lan_sites().iter().map(|ns| lan_bytes(ns)).sum();
        Moved { lan, links: w.fabric.report(), by_source: w.by_source() }
    }

    /// What moved between `before` and now: over the LANs, over each link that carried more than
    /// a trickle, and where each device's downloads came from.
    fn since(&self, before: &Moved) -> String {
        let mib = |n: u64| format!("{:.1} MiB", n as f64 / 1048576.0);
        let lan = self.lan.saturating_sub(before.lan);
        let mut parts = vec![format!("{} over LANs", mib(lan))];
        for (now, was) in self.links.iter().zip(&before.links) {
            let (up, down) = (now.out.bytes - was.out.bytes, now.back.bytes - was.back.bytes);
            if up + down >= 100 * 1024 {
                let (a, b) = match now.kind {
                    LinkKind::Uplink => ("up", "down"),
                    LinkKind::InterRegion => ("→", "←"),
                };
                parts.push(format!("{}: {b} {}, {a} {}", now.name, mib(down), mib(up)));
            }
        }
        let mut out = if parts.len() > 1 || lan >= 100 * 1024 {
            format!("      moved: {}", parts.join("; "))
        } else {
            String::new()
        };
        for (name, now) in &self.by_source {
            let was = before.by_source.get(name).copied().unwrap_or_default();
            let parts: Vec<String> = [
                ("reused {} it already had", now.local.saturating_sub(was.local)),
                ("took {} from a LAN peer", now.peer.saturating_sub(was.peer)),
                ("took {} from a relay", now.relay.saturating_sub(was.relay)),
                ("took {} from the origin", now.origin.saturating_sub(was.origin)),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| what.replace("{}", &mib(n)))
            .collect();
            if !parts.is_empty() {
                out += &format!("{}      {name} {}", if out.is_empty() { "" } else { "\n" }, parts.join(", "));
            }
        }
        out
    }
}

fn describe(step: &scenario::Step, scale: f64) -> String {
    let size = |s: &str| {
        let b = (scenario::bytes(s).unwrap_or(0) as f64 * scale) as u64;
        shoal_protocol::size::format_bytes(b)
    };
    let json = serde_json::json!({
        "write": step.write.as_ref().map(|w| format!("{} {} on {}", size(&w.size), w.path, w.device)),
        "modify": step.modify.as_ref().map(|m| format!("{} at {} of {} on {}", size(&m.size), size(&m.offset), m.path, m.device)),
        "edits": step.edits.as_ref().map(|e| format!("{} changes to {} files of {} in {}/ on {}", e.count, e.files, size(&e.size), e.dir, e.device)),
        "delete": step.delete.as_ref().map(|d| format!("{} on {}", d.path, d.device)),
        "rename": step.rename.as_ref().map(|r| format!("{} -> {} on {}", r.from, r.to, r.device)),
        "offline": step.offline.as_ref().map(|n| n.device.clone()),
        "online": step.online.as_ref().map(|n| n.device.clone()),
        "partition": step.partition.as_ref().map(link_name),
        "heal": step.heal.as_ref().map(link_name),
        "loss": step.loss.as_ref().map(|l| format!("{}% on {}", l.percent, link_name(&l.link()))),
        "kill": step.kill.as_ref().map(process_name),
        "restart": step.restart.as_ref().map(process_name),
        "converge": step.converge.as_ref().map(|t| format!("within {}", t.timeout)),
        "peers_connected": step.peers_connected.as_ref().map(|t| format!("within {}", t.timeout)),
        "backed_up": step.backed_up.as_ref().map(|t| format!("within {}", t.timeout)),
        "sleep": step.sleep.clone(),
    });
    json.as_object()
        .and_then(|o| {
            o.iter().find(|(_, v)| !v.is_null()).map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or_default()))
        })
        .unwrap_or_default()
}

fn link_name(l: &LinkRef) -> String {
    match (&l.site, &l.regions) {
        (Some(s), _) => format!("{s} uplink"),
        (None, Some([a, b])) => format!("{a}-{b}"),
        _ => String::new(),
    }
}

fn process_name(p: &Process) -> String {
    match (&p.device, &p.relay) {
        (Some(d), _) => format!("device {d}"),
        (None, Some(r)) => format!("relay {r}"),
        _ => "coordinator".into(),
    }
}

/// The prefix of the namespaces this process's runs make.
pub fn namespace_prefix() -> String {
    format!("sn{}", std::process::id() % 100_000)
}

/// Runs `s`.
pub fn run(s: &Scenario, opts: &Options) -> Result<Report, RunError> {
    let work = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| RunError::Setup(format!("{}: {e}", d.display())))?;
            tempfile::Builder::new().prefix("netsim-").tempdir_in(d)
        }
        None => tempfile::Builder::new().prefix("netsim-").tempdir(),
    }
    .map_err(|e| RunError::Setup(format!("a work directory: {e}")))?
    // Kept if the run fails or panics; removed when it passes.
    .keep();
    let base = work.clone();
    let say = |line: String| {
        if opts.progress {
            eprintln!("{line}");
        }
    };

    let mut fabric = Fabric::new(&namespace_prefix(), s.seed);
    for r in &s.regions {
        fabric.add_region(&r.name)?;
    }
    let mut betweens = HashMap::new();
    for b in &s.betweens {
        let p = b.params().map_err(RunError::Setup)?;
        let id = fabric.connect_regions(&b.regions[0], &b.regions[1], p, p)?;
        betweens.insert((b.regions[0].clone(), b.regions[1].clone()), id);
    }
    let mut sites = HashMap::new();
    for site in &s.sites {
        let (up, down) = site.params().map_err(RunError::Setup)?;
        let (addr, link) = fabric.add_site(&site.name, &site.region, up, down)?;
        let ns = fabric.namespace(&site.name).expect("just added");
        sites.insert(site.name.clone(), (ns, addr, link));
    }
    say(format!("netsim: {} ({} sites, {} devices) in {}", s.name, s.sites.len(), s.devices.len(), base.display()));

    let (ns, addr, _) = &sites[&s.coordinator.site];
    let coord = Coordinator::start_in(&base.join("coordinator"), &format!("{addr}:0"), Some(ns));
    let region_of = |site: &str| s.sites.iter().find(|x| x.name == site).map(|x| x.region.clone()).unwrap_or_default();
    let mut relays = HashMap::new();
    for r in &s.relays {
        let (ns, addr, _) = &sites[&r.site];
        let relay = Relay::start_in(
            &coord,
            &r.name,
            &region_of(&r.site),
            &addr.to_string(),
            &base.join(&r.name),
            &r.cache_size,
            &[],
            Some(ns),
        );
        relays.insert(r.name.clone(), relay);
    }
    let mut devices = Vec::new();
    for d in &s.devices {
        let (ns, _, _) = &sites[&d.site];
        let dev = Device::enroll_in(&base, &coord, &d.user, &d.name, ns);
        let region = d.region.clone().unwrap_or_else(|| region_of(&d.site));
        let (peers, relays_on) = (d.peers, d.relays);
        dev.configure(|c| {
            c.lan_sync = peers;
            c.mdns = peers;
            c.relays = relays_on;
            c.region = Some(region);
        });
        devices.push(dev);
    }
    let mut w = World {
        fabric,
        sites,
        betweens,
        coord,
        relays,
        devices,
        online: HashMap::new(),
        carried: HashMap::new(),
        written: HashSet::new(),
        required: BTreeMap::new(),
        user_of: s.devices.iter().map(|d| (d.name.clone(), d.user.clone())).collect(),
        coord_ns: String::new(),
        site_of: s.devices.iter().map(|d| (d.name.clone(), d.site.clone())).collect(),
        foreign: Vec::new(),
        settled: None,
        touched: Vec::new(),
        changed: Vec::new(),
        untouched_checked: 0,
    };
    w.coord_ns = w.sites[&s.coordinator.site].0.clone();
    for d in &s.devices {
        w.start(&d.name);
    }
    let lan0: u64 = w.lan_sites().iter().map(|ns| lan_bytes(ns)).sum();
    let links0 = w.fabric.report();

    let started = Instant::now();
    let mut steps = Vec::new();
    let mut moved = Moved::now(&w);
    for (i, step) in s.steps.iter().enumerate() {
        let action = describe(step, opts.scale);
        if let Some(text) = &step.say {
            say(format!("\n{text}"));
        }
        say(format!("[{}/{}] {action} …", i + 1, s.steps.len()));
        let t = Instant::now();
        let error = perform(&mut w, s, i, step, opts.scale).err();
        let seconds = t.elapsed().as_secs_f64();
        say(format!(
            "[{}/{}] {action}: {seconds:.1} s{}",
            i + 1,
            s.steps.len(),
            error.as_ref().map(|e| format!(" — FAILED: {e}")).unwrap_or_default()
        ));
        if opts.narrate {
            if step.converge.is_some() {
                // The devices' counts are in the status each writes as its cycle ends, a moment
                // after its last file landed.
                std::thread::sleep(Duration::from_secs(1));
                let running = w.running();
                wait_for(Duration::from_secs(10), || running.iter().all(|d| daemon_status(d).in_sync).then_some(()));
            }
            let now = Moved::now(&w);
            let line = now.since(&moved);
            if !line.is_empty() {
                say(line);
            }
            moved = now;
        }
        steps.push(StepReport { step: i + 1, action, seconds, error });
    }
    let seconds = started.elapsed().as_secs_f64();
    // Each running daemon's counts are in the status it writes after a cycle: let the cycles
    // under way end (a daemon that stays busy is read as it is after 30 s).
    let online: Vec<&Device> = w.devices.iter().filter(|d| w.online.get(&d.name) == Some(&true)).collect();
    wait_for(Duration::from_secs(30), || online.iter().all(|d| daemon_status(d).in_sync).then_some(()));

    // What crossed each link during the timeline.
    let links: Vec<LinkLine> = w
        .fabric
        .report()
        .into_iter()
        .zip(links0)
        .map(|(now, before): (LinkReport, LinkReport)| LinkLine {
            name: now.name,
            kind: now.kind,
            up_bytes: now.out.bytes - before.out.bytes,
            down_bytes: now.back.bytes - before.back.bytes,
            dropped_packets: (now.out.dropped + now.back.dropped) - (before.out.dropped + before.back.dropped),
            connections: (now.out.connections + now.back.connections)
                - (before.out.connections + before.back.connections),
        })
        .collect();
    let mut kinds = ByLinkKind::default();
    for l in &links {
        match l.kind {
            LinkKind::Uplink => kinds.uplink += l.up_bytes + l.down_bytes,
            LinkKind::InterRegion => kinds.inter_region += l.up_bytes + l.down_bytes,
        }
    }
    kinds.lan = w.lan_sites().iter().map(|ns| lan_bytes(ns)).sum::<u64>().saturating_sub(lan0);
    let by_source = w.by_source();

    let finals = final_state(&w);
    let mut asserts = check(s, opts.scale, &steps, &links, &by_source, &finals);
    asserts.extend(invariants(&w, &finals));
    let passed = steps.iter().all(|st| st.error.is_none()) && asserts.iter().all(|a| a.passed);
    for d in &s.devices {
        w.stop(&d.name, false);
    }
    for r in w.relays.values_mut() {
        r.stop(false);
    }
    w.coord.stop(false);
    drop(w);
    if passed {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        say(format!("netsim: logs kept in {}", work.display()));
    }
    Ok(Report {
        scenario: s.name.clone(),
        scale: opts.scale,
        seconds,
        steps,
        bytes_by_link_kind: kinds,
        links,
        bytes_by_source: by_source,
        asserts,
        passed,
    })
}

fn perform(w: &mut World, s: &Scenario, i: usize, step: &scenario::Step, scale: f64) -> Result<(), String> {
    if let Some(x) = &step.write {
        let size = (scenario::bytes(&x.size)? as f64 * scale) as usize;
        let data = noise(x.seed.unwrap_or(s.seed.wrapping_mul(1000).wrapping_add(i as u64)), size);
        w.write(&x.device, &x.path, &data);
    } else if let Some(x) = &step.modify {
        use std::io::{Seek, SeekFrom, Write};
        let offset = (scenario::bytes(&x.offset)? as f64 * scale) as u64;
        let size = (scenario::bytes(&x.size)? as f64 * scale) as usize;
        let data = noise(s.seed.wrapping_mul(1000).wrapping_add(i as u64), size);
        w.touched.push(x.path.clone());
        let p = w.device(&x.device).path(&x.path);
        // What the file will hold is known before it is written (the agent may move it aside
        // as a conflicted copy any moment after).
        let mut now = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let end = offset as usize + data.len();
        if now.len() < end {
            now.resize(end, 0);
        }
        now[offset as usize..end].copy_from_slice(&data);
        w.written.insert(file_hash(&now));
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.write_all(&data))
            .map_err(|e| format!("{}: {e}", p.display()))?;
    } else if let Some(x) = &step.edits {
        let size = (scenario::bytes(&x.size)? as f64 * scale).max(1.0) as usize;
        let gap = x.gap.as_deref().map(scenario::duration).transpose()?.unwrap_or_default();
        for k in 0..x.count {
            let seed = s.seed.wrapping_mul(1000).wrapping_add(i as u64).wrapping_mul(1_000_000).wrapping_add(k as u64);
            let rel = format!("{}/f{}.bin", x.dir, k % x.files + 1);
            w.write(&x.device, &rel, &noise(seed, size));
            std::thread::sleep(gap);
        }
    } else if let Some(x) = &step.delete {
        w.touched.push(x.path.clone());
        let p = w.device(&x.device).path(&x.path);
        match std::fs::remove_file(&p) {
            Err(e) if !(x.missing_ok && e.kind() == std::io::ErrorKind::NotFound) => {
                return Err(format!("removing {}: {e}", p.display()));
            }
            _ => {}
        }
    } else if let Some(x) = &step.rename {
        w.touched.extend([x.from.clone(), x.to.clone()]);
        let d = w.device(&x.device);
        let (from, to) = (d.path(&x.from), d.path(&x.to));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        match std::fs::rename(&from, &to) {
            // Sync may have removed or moved it a moment ago.
            Err(e) if !(x.missing_ok && e.kind() == std::io::ErrorKind::NotFound) => {
                return Err(format!("renaming {}: {e}", from.display()));
            }
            _ => {}
        }
    } else if let Some(x) = &step.offline {
        w.stop(&x.device, false);
        w.require_committed(&x.device, i + 1);
    } else if let Some(x) = &step.online {
        w.start(&x.device);
    } else if let Some(l) = &step.partition {
        w.fabric.partition(w.link(l), true);
    } else if let Some(l) = &step.heal {
        w.fabric.partition(w.link(l), false);
    } else if let Some(l) = &step.loss {
        w.fabric.set_loss(w.link(&l.link()), l.percent / 100.0);
    } else if let Some(p) = &step.kill {
        match (&p.device, &p.relay) {
            (Some(d), _) => w.stop(d, true),
            (None, Some(r)) => w.relays.get_mut(r).expect("checked").stop(true),
            _ => w.coord.stop(true),
        }
    } else if let Some(p) = &step.restart {
        match (&p.device, &p.relay) {
            (Some(d), _) => w.start(d),
            (None, Some(r)) => {
                // A relay registers with the coordinator before it serves, and waits for one that
                // is down: the timeline goes on meanwhile.
                let relay = w.relays.get_mut(r).expect("checked");
                relay.respawn();
                let _ = relay.wait_ready(Duration::from_secs(5));
            }
            _ => w.coord.restart(false),
        }
    } else if let Some(t) = &step.converge {
        let timeout = scenario::duration(&t.timeout)?;
        w.require_held(i + 1);
        let online = w.running();
        if !online.is_empty() {
            // The coordinator is asked for its tree from its own site, so that the polling
            // crosses no link the report counts.
            let everyone = online.len() == s.devices.len();
            let tree = in_namespace(&w.coord_ns, || try_converge_with(&online, timeout, api_tree))
                .map_err(|e| e.to_string())??;
            w.check_written(&tree, i + 1);
            if everyone {
                w.check_untouched(tree, i + 1);
            }
        }
    } else if let Some(t) = &step.peers_connected {
        let until = Instant::now() + scenario::duration(&t.timeout)?;
        for site in &s.sites {
            let here: Vec<&Device> = w
                .devices
                .iter()
                .filter(|d| {
                    w.online.get(&d.name) == Some(&true)
                        && s.devices.iter().any(|x| x.name == d.name && x.site == site.name && x.peers)
                })
                .collect();
            if here.len() > 1 {
                try_wait_for_peers(&here, until.saturating_duration_since(Instant::now()))?;
            }
        }
    } else if let Some(t) = &step.backed_up {
        let timeout = scenario::duration(&t.timeout)?;
        let online: Vec<&Device> = w.devices.iter().filter(|d| w.online.get(&d.name) == Some(&true)).collect();
        wait_for(timeout, || {
            online
                .iter()
                .all(|d| {
                    let st = daemon_status(d);
                    // A withdrawn or stuck version stays listed; it is not waiting for an upload.
                    st.owed_uploads == 0 && st.pending_versions.iter().all(|v| v.withdrawn || v.stuck)
                })
                .then_some(())
        })
        .ok_or_else(|| format!("versions not backed up within {timeout:?}"))?;
    } else if let Some(d) = &step.sleep {
        std::thread::sleep(scenario::duration(d)?);
    }
    Ok(())
}

/// The files of `old` (a tree converged with every device running, at its step) that no path of
/// `touched` touches (itself, a directory above it or a path below it) and that `new` (the next
/// such tree) does not hold unchanged. Sync may add conflicted copies beside a file; it never
/// changes or removes one that nobody changed. Also how many files were untouched.
fn untouched_changes(old: (usize, &Tree), touched: &[String], new: (usize, &Tree)) -> (Vec<String>, usize) {
    let touches = |p: &str, t: &str| {
        p == t
            || p.strip_prefix(t).is_some_and(|r| r.starts_with('/'))
            || t.strip_prefix(p).is_some_and(|r| r.starts_with('/'))
    };
    let (mut changed, mut checked) = (Vec::new(), 0);
    for (p, n) in old.1 {
        let Node::File(h, _) = n else { continue };
        if touched.iter().any(|t| touches(p, t)) {
            continue;
        }
        checked += 1;
        let now = match new.1.get(p) {
            Some(m) if m == n => continue,
            Some(Node::File(h, _)) => format!("holds {}", &h[..12.min(h.len())]),
            Some(Node::Dir) => "is a directory".to_string(),
            None => "is gone".to_string(),
        };
        changed.push(format!(
            "{p} ({} at step {}, untouched since) {now} at step {}",
            &h[..12.min(h.len())],
            old.0,
            new.0
        ));
    }
    (changed, checked)
}

/// Each user's tree on the coordinator at the end and the contents in its history, or why they
/// could not be had.
type Finals = HashMap<String, Result<(Tree, HashSet<String>), String>>;

fn final_state(w: &World) -> Finals {
    let mut remote = Finals::new();
    for d in &w.devices {
        let user = &w.user_of[&d.name];
        if remote.contains_key(user) {
            continue;
        }
        // Asked from the coordinator's site, for up to 30 s (it may be restarting).
        let ask = || {
            in_namespace(&w.coord_ns, || Ok::<_, String>((api_tree(d)?, durable_contents(d)?)))
                .map_err(|e| e.to_string())?
        };
        let mut last = ask();
        let until = Instant::now() + Duration::from_secs(30);
        while last.is_err() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(500));
            last = ask();
        }
        remote.insert(user.clone(), last);
    }
    remote
}

/// What holds for every scenario: no file anywhere holds bytes the timeline never wrote (nothing
/// torn, nothing foreign), and every content a running device held when a convergence was asked
/// for, or held committed when it was stopped with SIGTERM, is still somewhere: in a file on the
/// coordinator's tree or as a durable version in its history (an edit overwritten before any
/// device noticed it is no version, and not required).
fn invariants(w: &World, remote: &Finals) -> Vec<AssertReport> {
    let mut foreign = w.foreign.clone();
    for d in &w.devices {
        for (p, n) in d.local_tree() {
            if let Node::File(h, _) = n
                && !w.written.contains(&h)
            {
                foreign.push(format!("{p} on {}", d.name));
            }
        }
    }
    for (user, got) in remote {
        if let Ok((tree, _)) = got {
            for (p, n) in tree {
                if let Node::File(h, _) = n
                    && !w.written.contains(h)
                {
                    foreign.push(format!("{p} on the coordinator ({user})"));
                }
            }
        }
    }
    let mut lost = Vec::new();
    for ((user, hash), seen) in &w.required {
        match &remote[user] {
            Ok((tree, durable)) => {
                let held = tree.values().any(|n| matches!(n, Node::File(h, _) if h == hash));
                if !held && !durable.contains(hash) {
                    lost.push(format!("{} ({seen})", &hash[..12]));
                }
            }
            Err(e) => lost.push(format!("{} ({seen}): the coordinator does not answer: {e}", &hash[..12])),
        }
    }
    vec![
        AssertReport {
            assertion: "nothing torn: every file holds bytes the timeline wrote".into(),
            passed: foreign.is_empty(),
            measured: if foreign.is_empty() {
                "none foreign".into()
            } else {
                format!("foreign: {}", foreign.join(", "))
            },
        },
        AssertReport {
            assertion: "nothing lost: what the devices held at each convergence, and what they had committed when stopped, is on the tree or in history".into(),
            passed: lost.is_empty(),
            measured: if lost.is_empty() {
                format!("{} contents kept", w.required.len())
            } else {
                format!("lost: {}", lost.join(", "))
            },
        },
        AssertReport {
            assertion: "nothing changed behind the user's back: a file no step touched between two convergences with every device running is unchanged".into(),
            passed: w.changed.is_empty(),
            measured: if w.changed.is_empty() {
                format!("{} untouched files checked, none changed", w.untouched_checked)
            } else {
                format!("changed: {}", w.changed.join(", "))
            },
        },
    ]
}

/// `v` is within the bounds, which scale with the run's file sizes.
fn within(v: u64, most: &Option<String>, least: &Option<String>, scale: f64) -> bool {
    let scaled = |b: &str| (scenario::bytes(b).unwrap_or(0) as f64 * scale) as u64;
    let most = most.as_deref().map(scaled);
    let least = least.as_deref().map(scaled);
    most.is_none_or(|m| v <= m) && least.is_none_or(|l| v >= l)
}

fn bounds(most: &Option<String>, least: &Option<String>, scale: f64) -> String {
    let b = |s: &String| {
        let n = (scenario::bytes(s).unwrap_or(0) as f64 * scale) as u64;
        shoal_protocol::size::format_bytes(n)
    };
    match (most, least) {
        (Some(m), Some(l)) => format!("between {} and {}", b(l), b(m)),
        (Some(m), None) => format!("at most {}", b(m)),
        (None, Some(l)) => format!("at least {}", b(l)),
        (None, None) => String::new(),
    }
}

fn check(
    s: &Scenario,
    scale: f64,
    steps: &[StepReport],
    links: &[LinkLine],
    by_source: &BTreeMap<String, BytesBySource>,
    finals: &Finals,
) -> Vec<AssertReport> {
    s.asserts
        .iter()
        .map(|a| {
            if let Some(l) = &a.link_bytes {
                let r = l.link();
                let name = match (&r.site, &r.regions) {
                    (Some(site), _) => format!("{site}-uplink"),
                    (None, Some([x, y])) => links
                        .iter()
                        .map(|k| k.name.clone())
                        .find(|n| *n == format!("{x}-{y}") || *n == format!("{y}-{x}"))
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                let line = links.iter().find(|k| k.name == name);
                // For a link between regions, "down" is towards the first region named (as towards the
                // site for an uplink).
                // The link is named after its regions in the order they are declared.
                let order = |r: &str| s.regions.iter().position(|x| x.name == r);
                let forward = match &r.regions {
                    Some([x, y]) => order(x) < order(y),
                    None => true,
                };
                let v = line.map_or(0, |k| match (l.direction.as_str(), forward) {
                    ("up", true) | ("down", false) => k.up_bytes,
                    _ => k.down_bytes,
                });
                AssertReport {
                    assertion: format!(
                        "{} bytes {} on {}",
                        l.direction,
                        bounds(&l.at_most, &l.at_least, scale),
                        link_name(&r)
                    ),
                    passed: within(v, &l.at_most, &l.at_least, scale),
                    measured: format!("{v} bytes"),
                }
            } else if let Some(x) = &a.source_bytes {
                let b = by_source.get(&x.device).copied().unwrap_or_default();
                let v = match x.source.as_str() {
                    "local" => b.local,
                    "peer" => b.peer,
                    "relay" => b.relay,
                    _ => b.origin,
                };
                AssertReport {
                    assertion: format!("{} from {} {}", x.device, x.source, bounds(&x.at_most, &x.at_least, scale)),
                    passed: within(v, &x.at_most, &x.at_least, scale),
                    measured: format!("{v} bytes"),
                }
            } else if let Some(t) = &a.step_time {
                let took = steps.get(t.step - 1).map_or(f64::INFINITY, |st| st.seconds);
                let most = scenario::duration(&t.at_most).unwrap_or(Duration::ZERO).as_secs_f64();
                AssertReport {
                    assertion: format!("step {} within {}", t.step, t.at_most),
                    passed: took <= most,
                    measured: format!("{took:.1} s"),
                }
            } else if let Some(c) = &a.conflicted_copies {
                let user = c.user.clone().unwrap_or_else(|| s.devices[0].user.clone());
                let (n, measured) = match finals.get(&user) {
                    Some(Ok((tree, _))) => {
                        // Files named as copies (the entries of a directory moved aside are not).
                        let copy = |p: &String| p.rsplit('/').next().is_some_and(|n| n.contains("(conflicted copy"));
                        let n = tree.iter().filter(|(p, n)| matches!(n, Node::File(..)) && copy(p)).count();
                        (Some(n), format!("{n}"))
                    }
                    Some(Err(e)) => (None, e.clone()),
                    None => (None, format!("no user {user}")),
                };
                let bounds = match (c.at_most, c.at_least) {
                    (Some(m), Some(l)) => format!("between {l} and {m}"),
                    (Some(m), None) => format!("at most {m}"),
                    (None, Some(l)) => format!("at least {l}"),
                    (None, None) => String::new(),
                };
                AssertReport {
                    assertion: format!("conflicted copies {bounds}"),
                    passed: n.is_some_and(|n| c.at_most.is_none_or(|m| n <= m) && c.at_least.is_none_or(|l| n >= l)),
                    measured,
                }
            } else {
                AssertReport { assertion: "nothing".into(), passed: false, measured: String::new() }
            }
        })
        .collect()
}

impl Report {
    /// The report as text: steps, bytes by link kind and by link, bytes by source, assertions.
    pub fn text(&self) -> String {
        let mut out = format!(
            "scenario {} (scale {}): {:.1} s\n\nstep | took | action\n",
            self.scenario, self.scale, self.seconds
        );
        for s in &self.steps {
            out += &format!(
                "{:>4} | {:>6.1} s | {}{}\n",
                s.step,
                s.seconds,
                s.action,
                s.error.as_ref().map(|e| format!(" — FAILED: {e}")).unwrap_or_default()
            );
        }
        let k = &self.bytes_by_link_kind;
        out += &format!("\nbytes by link kind: lan {}  uplink {}  inter_region {}\n", k.lan, k.uplink, k.inter_region);
        for l in &self.links {
            out += &format!(
                "  {:<24} up {:>12}  down {:>12}  dropped {} packets, {} connections opened\n",
                l.name, l.up_bytes, l.down_bytes, l.dropped_packets, l.connections
            );
        }
        out += "\nbytes by source (local / peer / relay / origin):\n";
        for (d, b) in &self.bytes_by_source {
            out += &format!("  {d:<16} {} / {} / {} / {}\n", b.local, b.peer, b.relay, b.origin);
        }
        out += "\n";
        for a in &self.asserts {
            out += &format!("{} {} (measured {})\n", if a.passed { "PASS" } else { "FAIL" }, a.assertion, a.measured);
        }
        out += if self.passed { "\npassed\n" } else { "\nFAILED\n" };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_nothing_touched_must_stay_as_they_were() {
        let file = |h: &str| Node::File(h.repeat(12), false);
        let old: Tree = [
            ("a".to_string(), Node::Dir),
            ("a/kept".to_string(), file("1")),
            ("a/edited".to_string(), file("2")),
            ("b".to_string(), Node::Dir),
            ("b/in-a-moved-dir".to_string(), file("3")),
            ("c".to_string(), file("4")),
            ("d".to_string(), file("5")),
            ("e".to_string(), file("6")),
            ("ab".to_string(), file("7")),
        ]
        .into();
        let mut new = old.clone();
        new.insert("a/edited".into(), file("8"));
        new.remove("b/in-a-moved-dir");
        new.insert("a/kept (conflicted copy)".into(), file("9"));
        // Someone wrote below c, so c had to go; d was lost and e rewritten, by nobody.
        new.remove("c");
        new.insert("c/x".into(), file("a"));
        new.remove("d");
        new.insert("e".into(), file("b"));
        let touched = ["a/edited", "b", "c/x", "a/b"].map(String::from);
        let (changed, checked) = untouched_changes((3, &old), &touched, (7, &new));
        assert_eq!((changed.len(), checked), (2, 4), "{changed:?}");
        assert!(changed[0].starts_with("d (555555555555 at step 3, untouched since) is gone at step 7"), "{changed:?}");
        assert!(
            changed[1].starts_with("e (666666666666 at step 3, untouched since) holds bbbbbbbbbbbb"),
            "{changed:?}"
        );
        assert_eq!(untouched_changes((3, &old), &touched, (7, &old)), (vec![], 4));
    }
}
