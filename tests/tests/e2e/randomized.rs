//! The randomized whole-system test: a coordinator and three devices of one user (real
//! processes), driven by a seeded random sequence of what users and machines do — files created,
//! rewritten, appended to, deleted and renamed, directories made, moved and removed, the same file
//! edited on several devices, devices stopped (SIGTERM), killed (SIGKILL), paused (SIGSTOP) and
//! started again, the coordinator stopped or killed and restarted — then everything is started
//! and left to converge. Checked for every seed:
//! - every folder ends identical to the coordinator's tree;
//! - every content a device held when its daemon reported in sync, and every committed content it
//!   held when it was stopped with SIGTERM, is still in a file or is a durable version in history;
//! - every file holds bytes the test wrote (nothing torn, nothing foreign), and no temp file is
//!   left behind;
//! - files written before the daemons start, in a directory no operation names, end on every
//!   device as they were written (nothing changed behind the user's back);
//! - no device reports in sync while a change in its folder is uncommitted (checked whenever a
//!   daemon reports in sync for a cycle that began after the test's last change to its folder).
//!
//! Seeds: `SHOAL_RANDOM_SEED=S` replays one; `SHOAL_RANDOM_SEEDS=N` runs a campaign of N seeds
//! from a random start (or from `SHOAL_RANDOM_SEED`); otherwise seeds run until
//! `SHOAL_RANDOM_BUDGET` seconds have passed (default 150), at least one. A failure names its seed
//! and the operations that led to it. The timing of a run is not part of the seed, so a replay
//! takes the same steps but may interleave them differently with the daemons.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_protocol::{Entry, EntryKind};

use crate::harness::*;

/// How long after the test's last change to a folder a daemon's cycle must start for its
/// "in sync" to cover that change: the watcher's debounce and a loaded machine's scheduling
/// (2 s was exceeded, by 69 ms, with the whole suite running on two cores).
const NOTICE_MARGIN_MS: u64 = 5_000;
/// Operations per seed.
const STEPS: usize = 45;
/// How long the devices may take to converge at the end of a seed.
const CONVERGE: Duration = Duration::from_secs(240);

#[test]
fn randomized_whole_system() {
    // Its in-sync checks count on a change being noticed within seconds: no other test loads the
    // machine meanwhile.
    let _alone = alone();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let first = env("SHOAL_RANDOM_SEED").unwrap_or_else(|| shoal_sys::clock::now_ms() ^ u64::from(std::process::id()));
    let (count, budget) = match (env("SHOAL_RANDOM_SEED"), env("SHOAL_RANDOM_SEEDS")) {
        (_, Some(n)) => (n, None),
        (Some(_), None) => (1, None),
        (None, None) => (u64::MAX, Some(Duration::from_secs(env("SHOAL_RANDOM_BUDGET").unwrap_or(150)))),
    };
    let started = Instant::now();
    let mut ran = 0;
    for seed in first..first.saturating_add(count) {
        if ran > 0 && budget.is_some_and(|b| started.elapsed() >= b) {
            break;
        }
        eprintln!("randomized: seed {seed} (replay with SHOAL_RANDOM_SEED={seed})");
        let t = Instant::now();
        Run::new(seed).play();
        ran += 1;
        eprintln!("randomized: seed {seed} passed in {:.1} s", t.elapsed().as_secs_f64());
    }
    eprintln!("randomized: {ran} seeds passed in {:.1} s", started.elapsed().as_secs_f64());
}

/// A small deterministic generator (xorshift64*), so a seed names its operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Running,
    Stopped,
    Paused,
}

/// One seed's world and what the test knows about it.
struct Run {
    seed: u64,
    rng: Rng,
    tmp: tempfile::TempDir,
    coord: Coordinator,
    devices: Vec<Device>,
    life: Vec<Life>,
    /// When the test last changed each device's folder (ms since the epoch).
    last_change: Vec<u64>,
    /// The start of the cycle whose "in sync" was last checked, per device.
    last_checked: Vec<u64>,
    /// Every content the test wrote, by BLAKE3: nothing else may appear in a folder.
    written: HashSet<String>,
    /// Contents that must survive (a device held them in sync, or committed when stopped), with
    /// where they were seen.
    required: BTreeMap<String, String>,
    /// What happened so far, printed on failure.
    log: Vec<String>,
    /// Numbers the test's temp files and contents.
    counter: u64,
    t0: Instant,
    /// How many "in sync" reports were checked.
    checks: usize,
    /// The files under `KEPT` and their contents: no operation touches them.
    kept: Vec<(String, String)>,
}

