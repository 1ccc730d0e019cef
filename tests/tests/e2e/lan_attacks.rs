//! The peer layer attacked from the LAN: what an unauthenticated sender can do to a device's
//! peer endpoint (QUIC) and its mDNS listener (TCP, on the same port number) must not keep the
//! user's devices apart, nor starve the agent. The TCP test runs in network namespaces (root).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A free UDP port on `ip`.
fn free_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// `n` distinct QUIC Initial packets, as a client sends them first (each with its own connection
/// id), captured on a socket that never answers.
fn initials(n: usize) -> Vec<Vec<u8>> {
    block_on(async {
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = sink.local_addr().unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(throwaway_client());
        let mut out = Vec::new();
        // Every attempt is kept open until the end: dropping one sends a close, which is not
        // what is wanted here.
        let mut attempts = Vec::new();
        while out.len() < n {
            attempts.push(client.connect(to, "peer.shoal").unwrap());
            let mut buf = vec![0u8; 2048];
            let len = tokio::time::timeout(Duration::from_secs(5), sink.recv(&mut buf)).await.unwrap().unwrap();
            buf.truncate(len);
            // A long-header Initial (first byte 0b11xx_xxxx with packet type 0); anything else
            // (a retransmission's coalesced packets) is left out.
            if buf.first().is_some_and(|b| b & 0xf0 == 0xc0) {
                out.push(buf);
            }
        }
        drop(attempts);
        out
    })
}

/// A client configuration that makes well-formed Initials (it never gets far enough to check a
/// certificate, so it trusts none).
fn throwaway_client() -> quinn::ClientConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"shoal/peer/2".to_vec()];
    quinn::ClientConfig::new(std::sync::Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()))
}

/// Bare QUIC Initials from 40 addresses, 40 a second to each device, never going further (they
/// could come from spoofed addresses): the user's two devices still find each other within
/// seconds, because an address must answer a Retry before it holds anything.
#[test]
fn bare_quic_initials_do_not_keep_devices_apart() {
    let (_tmp, _coord, devices) = world("ines", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // Both devices' endpoints are flooded: whichever calls the other meets it.
    let mut targets: Vec<SocketAddr> = Vec::new();
    for d in [&a, &b] {
        let at: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().unwrap();
        d.configure(|c| c.peer_listen = Some(at));
        targets.push(at);
    }
    let packets = initials(400);
    a.start();
    // The flood starts before B does, and goes on while it tries to connect.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let senders: Vec<UdpSocket> = (2..42).map(|i| UdpSocket::bind(format!("127.0.0.{i}:0")).unwrap()).collect();
            let mut sent = 0usize;
            let started = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let s = &senders[sent % senders.len()];
                for target in &targets {
                    let _ = s.send_to(&packets[sent % packets.len()], target);
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    b.start();
    let connected = Instant::now();
    wait_for(Duration::from_secs(30), || peers_of(&b).iter().any(|p| p.name == "a").then_some(()))
        .unwrap_or_else(|| panic!("B never reached A through the flood:\n{}", b.log()));
    let took = connected.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert!(sent > 100, "only {sent} packets were sent");
    eprintln!("lan_attacks: B reached A in {took:?} through {sent} rounds of Initials");
    assert!(took < Duration::from_secs(10), "B took {took:?} to reach A");
    a.stop(false);
    b.stop(false);
}

/// Opens a TCP connection to `to` from inside network namespace `ns` for each of `n`, keeping
/// them open until the returned sender is dropped; returns how many were accepted by the kernel.
fn hold_tcp_connections(ns: &str, to: SocketAddr, n: usize) -> (std::sync::mpsc::Sender<()>, usize) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace exists");
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&netns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("entering the namespace (needs root)");
        let mut held = Vec::new();
        for _ in 0..n {
            if let Ok(s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                held.push(s);
            }
        }
        let _ = ready_tx.send(held.len());
        let _ = stop_rx.recv();
    });
    let opened = ready_rx.recv().unwrap();
    (stop_tx, opened)
}

/// The descriptors process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// 1,100 idle TCP connections to the port mDNS announces (the peer port's number), from another
/// machine on the LAN: the agent takes none of them, so its descriptors stay few and it goes on
/// syncing; and its open-file limit is the system's hard limit.
#[test]
fn idle_tcp_connections_to_the_peer_port_do_not_starve_the_agent() {
    let lan = Lan::create();
    let tmp = test_dir();
    let mut coord = Coordinator::start_in(&tmp.path().join("coord"), "10.78.0.1:0", Some(&lan.b));
    let mut a = Device::enroll_in(tmp.path(), &coord, "olaf", "a", &lan.a);
    a.configure(|c| c.peer_listen = Some("10.77.0.1:47001".parse().unwrap()));
    a.start();
    wait_for(SETTLE, || (daemon_status(&a).in_sync).then_some(())).expect("A never got in sync");
    let pid = a.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft_hard: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().skip(3).take(2).collect();
    assert_eq!(soft_hard[0], soft_hard[1], "the open-file limit was not raised: {limits}");

    // mDNS starts once the device has the user's LAN key; its listener then takes the port.
    let listening = || {
        let (stop, n) = hold_tcp_connections(&lan.b, "10.77.0.1:47001".parse().unwrap(), 1);
        drop(stop);
        (n == 1).then_some(())
    };
    wait_for(SETTLE, listening).unwrap_or_else(|| panic!("nothing listens on the peer port's number:\n{}", a.log()));
    let (held, opened) = hold_tcp_connections(&lan.b, "10.77.0.1:47001".parse().unwrap(), 1100);
    assert!(opened > 1000, "only {opened} connections were made");
    std::thread::sleep(Duration::from_secs(2));
    let fds = open_fds(pid);
    eprintln!("lan_attacks: {opened} TCP connections held; the agent has {fds} descriptors open");
    assert!(fds < 200, "the agent holds {fds} descriptors with {opened} connections open to it");
    a.write("still.txt", b"syncing");
    wait_for(SETTLE, || a.remote_tree().contains_key("still.txt").then_some(()))
        .unwrap_or_else(|| panic!("A stopped syncing:\n{}", a.log()));
    drop(held);
    a.stop(false);
    coord.stop(false);
}

