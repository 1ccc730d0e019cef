//! The agent's connections: every one of them leaves from the configured local address.

use std::time::Duration;

use shoal_agent::config::Config;
use shoal_protocol::api::PeerHint;

use shoal_protocol::status::SyncState;

use crate::harness::*;

/// Established TCP connections from `local_ip` to port `port` on this machine (IPv4, from
/// /proc/net/tcp, where an address is little-endian hex and a port big-endian hex).
fn connections_from(local_ip: [u8; 4], port: u16) -> usize {
    let want_ip = format!("{:08X}", u32::from_le_bytes(local_ip));
    let want_port = format!("{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].starts_with(&want_ip) && f[2].ends_with(&format!(":{want_port}")) && f[3] == "01"
        })
        .count()
}

fn set_bind(d: &Device, bind: &str) {
    let mut cfg = Config::load(&d.home).unwrap();
    cfg.bind = Some(bind.parse().unwrap());
    cfg.save(&d.home).unwrap();
}

#[test]
fn every_connection_leaves_from_the_bind_address() {
    let (_tmp, coord, devices) = world("bianca", &["a", "b"]);
    let [a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    let port: u16 = coord.addr.rsplit_once(':').unwrap().1.parse().unwrap();

    // An address this machine does not have: the HTTP client cannot connect from it, so nothing
    // syncs and the error says why (binding fails locally; no packet is sent).
    set_bind(&b, "192.0.2.1");
    a.write("x.txt", b"hello");
    a.sync();
    let out = b.shoal(&["sync", "--once"]);
    assert!(!out.status.success(), "synced from an address the machine does not have");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bind") && err.contains("Cannot assign requested address"), "{err}");
    assert!(b.read("x.txt").is_none());

    // Another loopback address: the HTTP client and the push subscription both use it.
    set_bind(&b, "127.0.0.2");
    b.sync();
    assert_eq!(b.read("x.txt").as_deref(), Some(&b"hello"[..]));
    assert_eq!(connections_from([127, 0, 0, 2], port), 0, "left-over connections from 127.0.0.2");
    b.start();
    wait_for(SETTLE, || (connections_from([127, 0, 0, 2], port) >= 1).then_some(()))
        .expect("the daemon's subscription comes from 127.0.0.2");
    a.write("y.txt", b"pushed");
    a.sync();
    wait_for(SETTLE, || (b.read("y.txt").as_deref() == Some(&b"pushed"[..])).then_some(())).expect("y.txt arrives");
    b.stop(false);
    converge(&[&a, &b], SETTLE);
}

/// The daemon's saved copy of the user's device list (`devices.json` in its home).
fn saved_roster(d: &Device) -> Vec<serde_json::Value> {
    let saved: Option<serde_json::Value> =
        std::fs::read(d.home.join("devices.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    saved.and_then(|v| v["devices"].as_array().cloned()).unwrap_or_default()
}

#[test]
fn the_daemon_keeps_the_users_device_list_with_revocations() {
    let (_tmp, _coord, devices) = world("rosa", &["a", "b", "c"]);
    let [a, mut b, mut c] = <[Device; 3]>::try_from(devices).ok().unwrap();
    c.start();
    b.start();
    wait_for(SETTLE, || (saved_roster(&b).len() == 3).then_some(())).expect("B saved the user's three devices");
    assert!(saved_roster(&b).iter().all(|d| d["revoked"] == false));
    wait_for(SETTLE, || peers_of(&b).iter().any(|p| p.name == "c").then_some(())).expect("B and C connect");

    // A revocation (asked for by A, confirmed by B) reaches B's saved list at once: the push
    // subscription says the device list changed. C knew the user's LAN key: it is replaced.
    let c_id = Config::load(&c.home).unwrap().device_id.to_string();
    let lan_key = |d: &Device| -> Option<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(d.home.join("devices.json")).ok()?).ok()?;
        Some(v["lan"]["current"].clone()).filter(|k| k.is_string())
    };
    let key_before = lan_key(&b).expect("B keeps the user's LAN key");
    for d in [&a, &b] {
        let out = d.shoal(&["devices", "--revoke", &c_id]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for(Duration::from_secs(5), || {
        saved_roster(&b).iter().any(|d| d["id"] == c_id.as_str() && d["revoked"] == true).then_some(())
    })
    .unwrap_or_else(|| panic!("B's device list after revoking C: {:?}", saved_roster(&b)));
    wait_for(Duration::from_secs(5), || (lan_key(&b).is_some_and(|k| k != key_before)).then_some(()))
        .expect("the LAN key was not replaced after a revocation");
    // The open connection to C goes with it.
    wait_for(Duration::from_secs(5), || peers_of(&b).iter().all(|p| p.name != "c").then_some(()))
        .unwrap_or_else(|| panic!("B still connected to revoked C: {:?}", peers_of(&b)));
    // C's own status says so at once (it was in sync, and nothing else happens in its folder).
    wait_for(Duration::from_secs(5), || {
        let s = daemon_status(&c);
        (s.state == SyncState::Unauthorized && !s.in_sync).then_some(())
    })
    .unwrap_or_else(|| panic!("C's status after its revocation: {:?}", daemon_status(&c)));
    c.stop(false);
    b.stop(false);
    converge(&[&a, &b], SETTLE);
}

fn hinted(hints: &[PeerHint]) -> Vec<(String, Vec<String>)> {
    hints.iter().map(|h| (h.name.clone(), h.addrs.clone())).collect()
}

#[test]
fn coordinator_hints_name_the_users_devices_on_the_same_network() {
    let (tmp, coord, devices) = world("hilda", &["a", "b", "far"]);
    let [a, b, far] = <[Device; 3]>::try_from(devices).ok().unwrap();
    let stranger = Device::enroll(tmp.path(), &coord, "igor", "stranger");
    set_bind(&far, "127.0.0.2");
    block_on(async {
        let (ca, cb, cfar, cstranger) = (client_of(&a), client_of(&b), client_of(&far), client_of(&stranger));
        assert_eq!(ca.peers(vec!["127.0.0.1:4001".into()]).await.unwrap(), vec![], "nobody announced yet");
        // B, from the same address, learns A's endpoint and certificate, and A then learns B's.
        let hints = cb.peers(vec!["127.0.0.1:4002".into(), "[::1]:4002".into()]).await.unwrap();
        assert_eq!(hinted(&hints), vec![("a".to_string(), vec!["127.0.0.1:4001".to_string()])]);
        let a_info = ca.devices().await.unwrap().into_iter().find(|d| d.name == "a").unwrap();
        assert_eq!(hints[0].cert_fingerprint, a_info.cert_fingerprint);
        let hints = ca.peers(vec!["127.0.0.1:4001".into()]).await.unwrap();
        assert_eq!(
            hinted(&hints),
            vec![("b".to_string(), vec!["127.0.0.1:4002".to_string(), "[::1]:4002".to_string()])]
        );
        // The same user from another address, and another user from the same one: nothing.
        assert_eq!(cfar.peers(vec!["127.0.0.2:4003".into()]).await.unwrap(), vec![]);
        assert_eq!(cstranger.peers(vec!["127.0.0.1:4004".into()]).await.unwrap(), vec![]);
        assert_eq!(hinted(&ca.peers(vec![]).await.unwrap()).len(), 1, "far and the stranger are not A's hints");

        // Bad announcements are refused and change nothing.
        // So are addresses no device has on a LAN: peers would send QUIC packets there.
        let not_lan = ["255.255.255.255:4000", "224.0.0.251:5353", "8.8.8.8:53", "[ff02::1]:4000", "0.0.0.0:4000"];
        for bad in [vec!["nonsense".to_string()], vec!["127.0.0.1:0".into()], vec!["127.0.0.1:1".to_string(); 9]]
            .into_iter()
            .chain(not_lan.iter().map(|a| vec!["127.0.0.1:4002".to_string(), a.to_string()]))
        {
            assert!(cb.peers(bad).await.is_err());
        }
        assert_eq!(hinted(&ca.peers(vec![]).await.unwrap())[0].1, vec!["127.0.0.1:4002", "[::1]:4002"]);

        // A revoked device (asked for by A, confirmed by far) is nobody's hint any more.
        let b_id = Config::load(&b.home).unwrap().device_id;
        assert!(ca.revoke(b_id).await.unwrap().revoke_requested.is_some());
        assert!(cfar.revoke(b_id).await.unwrap().revoked);
        assert_eq!(ca.peers(vec![]).await.unwrap(), vec![]);
    });
    set_bind(&far, "127.0.0.1");
    converge(&[&a, &far], SETTLE);
}

#[test]
fn devices_of_one_user_find_each_other_through_coordinator_hints() {
    let (tmp, coord, devices) = world("petra", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    let mut stranger = Device::enroll(tmp.path(), &coord, "sven", "stranger");
    stranger.start();
    a.start();
    b.start();
    let started = std::time::Instant::now();
    let find = |d: &Device, name: &str| wait_for(SETTLE, || peers_of(d).into_iter().find(|p| p.name == name));
    let a_on_b = find(&b, "a").unwrap_or_else(|| panic!("B never connected to A: {:?}", peers_of(&b)));
    let b_on_a = find(&a, "b").unwrap_or_else(|| panic!("A never saw B: {:?}", peers_of(&a)));
    eprintln!("peers found {:?} after both agents started", started.elapsed());
    // Whichever started second dialled the first from the coordinator's hint; the first saw it
    // call in.
    let mut how = [a_on_b.found.as_str(), b_on_a.found.as_str()];
    how.sort();
    assert_eq!(how, ["hint", "incoming"], "{a_on_b:?} {b_on_a:?}");
    assert!(a_on_b.addr.as_str().starts_with("127.0.0.1:"), "{a_on_b:?}");
    assert!(a_on_b.rtt_ms >= 0.0 && a_on_b.bytes_received > 0, "{a_on_b:?}");
    // Another user's device, on the same machine, is nobody's peer.
    assert!(peers_of(&a).iter().chain(&peers_of(&b)).all(|p| p.name != "stranger"));
    assert!(peers_of(&stranger).is_empty());

    // A leaves: B's list follows.
    a.stop(false);
    wait_for(SETTLE, || peers_of(&b).is_empty().then_some(())).unwrap_or_else(|| panic!("{:?}", peers_of(&b)));
    b.stop(false);
    stranger.stop(false);
    converge(&[&a, &b], SETTLE);
}
