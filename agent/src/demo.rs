//! `shoal demo`: a coordinator and two devices on this machine, syncing `DIR/laptop` and
//! `DIR/desktop` until Ctrl-C. The coordinator is the `shoal-coordinator` program, run as a child
//! process (the agent does not link the coordinator); the two devices run in this process. State
//! stays under `DIR/.state`, so a second run resumes, on the same address.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_protocol::api::ServerInfo;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The coordinator's program name.
const COORDINATOR: &str = "shoal-coordinator";

/// The demo's devices, one folder each.
const DEVICES: [&str; 2] = ["laptop", "desktop"];
/// The user both devices belong to.
const USER: &str = "demo";

/// How long the coordinator may take to start listening: it opens and flushes its store first.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the coordinator may take to stop after SIGTERM (it flushes its store) before it is
/// killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let program = find_coordinator()?;
    // Listening before the coordinator starts: from here on, an interrupt stops it too.
    let mut stop = crate::signals::StopSignals::listen()?;
    let mut coordinator = Coordinator::spawn(&program, &dir.join(".state").join("coordinator"))?;
    let started = tokio::select! {
        r = start(dir, &mut coordinator) => Some(r),
        _ = stop.recv() => None,
    };
    let result = match started {
        Some(Ok(addr)) => run_devices(dir, &addr, &mut coordinator, &mut stop).await,
        Some(Err(e)) => Err(e),
        None => Ok(()),
    };
    coordinator.stop().await;
    result
}

/// Waits until the coordinator listens, then enrolls the devices not enrolled yet. Returns the
/// coordinator's address.
async fn start(dir: &Path, coordinator: &mut Coordinator) -> anyhow::Result<String> {
    let info = coordinator.ready().await?;
    for name in DEVICES {
        let home = dir.join(".state").join(name);
        if !Config::path(&home).exists() {
            let invite = coordinator.invite(USER).await?;
            crate::cli::init(&home, &invite, &dir.join(name), Some(name.to_string()), None, None).await?;
        }
    }
    Ok(info.addr)
}

/// Syncs the devices until Ctrl-C (or SIGTERM, SIGHUP) or the coordinator's exit, then stops them.
async fn run_devices(
    dir: &Path,
    addr: &str,
    coordinator: &mut Coordinator,
    stop: &mut crate::signals::StopSignals,
) -> anyhow::Result<()> {
    let (cancel, now) = (CancellationToken::new(), CancellationToken::new());
    let mut tasks = Vec::new();
    for name in DEVICES {
        let home = dir.join(".state").join(name);
        let mut cfg = Config::load(&home)?;
        // Both devices are on this machine: the coordinator introduces them, and nothing is
        // announced on the machine's network.
        cfg.mdns = false;
        let stop = crate::daemon::Stop { cancel: cancel.clone(), now: now.clone() };
        tasks.push(tokio::spawn(async move { crate::daemon::run(&home, cfg, stop).await }));
    }
    println!();
    println!("Shoal demo: coordinator on {addr} (data in {}/.state)", dir.display());
    println!("  {}/laptop and {}/desktop are kept identical.", dir.display(), dir.display());
    println!("  Drop, edit, rename or delete files in either; press Ctrl-C to stop.");
    let outcome = tokio::select! {
        _ = stop.recv() => Ok(()),
        status = coordinator.exited() => Err(match status {
            Ok(s) => anyhow::anyhow!("{COORDINATOR} stopped unexpectedly ({s}); its messages are above"),
            Err(e) => anyhow::anyhow!("lost track of {COORDINATOR}: {e}"),
        }),
    };
    cancel.cancel();
    // The devices finish what they owe the coordinator first; another signal stops them now.
    let stopped = async {
        for t in tasks {
            if let Ok(Err(e)) = t.await {
                eprintln!("error: {e:#}");
            }
        }
    };
    tokio::pin!(stopped);
    tokio::select! {
        _ = &mut stopped => {}
        _ = stop.recv() => {
            now.cancel();
            stopped.await;
        }
    }
    outcome
}

/// A `shoal-coordinator serve` run by the demo, a child of this process.
struct Coordinator {
    child: Child,
    program: PathBuf,
    data: PathBuf,
}

impl Coordinator {
    /// Starts `program serve` on `data`, on the address of its previous run if it had one (the
    /// devices' configs name it).
    fn spawn(program: &Path, data: &Path) -> anyhow::Result<Coordinator> {
        let listen = previous_addr(data).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let child = Command::new(program)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", &listen.to_string(), "--metrics-listen", "off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its log goes to this terminal, beside the devices'.
            .stderr(Stdio::inherit())
            // A process group of its own: Ctrl-C reaches the demo alone, which stops the devices
            // first and then the coordinator.
            .process_group(0)
            // Should the demo fail without stopping it, it still does not outlive the demo.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Coordinator { child, program: program.to_path_buf(), data: data.to_path_buf() })
    }

