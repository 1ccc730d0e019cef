//! Random timelines: `shoal-netsim random --seed N` draws a timeline from the seed over a
//! topology (the shipped `topologies/mixed.toml` unless given another) — writes, runs of edits,
//! deletes and renames on every device (offline ones included, so their edits meet on the way
//! back), devices taken offline, killed and started again, uplinks cut and healed, loss turned up
//! and down, the relay and the coordinator killed and restarted, waits and convergences — and
//! ends with everything healed and running, a last write on every device, a convergence and a
//! wait until everything is backed up. The run checks what every scenario is checked for
//! (converged, nothing torn, nothing held at a convergence lost, nothing untouched changed). The timeline is a scenario like
//! any other: a failing seed's TOML replays it with `shoal-netsim run`.

use std::collections::BTreeSet;

use crate::scenario::{Edits, LinkRef, LossChange, Named, OnDevice, Process, Rename, Scenario, Step, Timeout, Write};

/// The topology drawn over when none is given.
pub const MIXED: &str = include_str!("../topologies/mixed.toml");

/// SplitMix64: small, and the same on every machine.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// Files live at the top or one directory down; no name is ever both a file and a directory.
fn path(r: &mut Draw) -> String {
    let file = r.pick(&["a.bin", "b.bin", "c.bin", "d.bin", "e.bin"]);
    if r.chance(50) { file.to_string() } else { format!("{}/{file}", r.pick(&["x", "y", "z"])) }
}

/// Mostly small files, some of a few MiB, now and then a bigger one.
fn size(r: &mut Draw) -> String {
    match r.below(100) {
        0..70 => format!("{}KiB", 1 + r.below(256)),
        70..95 => format!("{}KiB", 256 + r.below(4 * 1024 - 256)),
        _ => format!("{}MiB", 4 + r.below(13)),
    }
}

/// What the timeline has done so far that a convergence must undo first.
#[derive(Default)]
struct Model {
    /// Devices stopped (`offline`) and killed.
    stopped: BTreeSet<String>,
    killed: BTreeSet<String>,
    /// Cut links, as (site) or (region, region).
    cut: Vec<LinkRef>,
    lossy: Vec<LinkRef>,
    relays_down: BTreeSet<String>,
    coordinator_down: bool,
}

fn same(a: &LinkRef, b: &LinkRef) -> bool {
    a.site == b.site && a.regions == b.regions
}

fn step() -> Step {
    Step::default()
}

/// Steps that bring the network, the coordinator and every device back before a convergence: a
/// version committed peer-first by a device that is down, before its upload, can reach no other
/// device until its author is back.
fn mend(m: &mut Model, out: &mut Vec<Step>) {
    for l in m.cut.drain(..) {
        out.push(Step { heal: Some(l), ..step() });
    }
    if m.coordinator_down {
        m.coordinator_down = false;
        out.push(Step { restart: Some(Process { device: None, relay: None, coordinator: true }), ..step() });
    }
    for device in std::mem::take(&mut m.stopped) {
        out.push(Step { online: Some(Named { device }), ..step() });
    }
    for device in std::mem::take(&mut m.killed) {
        out.push(Step { restart: Some(Process { device: Some(device), relay: None, coordinator: false }), ..step() });
    }
}

