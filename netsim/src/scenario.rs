//! A scenario: a TOML file with a topology (regions, the links between them, sites with their
//! uplinks, where the coordinator and the relays run, the devices), a timeline of steps, and
//! assertions on what the run measured. Parsing refuses unknown keys and names the line of any
//! mistake; `Scenario::check` then refuses names that point nowhere.
//!
//! ```toml
//! name = "home-lan"
//! [[region]]
//! name = "eu"
//! [[site]]
//! name = "home"
//! region = "eu"
//! latency = "20ms"            # one way, each direction
//! down = "50Mbit"             # towards the site; `up` away from it
//! [coordinator]
//! site = "dc"
//! [[device]]
//! name = "laptop1"
//! site = "home"
//! [[step]]
//! write = { device = "laptop1", path = "video.bin", size = "200MiB" }
//! [[step]]
//! converge = { timeout = "10m" }
//! [[assert]]
//! link_bytes = { site = "home", direction = "down", at_most = "10MiB" }
//! ```

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::link::LinkParams;

/// A scenario as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seeds the links' random draws and the written files' contents.
    #[serde(default = "one")]
    pub seed: u64,
    #[serde(rename = "region")]
    pub regions: Vec<Region>,
    #[serde(default, rename = "between")]
    pub betweens: Vec<Between>,
    #[serde(rename = "site")]
    pub sites: Vec<Site>,
    pub coordinator: Placement,
    #[serde(default, rename = "relay")]
    pub relays: Vec<RelaySpec>,
    #[serde(rename = "device")]
    pub devices: Vec<DeviceSpec>,
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
    #[serde(default, rename = "assert")]
    pub asserts: Vec<Assertion>,
}

fn one() -> u64 {
    1
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
}

/// The link between two regions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Between {
    pub regions: [String; 2],
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
    /// Percent of packets lost, e.g. `2.0`.
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Bits a second each way (`"1Gbit"`); no limit if absent.
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
}

/// A site: a LAN behind one uplink to its region.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    pub region: String,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
    /// Percent of packets lost, e.g. `2.0`.
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Bits a second towards the site, and away from it.
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub up: Option<String>,
}

/// Where a server runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub site: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySpec {
    pub name: String,
    pub site: String,
    #[serde(default = "relay_cache")]
    pub cache_size: String,
}

fn relay_cache() -> String {
    "1GiB".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    pub name: String,
    pub site: String,
    /// The user it belongs to; all devices of one user sync one folder.
    #[serde(default = "user")]
    pub user: String,
    /// LAN sync (peers, mDNS) on.
    #[serde(default = "yes")]
    pub peers: bool,
    /// Downloads through relays.
    #[serde(default = "yes")]
    pub relays: bool,
    /// The device's region, for choosing a relay: its site's region if absent.
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

fn user() -> String {
    "user".into()
}

/// One step of the timeline: exactly one action.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A line the run prints as the step starts (a narrating scenario's commentary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub say: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write: Option<Write>,
    /// Overwrites part of an existing file in place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modify: Option<Modify>,
    /// Many changes to a set of files on one device, one after another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edits: Option<Edits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete: Option<OnDevice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rename: Option<Rename>,
    /// Stops a device's daemon (its folder stays; it can be edited while offline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline: Option<Named>,
    /// Starts it again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<Named>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<LinkRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heal: Option<LinkRef>,
    /// Loss on a link from now on, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<LossChange>,
    /// Kills a process (`device`, `relay` or `coordinator`) with SIGKILL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill: Option<Process>,
    /// Starts a killed process again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<Process>,
    /// Waits until every device's folder equals the coordinator's tree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub converge: Option<Timeout>,
    /// Waits until the devices of each site with peers on are connected to each other.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers_connected: Option<Timeout>,
    /// Waits until no running device owes an upload or knows of a version not yet backed up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backed_up: Option<Timeout>,
    /// Waits this long.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sleep: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Write {
    pub device: String,
    pub path: String,
    pub size: String,
    /// Content seed (the scenario's seed and the step's number if absent).
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// `size` new bytes written over `path` on `device` from `offset` (both scale with the run).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Modify {
    pub device: String,
    pub path: String,
    #[serde(default = "zero")]
    pub offset: String,
    pub size: String,
}

