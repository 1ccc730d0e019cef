//! The emulated network carries real TCP between namespaces with the latency, bandwidth and
//! partitions its links are given, and counts what crosses each link (root only: it makes
//! network namespaces).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use shoal_netsim::{Fabric, LinkKind, LinkParams, in_namespace, spawn_in_namespace};

const MIB: usize = 1024 * 1024;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn connect_from(ns: &str, to: SocketAddr, timeout: Duration) -> Result<(TcpStream, Duration), String> {
    in_namespace(ns, move || {
        let t = Instant::now();
        TcpStream::connect_timeout(&to, timeout).map(|s| (s, t.elapsed())).map_err(|e| e.to_string())
    })
    .map_err(|e| e.to_string())?
}

#[test]
fn links_delay_shape_count_and_partition_real_tcp() {
    let mut f = Fabric::new(&format!("snt{}", std::process::id() % 100_000), 1);
    f.add_region("eu").unwrap();
    f.add_region("us").unwrap();
    let wan = LinkParams { latency: ms(30), ..LinkParams::IDEAL };
    f.connect_regions("eu", "us", wan, wan).unwrap();
    // Site a: 10 ms each way, 8 Mbit/s down (1 MiB takes ~1.05 s).
    let down = LinkParams { latency: ms(10), rate_bps: Some(8_000_000), ..LinkParams::IDEAL };
    let up = LinkParams { latency: ms(10), ..LinkParams::IDEAL };
    let (_, a_uplink) = f.add_site("a", "eu", up, down).unwrap();
    let (b_addr, _) = f.add_site("b", "us", LinkParams::IDEAL, LinkParams::IDEAL).unwrap();
    let (a_ns, b_ns) = (f.namespace("a").unwrap(), f.namespace("b").unwrap());
    let to = SocketAddr::from((b_addr, 7000));

    // A server at b sends 1 MiB to each connection.
    let listener = in_namespace(&b_ns, move || TcpListener::bind(to)).unwrap().unwrap();
    let _server = spawn_in_namespace(&b_ns, move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.write_all(&vec![7u8; MIB]);
            });
        }
    });

    // The round trip crosses a's uplink and the link between regions twice: 80 ms at least.
    let (mut s, took) = connect_from(&a_ns, to, Duration::from_secs(5)).unwrap();
    assert!(took >= ms(80) && took < ms(1000), "connected in {took:?}");
    let t = Instant::now();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let took = t.elapsed();
    assert_eq!(got.len(), MIB);
    assert!(took >= ms(900) && took < Duration::from_secs(10), "1 MiB at 8 Mbit/s in {took:?}");

    let report = f.report();
    let uplink = report.iter().find(|l| l.name == "a-uplink").unwrap();
    assert!(uplink.back.bytes >= MIB as u64, "{uplink:?}");
    assert!(uplink.out.bytes > 0 && uplink.out.bytes < uplink.back.bytes / 4, "{uplink:?}");
    let wan = report.iter().find(|l| l.kind == LinkKind::InterRegion).unwrap();
    assert!(wan.back.bytes >= MIB as u64, "{wan:?}");
    // One TCP connection, opened from a: counted once, on each link of its path, a's way.
    assert_eq!((uplink.out.connections, uplink.back.connections), (1, 0), "{uplink:?}");
    assert_eq!((wan.out.connections, wan.back.connections), (1, 0), "{wan:?}");

    // A UDP flow counts once, in the direction it started, however many packets go either way.
    let echo = SocketAddr::from((b_addr, 7001));
    let server = in_namespace(&b_ns, move || std::net::UdpSocket::bind(echo)).unwrap().unwrap();
    let client = in_namespace(&a_ns, || std::net::UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    for _ in 0..3 {
        client.send_to(b"ping", echo).unwrap();
        let mut buf = [0u8; 16];
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (_, from) = server.recv_from(&mut buf).unwrap();
        server.send_to(b"pong", from).unwrap();
    }
    let uplink = f.report().into_iter().find(|l| l.name == "a-uplink").unwrap();
    assert_eq!((uplink.out.connections, uplink.back.connections), (2, 0), "{uplink:?}");

    // Cut: no connection; healed: connections again.
    f.partition(a_uplink, true);
    assert!(connect_from(&a_ns, to, Duration::from_secs(1)).is_err(), "connected across a partition");
    f.partition(a_uplink, false);
    connect_from(&a_ns, to, Duration::from_secs(5)).unwrap();
    assert!(f.report().iter().find(|l| l.name == "a-uplink").unwrap().out.dropped > 0);
}
