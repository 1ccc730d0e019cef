//! Shoal itself over the emulated network: a coordinator in another region, two laptops behind
//! one home uplink; a file written on one reaches the other over the LAN while its upload still
//! crawls up the uplink (root only).

use std::time::{Duration, Instant};

use shoal_netsim::{Fabric, LinkParams};
use shoal_testkit::{Coordinator, Device, by_source, noise, test_dir, wait_for, wait_for_peers};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn laptops_at_home_share_a_file_over_the_lan_not_the_uplink() {
    let tmp = test_dir();
    let mut f = Fabric::new(&format!("sns{}", std::process::id() % 100_000), 2);
    f.add_region("eu").unwrap();
    f.add_region("us").unwrap();
    let wan = LinkParams { latency: ms(40), ..LinkParams::IDEAL };
    f.connect_regions("eu", "us", wan, wan).unwrap();
    // A home uplink: 20 ms, 20 Mbit/s down, 4 Mbit/s up (8 MiB takes ~17 s to go up).
    let down = LinkParams { latency: ms(20), rate_bps: Some(20_000_000), ..LinkParams::IDEAL };
    let up = LinkParams { latency: ms(20), rate_bps: Some(4_000_000), ..LinkParams::IDEAL };
    f.add_site("home", "eu", up, down).unwrap();
    let (dc_addr, _) = f.add_site("dc", "us", LinkParams::IDEAL, LinkParams::IDEAL).unwrap();
    let (home, dc) = (f.namespace("home").unwrap(), f.namespace("dc").unwrap());

    let coord = Coordinator::start_in(&tmp.path().join("coord"), &format!("{dc_addr}:0"), Some(&dc));
    let mut a = Device::enroll_in(tmp.path(), &coord, "hana", "a", &home);
    let mut b = Device::enroll_in(tmp.path(), &coord, "hana", "b", &home);
    a.start();
    b.start();
    // Two laptops that have been on at home for a while: connected to each other.
    wait_for_peers(&[&a, &b]);

    let data = noise(91, 8 * 1024 * 1024);
    let t = Instant::now();
    a.write("photos.tar", &data);
    wait_for(Duration::from_secs(120), || (b.read("photos.tar").as_deref() == Some(&data[..])).then_some(()))
        .unwrap_or_else(|| panic!("B never got the file:\n{}\n{}", a.log(), b.log()));
    let took = t.elapsed();
    // The status is written after the cycle that installed the file.
    let s = wait_for(Duration::from_secs(10), || {
        Some(by_source(&b)).filter(|s| s.iter().sum::<u64>() >= data.len() as u64)
    })
    .unwrap_or_else(|| panic!("B's status never counted the file:\n{}", b.log()));
    assert!(s[1] >= data.len() as u64 * 95 / 100, "B's bytes by source {s:?}:\n{}", b.log());
    // The upload alone needs ~17 s at 4 Mbit/s: B had it long before.
    assert!(took < Duration::from_secs(12), "B got it in {took:?}");
    let report = f.report();
    let uplink = report.iter().find(|l| l.name == "home-uplink").unwrap();
    assert!(uplink.back.bytes < data.len() as u64 / 20, "down the uplink: {uplink:?}");
    eprintln!("B had the file {took:?} after it was written; down the home uplink: {} bytes", uplink.back.bytes);
    a.stop(false);
    b.stop(false);
}
