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
    for (i, fault) in ["corrupt", "truncate", "endless", "stall", "trickle"].into_iter().enumerate() {
        a.start_with_env(&[("FAILPOINTS", &format!("peer-serve=return({fault})"))]);
        wait_for_peers(&[&a, &b]);
        let drops_before = b.log().matches("not asking this source again").count();
        let name = format!("{fault}.bin");
        let data = noise(40 + i as u64, 2 * 1024 * 1024 + i);
        a.write(&name, &data);
        converge(&[&a, &b], SETTLE);
        assert_eq!(b.read(&name).as_deref(), Some(&data[..]), "{fault}: B's copy differs");
        assert!(
            b.log().matches("not asking this source again").count() > drops_before,
            "{fault}: B never dropped the bad peer:\n{}\nA:\n{}",
            b.log(),
            a.log()
        );
        a.stop(false);
    }
    b.stop(false);
    // Nothing partial or corrupt was left behind in B's temp area either.
    let tmp = b.path(".shoal/tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "left in {}", tmp.display());
}

/// Sets `upload_limit` in a device's config.toml.
fn limit_upload(d: &Device, rate: &str) {
    let mut cfg = shoal_agent::config::Config::load(&d.home).unwrap();
    cfg.upload_limit = Some(shoal_agent::limit::Rate::parse(rate).unwrap());
    cfg.save(&d.home).unwrap();
}

/// The user's pending versions, as the coordinator lists them.
fn pending_of(d: &Device) -> Vec<shoal_protocol::api::PendingVersion> {
    let c = client_of(d);
    block_on(async { c.pending().await.unwrap().versions })
}

