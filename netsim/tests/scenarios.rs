//! The shipped scenarios, run by the `shoal-netsim` binary at a small scale (root only: it makes
//! network namespaces), and what it says about a malformed one.

use std::path::Path;
use std::process::Command;

fn netsim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal-netsim"));
    c.env("RUST_LOG", "warn");
    c
}

fn scenario(name: &str) -> String {
    format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"))
}

/// Runs a shipped scenario at `scale`; its JSON report.
fn run(name: &str, scale: &str) -> serde_json::Value {
    let bins = shoal_testkit::bin_dir();
    let out = netsim()
        .args(["run", &scenario(name), "--json", "--scale", scale, "--bin-dir"])
        .arg(bins)
        .output()
        .expect("running shoal-netsim");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{name}: no JSON report ({e}):\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.success(), report["passed"] == true, "{name}: exit status and report disagree");
    report
}

#[test]
fn every_shipped_scenario_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        shoal_netsim::scenario::parse(&path.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"));
        n += 1;
    }
    assert!(n >= 2, "{n} scenarios");
}

#[test]
fn home_lan_keeps_the_file_off_the_uplink_that_central_only_sends_it_down() {
    let home = run("home-lan", "0.02");
    let central = run("central-only", "0.02");
    for (r, name) in [(&home, "home-lan"), (&central, "central-only")] {
        assert_eq!(r["passed"], true, "{name}: {r:#}");
        for kind in ["lan", "uplink", "inter_region"] {
            assert!(r["bytes_by_link_kind"][kind].is_u64(), "{name}: {kind}");
        }
    }
    let down = |r: &serde_json::Value| {
        r["links"].as_array().unwrap().iter().find(|l| l["name"] == "home-uplink").unwrap()["down_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(down(&home) * 10 < down(&central), "home-lan {} against central-only {}", down(&home), down(&central));
    assert!(home["bytes_by_link_kind"]["lan"].as_u64().unwrap() > 4_000_000, "{home:#}");
}

#[test]
fn a_malformed_scenario_is_refused_with_its_line_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let good = std::fs::read_to_string(scenario("home-lan")).unwrap();
    let line = good.lines().position(|l| l == "latency = \"20ms\"").unwrap() + 1;
    std::fs::write(&path, good.replace("latency = \"20ms\"", "latency = 20")).unwrap();
    let out = netsim().arg("run").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("bad.toml:{line}:")), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn two_offices_cross_the_ocean_once_through_their_regions_relay() {
    let r = run("two-offices", "0.05");
    assert_eq!(r["passed"], true, "{r:#}");
    let desk2 = &r["bytes_by_source"]["desk2"];
    assert!(desk2["relay"].as_u64().unwrap() > 0 && desk2["origin"] == 0, "{desk2}");
}

#[test]
fn offline_laptop_keeps_both_sides_edits() {
    let r = run("offline-laptop", "0.1");
    assert_eq!(r["passed"], true, "{r:#}");
    let names: Vec<&str> = r["asserts"].as_array().unwrap().iter().map(|a| a["assertion"].as_str().unwrap()).collect();
    assert!(names.iter().any(|a| a.starts_with("nothing lost")), "{names:?}");
    // The album the laptop wrote before going offline, touched by nobody after, came through the
    // conflicts unchanged.
    let untouched = r["asserts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["assertion"].as_str().unwrap().starts_with("nothing changed"));
    let measured = untouched.map(|a| a["measured"].as_str().unwrap()).unwrap_or_default();
    assert!(measured.starts_with("1 untouched files checked"), "{names:?}: {measured}");
}

#[test]
fn flaky_uplink_converges_through_loss_and_a_partition_without_a_restart() {
    let r = run("flaky-uplink", "0.25");
    assert_eq!(r["passed"], true, "{r:#}");
    let home = r["links"].as_array().unwrap().iter().find(|l| l["name"] == "home-uplink").unwrap();
    assert!(home["dropped_packets"].as_u64().unwrap() > 0, "{home}");
}

#[test]
fn the_demo_narrates_what_moved_and_passes() {
    let bins = shoal_testkit::bin_dir();
    let out = netsim()
        .args(["demo", "--json", "--scale", "0.1", "--bin-dir"])
        .arg(bins)
        .output()
        .expect("running shoal-netsim demo");
    let err = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON report ({e}):\n{err}"));
    assert!(out.status.success() && report["passed"] == true, "{report:#}\n{err}");
    assert!(err.contains("laptop2 took") && err.contains("from a LAN peer"), "{err}");
    assert!(err.contains("desk took") && err.contains("from a relay"), "{err}");
}

#[test]
fn an_interrupted_run_stops_its_processes_and_removes_its_namespaces() {
    let work = tempfile::tempdir().unwrap();
    let mut child = netsim()
        .args(["run", &scenario("home-lan"), "--scale", "0.02", "--bin-dir"])
        .arg(shoal_testkit::bin_dir())
        .arg("--work-dir")
        .arg(work.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("sn{}", child.id() % 100_000);
    let namespaces = || shoal_netsim::fabric::namespaces(&prefix);
    // Interrupted once its daemons run (they write status.json in the work directory).
    let started = shoal_testkit::wait_for(std::time::Duration::from_secs(60), || {
        let found = walk(work.path()).into_iter().any(|p| p.ends_with("status.json"));
        found.then_some(())
    });
    assert!(started.is_some() && namespaces().len() == 2, "{:?}", namespaces());
    shoal_testkit::signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(namespaces().is_empty(), "{:?}", namespaces());
    let left = Command::new("pgrep").arg("-f").arg(work.path()).output().unwrap();
    assert!(left.stdout.is_empty(), "processes left: {}", String::from_utf8_lossy(&left.stdout));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