fn zero() -> String {
    "0".into()
}

/// `count` changes on `device`, each rewriting one of the files `DIR/f1.bin` .. `DIR/fN.bin`
/// (`N` = `files`, in turn) with new content of `size` bytes, `gap` apart.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edits {
    pub device: String,
    pub count: usize,
    pub files: usize,
    #[serde(default = "edits_dir")]
    pub dir: String,
    pub size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<String>,
}

fn edits_dir() -> String {
    "docs".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDevice {
    pub device: String,
    pub path: String,
    /// Nothing to do if the path is not there (sync may have removed or moved it already).
    #[serde(default, skip_serializing_if = "is_false")]
    pub missing_ok: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    pub device: String,
    pub from: String,
    pub to: String,
    /// Nothing to do if `from` is not there.
    #[serde(default, skip_serializing_if = "is_false")]
    pub missing_ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Named {
    pub device: String,
}

/// A site's uplink, or the link between two regions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRef {
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<[String; 2]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossChange {
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<[String; 2]>,
    pub percent: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    #[serde(default)]
    pub coordinator: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeout {
    pub timeout: String,
}

/// What a run must show.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    /// Bytes that crossed a site's uplink (or a link between regions) in one direction, from the
    /// start of the timeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_bytes: Option<LinkBytes>,
    /// Bytes a device downloaded from one source (`local`, `peer`, `relay`, `origin`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_bytes: Option<SourceBytes>,
    /// How long a step took (numbered from 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_time: Option<StepTime>,
    /// How many conflicted copies the coordinator's tree holds at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflicted_copies: Option<Count>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Count {
    /// Whose tree (the first device's user if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_most: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_least: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkBytes {
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<[String; 2]>,
    /// `down` (towards the site, or towards the first of the two regions named) or `up`.
    pub direction: String,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_most: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_least: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceBytes {
    pub device: String,
    pub source: String,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_most: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_least: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTime {
    pub step: usize,
    pub at_most: String,
}

/// A bad scenario: what is wrong, and where when known.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScenarioError(pub String);

/// Parses `text` (the file at `path`, for messages).
pub fn parse(path: &str, text: &str) -> Result<Scenario, ScenarioError> {
    let s: Scenario = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|r| text[..r.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(n) => ScenarioError(format!("{path}:{n}: {}", e.message())),
            None => ScenarioError(format!("{path}: {}", e.message())),
        }
    })?;
    s.check().map_err(|e| ScenarioError(format!("{path}: {e}")))?;
    Ok(s)
}

/// `"20ms"`, `"1.5s"`, `"10m"`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// Bits a second: `"50Mbit"`, `"1Gbit"`, `"512kbit"`, `"100bit"`.
pub fn rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let (num, mul) = [("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(unit, mul)| t.strip_suffix(unit).map(|n| (n.trim(), *mul)))
        .ok_or_else(|| format!("bad rate {s:?}: expected a number of bit, kbit, Mbit or Gbit"))?;
    let n: f64 = num.parse().map_err(|_| format!("bad rate {s:?}"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("bad rate {s:?}: must be above zero"));
    }
    Ok((n * mul) as u64)
}

/// A path inside the folder: relative, no `..`, not in `.shoal`.
fn relative(p: &str) -> Result<(), String> {
    let path = std::path::Path::new(p);
    let ok = !p.is_empty()
        && path.components().all(|c| matches!(c, std::path::Component::Normal(_)))
        && !p.starts_with(".shoal");
    if ok { Ok(()) } else { Err(format!("{p:?} is not a path inside the folder")) }
}

/// Bytes: `"200MiB"`, `"1 GB"`, `"4096"`.
pub fn bytes(s: &str) -> Result<u64, String> {
    shoal_protocol::size::parse_bytes(s)
}

fn params(
    latency: &Option<String>,
    jitter: &Option<String>,
    loss: Option<f64>,
    rate_s: Option<&String>,
) -> Result<LinkParams, String> {
    let latency = latency.as_deref().map(duration).transpose()?.unwrap_or_default();
    let jitter = jitter.as_deref().map(duration).transpose()?.unwrap_or_default();
    let loss = loss.unwrap_or(0.0);
    if !(0.0..=100.0).contains(&loss) {
        return Err(format!("loss {loss} is not a percentage"));
    }
    let rate_bps = rate_s.map(|r| rate(r)).transpose()?;
    Ok(LinkParams { latency, jitter, loss: loss / 100.0, rate_bps })
}

impl Between {
    /// Each direction's behaviour.
    pub fn params(&self) -> Result<LinkParams, String> {
        params(&self.latency, &self.jitter, self.loss, self.rate.as_ref())
    }
}

impl Site {
    /// Away from the site, and towards it.
    pub fn params(&self) -> Result<(LinkParams, LinkParams), String> {
        let p = |rate| params(&self.latency, &self.jitter, self.loss, rate);
        Ok((p(self.up.as_ref())?, p(self.down.as_ref())?))
    }
}

impl LossChange {
    pub fn link(&self) -> LinkRef {
        LinkRef { site: self.site.clone(), regions: self.regions.clone() }
    }
}

impl LinkBytes {
    pub fn link(&self) -> LinkRef {
        LinkRef { site: self.site.clone(), regions: self.regions.clone() }
    }
}

impl Step {
    /// How many actions the step names (a valid step names one).
    fn actions(&self) -> usize {
        [
            self.write.is_some(),
            self.edits.is_some(),
            self.modify.is_some(),
            self.delete.is_some(),
            self.rename.is_some(),
            self.offline.is_some(),
            self.online.is_some(),
            self.partition.is_some(),
            self.heal.is_some(),
            self.loss.is_some(),
            self.kill.is_some(),
            self.restart.is_some(),
            self.converge.is_some(),
            self.peers_connected.is_some(),
            self.backed_up.is_some(),
            self.sleep.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count()
    }
}

impl Scenario {
    /// Every name points somewhere, every value parses, every step and assertion says one thing.
    pub fn check(&self) -> Result<(), String> {
        let mut regions = HashSet::new();
        for r in &self.regions {
            if !regions.insert(r.name.as_str()) {
                return Err(format!("region {:?} is named twice", r.name));
            }
        }
        for b in &self.betweens {
            for r in &b.regions {
                if !regions.contains(r.as_str()) {
                    return Err(format!("between: no region {r:?}"));
                }
            }
            b.params().map_err(|e| format!("between {:?}: {e}", b.regions))?;
        }
        let mut sites = HashSet::new();
        for s in &self.sites {
            if !regions.contains(s.region.as_str()) {
                return Err(format!("site {:?}: no region {:?}", s.name, s.region));
            }
            if !sites.insert(s.name.as_str()) {
                return Err(format!("site {:?} is named twice", s.name));
            }
            s.params().map_err(|e| format!("site {:?}: {e}", s.name))?;
        }
        let site = |name: &str, what: &str| {
            if sites.contains(name) { Ok(()) } else { Err(format!("{what}: no site {name:?}")) }
        };
        site(&self.coordinator.site, "coordinator")?;
        let mut relays = HashSet::new();
        for r in &self.relays {
            site(&r.site, &format!("relay {:?}", r.name))?;
            bytes(&r.cache_size).map_err(|e| format!("relay {:?}: {e}", r.name))?;
            if !relays.insert(r.name.as_str()) {
                return Err(format!("relay {:?} is named twice", r.name));
            }
        }
        if self.devices.is_empty() {
            return Err("a scenario needs at least one device".into());
        }
        let mut devices = HashSet::new();
        for d in &self.devices {
            site(&d.site, &format!("device {:?}", d.name))?;
            if !devices.insert(d.name.as_str()) {
                return Err(format!("device {:?} is named twice", d.name));
            }
            if let Some(r) = &d.region
                && !regions.contains(r.as_str())
            {
                return Err(format!("device {:?}: no region {r:?}", d.name));
            }
        }
        let device = |name: &str, what: &str| {
            if devices.contains(name) { Ok(()) } else { Err(format!("{what}: no device {name:?}")) }
        };
        let link = |l: &LinkRef, what: &str| match (&l.site, &l.regions) {
            (Some(s), None) => site(s, what),
            (None, Some([a, b])) => {
                let joined = self
                    .betweens
                    .iter()
                    .any(|x| (x.regions[0] == *a && x.regions[1] == *b) || (x.regions[0] == *b && x.regions[1] == *a));
                if joined { Ok(()) } else { Err(format!("{what}: regions {a:?} and {b:?} are not joined")) }
            }
            _ => Err(format!("{what}: name a site or two regions")),
        };
        for (i, s) in self.steps.iter().enumerate() {
            let what = format!("step {}", i + 1);
            if s.actions() != 1 {
                return Err(format!("{what}: a step takes exactly one action, it has {}", s.actions()));
            }
            if let Some(w) = &s.write {
                device(&w.device, &what)?;
                bytes(&w.size).map_err(|e| format!("{what}: {e}"))?;
            }
            if let Some(e) = &s.edits {
                device(&e.device, &what)?;
                bytes(&e.size).map_err(|x| format!("{what}: {x}"))?;
                if e.files == 0 || e.count == 0 {
                    return Err(format!("{what}: edits need at least one file and one change"));
                }
                if let Some(g) = &e.gap {
                    duration(g).map_err(|x| format!("{what}: {x}"))?;
                }
                relative(&e.dir).map_err(|x| format!("{what}: {x}"))?;
            }
            if let Some(m) = &s.modify {
                device(&m.device, &what)?;
                for b in [&m.offset, &m.size] {
                    bytes(b).map_err(|x| format!("{what}: {x}"))?;
                }
            }
            for p in [
                s.write.as_ref().map(|w| &w.path),
                s.modify.as_ref().map(|m| &m.path),
                s.delete.as_ref().map(|d| &d.path),
                s.rename.as_ref().map(|r| &r.from),
                s.rename.as_ref().map(|r| &r.to),
            ]
            .into_iter()
            .flatten()
            {
                relative(p).map_err(|x| format!("{what}: {x}"))?;
            }
            for d in [s.delete.as_ref().map(|d| &d.device), s.rename.as_ref().map(|r| &r.device)].into_iter().flatten()
            {
                device(d, &what)?;
            }
            for n in [&s.offline, &s.online].into_iter().flatten() {
                device(&n.device, &what)?;
            }
            for l in [&s.partition, &s.heal].into_iter().flatten() {
                link(l, &what)?;
            }
            if let Some(l) = &s.loss {
                link(&l.link(), &what)?;
                if !(0.0..=100.0).contains(&l.percent) {
                    return Err(format!("{what}: loss {} is not a percentage", l.percent));
                }
            }
            for p in [&s.kill, &s.restart].into_iter().flatten() {
                match (&p.device, &p.relay, p.coordinator) {
                    (Some(d), None, false) => device(d, &what)?,
                    (None, Some(r), false) if relays.contains(r.as_str()) => {}
                    (None, Some(r), false) => return Err(format!("{what}: no relay {r:?}")),
                    (None, None, true) => {}
                    _ => return Err(format!("{what}: name one device, relay or the coordinator")),
                }
            }
            for t in [&s.converge, &s.peers_connected, &s.backed_up].into_iter().flatten() {
                duration(&t.timeout).map_err(|e| format!("{what}: {e}"))?;
            }
            if let Some(d) = &s.sleep {
                duration(d).map_err(|e| format!("{what}: {e}"))?;
            }
        }
        for (i, a) in self.asserts.iter().enumerate() {
            let what = format!("assert {}", i + 1);
            let n = [
                a.link_bytes.is_some(),
                a.source_bytes.is_some(),
                a.step_time.is_some(),
                a.conflicted_copies.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if n != 1 {
                return Err(format!("{what}: an assertion checks exactly one thing, it has {n}"));
            }
            let bounds = |most: &Option<String>, least: &Option<String>| -> Result<(), String> {
                if most.is_none() && least.is_none() {
                    return Err(format!("{what}: give at_most or at_least"));
                }
                for b in [most, least].into_iter().flatten() {
                    bytes(b).map_err(|e| format!("{what}: {e}"))?;
                }
                Ok(())
            };
            if let Some(l) = &a.link_bytes {
                link(&l.link(), &what)?;
                if l.direction != "up" && l.direction != "down" {
                    return Err(format!("{what}: direction is up or down, not {:?}", l.direction));
                }
                bounds(&l.at_most, &l.at_least)?;
            }
            if let Some(s) = &a.source_bytes {
                device(&s.device, &what)?;
                if !["local", "peer", "relay", "origin"].contains(&s.source.as_str()) {
                    return Err(format!("{what}: source is local, peer, relay or origin, not {:?}", s.source));
                }
                bounds(&s.at_most, &s.at_least)?;
            }
            if let Some(c) = &a.conflicted_copies {
                if c.at_most.is_none() && c.at_least.is_none() {
                    return Err(format!("{what}: give at_most or at_least"));
                }
                if let Some(u) = &c.user
                    && !self.devices.iter().any(|d| d.user == *u)
                {
                    return Err(format!("{what}: no device of user {u:?}"));
                }
            }
            if let Some(t) = &a.step_time {
                if t.step == 0 || t.step > self.steps.len() {
                    return Err(format!("{what}: no step {}", t.step));
                }
                duration(&t.at_most).map_err(|e| format!("{what}: {e}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[[region]]
name = "eu"
[[region]]
name = "us"
[[between]]
regions = ["eu", "us"]
latency = "75ms"
[[site]]
name = "home"
region = "eu"
latency = "20ms"
down = "50Mbit"
up = "10Mbit"
[[site]]
name = "dc"
region = "us"
[coordinator]
site = "dc"
[[device]]
name = "a"
site = "home"
[[step]]
write = { device = "a", path = "x.bin", size = "1MiB" }
[[step]]
converge = { timeout = "60s" }
[[assert]]
link_bytes = { site = "home", direction = "down", at_most = "100KiB" }
"#;

    #[test]
    fn a_good_scenario_parses_with_its_links() {
        let s = parse("t.toml", GOOD).unwrap();
        let (up, down) = s.sites[0].params().unwrap();
        assert_eq!((up.rate_bps, down.rate_bps), (Some(10_000_000), Some(50_000_000)));
        assert_eq!(up.latency, Duration::from_millis(20));
        assert_eq!(s.betweens[0].params().unwrap().latency, Duration::from_millis(75));
        assert_eq!(s.steps.len(), 2);
    }

    #[test]
    fn mistakes_are_named_with_their_line() {
        let typo = GOOD.replace("latency = \"75ms\"", "latncy = \"75ms\"");
        let e = parse("t.toml", &typo).unwrap_err().0;
        assert!(e.starts_with("t.toml:9:") && e.contains("latncy"), "{e}");
        let bad_type = GOOD.replace("name = \"t\"", "name = 3");
        assert!(parse("t.toml", &bad_type).unwrap_err().0.starts_with("t.toml:2:"));
    }

    #[test]
    fn names_that_point_nowhere_and_bad_values_are_refused() {
        for (from, to, says) in [
            ("site = \"dc\"\n[[device]]", "site = \"mars\"\n[[device]]", "coordinator: no site \"mars\""),
            ("device = \"a\", path", "device = \"b\", path", "step 1: no device \"b\""),
            ("down = \"50Mbit\"", "down = \"fast\"", "bad rate"),
            ("size = \"1MiB\"", "size = \"lots\"", "step 1"),
            (
                "converge = { timeout = \"60s\" }",
                "converge = { timeout = \"60s\" }\nsleep = \"1s\"",
                "exactly one action",
            ),
            ("direction = \"down\"", "direction = \"sideways\"", "direction is up or down"),
        ] {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{from}");
            let e = parse("t.toml", &text).unwrap_err().0;
            assert!(e.contains(says), "{from} -> {e}");
        }
        assert!(rate("0Mbit").is_err() && rate("5").is_err());
        assert_eq!(rate("1.5Gbit").unwrap(), 1_500_000_000);
    }
}