#[test]
fn a_new_version_reaches_a_peer_before_the_origin_and_becomes_durable_after() {
    let (_tmp, coord, devices) = world("rosa", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // 24 MiB through a 2 MiB/s uplink: twelve seconds of upload.
    slow_author(&mut a, &mut b, "2MiB");
    let data = noise(51, 24 * 1024 * 1024);
    a.write("slow.bin", &data);
    wait_until_has(&b, "slow.bin", &data);
    // B has all of it while the origin still lacks some: the version is pending.
    let pending = pending_of(&b);
    assert!(
        pending.iter().any(|v| v.path.as_str() == "slow.bin" && !v.withdrawn && v.missing_chunks > 0),
        "not pending when B had it: {pending:?}"
    );
    assert!(coord.metric("shoal_pending_versions") >= 1);
    let [_, peer, _, origin] = by_source(&b);
    assert!(peer >= data.len() as u64 && origin == 0, "B's bytes: peer {peer}, origin {origin}");
    // A's upload finishes: durable.
    wait_for(SETTLE, || pending_of(&a).is_empty().then_some(())).unwrap_or_else(|| panic!("{:?}", pending_of(&a)));
    assert_eq!(coord.metric("shoal_pending_versions"), 0);
    converge(&[&a, &b], SETTLE);
    a.stop(false);
    b.stop(false);
}

#[test]
fn a_pending_version_becomes_durable_through_the_peer_when_its_author_dies() {
    let (tmp, coord, devices) = world("sara", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // 200 MiB through a 2 MiB/s uplink: a hundred seconds of upload.
    slow_author(&mut a, &mut b, "2MiB");
    let data = noise(52, 200 * 1024 * 1024);
    let started = std::time::Instant::now();
    a.write("orphan.bin", &data);
    wait_until_has(&b, "orphan.bin", &data);
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(50), "B took {took:?}, half the upload's time or more");
    let pending = pending_of(&b);
    assert!(!pending.is_empty(), "the version was durable before A was killed");
    // The coordinator serves none of a pending version's missing chunks: no hash is a
    // permission, and it does not have them.
    let (_, tree) = block_on(client_of(&b).tree(None)).unwrap();
    let m = tree.iter().find(|e| e.path.as_str() == "orphan.bin").and_then(|e| e.manifest.clone()).unwrap();
    let refused = m.chunks.iter().filter(|c| block_on(client_of(&b).fetch_one(c.id)).is_err()).count();
    // A keeps uploading meanwhile, so compare with what is missing after the probe: a chunk
    // still missing then was missing when it was asked for, and must have been refused.
    let missing = pending_of(&b).first().map_or(0, |v| v.missing_chunks);
    assert!(missing > 0, "the version became durable during the probe");
    assert!(refused as u64 >= missing, "{refused} refused, {missing} missing");
    a.stop(true);
    // B notices A is gone and uploads the version itself.
    wait_for(SETTLE, || pending_of(&b).is_empty().then_some(()))
        .unwrap_or_else(|| panic!("still pending: {:?}\n{}", pending_of(&b), b.log()));
    // A third device, with no peers at all, gets it from the origin.
    b.stop(false);
    let c = Device::enroll(tmp.path(), &coord, "sara", "c");
    c.sync();
    assert_eq!(c.read("orphan.bin").as_deref(), Some(&data[..]));
}

/// `shoal history PATH --json` of `d`: each version with its state.
fn history_states(d: &Device, path: &str) -> Vec<(u64, String)> {
    let out = d.shoal(&["history", path, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.iter().map(|e| (e["version"].as_u64().unwrap(), e["state"].as_str().unwrap().to_string())).collect()
}

/// Starts A with its origin upload limited to `rate`, and B; returns once they are peers.
fn slow_author(a: &mut Device, b: &mut Device, rate: &str) {
    limit_upload(a, rate);
    a.start();
    b.start();
    wait_for_peers(&[a, b]);
}

/// Waits until `d`'s `path` holds exactly `data`.
fn wait_until_has(d: &Device, path: &str, data: &[u8]) {
    wait_for(SETTLE, || (d.read(path).as_deref() == Some(data)).then_some(()))
        .unwrap_or_else(|| panic!("{} never got {path}:\n{}", d.name, d.log()));
}

/// A's peer endpoint answers but never sends a chunk (B cannot fetch from it), and its uplink is
/// slow: its new versions stay pending for a while and no other device holds them.
fn stalling_author(a: &mut Device, b: &mut Device) {
    limit_upload(a, "256KiB");
    a.start_with_env(&[("FAILPOINTS", "peer-serve=return(stall)")]);
    b.start();
    wait_for_peers(&[a, b]);
}

#[test]
fn sync_once_returns_when_this_devices_versions_are_durable() {
    let (_tmp, _coord, devices) = world("tove", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    stalling_author(&mut a, &mut b);
    let data = noise(61, 1024 * 1024);
    a.write("f.bin", &data);
    wait_for(SETTLE, || pending_of(&a).iter().any(|v| v.path.as_str() == "f.bin").then_some(()))
        .expect("the version never showed as pending");
    // Stopped mid-upload, at once: the upload is still owed, and `sync --once` pays it before
    // returning.
    a.stop_now();
    a.sync();
    assert_eq!(pending_of(&a), vec![], "sync --once returned with a version of its own pending");
    converge(&[&a, &b], SETTLE);
    b.stop(false);
}

#[test]
fn a_version_its_author_lost_before_uploading_is_withdrawn_not_promised() {
    let (_tmp, _coord, devices) = world("ulla", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    stalling_author(&mut a, &mut b);
    a.write("f.bin", &noise(62, 2 * 1024 * 1024));
    let v1 = wait_for(SETTLE, || pending_of(&a).into_iter().find(|v| v.path.as_str() == "f.bin"))
        .expect("the version never showed as pending")
        .version;
    // The author stops before the upload is done (no time given to finish it), and the file
    // changes while it is stopped: nobody holds v1 any more.
    a.stop_now();
    let v2 = noise(63, 2 * 1024 * 1024);
    a.write("f.bin", &v2);
    a.start_with_env(&[("FAILPOINTS", "peer-serve=return(stall)")]);
    wait_for(SETTLE, || (history_states(&b, "f.bin").contains(&(v1, "withdrawn".into()))).then_some(()))
        .unwrap_or_else(|| panic!("v1 not withdrawn: {:?}\n{}", history_states(&b, "f.bin"), a.log()));
    // The new content arrives everywhere and becomes durable; v1 stays withdrawn.
    wait_for(SETTLE, || (b.read("f.bin").as_deref() == Some(&v2[..])).then_some(()))
        .unwrap_or_else(|| panic!("B never got v2\nA:\n{}\nB:\n{}", a.log(), b.log()));
    converge(&[&a, &b], SETTLE);
    assert_eq!(b.read("f.bin"), Some(v2));
    wait_for(SETTLE, || {
        let h = history_states(&b, "f.bin");
        (h.len() == 2 && h[1].1 == "durable").then_some(())
    })
    .unwrap_or_else(|| panic!("{:?}", history_states(&b, "f.bin")));
    assert_eq!(history_states(&b, "f.bin")[0], (v1, "withdrawn".to_string()));
    a.stop(false);
    b.stop(false);
}

#[test]
fn a_version_another_device_holds_is_kept_when_its_author_loses_it() {
    let (tmp, _coord, devices) = world("vera", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    slow_author(&mut a, &mut b, "256KiB");
    let v1 = noise(64, 6 * 1024 * 1024);
    a.write("f.bin", &v1);
    wait_until_has(&b, "f.bin", &v1);
    assert!(!pending_of(&b).is_empty(), "v1 was durable already");
    // A loses v1 before uploading it; B holds it and uploads it, so v1 is kept.
    a.stop_now();
    a.write("f.bin", &noise(65, 6 * 1024 * 1024));
    a.start();
    converge(&[&a, &b], SETTLE);
    wait_for(SETTLE, || pending_of(&b).is_empty().then_some(()))
        .unwrap_or_else(|| panic!("{:?}\n{}", pending_of(&b), b.log()));
    let states = history_states(&b, "f.bin");
    assert!(states.iter().all(|(_, s)| s == "durable"), "{states:?}");
    let out = tmp.path().join("v1.bin");
    let got = b.shoal(&["get", "f.bin", out.to_str().unwrap(), "--version", &states[0].0.to_string()]);
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), v1);
    a.stop(false);
    b.stop(false);
}

#[test]
fn a_download_limit_holds_origin_downloads_to_its_rate() {
    let (_tmp, _coord, devices) = world("yuki", &["a", "b"]);
    let [a, b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // Through the coordinator only, and B downloads at most 1 MiB/s.
    for d in [&a, &b] {
        let mut cfg = shoal_agent::config::Config::load(&d.home).unwrap();
        cfg.lan_sync = false;
        cfg.download_limit = (d.name == "b").then(|| shoal_agent::limit::Rate::parse("1MiB").unwrap());
        cfg.save(&d.home).unwrap();
    }
    let data = noise(91, 3 * 1024 * 1024);
    a.write("limited.bin", &data);
    a.sync();
    let started = std::time::Instant::now();
    b.sync();
    let took = started.elapsed();
    assert_eq!(b.read("limited.bin").as_deref(), Some(&data[..]));
    // The first tenth of a second's worth passes at once; the rest at 1 MiB/s.
    assert!(took >= std::time::Duration::from_millis(2500), "3 MiB at 1 MiB/s took {took:?}");
}

#[test]
fn a_slow_lan_limit_paces_a_peer_without_it_counting_as_stalled() {
    let (_tmp, _coord, devices) = world("wilma", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // A sends to its peers at 40 KiB/s: a 256 KiB chunk takes over six seconds, longer than a
    // peer may stay silent; paced piece by piece, it never is. Its uploads crawl, so the origin
    // has no other copy to offer meanwhile: A is the only source, however slow.
    let mut cfg = shoal_agent::config::Config::load(&a.home).unwrap();
    cfg.lan_limit = Some(shoal_agent::limit::Rate::parse("40KiB").unwrap());
    cfg.upload_limit = Some(shoal_agent::limit::Rate::parse("16KiB").unwrap());
    cfg.save(&a.home).unwrap();
    let chunker = shoal_protocol::Chunker::default();
    let data = (70..)
        .map(|seed| noise(seed, 600 * 1024))
        .find(|d| chunker.manifest(&d[..]).unwrap().chunks.iter().any(|c| c.len >= 224 * 1024))
        .unwrap();
    a.start();
    b.start();
    wait_for_peers(&[&a, &b]);
    let started = std::time::Instant::now();
    a.write("paced.bin", &data);
    wait_until_has(&b, "paced.bin", &data);
    // 600 KiB at 40 KiB/s: the limit did hold the transfer back.
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_secs(10), "600 KiB at 40 KiB/s took {took:?}");
    assert!(!b.log().contains("not asking this source again"), "B dropped A:\n{}", b.log());
    let [_, peer, _, origin] = wait_for(SETTLE, || {
        let s = by_source(&b);
        (s[1] + s[3] >= data.len() as u64).then_some(s)
    })
    .unwrap();
    assert!(peer >= data.len() as u64 && origin == 0, "B's bytes: peer {peer}, origin {origin}");
    a.stop_now();
    b.stop(false);
}

#[test]
fn a_device_asks_the_origin_once_which_chunks_of_a_pending_version_it_lacks() {
    let (_tmp, coord, devices) = world("xenia", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // B cannot fetch from A (it stalls) and the origin has few of the chunks yet: B's download
    // fails, after one refused batch and one question, not a refusal per chunk.
    stalling_author(&mut a, &mut b);
    let errors_before = coord.metric("shoal_request_errors_total");
    a.write("f.bin", &noise(66, 4 * 1024 * 1024));
    wait_for(SETTLE, || b.log().contains("download failed").then_some(()))
        .unwrap_or_else(|| panic!("B never failed to fetch the pending version:\n{}", b.log()));
    let errors = coord.metric("shoal_request_errors_total") - errors_before;
    assert!(errors <= 4, "the coordinator refused {errors} requests for one 64-chunk file");
    a.stop(false);
    b.stop(false);
}

#[test]
fn a_pending_commit_whose_answer_was_lost_is_paid_or_withdrawn_after_a_restart() {
    let (_tmp, _coord, devices) = world("yrsa", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // A commits peer-first and dies before it records what it owes.
    limit_upload(&a, "256KiB");
    a.start_with_env(&[("FAILPOINTS", "crash-after-pending-commit=return")]);
    b.start();
    wait_for_peers(&[&a, &b]);
    a.write("f.bin", &noise(67, 2 * 1024 * 1024));
    wait_for(SETTLE, || a.log().contains("exiting right after a pending commit").then_some(()))
        .unwrap_or_else(|| panic!("A never committed peer-first:\n{}", a.log()));
    a.stop(true);
    b.stop(false);
    let v1 = wait_for(SETTLE, || pending_of(&a).into_iter().find(|v| v.path.as_str() == "f.bin"))
        .expect("the version is pending at the coordinator")
        .version;
    // The file changes while A is down, and A comes back with no peer: its first version can no
    // longer be uploaded, so it must be withdrawn, not left pending with nobody to pay for it.
    let v2 = noise(68, 2 * 1024 * 1024);
    a.write("f.bin", &v2);
    a.start();
    wait_for(SETTLE, || pending_of(&a).iter().all(|v| v.withdrawn).then_some(()))
        .unwrap_or_else(|| panic!("still pending: {:?}\n{}", pending_of(&a), a.log()));
    assert!(pending_of(&a).iter().any(|v| v.version == v1 && v.withdrawn), "{:?}", pending_of(&a));
    b.start();
    converge(&[&a, &b], SETTLE);
    assert_eq!(b.read("f.bin").as_deref(), Some(&v2[..]));
    a.stop(false);
    b.stop(false);
}

/// A version fetched over the LAN, then both devices stopped with SIGTERM: the stops finish the
/// uploads owed first. The author's uplink is too slow to finish within its grace, and it says so;
/// the device that fetched the version uploads it on its way out. A second SIGTERM stops a
/// device at once.
#[test]
fn a_graceful_stop_finishes_owed_uploads_first() {
    let (_tmp, _coord, devices) = world("wendy", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.configure(|c| c.shutdown_grace = std::time::Duration::from_secs(1));
    slow_author(&mut a, &mut b, "64KiB");
    let data = noise(66, 4 * 1024 * 1024);
    a.write("both.bin", &data);
    wait_until_has(&b, "both.bin", &data);
    let version = pending_of(&b)
        .into_iter()
        .find(|v| v.path.as_str() == "both.bin")
        .expect("the version was durable before the stops")
        .version;
    a.stop(false);
    assert!(a.log().contains("stopping with uploads still owed"), "{}", a.log());
    b.stop(false);
    assert_eq!(history_states(&a, "both.bin"), vec![(version, "durable".to_string())], "B's log:\n{}", b.log());

    // A second signal does not wait for the uploads.
    a.configure(|c| c.shutdown_grace = std::time::Duration::from_secs(120));
    a.start();
    b.start();
    wait_for_peers(&[&a, &b]);
    let more = noise(67, 4 * 1024 * 1024);
    a.write("more.bin", &more);
    wait_until_has(&b, "more.bin", &more);
    let started = std::time::Instant::now();
    a.stop_now();
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
    b.stop(false);
}

/// A version committed naming a chunk no device holds (a buggy or hostile device): once nobody
/// has sent any of it for the stuck period, status, history and /metrics say it is stuck and the
/// devices stop trying to fetch it; a user's edit of its file goes on top of it rather than into a
/// conflicted copy; revoking its author withdraws it.
#[test]
fn a_pending_version_nobody_can_supply_is_stuck_not_retried() {
    use shoal_protocol::api::CommitRequest;
    use shoal_protocol::{Change, ChunkId, ChunkRef, CommitId, EntryKind, Manifest};
    let tmp = test_dir();
    let coord = Coordinator::start_with(&tmp.path().join("coord"), &["--pending-stuck-after", "3s"]);
    let mut a = Device::enroll(tmp.path(), &coord, "zoe", "a");
    let mut b = Device::enroll(tmp.path(), &coord, "zoe", "b");
    let liar = Device::enroll(tmp.path(), &coord, "zoe", "liar");
    a.write("ghost.txt", b"original");
    a.start();
    b.start();
    converge(&[&a, &b], SETTLE);

    let path: shoal_protocol::SyncPath = "ghost.txt".parse().unwrap();
    let c = client_of(&liar);
    let base = block_on(c.history(&path)).unwrap().last().unwrap().version;
    let nobody = ChunkId::of(b"a chunk nobody has");
    let manifest = Manifest { size: 100, hash: ChunkId::of(b"whole"), chunks: vec![ChunkRef { id: nobody, len: 100 }] };
    let change = Change {
        path: path.clone(),
        kind: EntryKind::File,
        manifest: Some(manifest),
        exec: false,
        mtime_ns: 0,
        deleted: false,
        base: Some(base),
    };
    let req = CommitRequest { commit_id: CommitId([7; 16]), changes: vec![change], pending_ok: true };
    let ghost = block_on(c.commit(&req)).unwrap().entries[0].version;

    // Stuck: the devices' status, history and the metrics say so.
    let stuck_on = |d: &Device| daemon_status(d).pending_versions.iter().any(|p| p.version == ghost && p.stuck);
    wait_for(SETTLE, || (stuck_on(&a) && stuck_on(&b)).then_some(()))
        .unwrap_or_else(|| panic!("never shown as stuck: {:?}", daemon_status(&b)));
    assert_eq!(history_states(&b, "ghost.txt").last(), Some(&(ghost, "stuck".to_string())));
    assert_eq!(coord.metric("shoal_pending_stuck_versions"), 1);
    // Nobody keeps trying to fetch it, and both say they are in sync.
    let failed = |d: &Device| d.log().matches("download failed").count();
    let before = (failed(&a), failed(&b));
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert_eq!((failed(&a), failed(&b)), before, "still retried:\n{}", b.log());
    assert!(daemon_status(&a).in_sync && daemon_status(&b).in_sync, "{:?}", daemon_status(&b));

    // An edit of the file is committed on top of it: no conflicted copy.
    b.write("ghost.txt", b"edited on b");
    let t = converge(&[&a, &b], SETTLE);
    assert!(t.keys().all(|k| !k.contains("conflicted copy")), "{t:?}");
    assert_eq!(a.read("ghost.txt").unwrap(), b"edited on b");

    // Revoking its author withdraws it.
    let (ok, text) = coord.admin(&["device", "revoke", "zoe", "liar"]);
    assert!(ok, "{text}");
    assert!(
        history_states(&b, "ghost.txt").contains(&(ghost, "withdrawn".to_string())),
        "{:?}",
        history_states(&b, "ghost.txt")
    );
    a.stop(false);
    b.stop(false);
}

/// A device whose pending versions already await as many chunks as the coordinator keeps for it
/// is refused its next peer-first commit (`pending_limit`); it uploads first and commits after,
/// so its new file still arrives, durable.
#[test]
fn a_device_at_its_pending_limit_uploads_before_committing() {
    use shoal_protocol::api::CommitRequest;
    use shoal_protocol::{Change, ChunkId, ChunkRef, CommitId, EntryKind, Manifest};
    let (_tmp, _coord, devices) = world("zita", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // A's budget of awaited chunks, filled through the API with A's own token.
    let chunks: Vec<ChunkRef> =
        (0..131_072u64).map(|i| ChunkRef { id: ChunkId::of(&i.to_be_bytes()), len: 65_536 }).collect();
    let manifest = Manifest { size: 131_072 * 65_536, hash: ChunkId::of(b"filler"), chunks };
    let change = Change {
        path: "filler.bin".parse().unwrap(),
        kind: EntryKind::File,
        manifest: Some(manifest),
        exec: false,
        mtime_ns: 0,
        deleted: false,
        base: None,
    };
    let req = CommitRequest { commit_id: CommitId([9; 16]), changes: vec![change], pending_ok: true };
    block_on(client_of(&a).commit(&req)).unwrap();
    a.start();
    b.start();
    wait_for_peers(&[&a, &b]);
    let data = noise(69, 300_000);
    a.write("new.bin", &data);
    wait_until_has(&b, "new.bin", &data);
    assert!(a.log().contains("uploading before committing"), "{}", a.log());
    let states = history_states(&b, "new.bin");
    assert!(states.iter().all(|(_, s)| s == "durable"), "{states:?}");
    a.stop_now();
    b.stop_now();
}

/// A peer of the same user that sends a KiB every four seconds, never silent long enough to
/// count as stalled: once the origin holds the chunks it was asked for, a device that has seen
/// what the other sources deliver leaves it for the origin, and the file arrives in seconds.
#[test]
fn a_peer_far_slower_than_the_origin_is_left_for_the_origin() {
    let (_tmp, _coord, devices) = world("ulf", &["a", "b"]);
    let [mut a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    // B learns what the origin delivers: a file from it, with no peer about.
    let first = noise(72, 4 * 1024 * 1024);
    a.write("first.bin", &first);
    a.sync();
    b.start();
    wait_until_has(&b, "first.bin", &first);
    a.start_with_env(&[("FAILPOINTS", "peer-serve=return(slow)")]);
    wait_for_peers(&[&a, &b]);
    let data = noise(73, 2 * 1024 * 1024);
    let started = std::time::Instant::now();
    a.write("second.bin", &data);
    wait_for(std::time::Duration::from_secs(60), || (b.read("second.bin").as_deref() == Some(&data[..])).then_some(()))
        .unwrap_or_else(|| panic!("B never got the file:\n{}", b.log()));
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(45), "took {took:?}");
    assert!(b.log().contains("other sources deliver"), "{}", b.log());
    a.stop(false);
    b.stop(false);
}

/// A holds a 100 MiB file the origin has too; B and C start together after it was committed:
/// each gives its LAN peers a chance before the origin, and takes at least 98 % of the file's
/// bytes from them. The coordinator takes a second to name their peers (as over a slow link),
/// while the journal already lists the file.
#[test]
fn devices_that_start_together_take_what_their_peers_hold_from_them() {
    let (_tmp, _coord, devices) = world("vivi", &["a", "b", "c"]);
    let [mut a, mut b, mut c] = <[Device; 3]>::try_from(devices).ok().unwrap();
    a.start();
    let data = noise(74, 100 * 1024 * 1024);
    a.write("big.bin", &data);
    wait_for(SETTLE, || {
        let committed = a.remote_tree().contains_key("big.bin");
        (committed && daemon_status(&a).in_sync).then_some(())
    })
    .unwrap_or_else(|| panic!("A never committed the file:\n{}", a.log()));
    b.start_with_env(&[("FAILPOINTS", "announce-delay=return(1000)")]);
    c.start_with_env(&[("FAILPOINTS", "announce-delay=return(1000)")]);
    for d in [&b, &c] {
        wait_until_has(d, "big.bin", &data);
        let [_, peer, _, origin] = wait_for(SETTLE, || {
            let s = by_source(d);
            (s[1] + s[3] >= data.len() as u64).then_some(s)
        })
        .unwrap();
        assert!(peer * 100 >= (peer + origin) * 98, "{}: peer {peer}, origin {origin}", d.name);
    }
    for d in [&mut a, &mut b, &mut c] {
        d.stop(false);
    }
}