/// Where generated paths live: a few directories and names, so that operations collide.
const DIRS: &[&str] = &["", "", "a", "b", "a/x", "c"];
const NAMES: &[&str] = &["f0", "f1", "f2", "notes.txt", "photo.jpg", "data.bin"];
const SUBDIRS: &[&str] = &["a", "b", "c", "a/x", "a/y", "b/z"];
/// A directory no operation names: what is written there before the daemons start must come
/// through every stop, kill, pause, conflict and restart unchanged.
const KEPT: &str = "kept";

impl Run {
    fn new(seed: u64) -> Run {
        let tmp = test_dir();
        let coord = Coordinator::start(&tmp.path().join("coord"));
        let devices: Vec<Device> =
            ["a", "b", "c"].iter().map(|n| Device::enroll(tmp.path(), &coord, "rnd", n)).collect();
        for d in &devices {
            std::fs::create_dir_all(scratch(tmp.path(), &d.name)).unwrap();
        }
        let n = devices.len();
        Run {
            seed,
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            tmp,
            coord,
            devices,
            life: vec![Life::Stopped; n],
            last_change: vec![0; n],
            last_checked: vec![0; n],
            written: HashSet::new(),
            required: BTreeMap::new(),
            log: Vec::new(),
            counter: 0,
            t0: Instant::now(),
            checks: 0,
            kept: Vec::new(),
        }
    }