    /// Waits for the `server.json` this process writes once it listens.
    async fn ready(&mut self) -> anyhow::Result<ServerInfo> {
        let pid = self.child.id().context("the coordinator exited at once")?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("{COORDINATOR} exited ({status}) before it was ready; its messages are above");
            }
            if let Some(info) = read_info(&self.data).filter(|i| i.pid == pid) {
                return Ok(info);
            }
            if Instant::now() > deadline {
                anyhow::bail!("{COORDINATOR} did not start listening within {}s", START_TIMEOUT.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A one-time invite for `user`, who is created on first use: `shoal-coordinator user add`
    /// (or `user invite` once the user exists), through the running server's admin socket.
    async fn invite(&self, user: &str) -> anyhow::Result<String> {
        let mut refusal = String::new();
        for sub in ["add", "invite"] {
            let out = Command::new(&self.program)
                .args(["user", sub, user, "--data"])
                .arg(&self.data)
                .stdin(Stdio::null())
                .output()
                .await
                .with_context(|| format!("running {} user {sub}", self.program.display()))?;
            if out.status.success() {
                // The invite is the last line of the output.
                let stdout = String::from_utf8_lossy(&out.stdout);
                let line = stdout.lines().last().map(str::trim).filter(|l| !l.is_empty());
                return line
                    .map(str::to_string)
                    .with_context(|| format!("`{COORDINATOR} user {sub}` printed no invite"));
            }
            refusal = String::from_utf8_lossy(&out.stderr).trim().to_string();
        }
        anyhow::bail!("{COORDINATOR} made no invite for user {user:?}: {refusal}")
    }

    /// Resolves when the coordinator exits (it crashed, or someone else stopped it).
    async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Stops the coordinator: SIGTERM, so that it flushes its store, then SIGKILL if it has not
    /// exited within `STOP_TIMEOUT`.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await.is_err() {
            eprintln!("error: {COORDINATOR} did not stop within {}s; killing it", STOP_TIMEOUT.as_secs());
            let _ = self.child.kill().await;
        }
    }
}

/// Finds the `shoal-coordinator` program: beside this executable (where `cargo build` and an
/// install put both programs), else on `PATH`.
fn find_coordinator() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this program's own path")?;
    locate(COORDINATOR, exe.parent(), std::env::var_os("PATH").as_deref()).with_context(|| {
        format!(
            "`shoal demo` runs the `{COORDINATOR}` program, found neither beside {} nor on PATH; \
             build both programs (`cargo build --release`) or install `{COORDINATOR}` beside `shoal`",
            exe.display()
        )
    })
}

/// The executable file `name` in `beside`, else in the first directory of `path` (a `PATH`
/// value) that holds one. Empty `PATH` entries (the current directory) are skipped.
fn locate(name: &str, beside: Option<&Path>, path: Option<&OsStr>) -> Option<PathBuf> {
    let on_path = path.into_iter().flat_map(std::env::split_paths).filter(|d| !d.as_os_str().is_empty());
    beside.map(Path::to_path_buf).into_iter().chain(on_path).map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What the coordinator wrote to `DATA/server.json` when it last started, if anything.
fn read_info(data: &Path) -> Option<ServerInfo> {
    serde_json::from_slice(&std::fs::read(data.join("server.json")).ok()?).ok()
}

/// The address the coordinator listened on last time, which the enrolled devices dial.
fn previous_addr(data: &Path) -> Option<SocketAddr> {
    read_info(data)?.addr.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn program(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join(COORDINATOR);
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn the_coordinator_is_found_beside_shoal_first_then_on_path() {
        let tmp = tempfile::tempdir().unwrap();
        let [beside, a, b, empty] = ["beside", "a", "b", "empty"].map(|d| {
            let d = tmp.path().join(d);
            std::fs::create_dir(&d).unwrap();
            d
        });
        let path = std::env::join_paths([&empty, &a, &b]).unwrap();
        assert_eq!(locate(COORDINATOR, Some(&beside), Some(&path)), None);
        program(&a, 0o644);
        assert_eq!(locate(COORDINATOR, Some(&beside), Some(&path)), None, "not executable");
        let on_b = program(&b, 0o755);
        assert_eq!(locate(COORDINATOR, Some(&beside), Some(&path)), Some(on_b));
        let on_a = program(&a, 0o755);
        assert_eq!(locate(COORDINATOR, Some(&beside), Some(&path)), Some(on_a.clone()), "PATH order");
        let here = program(&beside, 0o755);
        assert_eq!(locate(COORDINATOR, Some(&beside), Some(&path)), Some(here));
        assert_eq!(locate(COORDINATOR, None, Some(&path)), Some(on_a));
        assert_eq!(locate(COORDINATOR, None, None), None);
        assert_eq!(locate(COORDINATOR, Some(&empty), Some(OsStr::new("::"))), None, "empty entries are skipped");
    }
}
