//! Two devices on a LAN the coordinator does not describe: each agent runs in its own network
//! namespace, joined by a veth pair. The coordinator sees them come from different addresses, so
//! it never names one to the other; they find each other by mDNS, and a new file goes from one
//! to the other over QUIC after its author has lost the coordinator. Needs root (CI runs as root)
//! to create the namespaces.

use shoal_protocol::testdata::noise;

use crate::harness::*;

fn set_config(d: &Device, f: impl FnOnce(&mut shoal_agent::config::Config)) {
    let mut cfg = shoal_agent::config::Config::load(&d.home).unwrap();
    f(&mut cfg);
    cfg.save(&d.home).unwrap();
}

/// Versions of `path` with their state, as `d` sees them.
fn states(d: &Device, path: &str) -> Vec<String> {
    let out = d.shoal(&["history", path, "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.iter().map(|e| e["state"].as_str().unwrap_or_default().to_string()).collect()
}

#[test]
fn devices_on_a_lan_find_each_other_by_mdns_and_transfer_without_the_coordinator() {
    let lan = Lan::create();
    let tmp = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::start_in(&tmp.path().join("coord"), "10.78.0.1:0", Some(&lan.b));
    let mut a = Device::enroll_in(tmp.path(), &coord, "wanda", "a", &lan.a);
    let mut b = Device::enroll_in(tmp.path(), &coord, "wanda", "b", &lan.b);
    // A's uploads crawl and its LAN sends take a few seconds, so the transfer below is still
    // running when A loses the coordinator, and the origin never has the file.
    set_config(&a, |c| {
        c.upload_limit = Some(shoal_agent::limit::Rate::parse("16KiB").unwrap());
        c.lan_limit = Some(shoal_agent::limit::Rate::parse("1MiB").unwrap());
    });
    a.start();
    b.start();

    // Found by mDNS: the coordinator sees A at 10.77.0.1 and B at 10.78.0.1, so it hints nothing.
    // Two devices that dial each other at once both keep one of the two connections; until the
    // other is closed on both ends, each may list the one the other side dialed ("incoming" on
    // both). Wait for a settled pair: one end lists the connection it dialed.
    let found = |d: &Device, other: &str| peers_of(d).into_iter().find(|p| p.name == other);
    let (on_a, on_b) = wait_for(SETTLE, || {
        let pair = (found(&a, "b")?, found(&b, "a")?);
        (pair.0.found != "incoming" || pair.1.found != "incoming").then_some(pair)
    })
    .unwrap_or_else(|| panic!("no peers:\nA: {}\nB: {}", a.log(), b.log()));
    let mut how = [on_a.found.as_str().to_string(), on_b.found.as_str().to_string()];
    how.sort();
    assert!(how.contains(&"mdns".to_string()) && !how.contains(&"hint".to_string()), "{on_a:?} {on_b:?}");

    // A commits a new file; as soon as B knows of it, A loses the coordinator (a blackhole route
    // to its address). B still gets every byte, from A.
    let data = noise(71, 4 * 1024 * 1024);
    a.write("lan.bin", &data);
    wait_for(SETTLE, || (!states(&b, "lan.bin").is_empty()).then_some(()))
        .unwrap_or_else(|| panic!("B never saw the version:\nA: {}", a.log()));
    ip(&["-n", &lan.a, "route", "replace", "blackhole", "10.78.0.1/32"]);
    wait_for(SETTLE, || (b.read("lan.bin").as_deref() == Some(&data[..])).then_some(()))
        .unwrap_or_else(|| panic!("B never got the file:\nB: {}", b.log()));
    let [_, peer, _, origin] = wait_for(SETTLE, || {
        let s = by_source(&b);
        (s[1] + s[3] >= data.len() as u64).then_some(s)
    })
    .unwrap();
    assert!(peer >= data.len() as u64 && origin == 0, "B's bytes: peer {peer}, origin {origin}");
    assert_eq!(states(&b, "lan.bin"), vec!["pending"], "the origin cannot have it: A never got to upload it");

    a.stop(true);
    b.stop(false);
    coord.stop(false);
}