    fn play(mut self) {
        for rel in [format!("{KEPT}/k0"), format!("{KEPT}/k1"), format!("{KEPT}/deep/k2")] {
            let data = self.content(0);
            assert!(self.write(0, &rel, &data), "writing {rel}");
            self.kept.push((rel, file_hash(&data)));
        }
        for i in 0..self.devices.len() {
            self.start(i);
        }
        for step in 0..STEPS {
            self.step(step);
            let pause = if self.rng.chance(10) { 500 + self.rng.below(2_500) } else { self.rng.below(300) };
            std::thread::sleep(Duration::from_millis(pause));
            self.check_in_sync();
        }
        self.finish();
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {} failed (replay with SHOAL_RANDOM_SEED={}): {what}\noperations:\n  {}",
            self.seed,
            self.seed,
            self.log.join("\n  ")
        );
    }

    fn note(&mut self, what: String) {
        self.log.push(format!("{:>6} ms {what}", self.elapsed_ms()));
    }

    fn elapsed_ms(&self) -> u128 {
        self.t0.elapsed().as_millis()
    }

    /// One random operation.
    fn step(&mut self, step: usize) {
        let roll = self.rng.below(100);
        let d = self.rng.below(self.devices.len() as u64) as usize;
        match roll {
            0..=27 => {
                let path = self.random_path();
                let data = self.content(d);
                if self.write(d, &path, &data) {
                    self.note(format!("#{step} {} writes {path} ({} bytes)", self.devices[d].name, data.len()));
                }
            }
            28..=35 => {
                if let Some(path) = self.existing_file(d) {
                    let extra = self.content(d);
                    let extra = &extra[..extra.len().min(4096)];
                    if self.append(d, &path, extra) {
                        self.note(format!("#{step} {} appends {} bytes to {path}", self.devices[d].name, extra.len()));
                    }
                }
            }
            36..=44 => {
                if let Some(path) = self.existing_file(d) {
                    let _ = std::fs::remove_file(self.devices[d].path(&path));
                    self.changed(d);
                    self.note(format!("#{step} {} deletes {path}", self.devices[d].name));
                }
            }
            45..=52 => {
                if let Some(from) = self.existing_file(d) {
                    let to = self.random_path();
                    if self.rename(d, &from, &to) {
                        self.note(format!("#{step} {} renames {from} to {to}", self.devices[d].name));
                    }
                }
            }
            53..=56 => {
                let dir = self.rng.pick(SUBDIRS).to_string();
                let p = self.devices[d].path(&dir);
                if std::fs::create_dir_all(&p).is_ok() {
                    self.changed(d);
                    self.note(format!("#{step} {} makes directory {dir}", self.devices[d].name));
                }
            }
            57..=60 => {
                let dir = self.rng.pick(SUBDIRS).to_string();
                let p = self.devices[d].path(&dir);
                if p.is_dir() && std::fs::remove_dir_all(&p).is_ok() {
                    self.changed(d);
                    self.note(format!("#{step} {} removes directory {dir} and everything in it", self.devices[d].name));
                }
            }
            61..=64 => {
                let (from, to) = (self.rng.pick(SUBDIRS).to_string(), self.rng.pick(SUBDIRS).to_string());
                if self.rename(d, &from, &format!("{to}-moved")) {
                    self.note(format!("#{step} {} moves directory {from} to {to}-moved", self.devices[d].name));
                }
            }
            65..=73 => {
                // The same file edited on several devices before they see each other's edit.
                let path = self.random_path();
                let mut who = Vec::new();
                for e in 0..self.devices.len() {
                    if e == d || self.rng.chance(50) {
                        let data = self.content(e);
                        if self.write(e, &path, &data) {
                            who.push(self.devices[e].name.clone());
                        }
                    }
                }
                self.note(format!("#{step} {} edit {path} at once", who.join(", ")));
            }
            74..=91 => self.lifecycle(step, d),
            _ => {
                let hard = self.rng.chance(50);
                self.note(format!("#{step} coordinator {}", if hard { "killed and restarted" } else { "restarted" }));
                self.coord.stop(hard);
                std::thread::sleep(Duration::from_millis(self.rng.below(2_000)));
                self.coord.restart(false);
            }
        }
    }

    /// Stops, kills, pauses or starts device `d`'s daemon.
    fn lifecycle(&mut self, step: usize, d: usize) {
        let name = self.devices[d].name.clone();
        match self.life[d] {
            Life::Running => match self.rng.below(3) {
                0 => {
                    self.note(format!("#{step} {name} stopped (SIGTERM)"));
                    self.devices[d].stop(false);
                    self.life[d] = Life::Stopped;
                    self.require_committed(d);
                }
                1 => {
                    self.note(format!("#{step} {name} killed (SIGKILL)"));
                    self.devices[d].stop(true);
                    self.life[d] = Life::Stopped;
                }
                _ => {
                    self.note(format!("#{step} {name} paused (SIGSTOP)"));
                    self.devices[d].signal_daemon("STOP");
                    self.life[d] = Life::Paused;
                }
            },
            Life::Stopped => {
                self.note(format!("#{step} {name} started"));
                self.start(d);
            }
            Life::Paused => {
                self.note(format!("#{step} {name} resumed (SIGCONT)"));
                self.devices[d].signal_daemon("CONT");
                self.life[d] = Life::Running;
            }
        }
    }

    fn start(&mut self, d: usize) {
        self.devices[d].start();
        self.life[d] = Life::Running;
    }

    fn changed(&mut self, d: usize) {
        self.last_change[d] = shoal_sys::clock::now_ms();
    }

    fn random_path(&mut self) -> String {
        let dir = *self.rng.pick(DIRS);
        let name = *self.rng.pick(NAMES);
        if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
    }

    /// New content, unlike anything written before: mostly small, some of a few hundred KiB,
    /// a few of several MiB (many chunks).
    fn content(&mut self, d: usize) -> Vec<u8> {
        self.counter += 1;
        let len = match self.rng.below(100) {
            0..=59 => self.rng.below(4096) as usize,
            60..=89 => 10_000 + self.rng.below(300_000) as usize,
            _ => 1_000_000 + self.rng.below(3_000_000) as usize,
        };
        let mut data =
            format!("seed {} content {} by {}\n", self.seed, self.counter, self.devices[d].name).into_bytes();
        data.extend(noise(self.seed ^ (self.counter << 20), len));
        data
    }

    /// A file in `d`'s folder outside `KEPT`, if there is one.
    fn existing_file(&mut self, d: usize) -> Option<String> {
        let files: Vec<String> = self.devices[d]
            .local_tree()
            .into_iter()
            .filter(|(p, n)| matches!(n, Node::File(..)) && !p.starts_with(&format!("{KEPT}/")))
            .map(|(p, _)| p)
            .collect();
        (!files.is_empty()).then(|| self.rng.pick(&files).clone())
    }

    /// Replaces (or creates) a file whole, the way editors save: written beside the folder, then
    /// renamed over the old one, so no reader ever sees it half written.
    fn write(&mut self, d: usize, rel: &str, data: &[u8]) -> bool {
        let target = self.devices[d].path(rel);
        if target.is_dir() || target.parent().is_some_and(|p| ensure_dir(p).is_err()) {
            return false;
        }
        self.counter += 1;
        let tmp = scratch(self.tmp.path(), &self.devices[d].name).join(format!("w{}", self.counter));
        std::fs::write(&tmp, data).unwrap();
        if std::fs::rename(&tmp, &target).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return false;
        }
        self.written.insert(file_hash(data));
        self.changed(d);
        true
    }

    /// Appends in one write, so a reader sees the old content or the new, nothing between.
    fn append(&mut self, d: usize, rel: &str, extra: &[u8]) -> bool {
        use std::io::Write;
        let p = self.devices[d].path(rel);
        let Ok(mut old) = std::fs::read(&p) else { return false };
        let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&p) else { return false };
        if f.write_all(extra).is_err() {
            return false;
        }
        old.extend_from_slice(extra);
        self.written.insert(file_hash(&old));
        self.changed(d);
        true
    }

    fn rename(&mut self, d: usize, from: &str, to: &str) -> bool {
        let (src, dst) = (self.devices[d].path(from), self.devices[d].path(to));
        if !src.exists() || dst.exists() || to.starts_with(&format!("{from}/")) {
            return false;
        }
        if dst.parent().is_some_and(|p| ensure_dir(p).is_err()) || std::fs::rename(&src, &dst).is_err() {
            return false;
        }
        self.changed(d);
        true
    }

    /// Whenever a running daemon reports in sync for a cycle that began well after the test last
    /// changed its folder, everything in the folder must be committed; it must then survive.
    fn check_in_sync(&mut self) {
        for d in 0..self.devices.len() {
            if self.life[d] != Life::Running {
                continue;
            }
            let Some(st) = status_file(&self.devices[d]) else { continue };
            let started = st["cycle_started_ms"].as_u64().unwrap_or(0);
            if st["in_sync"] != true
                || st["pid"] != self.devices[d].pid()
                || started <= self.last_change[d] + NOTICE_MARGIN_MS
                || started <= self.last_checked[d]
            {
                continue;
            }
            let local = self.devices[d].local_tree();
            let Some(journal) = self.journal() else { continue };
            let committed: HashSet<(String, Node)> =
                journal.iter().filter_map(|e| Some((e.path.to_string(), node_of(e)?))).collect();
            for (p, n) in &local {
                if !committed.contains(&(p.clone(), n.clone())) {
                    self.fail(format!(
                        "{} reported in sync (its cycle began at {started}, {} ms after the test last changed its \
                         folder) while {p} ({n:?}) was not committed",
                        self.devices[d].name,
                        started - self.last_change[d]
                    ));
                }
            }
            self.last_checked[d] = started;
            self.checks += 1;
            let name = self.devices[d].name.clone();
            for (p, n) in local {
                if let Node::File(hash, _) = n {
                    self.required.entry(hash).or_insert_with(|| format!("{p} on {name}, in sync at {started}"));
                }
            }
        }
    }

    /// A device just stopped with SIGTERM: the committed contents in its folder must survive
    /// (its owed uploads were paid on the way out, or are paid when it starts again).
    fn require_committed(&mut self, d: usize) {
        let Some(journal) = self.journal() else { return };
        let committed: HashSet<String> = journal.iter().filter_map(|e| e.hash().map(|h| h.to_string())).collect();
        let name = self.devices[d].name.clone();
        for (p, n) in self.devices[d].local_tree() {
            if let Node::File(hash, _) = n
                && committed.contains(&hash)
            {
                self.required.entry(hash).or_insert_with(|| format!("{p} on {name}, stopped with SIGTERM"));
            }
        }
    }

    /// Every journal entry (pending versions' included), or `None` while the coordinator is down.
    fn journal(&self) -> Option<Vec<Entry>> {
        journal(&self.devices[0]).ok()
    }

    /// Everything running again, then the end state checked.
    fn finish(mut self) {
        for d in 0..self.devices.len() {
            match self.life[d] {
                Life::Paused => self.devices[d].signal_daemon("CONT"),
                Life::Stopped => self.devices[d].start(),
                Life::Running => {}
            }
            self.life[d] = Life::Running;
        }
        self.note("everything running; converging".into());
        let deadline = Instant::now() + CONVERGE;
        let done = wait_for(CONVERGE, || {
            self.check_in_sync();
            let all_in_sync = self.devices.iter().all(|d| {
                status_file(d).is_some_and(|s| {
                    s["in_sync"] == true && s["owed_uploads"] == 0 && s["pending_uploads"] == 0 && s["pid"] == d.pid()
                })
            });
            if !all_in_sync {
                return None;
            }
            let remote = self.devices[0].remote_tree();
            self.devices.iter().all(|d| d.local_tree() == remote).then_some(remote)
        });
        let Some(tree) = done else {
            let states: Vec<String> = self
                .devices
                .iter()
                .map(|d| format!("{}: {}", d.name, status_file(d).map(|s| s.to_string()).unwrap_or_default()))
                .collect();
            let remote = self.devices[0].remote_tree();
            let diffs: Vec<String> = self
                .devices
                .iter()
                .map(|d| diff(&d.name, &d.local_tree(), &remote))
                .filter(|s| !s.is_empty())
                .collect();
            self.fail(format!(
                "the devices did not converge within {CONVERGE:?} ({:?} left): {}\nstatuses:\n{}",
                deadline.saturating_duration_since(Instant::now()),
                diffs.join("; "),
                states.join("\n")
            ));
        };

        // Nothing torn or foreign, no temp file left behind.
        for (p, n) in &tree {
            if let Node::File(hash, _) = n
                && !self.written.contains(hash)
            {
                self.fail(format!("{p} holds bytes the test never wrote ({hash})"));
            }
        }
        for d in &self.devices {
            let tmp = d.root.join(".shoal").join("tmp");
            let left: Vec<PathBuf> =
                std::fs::read_dir(&tmp).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
            if !left.is_empty() {
                self.fail(format!("{} left temp files: {left:?}", d.name));
            }
        }

        // What no operation touched is as it was written.
        for (p, hash) in &self.kept {
            match tree.get(p) {
                Some(Node::File(h, _)) if h == hash => {}
                other => {
                    self.fail(format!("{p}, which no operation touched, changed: it is {other:?}, written as {hash}"))
                }
            }
        }

        // Every required content is in a file, or a durable version in history.
        let durable = durable_contents(&self.devices[0])
            .unwrap_or_else(|e| self.fail(format!("the coordinator does not answer: {e}")));
        let held: HashSet<&String> =
            tree.values().filter_map(|n| if let Node::File(h, _) = n { Some(h) } else { None }).collect();
        let lost: Vec<String> = self
            .required
            .iter()
            .filter(|(h, _)| !held.contains(h) && !durable.contains(*h))
            .map(|(h, seen)| format!("{h} ({seen})"))
            .collect();
        if !lost.is_empty() {
            self.fail(format!("contents that had to survive are gone: {}", lost.join("; ")));
        }
        eprintln!(
            "randomized: seed {}: {} in-sync reports checked, {} contents required, {} untouched files unchanged, {} files \
             at the end ({} conflicted copies)",
            self.seed,
            self.checks,
            self.required.len(),
            self.kept.len(),
            tree.values().filter(|n| matches!(n, Node::File(..))).count(),
            tree.keys().filter(|p| p.contains("(conflicted copy")).count()
        );
        for d in &mut self.devices {
            d.stop(false);
        }
    }
}

