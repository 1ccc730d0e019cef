//! `shoal-netsim`: runs a scenario over the emulated network and reports (see the crate doc).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use shoal_netsim::random;
use shoal_netsim::run::{Options, Report};
use shoal_netsim::scenario::{self, Scenario};

#[derive(Parser)]
#[command(name = "shoal-netsim", about = "Run Shoal over emulated LANs, uplinks and regions (needs root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Common {
    /// The report as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// Multiply every file size by this (a quick run of a big scenario).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Where the run's folders go (kept when it fails); the system's temp directory if not given.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The directory holding shoal, shoal-coordinator and shoal-relay: this program's own
    /// directory if not given.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario file and report; exit status 0 only if every assertion passed.
    Run {
        scenario: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Run a timeline drawn from a seed (edits on every device, offline periods, cuts, loss,
    /// kills) and check that everything converges and nothing is lost or torn; a failing seed
    /// leaves the scenario file that replays it.
    Random {
        /// The seed (a fresh one, printed, if not given).
        #[arg(long)]
        seed: Option<u64>,
        /// How many actions to draw.
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// The topology to draw over: a scenario file, whose steps and assertions are ignored
        /// (the shipped topologies/mixed.toml if not given).
        #[arg(long)]
        topology: Option<PathBuf>,
        /// How long each convergence, and the final backup, may take.
        #[arg(long, default_value = "10m")]
        timeout: String,
        /// Where a failing seed's scenario file goes.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Print the timeline as a scenario file and exit without running it.
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Two laptops at home, a desk at the office, a relay in their region and the coordinator
    /// across the ocean, narrated step by step: what moved over which link, and from where.
    Demo {
        #[command(flatten)]
        common: Common,
    },
}

/// The demo's scenario.
const DEMO: &str = include_str!("../scenarios/demo.toml");

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

fn read(path: &Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    scenario::parse(&path.display().to_string(), &text).map_err(|e| e.to_string())
}

/// Finds the binaries and runs `s`; the report, or an exit status for a run that could not be made.
fn run(s: &Scenario, common: &Common, narrate: bool) -> Result<Report, ExitCode> {
    if !(common.scale.is_finite() && common.scale > 0.0) {
        return Err(fail("--scale must be above zero"));
    }
    let bins = common.bin_dir.clone().or_else(|| std::env::current_exe().ok()?.parent().map(PathBuf::from));
    if let Some(dir) = bins {
        for b in ["shoal", "shoal-coordinator", "shoal-relay"] {
            if !dir.join(b).exists() {
                return Err(fail(format!("no {b} in {} (build the binaries, or give --bin-dir)", dir.display())));
            }
        }
        shoal_testkit::use_bins_in(&dir);
    }
    let opts = Options { scale: common.scale, work_dir: common.work_dir.clone(), progress: true, narrate };
    shoal_netsim::run::run(s, &opts).map_err(fail)
}

fn report(r: &Report, common: &Common) -> ExitCode {
    if common.json {
        println!("{}", serde_json::to_string_pretty(r).expect("a report serialises"));
    } else {
        print!("{}", r.text());
    }
    if r.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Set once a signal is being handled: the run, whose processes and namespaces vanish under it,
/// may then fail or panic, but the exit is the handler's (130).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Parks the calling thread for good once a signal is being handled.
fn park_if_interrupted() {
    while INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// On Ctrl-C, SIGTERM or SIGHUP: the run's processes stopped and its namespaces removed, then
/// exit (its folders stay where the run said they are).
fn clean_up_on_signal() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        park_if_interrupted();
        default(info)
    }));
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
            else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
            eprintln!("netsim: interrupted; stopping the run's processes and removing its namespaces");
            shoal_netsim::fabric::remove_namespaces(&shoal_netsim::run::namespace_prefix());
            std::process::exit(130);
        });
    });
}

fn main() -> ExitCode {
    clean_up_on_signal();
    let code = command();
    park_if_interrupted();
    code
}

fn command() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run { scenario, common } => {
            let s = match read(&scenario) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            match run(&s, &common, false) {
                Ok(r) => report(&r, &common),
                Err(code) => code,
            }
        }
        Cmd::Random { seed, steps, topology, timeout, out, print, common } => {
            let topo = match &topology {
                Some(p) => read(p),
                None => scenario::parse("topologies/mixed.toml", random::MIXED).map_err(|e| e.to_string()),
            };
            let topo = match topo {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
            if let Err(e) = scenario::duration(&timeout) {
                return fail(format!("--timeout: {e}"));
            }
            let seed = seed.unwrap_or_else(|| {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                now.as_millis() as u64 ^ (u64::from(std::process::id()) << 40)
            });
            let s = random::timeline(&topo, seed, steps, &timeout);
            let toml = random::to_toml(&s, common.scale);
            if print {
                print!("{toml}");
                return ExitCode::SUCCESS;
            }
            let topology_arg = topology.as_ref().map(|p| format!(" --topology {}", p.display())).unwrap_or_default();
            eprintln!(
                "netsim: random seed {seed} (replay: shoal-netsim random --seed {seed} --steps {steps} --scale {} \
                 --timeout {timeout}{topology_arg})",
                common.scale
            );
            // Written first and removed if the run passes: a run that panics leaves it too.
            let file = out.join(format!("netsim-random-{seed}.toml"));
            if let Err(e) = std::fs::create_dir_all(&out).and_then(|()| std::fs::write(&file, &toml)) {
                return fail(format!("writing {}: {e}", file.display()));
            }
            let r = match run(&s, &common, false) {
                Ok(r) => r,
                Err(code) => return code,
            };
            if r.passed {
                let _ = std::fs::remove_file(&file);
            } else {
                eprintln!("netsim: seed {seed} failed; its scenario: {}", file.display());
            }
            report(&r, &common)
        }
        Cmd::Demo { common } => {
            let s = scenario::parse("scenarios/demo.toml", DEMO).expect("the demo scenario parses");
            match run(&s, &common, true) {
                Ok(r) => report(&r, &common),
                Err(code) => code,
            }
        }
    }
}
