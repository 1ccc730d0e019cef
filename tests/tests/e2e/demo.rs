//! `shoal demo`: it runs `shoal-coordinator` as a child process, keeps its two folders in sync,
//! stops the coordinator when it is interrupted, resumes on the same address, and says what is
//! missing when the coordinator program cannot be found.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::harness::*;

/// Starts `shoal demo --dir DIR`, its output in `DIR.log`.
fn spawn_demo(shoal: &Path, dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log")).unwrap();
    Command::new(shoal).args(["demo", "--dir"]).arg(dir).stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

/// The pid and address in the demo coordinator's `server.json`, once `pid` differs from `old`.
fn coordinator_info(dir: &Path, old: Option<u64>) -> (u64, String) {
    let info = dir.join(".state/coordinator/server.json");
    wait_for(SETTLE, || {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&info).ok()?).ok()?;
        let pid = v["pid"].as_u64().filter(|p| Some(*p) != old)?;
        Some((pid, v["addr"].as_str()?.to_string()))
    })
    .expect("the demo's coordinator did not start")
}

/// Interrupts the demo as Ctrl-C would and checks that it exits cleanly, its coordinator too.
fn interrupt(mut demo: Child, coordinator_pid: u64) {
    signal(&demo, "INT");
    let status = demo.wait().unwrap();
    assert!(status.success(), "the demo did not exit cleanly: {status}");
    let alive = Command::new("kill").args(["-0", &coordinator_pid.to_string()]).stderr(Stdio::null()).status();
    assert!(!alive.unwrap().success(), "the demo left its coordinator ({coordinator_pid}) running");
}

fn device(dir: &Path, name: &str) -> Device {
    Device::existing(name, dir.join(".state").join(name), dir.join(name))
}

#[test]
fn demo_syncs_its_two_folders_and_stops_its_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let demo = spawn_demo(&bin("shoal"), &dir);
    let (pid, addr) = coordinator_info(&dir, None);
    let (laptop, desktop) = (device(&dir, "laptop"), device(&dir, "desktop"));
    wait_for(SETTLE, || laptop.home.join("status.json").exists().then_some(())).expect("the devices did not start");
    laptop.write("notes/hello.txt", b"from the laptop");
    wait_for(SETTLE, || desktop.read("notes/hello.txt")).expect("the file did not reach the desktop");
    converge(&[&laptop, &desktop], SETTLE);
    interrupt(demo, pid);

    // A second run resumes: same coordinator address, same devices, nothing enrolled again.
    let demo = spawn_demo(&bin("shoal"), &dir);
    let (pid, again) = coordinator_info(&dir, Some(pid));
    assert_eq!(again, addr, "the coordinator comes back on the address the devices know");
    desktop.write("again.txt", b"from the desktop");
    wait_for(SETTLE, || laptop.read("again.txt")).expect("the file did not reach the laptop");
    let tree = converge(&[&laptop, &desktop], SETTLE);
    assert_eq!(tree.len(), 3, "{tree:?}");
    interrupt(demo, pid);
    // Its log is not a terminal: the coordinator's lines, beside the devices', carry no colour.
    let log = std::fs::read_to_string(dir.with_extension("log")).unwrap();
    assert!(log.contains("coordinator listening"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a log file:\n{log}");
}

#[test]
fn demo_without_the_coordinator_program_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    // `shoal` alone in a directory (linked, so that its own path is there), and no PATH.
    let shoal = tmp.path().join("shoal");
    if std::fs::hard_link(bin("shoal"), &shoal).is_err() {
        std::fs::copy(bin("shoal"), &shoal).unwrap();
    }
    let out =
        Command::new(&shoal).args(["demo", "--dir"]).arg(tmp.path().join("demo")).env("PATH", "").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shoal-coordinator") && err.contains("PATH"), "{err}");
    assert!(!tmp.path().join("demo/.state").exists(), "nothing is enrolled without a coordinator");
}