/// The test's own scratch directory for a device: beside the folders, on the same file system.
fn scratch(base: &Path, device: &str) -> PathBuf {
    base.join(format!("scratch-{device}"))
}

/// Creates `dir` and its parents unless a file is in the way.
fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// The node an entry leaves at its path (`None`: a deletion).
fn node_of(e: &Entry) -> Option<Node> {
    if e.deleted {
        return None;
    }
    Some(match e.kind {
        EntryKind::Dir => Node::Dir,
        _ => Node::File(e.hash()?.to_string(), e.exec),
    })
}

/// The daemon's `status.json`, read directly (cheaper than `shoal status`).
fn status_file(d: &Device) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(d.home.join("status.json")).ok()?).ok()
}

fn diff(name: &str, local: &Tree, remote: &Tree) -> String {
    let mut out = Vec::new();
    let paths: BTreeSet<&String> = local.keys().chain(remote.keys()).collect();
    for p in paths {
        match (local.get(p), remote.get(p)) {
            (Some(_), None) => out.push(format!("+{p}")),
            (None, Some(_)) => out.push(format!("-{p}")),
            (Some(a), Some(b)) if a != b => out.push(format!("~{p}")),
            _ => {}
        }
    }
    if out.is_empty() { String::new() } else { format!("{name}: {}", out.join(" ")) }
}