/// A timeline of `steps` drawn actions (plus the mending a convergence needs, and the ending)
/// over `topology`, from `seed`. `timeout` bounds each convergence and the final backup.
pub fn timeline(topology: &Scenario, seed: u64, steps: usize, timeout: &str) -> Scenario {
    let mut r = Draw(seed);
    let devices: Vec<String> = topology.devices.iter().map(|d| d.name.clone()).collect();
    let relays: Vec<String> = topology.relays.iter().map(|x| x.name.clone()).collect();
    let mut links: Vec<LinkRef> =
        topology.sites.iter().map(|s| LinkRef { site: Some(s.name.clone()), regions: None }).collect();
    links.extend(topology.betweens.iter().map(|b| LinkRef { site: None, regions: Some(b.regions.clone()) }));
    let converge = || Step { converge: Some(Timeout { timeout: timeout.to_string() }), ..step() };
    let mut m = Model::default();
    let mut out: Vec<Step> = Vec::new();

    for _ in 0..steps {
        let device = r.pick(&devices).clone();
        match r.below(100) {
            0..30 => {
                let (path, size) = (path(&mut r), size(&mut r));
                out.push(Step { write: Some(Write { device, path, size, seed: None }), ..step() });
            }
            30..36 => {
                let gap = r.chance(50).then(|| format!("{}ms", 20 * r.below(10)));
                let edits = Edits {
                    device,
                    count: 2 + r.below(20),
                    files: 1 + r.below(3),
                    dir: r.pick(&["x", "y", "z"]).to_string(),
                    size: format!("{}KiB", 1 + r.below(128)),
                    gap,
                };
                out.push(Step { edits: Some(edits), ..step() });
            }
            36..44 => {
                let path = path(&mut r);
                out.push(Step { delete: Some(OnDevice { device, path, missing_ok: true }), ..step() });
            }
            44..50 => {
                let (from, to) = (path(&mut r), path(&mut r));
                if from != to {
                    out.push(Step { rename: Some(Rename { device, from, to, missing_ok: true }), ..step() });
                }
            }
            50..58 => {
                // Offline and back (a device killed is started again by `restart`).
                if m.killed.contains(&device) {
                    continue;
                }
                if m.stopped.remove(&device) {
                    out.push(Step { online: Some(Named { device }), ..step() });
                } else {
                    m.stopped.insert(device.clone());
                    out.push(Step { offline: Some(Named { device }), ..step() });
                }
            }
            58..63 => {
                if m.stopped.contains(&device) {
                    continue;
                }
                let p = Process { device: Some(device.clone()), relay: None, coordinator: false };
                if m.killed.remove(&device) {
                    out.push(Step { restart: Some(p), ..step() });
                } else {
                    m.killed.insert(device);
                    out.push(Step { kill: Some(p), ..step() });
                }
            }
            63..70 => {
                let l = r.pick(&links).clone();
                if let Some(i) = m.cut.iter().position(|c| same(c, &l)) {
                    m.cut.remove(i);
                    out.push(Step { heal: Some(l), ..step() });
                } else {
                    m.cut.push(l.clone());
                    out.push(Step { partition: Some(l), ..step() });
                }
            }
            70..75 => {
                let l = r.pick(&links).clone();
                let percent = *r.pick(&[0.0, 1.0, 2.0, 5.0]);
                m.lossy.retain(|c| !same(c, &l));
                if percent > 0.0 {
                    m.lossy.push(l.clone());
                }
                out.push(Step { loss: Some(LossChange { site: l.site, regions: l.regions, percent }), ..step() });
            }
            75..79 if !relays.is_empty() => {
                let relay = r.pick(&relays).clone();
                let p = Process { device: None, relay: Some(relay.clone()), coordinator: false };
                if m.relays_down.remove(&relay) {
                    out.push(Step { restart: Some(p), ..step() });
                } else {
                    m.relays_down.insert(relay);
                    out.push(Step { kill: Some(p), ..step() });
                }
            }
            79..82 => {
                let p = Process { device: None, relay: None, coordinator: true };
                m.coordinator_down = !m.coordinator_down;
                if m.coordinator_down {
                    out.push(Step { kill: Some(p), ..step() });
                } else {
                    out.push(Step { restart: Some(p), ..step() });
                }
            }
            82..92 => {
                let ms = 200 + 100 * r.below(40);
                out.push(Step { sleep: Some(format!("{ms}ms")), ..step() });
            }
            _ => {
                mend(&mut m, &mut out);
                out.push(converge());
            }
        }
    }

    // The ending: everything healed and running, a last change on every device, then converged
    // and backed up.
    mend(&mut m, &mut out);
    for l in m.lossy.drain(..) {
        out.push(Step { loss: Some(LossChange { site: l.site, regions: l.regions, percent: 0.0 }), ..step() });
    }
    for relay in std::mem::take(&mut m.relays_down) {
        out.push(Step { restart: Some(Process { device: None, relay: Some(relay), coordinator: false }), ..step() });
    }
    for device in &devices {
        let write =
            Write { device: device.clone(), path: format!("last-{device}.bin"), size: "4KiB".into(), seed: None };
        out.push(Step { write: Some(write), ..step() });
    }
    out.push(converge());
    out.push(Step { backed_up: Some(Timeout { timeout: timeout.to_string() }), ..step() });

    Scenario {
        name: format!("random-{seed}"),
        description: format!("drawn from seed {seed} over {} ({steps} steps)", topology.name),
        seed,
        steps: out,
        asserts: Vec::new(),
        ..topology.clone()
    }
}

/// The scenario as a TOML file `shoal-netsim run` replays (at `scale`, which the file names).
pub fn to_toml(s: &Scenario, scale: f64) -> String {
    let body = toml::to_string(s).expect("a scenario serialises");
    format!("# {}\n# Replay: shoal-netsim run THIS_FILE --scale {scale}\n{body}", s.description)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::parse;

    #[test]
    fn a_seed_draws_the_same_timeline_and_its_toml_replays_it() {
        let topology = parse("mixed.toml", MIXED).unwrap();
        for seed in [0, 1, 42, u64::MAX] {
            let a = to_toml(&timeline(&topology, seed, 40, "5m"), 1.0);
            assert_eq!(a, to_toml(&timeline(&topology, seed, 40, "5m"), 1.0), "seed {seed}");
            let back = parse("random.toml", &a).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{a}"));
            assert_eq!(to_toml(&back, 1.0), a, "seed {seed}");
        }
        let one = to_toml(&timeline(&topology, 1, 40, "5m"), 1.0);
        assert_ne!(one, to_toml(&timeline(&topology, 2, 40, "5m"), 1.0));
    }

    #[test]
    fn every_timeline_ends_healed_running_and_converged() {
        let topology = parse("mixed.toml", MIXED).unwrap();
        for seed in 0..200 {
            let s = timeline(&topology, seed, 30, "5m");
            let mut cut = 0i32;
            let mut down = 0i32;
            let mut coordinator_up = true;
            for (i, st) in s.steps.iter().enumerate() {
                cut += i32::from(st.partition.is_some()) - i32::from(st.heal.is_some());
                let device = |p: &Option<Process>| p.as_ref().is_some_and(|p| p.device.is_some());
                down += i32::from(st.offline.is_some() || device(&st.kill))
                    - i32::from(st.online.is_some() || device(&st.restart));
                if let Some(p) = st.kill.as_ref().or(st.restart.as_ref())
                    && p.coordinator
                {
                    coordinator_up = st.restart.is_some();
                }
                if st.converge.is_some() {
                    assert!(
                        cut == 0 && down == 0 && coordinator_up,
                        "seed {seed}: step {} converges with a link cut, a device down or no coordinator",
                        i + 1
                    );
                }
            }
            assert!(s.steps.last().unwrap().backed_up.is_some(), "seed {seed}");
            assert!(s.steps[s.steps.len() - 2].converge.is_some(), "seed {seed}");
        }
    }
}
