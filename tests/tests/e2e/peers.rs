//! LAN peers: a user's devices hand each other chunks over QUIC, and the origin serves only what
//! no peer has; a peer that sends bad bytes is dropped and the chunks come from elsewhere.

use shoal_protocol::testdata::noise;

use crate::harness::*;

/// Size of the file the three-device test moves.
const BIG: usize = 300 * 1024 * 1024;

#[test]
fn devices_take_a_new_file_from_each_other_rather_than_the_origin() {
    let (_tmp, coord, devices) = world("pia", &["a", "b", "c"]);
    let [mut a, mut b, mut c] = <[Device; 3]>::try_from(devices).ok().unwrap();
    for d in [&mut a, &mut b, &mut c] {
        d.start();
    }
    wait_for_peers(&[&a, &b, &c]);
    let served_before = coord.metric("shoal_chunk_bytes_out_total");
    let data = noise(31, BIG);
    a.write("big.bin", &data);
    converge(&[&a, &b, &c], SETTLE);
    for d in [&b, &c] {
        let [_, peer, _, origin] = wait_for(SETTLE, || {
            let s = by_source(d);
            (s[1] + s[3] >= BIG as u64).then_some(s)
        })
        .unwrap_or_else(|| panic!("{}: bytes by source {:?}", d.name, by_source(d)));
        assert!(
            peer * 100 >= BIG as u64 * 95,
            "{}: only {peer} of {BIG} bytes from peers ({origin} from the origin)",
            d.name
        );
    }
    let served = coord.metric("shoal_chunk_bytes_out_total") - served_before;
    assert!(served * 100 <= BIG as u64 * 5, "the coordinator served {served} chunk bytes of a {BIG}-byte file");
    for d in [&mut a, &mut b, &mut c] {
        d.stop(false);
    }
}

#[test]
fn a_peer_serving_bad_bytes_is_dropped_and_the_file_still_arrives_intact() {
    let (_tmp, _coord, devices) = world("quinn", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    b.start();
    for (i, fault) in ["corrupt", "truncate", "endless", "stall"].into_iter().enumerate() {
        a.start_with_env(&[("SHOAL_TEST_PEER_FAULT", fault)]);
        wait_for_peers(&[&a, &b]);
        let drops_before = b.log().matches("not asking this peer again").count();
        let name = format!("{fault}.bin");
        let data = noise(40 + i as u64, 2 * 1024 * 1024 + i);
        a.write(&name, &data);
        converge(&[&a, &b], SETTLE);
        assert_eq!(b.read(&name).as_deref(), Some(&data[..]), "{fault}: B's copy differs");
        assert!(
            b.log().matches("not asking this peer again").count() > drops_before,
            "{fault}: B never dropped the bad peer:\n{}",
            b.log()
        );
        a.stop(false);
    }
    b.stop(false);
    // Nothing partial or corrupt was left behind in B's temp area either.
    let tmp = b.path(".shoal/tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "left in {}", tmp.display());
}
