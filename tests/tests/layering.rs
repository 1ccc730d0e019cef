//! The workspace's dependency rules (ARCHITECTURE.md, "Architecture invariants"): the agent and
//! the relay never depend on the coordinator, and the relay never on the agent, directly or
//! through another workspace crate; what they share lives in `shoal-protocol`, `shoal-sys`,
//! `shoal-net` and `shoal-packs`, which depend on none of them. Read from `cargo metadata`, so every way of
//! declaring a dependency counts.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Crates that must never reach the coordinator.
const NEVER_ON_COORDINATOR: [&str; 2] = ["shoal-agent", "shoal-relay"];

/// The shared crates, and the crates each must never reach.
const SHARED: [(&str, &[&str]); 4] = [
    ("shoal-protocol", &["shoal-coordinator", "shoal-agent", "shoal-relay", "shoal-net", "shoal-packs"]),
    ("shoal-sys", &["shoal-coordinator", "shoal-agent", "shoal-relay", "shoal-net", "shoal-packs"]),
    ("shoal-net", &["shoal-coordinator", "shoal-agent", "shoal-relay", "shoal-packs"]),
    ("shoal-packs", &["shoal-coordinator", "shoal-agent", "shoal-relay", "shoal-net"]),
];

/// One declared dependency: the package's name, and whether it is for the crate's tests only.
type Dep = (String, bool);

#[test]
fn agent_and_relay_never_depend_on_the_coordinator() {
    let graph = workspace_graph();
    assert!(
        path_to(&graph, "shoal-tests", "shoal-coordinator").is_some(),
        "the check sees dependencies: the end-to-end tests do use the coordinator"
    );
    for krate in NEVER_ON_COORDINATOR {
        assert!(graph.contains_key(krate), "no {krate} in {graph:?}");
        if let Some(path) = path_to(&graph, krate, "shoal-coordinator") {
            panic!(
                "{krate} depends on shoal-coordinator ({}); move what it needs into shoal-sys or \
                 shoal-protocol instead",
                path.join(" -> ")
            );
        }
    }
}

/// Each workspace member's declared dependencies, by package name.
fn workspace_graph() -> BTreeMap<String, Vec<Dep>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--manifest-path", manifest])
        .output()
        .expect("running cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let str_of = |v: &serde_json::Value| v.as_str().expect("cargo metadata names are strings").to_string();
    let packages = meta["packages"].as_array().expect("cargo metadata lists packages");
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"].as_array().expect("each package lists its dependencies");
            (str_of(&p["name"]), deps.iter().map(|d| (str_of(&d["name"]), d["kind"] == "dev")).collect())
        })
        .collect()
}

/// How `from` depends on `to`, if it does: through everything `from` declares, and what those
/// declare for their own code (not their tests), through workspace members.
fn path_to<'g>(graph: &'g BTreeMap<String, Vec<Dep>>, from: &'g str, to: &str) -> Option<Vec<&'g str>> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<Vec<&str>> = graph[from].iter().map(|(name, _)| vec![from, name.as_str()]).collect();
    while let Some(path) = todo.pop() {
        let last = *path.last().expect("a path holds at least `from`");
        if last == to {
            return Some(path);
        }
        if seen.insert(last) {
            for (dep, _) in graph.get(last).into_iter().flatten().filter(|(_, dev)| !dev) {
                todo.push([path.as_slice(), &[dep.as_str()]].concat());
            }
        }
    }
    None
}

#[test]
fn shared_crates_depend_on_no_part_that_uses_them_and_the_relay_not_on_the_agent() {
    let graph = workspace_graph();
    assert!(path_to(&graph, "shoal-agent", "shoal-net").is_some(), "the agent uses shoal-net");
    assert!(path_to(&graph, "shoal-coordinator", "shoal-net").is_some(), "the coordinator uses shoal-net");
    assert!(path_to(&graph, "shoal-coordinator", "shoal-packs").is_some(), "the coordinator uses shoal-packs");
    for (shared, never) in SHARED {
        assert!(graph.contains_key(shared), "no {shared} in {graph:?}");
        for to in never {
            if let Some(path) = path_to(&graph, shared, to) {
                panic!("{shared} depends on {to} ({}): shared crates sit below every part", path.join(" -> "));
            }
        }
    }
    assert!(path_to(&graph, "shoal-relay", "shoal-packs").is_some(), "the relay uses shoal-packs");
    if let Some(path) = path_to(&graph, "shoal-relay", "shoal-agent") {
        panic!("shoal-relay depends on shoal-agent ({}); move what it needs into shoal-net", path.join(" -> "));
    }
}

#[test]
fn nothing_shipped_depends_on_the_test_kit() {
    let graph = workspace_graph();
    assert!(path_to(&graph, "shoal-tests", "shoal-testkit").is_some(), "the end-to-end tests use the kit");
    for krate in
        ["shoal-protocol", "shoal-sys", "shoal-net", "shoal-packs", "shoal-coordinator", "shoal-agent", "shoal-relay"]
    {
        assert!(graph.contains_key(krate), "no {krate} in {graph:?}");
        if let Some(path) = path_to(&graph, krate, "shoal-testkit") {
            panic!("{krate} depends on the test kit ({})", path.join(" -> "));
        }
    }
}
