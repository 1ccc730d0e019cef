//! Real `shoal-coordinator`, `shoal-relay` and `shoal` processes in temp dirs, on loopback or in
//! network namespaces, started, stopped, killed and restarted as a test or a scenario says.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::*;

/// A running coordinator.
pub struct Coordinator {
    pub data: PathBuf,
    pub addr: String,
    child: Option<Child>,
    netns: Option<String>,
    /// More arguments for `serve`, kept for restarts.
    extra: Vec<String>,
    /// Keeps a test that must run alone (see [`alone`]) waiting while this coordinator lives.
    _shared: Shared,
}

/// Tests that run alone take this for writing; every coordinator a test starts holds it for
/// reading. So the randomized whole-system test, whose checks count on devices noticing a
/// change within seconds, runs its seeds without the rest of the suite loading the machine.
static ALONE: std::sync::RwLock<()> = std::sync::RwLock::new(());

thread_local! {
    /// Guards of [`ALONE`] this thread holds: a thread that holds one never waits for another.
    static HELD: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A share of the machine, held by each coordinator of a test that does not run alone.
pub struct Shared(Option<std::sync::RwLockReadGuard<'static, ()>>);

impl Shared {
    fn take() -> Shared {
        if HELD.get() > 0 {
            return Shared(None);
        }
        let guard = ALONE.read().unwrap_or_else(|p| p.into_inner());
        HELD.set(HELD.get() + 1);
        Shared(Some(guard))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.0.is_some() {
            HELD.set(HELD.get().saturating_sub(1));
        }
    }
}

/// The machine to itself: waits for the running tests' coordinators to stop, and keeps other
/// tests from starting one until the guard is dropped.
pub struct Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>);

pub fn alone() -> Alone {
    let guard = ALONE.write().unwrap_or_else(|p| p.into_inner());
    HELD.set(HELD.get() + 1);
    Alone(guard)
}

impl Drop for Alone {
    fn drop(&mut self) {
        HELD.set(HELD.get().saturating_sub(1));
    }
}

impl Coordinator {
    pub fn start(data: &Path) -> Coordinator {
        Self::start_on(data, "127.0.0.1:0")
    }

    /// A coordinator on loopback started with more `serve` arguments.
    pub fn start_with(data: &Path, args: &[&str]) -> Coordinator {
        let shared = Shared::take();
        let extra: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, addr) = spawn_coordinator(data, "127.0.0.1:0", None, &extra);
        Coordinator { data: data.to_path_buf(), addr, child: Some(child), netns: None, extra, _shared: shared }
    }

    fn start_on(data: &Path, listen: &str) -> Coordinator {
        Self::start_in(data, listen, None)
    }

    /// A coordinator listening on `listen`, inside network namespace `netns` if given.
    pub fn start_in(data: &Path, listen: &str, netns: Option<&str>) -> Coordinator {
        let shared = Shared::take();
        let (child, addr) = spawn_coordinator(data, listen, netns, &[]);
        Coordinator {
            data: data.to_path_buf(),
            addr,
            child: Some(child),
            netns: netns.map(String::from),
            extra: Vec::new(),
            _shared: shared,
        }
    }

    /// Stops the server (SIGTERM, or SIGKILL when `hard`) and starts it again on the same address.
    pub fn restart(&mut self, hard: bool) {
        self.stop(hard);
        let (child, _) = spawn_coordinator(&self.data, &self.addr, self.netns.as_deref(), &self.extra);
        self.child = Some(child);
    }

    pub fn stop(&mut self, hard: bool) {
        if let Some(mut c) = self.child.take() {
            signal(&c, if hard { "KILL" } else { "TERM" });
            let _ = c.wait();
        }
    }

    /// An unauthenticated client pinned to this coordinator's certificate.
    pub fn client(&self) -> shoal_agent::client::Client {
        let b = std::fs::read(self.data.join("server.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        let fp = v["fingerprint"].as_str().unwrap().parse().unwrap();
        shoal_agent::client::Client::anonymous(&self.addr, fp, Default::default()).unwrap()
    }

    /// The text of `/metrics`, from the coordinator's separate metrics listener.
    pub fn metrics_text(&self) -> String {
        let b = std::fs::read(self.data.join("server.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        let addr = v["metrics_addr"].as_str().expect("the test coordinator serves metrics").to_string();
        block_on(async move {
            let resp = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
            assert!(resp.status().is_success(), "metrics answered {}", resp.status());
            resp.text().await.unwrap()
        })
    }

    /// Reads a counter from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} missing from {text}"))
    }

    /// Runs `shoal-coordinator ARGS --data DATA` (the operator's commands): success, and
    /// stdout followed by stderr.
    pub fn admin(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(bin("shoal-coordinator")).args(args).arg("--data").arg(&self.data).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// The coordinator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }

    /// A one-time invite for `user` (created on first use).
    pub fn invite(&self, user: &str) -> String {
        let run = |sub: &str| {
            Command::new(bin("shoal-coordinator")).args(["user", sub, user, "--data"]).arg(&self.data).output().unwrap()
        };
        let mut out = run("invite");
        if !out.status.success() {
            out = run("add");
        }
        assert!(out.status.success(), "user add failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_string()
    }
}

/// Starts `shoal-coordinator serve` and waits until it has written its `server.json`.
/// `program`, run inside network namespace `netns` if given (`ip netns exec` execs it, so the
/// child's pid is the program's).
pub fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn spawn_coordinator(data: &Path, listen: &str, netns: Option<&str>, extra: &[String]) -> (Child, String) {
    let _ = std::fs::remove_file(data.join("server.json"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log")).unwrap();
    let child = command_in(netns, &bin("shoal-coordinator"))
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawning shoal-coordinator");
    let pid = child.id();
    let info = wait_for(Duration::from_secs(30), || {
        let b = std::fs::read(data.join("server.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
        (v["pid"].as_u64() == Some(u64::from(pid))).then_some(v)
    })
    .expect("coordinator did not start");
    (child, info["addr"].as_str().unwrap().to_string())
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Waits (at most 10 s) until process `pid` handles SIGTERM: one sent before the program has
/// installed its handler ends it outright, which is not the graceful stop a test means.
fn wait_for_term_handler(pid: u32) {
    const SIGTERM_BIT: u64 = 1 << 14;
    wait_for(Duration::from_secs(10), || {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Some(()) };
        let caught = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?.trim();
        (u64::from_str_radix(caught, 16).ok()? & SIGTERM_BIT != 0).then_some(())
    });
}

pub fn signal(c: &Child, sig: &str) {
    let _ = Command::new("kill").args([&format!("-{sig}"), &c.id().to_string()]).status();
}

/// A running `shoal-relay`.
pub struct Relay {
    pub cache_dir: PathBuf,
    pub info: shoal_relay::RelayInfo,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The network namespace it runs in, if not this one.
    netns: Option<String>,
    child: Option<Child>,
}

impl Relay {
    /// Adds relay `name` in `region` to `coord` and starts it on loopback address `ip` with a
    /// cache of `cache_size` in `cache_dir`; `env` is set for the process (test switches).
    pub fn start(
        coord: &Coordinator,
        name: &str,
        region: &str,
        ip: &str,
        cache_dir: &Path,
        cache_size: &str,
        env: &[(&str, &str)],
    ) -> Relay {
        Relay::start_in(coord, name, region, ip, cache_dir, cache_size, env, None)
    }

    /// `start`, inside network namespace `netns` if given, listening on `ip` there.
    #[allow(clippy::too_many_arguments)]
    pub fn start_in(
        coord: &Coordinator,
        name: &str,
        region: &str,
        ip: &str,
        cache_dir: &Path,
        cache_size: &str,
        env: &[(&str, &str)],
        netns: Option<&str>,
    ) -> Relay {
        let (ok, out) = coord.admin(&["relay", "add", name, "--region", region]);
        assert!(ok, "{out}");
        let token = out.lines().last().unwrap().trim().to_string();
        let b = std::fs::read(coord.data.join("server.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        let args: Vec<String> = [
            "serve",
            "--region",
            region,
            "--coordinator",
            &coord.addr,
            "--coordinator-fingerprint",
            v["fingerprint"].as_str().unwrap(),
            "--token",
            &token,
            "--cache-dir",
            cache_dir.to_str().unwrap(),
            "--cache-size",
            cache_size,
            "--listen",
            &format!("{ip}:0"),
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut r = Relay {
            cache_dir: cache_dir.to_path_buf(),
            info: placeholder_info(),
            args,
            env,
            netns: netns.map(String::from),
            child: None,
        };
        r.restart();
        r
    }

    /// Starts the relay again (after `stop`), on a new port, with the same cache, and waits until
    /// it serves.
    pub fn restart(&mut self) {
        self.respawn();
        if let Err(e) = self.wait_ready(Duration::from_secs(30)) {
            panic!("{e}");
        }
    }

    /// Starts the relay's process again (after `stop`) without waiting for it to serve: it
    /// registers with the coordinator first, and waits for one that is down.
    pub fn respawn(&mut self) {
        self.stop(false);
        let _ = std::fs::remove_file(self.cache_dir.join("relay.json"));
        std::fs::create_dir_all(&self.cache_dir).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.cache_dir.with_extension("log")).unwrap();
        let child = command_in(self.netns.as_deref(), &bin("shoal-relay"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning shoal-relay");
        self.child = Some(child);
    }

    /// Waits until the process `respawn` started serves (its `relay.json` written).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let pid = self.child.as_ref().map(Child::id).ok_or("the relay is not running")?;
        self.info = wait_for(timeout, || {
            let b = std::fs::read(self.cache_dir.join("relay.json")).ok()?;
            let info: shoal_relay::RelayInfo = serde_json::from_slice(&b).ok()?;
            (info.pid == pid).then_some(info)
        })
        .ok_or_else(|| format!("relay did not start within {timeout:?}:\n{}", self.log()))?;
        wait_for_term_handler(pid);
        Ok(())
    }

    /// Whether the process started last is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn stop(&mut self, hard: bool) {
        if let Some(mut c) = self.child.take() {
            signal(&c, if hard { "KILL" } else { "TERM" });
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.cache_dir.with_extension("log")).unwrap_or_default()
    }

    /// Reads a counter or gauge from the relay's `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let addr = self.info.metrics_addr.clone().expect("the test relay serves metrics");
        let text =
            block_on(
                async move { reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap() },
            );
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} missing from {text}"))
    }

    /// An HTTPS client pinned to the relay's certificate.
    pub fn http(&self) -> reqwest::Client {
        let tls = shoal_net::pinned::client_config(self.info.fingerprint).unwrap();
        reqwest::Client::builder().tls_backend_preconfigured(tls).build().unwrap()
    }
}

fn placeholder_info() -> shoal_relay::RelayInfo {
    shoal_relay::RelayInfo {
        name: String::new(),
        region: String::new(),
        addr: String::new(),
        url: String::new(),
        metrics_addr: None,
        fingerprint: shoal_protocol::ChunkId([0; 32]),
        pid: 0,
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// A temp dir with a running coordinator and `names.len()` devices of one user.
pub fn world(user: &str, names: &[&str]) -> (tempfile::TempDir, Coordinator, Vec<Device>) {
    let tmp = test_dir();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let devices = names.iter().map(|n| Device::enroll(tmp.path(), &coord, user, n)).collect();
    (tmp, coord, devices)
}

/// A temp dir for one test, kept after the test (and printed) when `SHOAL_TEST_KEEP` is set, for
/// reading the logs of a failure.
pub fn test_dir() -> tempfile::TempDir {
    let mut tmp = tempfile::tempdir().unwrap();
    if std::env::var_os("SHOAL_TEST_KEEP").is_some() {
        tmp.disable_cleanup(true);
        eprintln!("keeping {}", tmp.path().display());
    }
    tmp
}

/// One enrolled device: its home, its sync folder and (maybe) its running daemon.
pub struct Device {
    pub name: String,
    pub home: PathBuf,
    pub root: PathBuf,
    /// The umask every `shoal` process of this device runs with (`None`: the test's own).
    pub umask: Option<u32>,
    /// The network namespace every `shoal` process of this device runs in (`None`: the test's).
    pub netns: Option<String>,
    daemon: Option<Child>,
}

impl Device {
    pub fn enroll(base: &Path, coord: &Coordinator, user: &str, name: &str) -> Device {
        Self::enroll_with_umask(base, coord, user, name, None)
    }

    /// Enrolls a device whose `shoal` processes (this `init` included) run under `umask`.
    pub fn enroll_with_umask(base: &Path, coord: &Coordinator, user: &str, name: &str, umask: Option<u32>) -> Device {
        let home = base.join(format!("{name}-home"));
        let root = base.join(name);
        let d = Device { name: name.to_string(), home, root, umask, netns: None, daemon: None };
        d.init(coord, user);
        d
    }

    /// Enrolls a device whose `shoal` processes run in network namespace `netns`.
    pub fn enroll_in(base: &Path, coord: &Coordinator, user: &str, name: &str, netns: &str) -> Device {
        let home = base.join(format!("{name}-home"));
        let root = base.join(name);
        let d = Device { name: name.to_string(), home, root, umask: None, netns: Some(netns.into()), daemon: None };
        d.init(coord, user);
        d
    }

    fn init(&self, coord: &Coordinator, user: &str) {
        let d = self;
        let name = d.name.as_str();
        let invite = coord.invite(user);
        let out = d.shoal(&["init", "--invite", &invite, "--dir", d.root.to_str().unwrap(), "--device", name]);
        assert!(out.status.success(), "init failed: {}", String::from_utf8_lossy(&out.stderr));
        // mDNS would announce on every interface of this machine, not only loopback: tests keep
        // their traffic on loopback, and use it only inside network namespaces of their own.
        if self.netns.is_none() {
            let mut cfg = shoal_agent::config::Config::load(&self.home).unwrap();
            cfg.mdns = false;
            cfg.save(&self.home).unwrap();
        }
    }

    /// A device whose home and folder already exist, e.g. unpacked from a fixture.
    pub fn existing(name: &str, home: PathBuf, root: PathBuf) -> Device {
        Device { name: name.to_string(), home, root, umask: None, netns: None, daemon: None }
    }

    pub fn cmd(&self) -> Command {
        let mut c = match self.umask {
            Some(mask) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("umask {mask:03o} && exec \"$0\" \"$@\"")).arg(bin("shoal"));
                c
            }
            None => command_in(self.netns.as_deref(), &bin("shoal")),
        };
        c.arg("--home").arg(&self.home);
        c
    }

    pub fn shoal(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("running shoal")
    }

    /// Runs `shoal sync --once` and asserts it reached "in sync".
    pub fn sync(&self) {
        let out = self.shoal(&["sync", "--once"]);
        assert!(out.status.success(), "{}: sync --once failed: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Starts the daemon with extra environment variables (the agent's test switches).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.daemon.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.home.join("run.log")).unwrap();
        let mut cmd = self.cmd();
        cmd.arg("run")
            .env("RUST_LOG", std::env::var("SHOAL_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        self.daemon = Some(cmd.spawn().unwrap());
    }

    /// The running daemon's process id (0 when none runs).
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, Child::id)
    }

    /// Sends `sig` (`STOP`, `CONT`, ...) to the running daemon.
    pub fn signal_daemon(&self, sig: &str) {
        signal(self.daemon.as_ref().expect("the daemon is running"), sig);
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("run.log")).unwrap_or_default()
    }

    /// Stops the daemon (SIGTERM and wait, or SIGKILL when `hard`).
    pub fn stop(&mut self, hard: bool) {
        if let Some(mut c) = self.daemon.take() {
            if !hard {
                wait_for_term_handler(c.id());
            }
            signal(&c, if hard { "KILL" } else { "TERM" });
            let status = c.wait().unwrap();
            if !hard {
                assert!(status.success(), "{}: daemon did not exit cleanly: {status}", self.name);
            }
        }
    }

    /// Stops the daemon with two SIGTERMs in a row: the second ends its finishing uploads.
    pub fn stop_now(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            wait_for_term_handler(c.id());
            signal(&c, "TERM");
            std::thread::sleep(Duration::from_millis(300));
            signal(&c, "TERM");
            let status = c.wait().unwrap();
            assert!(status.success(), "{}: daemon did not exit cleanly: {status}", self.name);
        }
    }

    /// Changes this device's config.toml.
    pub fn configure(&self, change: impl FnOnce(&mut shoal_agent::config::Config)) {
        let mut cfg = shoal_agent::config::Config::load(&self.home).unwrap();
        change(&mut cfg);
        cfg.save(&self.home).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn write(&self, rel: &str, data: &[u8]) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    pub fn read(&self, rel: &str) -> Option<Vec<u8>> {
        std::fs::read(self.path(rel)).ok()
    }

    /// The coordinator's live tree as this device sees it (`shoal ls --json`).
    pub fn remote_tree(&self) -> Tree {
        self.try_remote_tree().unwrap_or_else(|e| panic!("{e}"))
    }

    /// `remote_tree`, or why it could not be had.
    pub fn try_remote_tree(&self) -> Result<Tree, String> {
        let out = self.shoal(&["ls", "--json"]);
        if !out.status.success() {
            return Err(format!("ls failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let v: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("ls printed no JSON list: {e}"))?;
        v.into_iter()
            .map(|e| {
                let node = match e["kind"].as_str() {
                    Some("dir") => Node::Dir,
                    _ => Node::File(
                        e["hash"].as_str().ok_or("ls: a file without a hash")?.to_string(),
                        e["exec"].as_bool().unwrap_or(false),
                    ),
                };
                Ok((e["path"].as_str().ok_or("ls: an entry without a path")?.to_string(), node))
            })
            .collect()
    }

    pub fn local_tree(&self) -> Tree {
        local_tree(&self.root)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop(true);
    }
}
