//! `shoal-netsim`: runs a scenario over the emulated network and reports (see the crate doc).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shoal-netsim", about = "Run Shoal over emulated LANs, uplinks and regions (needs root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario file and report; exit status 0 only if every assertion passed.
    Run {
        scenario: PathBuf,
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
    },
}

fn main() -> ExitCode {
    let Cmd::Run { scenario, json, scale, work_dir, bin_dir } = Cli::parse().cmd;
    if !(scale.is_finite() && scale > 0.0) {
        eprintln!("error: --scale must be above zero");
        return ExitCode::from(2);
    }
    let text = match std::fs::read_to_string(&scenario) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}: {e}", scenario.display());
            return ExitCode::from(2);
        }
    };
    let s = match shoal_netsim::scenario::parse(&scenario.display().to_string(), &text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let bins = bin_dir.or_else(|| std::env::current_exe().ok()?.parent().map(PathBuf::from));
    if let Some(dir) = bins {
        for b in ["shoal", "shoal-coordinator", "shoal-relay"] {
            if !dir.join(b).exists() {
                eprintln!("error: no {b} in {} (build the binaries, or give --bin-dir)", dir.display());
                return ExitCode::from(2);
            }
        }
        shoal_testkit::use_bins_in(&dir);
    }
    let opts = shoal_netsim::run::Options { scale, work_dir, progress: true, narrate: false };
    match shoal_netsim::run::run(&s, &opts) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("a report serialises"));
            } else {
                print!("{}", report.text());
            }
            if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