/// Base58 (Bitcoin alphabet), as libp2p writes peer ids.
fn base58(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut digits: Vec<u8> = Vec::new();
    for &b in bytes {
        let mut carry = u32::from(b);
        for d in digits.iter_mut() {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    std::iter::repeat_n(b'1', zeros).chain(digits.iter().rev().map(|d| ALPHABET[*d as usize])).map(char::from).collect()
}

/// An mDNS answer as libp2p's discovery sends one: "a peer with this id is at this address", for
/// `ttl` seconds. The peer id is made up (an identity multihash of 36 random-looking bytes, as an
/// ed25519 key's), so nobody can be it.
fn forged_answer(n: u32, addr: &str, ttl: u32) -> Vec<u8> {
    let mut key = vec![0x08, 0x01, 0x12, 0x20];
    key.extend_from_slice(blake3::hash(&n.to_be_bytes()).as_bytes());
    let mut mh = vec![0x00, key.len() as u8];
    mh.extend_from_slice(&key);
    let txt = format!("dnsaddr={addr}/p2p/{}", base58(&mh));
    let qname = |out: &mut Vec<u8>, name: &str| {
        for label in name.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    };
    let mut peer_name = Vec::new();
    qname(&mut peer_name, &format!("forged{n:08}x{}", "y".repeat(32)));
    let mut out = Vec::new();
    out.extend_from_slice(&[0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
    qname(&mut out, "_p2p._udp.local");
    out.extend_from_slice(&[0x00, 0x0c, 0x00, 0x01]);
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(peer_name.len() as u16).to_be_bytes());
    out.extend_from_slice(&peer_name);
    // The TXT record, under the peer's name.
    out.extend_from_slice(&peer_name);
    out.extend_from_slice(&[0x00, 0x10, 0x80, 0x01]);
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&((txt.len() + 1) as u16).to_be_bytes());
    out.push(txt.len() as u8);
    out.extend_from_slice(txt.as_bytes());
    out
}

/// CPU seconds process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// 20,000 forged mDNS answers with hour-long lifetimes, each naming a different made-up peer: the
/// agent keeps none of them, and once the flood is over it is idle again, its memory back near
/// where it was, and still syncing.
#[test]
fn forged_mdns_answers_cost_the_agent_nothing_lasting() {
    let lan = Lan::create();
    let tmp = test_dir();
    let mut coord = Coordinator::start_in(&tmp.path().join("coord"), "10.78.0.1:0", Some(&lan.b));
    let mut a = Device::enroll_in(tmp.path(), &coord, "pia", "a", &lan.a);
    // Another device of the user, which A would look for among what it hears.
    let _b = Device::enroll_in(tmp.path(), &coord, "pia", "b", &lan.b);
    a.configure(|c| c.peer_listen = Some("10.77.0.1:47002".parse().unwrap()));
    a.start();
    let listening = || {
        let (stop, n) = hold_tcp_connections(&lan.b, "10.77.0.1:47002".parse().unwrap(), 1);
        drop(stop);
        (n == 1).then_some(())
    };
    wait_for(SETTLE, listening).unwrap_or_else(|| panic!("mDNS never started:\n{}", a.log()));
    std::thread::sleep(Duration::from_secs(2));
    let pid = a.pid();
    let rss_before = rss_mib(pid);

    // From the other machine on the LAN, to the mDNS port of A's address.
    let ns = lan.b.clone();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&netns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        let s = UdpSocket::bind("10.77.0.2:0").unwrap();
        for n in 0..20_000u32 {
            let _ = s.send_to(&forged_answer(n, "/ip4/10.77.0.9/tcp/4000", 3600), "10.77.0.1:5353");
            if n % 100 == 99 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    })
    .join()
    .unwrap();
    // Whatever the flood cost while it lasted, afterwards the agent is idle.
    std::thread::sleep(Duration::from_secs(6));
    let cpu = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu_seconds(pid) - cpu;
    eprintln!(
        "lan_attacks: after 20,000 forged mDNS answers: {used:.2} CPU-s in 10 s, RSS {rss_before} -> {} MiB",
        rss_mib(pid)
    );
    assert!(used < 1.0, "the agent used {used:.2} s of CPU in the 10 s after the flood");
    let rss = rss_mib(pid);
    assert!(rss < rss_before + 24, "the agent grew from {rss_before} to {rss} MiB");
    a.write("after.txt", b"still syncing");
    wait_for(SETTLE, || a.remote_tree().contains_key("after.txt").then_some(()))
        .unwrap_or_else(|| panic!("A stopped syncing:\n{}", a.log()));
    a.stop(false);
    coord.stop(false);
}
