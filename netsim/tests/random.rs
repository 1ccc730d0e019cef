//! `shoal-netsim random`: one seed drawn per run (`SHOAL_NETSIM_SEED` replays one), short
//! timelines at a small scale; and a failing seed leaves the scenario file that replays it.

use std::process::Command;

fn netsim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal-netsim"));
    c.env("RUST_LOG", "warn").arg("random").arg("--bin-dir").arg(shoal_testkit::bin_dir());
    c
}

#[test]
fn a_random_timeline_converges_with_nothing_lost_or_torn() {
    let seed = std::env::var("SHOAL_NETSIM_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        now.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    eprintln!("netsim random: seed {seed} (replay with SHOAL_NETSIM_SEED={seed})");
    let out_dir = tempfile::tempdir().unwrap();
    let out = netsim()
        .args(["--seed", &seed.to_string(), "--steps", "14", "--scale", "0.05", "--timeout", "5m", "--json", "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("seed {seed}: no JSON report ({e}):\n{err}"));
    assert!(out.status.success() && report["passed"] == true, "seed {seed} failed:\n{report:#}\n{err}");
    let kept: Vec<&str> =
        report["asserts"].as_array().unwrap().iter().map(|a| a["assertion"].as_str().unwrap()).collect();
    assert!(kept.iter().any(|a| a.starts_with("nothing lost")) && kept.iter().any(|a| a.starts_with("nothing torn")));
}

#[test]
fn a_failing_seed_leaves_the_scenario_that_replays_it() {
    let out_dir = tempfile::tempdir().unwrap();
    // No time to converge after the last writes: the run fails.
    let out = netsim()
        .args(["--seed", "7", "--steps", "0", "--timeout", "1ms", "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let file = out_dir.path().join("netsim-random-7.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let printed = netsim().args(["--seed", "7", "--steps", "0", "--timeout", "1ms", "--print"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&printed.stdout), text);
    let s = shoal_netsim::scenario::parse("replay.toml", &text).unwrap();
    assert_eq!((s.name.as_str(), s.seed), ("random-7", 7));
}
