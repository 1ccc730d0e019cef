//! The coordinator's side of relays, driven over its real HTTPS API: an operator adds relays and
//! gets their tokens; a relay registers and is listed to devices; devices get tickets only for
//! chunks they may read; a relay fetches its misses only with its token and a ticket that
//! covers them; a removed relay's token stops working.

use std::time::Duration;

use shoal_agent::client::Client;
use shoal_agent::config::Config;
use shoal_protocol::ChunkId;
use shoal_protocol::api::{RelayInfo, RelayRegistered, TicketResponse, decode_frame};

use crate::harness::*;

fn chunks_of(d: &Device, path: &str) -> Vec<ChunkId> {
    let client = Client::new(&Config::load(&d.home).unwrap()).unwrap();
    let (_, entries) = block_on(client.tree(None)).unwrap();
    let e = entries.into_iter().find(|e| e.path.as_str() == path).unwrap();
    e.manifest.unwrap().chunks.iter().map(|c| c.id).collect()
}

fn token_of(d: &Device) -> String {
    Config::load(&d.home).unwrap().token
}

/// `(status, body)` of a POST of `body` (JSON) with bearer `token`.
fn post(coord: &Coordinator, path: &str, token: &str, body: serde_json::Value) -> (u16, Vec<u8>) {
    let anon = coord.client();
    block_on(async {
        let resp = anon.request(reqwest::Method::POST, path).bearer_auth(token).json(&body).send().await.unwrap();
        (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
    })
}

#[test]
fn relays_register_and_fetch_only_what_a_device_ticket_covers() {
    let (tmp, coord, devices) = world("rita", &["a"]);
    let a = &devices[0];
    let data = random_bytes(300 * 1024, 41);
    a.write("photo.raw", &data);
    a.write("note.txt", b"a note");
    a.sync();
    let chunks = chunks_of(a, "photo.raw");
    let note = chunks_of(a, "note.txt");
    assert!(chunks.len() >= 2, "{chunks:?}");

    // Another user, with a file of its own.
    let other = Device::enroll(tmp.path(), &coord, "otto", "o");
    other.write("secret.txt", b"otto's own");
    other.sync();
    let secret = chunks_of(&other, "secret.txt");

    let (ok, out) = coord.admin(&["relay", "add", "sg1", "--region", "apac"]);
    assert!(ok, "{out}");
    let token = out.lines().last().unwrap().trim().to_string();
    let (ok, out) = coord.admin(&["relay", "add", "sg1", "--region", "apac"]);
    assert!(!ok && out.contains("already a relay"), "{out}");
    let (ok, out) = coord.admin(&["relay", "add", "Bad Name", "--region", "apac"]);
    assert!(!ok, "{out}");
    assert!(coord.admin(&["relay", "add", "eu1", "--region", "eu"]).0);

    // Registration: the token, and a url devices can reach.
    let fp = ChunkId::of(b"the relay's certificate");
    let reg = serde_json::json!({"url": "https://127.0.1.1:4443", "fingerprint": fp});
    assert_eq!(post(&coord, "/v1/relay/register", "not-a-token", reg.clone()).0, 401);
    assert_eq!(post(&coord, "/v1/relay/register", &token_of(a), reg.clone()).0, 401, "a device token is not a relay's");
    let bad_url = serde_json::json!({"url": "http://127.0.1.1:4443", "fingerprint": fp});
    assert_eq!(post(&coord, "/v1/relay/register", &token, bad_url).0, 400);
    let (status, body) = post(&coord, "/v1/relay/register", &token, reg);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let registered: RelayRegistered = serde_json::from_slice(&body).unwrap();
    assert_eq!((registered.name.as_str(), registered.region.as_str()), ("sg1", "apac"));
    assert_eq!(registered.ticket_key.len(), 64);

    // Devices see the live relay only (eu1 never registered).
    let anon = coord.client();
    let listed: Vec<RelayInfo> = block_on(async {
        let r = anon.request(reqwest::Method::GET, "/v1/relays").bearer_auth(token_of(a)).send().await.unwrap();
        r.json().await.unwrap()
    });
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].url.as_str(), listed[0].fingerprint), ("https://127.0.1.1:4443", fp));
    let (_, out) = coord.admin(&["relay", "list"]);
    assert!(out.contains("live at https://127.0.1.1:4443") && out.contains("not heard from"), "{out}");

    // Tickets: for the user's own chunks only.
    let ticket_for =
        |d: &Device, ids: &[ChunkId]| post(&coord, "/v1/tickets", &token_of(d), serde_json::json!({"chunks": ids}));
    assert_eq!(ticket_for(a, &secret).0, 404, "another user's chunk");
    assert_eq!(ticket_for(a, &[ChunkId::of(b"never stored")]).0, 404);
    assert_eq!(ticket_for(a, &[]).0, 400);
    let (status, body) = ticket_for(a, &chunks);
    assert_eq!(status, 200);
    let ticket: TicketResponse = serde_json::from_slice(&body).unwrap();

    // A relay fetches with its token and the ticket: the chunks' frames, verified.
    let fetch = |token: &str, ticket: &str, ids: &[ChunkId]| {
        post(&coord, "/v1/relay/fetch", token, serde_json::json!({"ticket": ticket, "chunks": ids}))
    };
    let (status, body) = fetch(&token, &ticket.ticket, &chunks);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let mut rest = &body[..];
    let mut got = Vec::new();
    while let Some((id, bytes, used)) = decode_frame(rest, u32::MAX).unwrap() {
        assert_eq!(ChunkId::of(bytes), id);
        got.extend_from_slice(bytes);
        rest = &rest[used..];
    }
    assert_eq!(got, data, "the file's chunks, in order");

    // Refused: a chunk the ticket does not cover (the user's own, even), a forged ticket, a
    // device token in place of the relay's, no token.
    assert_eq!(fetch(&token, &ticket.ticket, &note).0, 403);
    assert_eq!(fetch(&token, &ticket.ticket, &secret).0, 403);
    let mut forged = ticket.ticket.clone().into_bytes();
    let at = forged.len() / 3;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    assert_eq!(fetch(&token, &String::from_utf8(forged).unwrap(), &chunks).0, 403);
    assert_eq!(fetch(&token_of(a), &ticket.ticket, &chunks).0, 401);
    assert_eq!(fetch("", &ticket.ticket, &chunks).0, 401);

    // Removed: the token stops working, and devices are no longer offered it.
    let (ok, out) = coord.admin(&["relay", "remove", "sg1"]);
    assert!(ok, "{out}");
    assert_eq!(fetch(&token, &ticket.ticket, &chunks).0, 401);
    let listed: Vec<RelayInfo> = block_on(async {
        let r = anon.request(reqwest::Method::GET, "/v1/relays").bearer_auth(token_of(a)).send().await.unwrap();
        r.json().await.unwrap()
    });
    assert!(listed.is_empty(), "{listed:?}");
    let (ok, out) = coord.admin(&["relay", "remove", "sg1"]);
    assert!(!ok && out.contains("no relay"), "{out}");
}

/// Frames `body` back into chunks, checking each against its id.
fn unframe(body: &[u8]) -> Vec<(ChunkId, Vec<u8>)> {
    let mut rest = body;
    let mut out = Vec::new();
    while let Some((id, bytes, used)) = decode_frame(rest, u32::MAX).unwrap() {
        out.push((id, bytes.to_vec()));
        rest = &rest[used..];
    }
    assert!(rest.is_empty(), "a partial frame at the end");
    out
}

fn ticket(coord: &Coordinator, d: &Device, ids: &[ChunkId]) -> String {
    let (status, body) = post(coord, "/v1/tickets", &token_of(d), serde_json::json!({"chunks": ids}));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<TicketResponse>(&body).unwrap().ticket
}

/// `(status, body)` of a relay fetch.
fn via_relay(relay: &Relay, ticket: &str, ids: &[ChunkId]) -> (u16, Vec<u8>) {
    via_relay_listed(relay, ticket, None, ids)
}

/// `(status, body)` of a relay fetch carrying `list`, the chunk list a ticket by digest covers.
fn via_relay_listed(relay: &Relay, ticket: &str, list: Option<&[ChunkId]>, ids: &[ChunkId]) -> (u16, Vec<u8>) {
    let http = relay.http();
    let url = format!("{}/v1/chunks/fetch", relay.info.url);
    let mut req = serde_json::json!({"ticket": ticket, "chunks": ids});
    if let Some(list) = list {
        req["list"] = serde_json::json!(list);
    }
    block_on(async {
        let resp = http.post(url).json(&req).send().await.unwrap();
        (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
    })
}

#[test]
fn a_relay_serves_ticketed_chunks_from_its_cache_and_refuses_everything_else_alike() {
    let (tmp, coord, devices) = world("rosa", &["a"]);
    let a = &devices[0];
    let data = random_bytes(3 * 1024 * 1024, 50);
    a.write("big.bin", &data);
    a.write("other.bin", &random_bytes(200 * 1024, 61));
    a.sync();
    let ids = chunks_of(a, "big.bin");
    let other = chunks_of(a, "other.bin");
    let mut relay = Relay::start(&coord, "r1", "eu", "127.0.0.1", &tmp.path().join("r1"), "64MiB", &[]);
    let t = ticket(&coord, a, &ids);

    // First: every chunk a miss, fetched from the origin once; then every chunk a hit, and the
    // coordinator sends nothing more.
    let (status, body) = via_relay(&relay, &t, &ids);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let got = unframe(&body);
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    assert_eq!(got.iter().flat_map(|(_, b)| b.clone()).collect::<Vec<_>>(), data);
    let n = ids.len() as u64;
    assert_eq!(relay.metric("shoal_relay_cache_misses_total"), n);
    assert_eq!(relay.metric("shoal_relay_origin_bytes_total"), data.len() as u64);
    let origin_out = coord.metric("shoal_chunk_bytes_out_total");
    let (status, again) = via_relay(&relay, &t, &ids);
    assert_eq!((status, &again), (200, &body));
    assert_eq!(relay.metric("shoal_relay_cache_hits_total"), n);
    assert_eq!(relay.metric("shoal_relay_origin_bytes_total"), data.len() as u64);
    assert_eq!(coord.metric("shoal_chunk_bytes_out_total"), origin_out, "hits cost the origin nothing");
    assert_eq!(relay.metric("shoal_relay_bytes_served_total"), 2 * data.len() as u64);

    // One chunk by GET, its ticket in a header.
    let http = relay.http();
    let one = block_on(async {
        let r = http
            .get(format!("{}/v1/chunks/{}", relay.info.url, ids[1]))
            .header("x-shoal-ticket", &t)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
    });
    assert_eq!((one.0, ChunkId::of(&one.1)), (200, ids[1]));

    // Refusals: no ticket, a forged one, one for other chunks, one asking beyond its chunks.
    // A cached chunk (ids[0]) and an uncached one (other[0]) get the very same answer.
    let t_other = ticket(&coord, a, &other);
    let mut forged = t.clone().into_bytes();
    let at = forged.len() / 2;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let rejected = relay.metric("shoal_relay_rejected_tickets_total");
    let mut answers = Vec::new();
    for chunk in [ids[0], other[0]] {
        for ticket in ["", forged.as_str(), "not base64 at all!"] {
            answers.push(via_relay(&relay, ticket, &[chunk]));
        }
    }
    answers.push(via_relay(&relay, &t_other, &[ids[0]]));
    answers.push(via_relay(&relay, &t, &[other[0]]));
    answers.push(via_relay(&relay, &t, &[ids[0], other[0]]));
    let first = answers[0].clone();
    assert_eq!(first.0, 403);
    assert!(
        answers.iter().all(|a| *a == first),
        "{:?}",
        answers.iter().map(|(s, b)| (s, String::from_utf8_lossy(b))).collect::<Vec<_>>()
    );
    assert_eq!(relay.metric("shoal_relay_rejected_tickets_total"), rejected + answers.len() as u64);
    assert_eq!(relay.metric("shoal_relay_cache_misses_total"), n, "a refused request never reaches the origin");

    // Restarted, the relay keeps its cache.
    relay.restart();
    assert_eq!(via_relay(&relay, &t, &ids), (200, body.clone()));
    assert_eq!(relay.metric("shoal_relay_cache_hits_total"), n);
    assert_eq!(relay.metric("shoal_relay_origin_requests_total"), 0);

    // A tampered cache file: the bad chunk is not served; it comes from the origin again.
    relay.stop(false);
    let seg = std::fs::read_dir(tmp.path().join("r1").join("segments")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&seg).unwrap();
    let pos = bytes.windows(32).position(|w| w == ids[2].as_bytes()).unwrap() + 36 + 1000;
    bytes[pos] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    relay.restart();
    assert_eq!(via_relay(&relay, &t, &ids), (200, body));
    assert_eq!(relay.metric("shoal_relay_corrupt_chunks_total"), 1);
    assert_eq!(relay.metric("shoal_relay_cache_misses_total"), 1);
    assert_eq!(relay.metric("shoal_relay_origin_requests_total"), 1);
}

#[test]
fn concurrent_misses_make_one_origin_fetch_and_the_cache_keeps_its_bound() {
    let (tmp, coord, devices) = world("sara", &["a"]);
    let a = &devices[0];
    let data = random_bytes(12 * 1024 * 1024, 44);
    a.write("big.bin", &data);
    a.sync();
    let ids = chunks_of(a, "big.bin");
    let relay = Relay::start(&coord, "r2", "eu", "127.0.0.1", &tmp.path().join("r2"), "4MiB", &[]);
    let t = ticket(&coord, a, &ids[..1]);

    // 100 requests at once for one chunk the relay does not have: one origin fetch.
    let http = relay.http();
    let url = format!("{}/v1/chunks/fetch", relay.info.url);
    let answers = block_on(async {
        let asks = (0..100).map(|_| {
            let req = http.post(&url).json(&serde_json::json!({"ticket": t, "chunks": [ids[0]]}));
            async move {
                let r = req.send().await.unwrap();
                (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
            }
        });
        futures::future::join_all(asks).await
    });
    assert!(answers.iter().all(|(s, b)| *s == 200 && unframe(b)[0].0 == ids[0]));
    assert_eq!(relay.metric("shoal_relay_origin_requests_total"), 1, "{}", relay.log());

    // 12 MiB through a 4 MiB cache: segments are evicted and the disk stays within the bound.
    let t = ticket(&coord, a, &ids);
    assert!(ids.len() > 64, "a ticket by digest");
    assert_eq!(via_relay(&relay, &t, &ids).0, 403, "without the list the digest names");
    let (status, body) = via_relay_listed(&relay, &t, Some(&ids), &ids);
    assert_eq!(status, 200);
    assert_eq!(unframe(&body).into_iter().flat_map(|(_, b)| b).collect::<Vec<_>>(), data);
    assert!(relay.metric("shoal_relay_evictions_total") > 0);
    let disk: u64 = std::fs::read_dir(tmp.path().join("r2").join("segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096) * 4096)
        .sum();
    assert!(disk <= 4 * 1024 * 1024, "{disk} bytes of segments");
    assert!(relay.metric("shoal_relay_cache_bytes") <= 4 * 1024 * 1024);
}

/// A device of `user` in `region`, leaving from `bind`, with LAN sync off: the coordinator sees
/// it on a network of its own, and it gets nothing from a peer.
fn regional(base: &std::path::Path, coord: &Coordinator, user: &str, name: &str, bind: &str, region: &str) -> Device {
    let d = Device::enroll(base, coord, user, name);
    d.configure(|c| {
        c.bind = Some(bind.parse().unwrap());
        c.region = Some(region.to_string());
        c.lan_sync = false;
    });
    d
}

fn wait_for_file(d: &Device, path: &str, data: &[u8]) {
    wait_for(SETTLE, || (d.read(path).as_deref() == Some(data)).then_some(()))
        .unwrap_or_else(|| panic!("{} never got {path}:\n{}", d.name, d.log()));
}

#[test]
fn devices_in_a_region_download_through_its_relay_and_the_second_from_its_cache() {
    let tmp = test_dir();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let eu = Relay::start(&coord, "eu1", "eu", "127.0.0.1", &tmp.path().join("eu1"), "256MiB", &[]);
    let _apac = Relay::start(&coord, "apac1", "apac", "127.0.0.1", &tmp.path().join("apac1"), "256MiB", &[]);
    let author = Device::enroll(tmp.path(), &coord, "una", "author");
    author.configure(|c| c.relays = false);
    let data = noise(81, 4 * 1024 * 1024);
    author.write("video.mp4", &data);
    author.sync();
    let n = chunks_of(&author, "video.mp4").len() as u64;

    // The first device of the region fills the relay from the origin.
    let mut b = regional(tmp.path(), &coord, "una", "b", "127.0.1.1", "eu");
    b.start();
    wait_for_file(&b, "video.mp4", &data);
    let s = by_source(&b);
    assert_eq!(s[2], data.len() as u64, "B's bytes by source {s:?}:\n{}", b.log());
    assert_eq!(daemon_status(&b).relay.map(|r| r.name).unwrap_or_default(), "eu1", "the region's relay, not the other");
    assert_eq!(eu.metric("shoal_relay_cache_misses_total"), n);
    assert_eq!(eu.metric("shoal_relay_origin_bytes_total"), data.len() as u64);

    // The second is served from the relay's cache: no more bytes from the origin.
    let out_before = coord.metric("shoal_chunk_bytes_out_total");
    let mut c = regional(tmp.path(), &coord, "una", "c", "127.0.2.1", "eu");
    c.start();
    wait_for_file(&c, "video.mp4", &data);
    let s = by_source(&c);
    assert_eq!((s[2], s[3]), (data.len() as u64, 0), "C's bytes by source {s:?}");
    assert_eq!(eu.metric("shoal_relay_cache_hits_total"), n);
    assert_eq!(eu.metric("shoal_relay_origin_bytes_total"), data.len() as u64);
    assert_eq!(coord.metric("shoal_chunk_bytes_out_total"), out_before, "the origin sent C nothing");
    let text = String::from_utf8(c.shoal(&["status"]).stdout).unwrap();
    assert!(text.contains("relay:   eu1"), "{text}");
    b.stop(false);
    c.stop(false);
}

#[test]
fn a_relay_serving_wrong_bytes_or_killed_mid_download_leaves_the_origin_to_finish() {
    let tmp = test_dir();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let bad = Relay::start(
        &coord,
        "bad",
        "eu",
        "127.0.0.1",
        &tmp.path().join("bad"),
        "64MiB",
        &[("FAILPOINTS", "relay-serve=return(corrupt)")],
    );
    let author = Device::enroll(tmp.path(), &coord, "vera", "author");
    author.configure(|c| c.relays = false);
    let data = noise(82, 2 * 1024 * 1024);
    author.write("a.bin", &data);
    author.sync();

    // Wrong bytes: rejected, the relay dropped for good, the file from the origin.
    let mut b = regional(tmp.path(), &coord, "vera", "b", "127.0.1.1", "eu");
    b.start();
    wait_for_file(&b, "a.bin", &data);
    let s = by_source(&b);
    assert_eq!((s[2], s[3]), (0, data.len() as u64), "B's bytes by source {s:?}");
    assert!(b.log().contains("served wrong bytes"), "{}", b.log());
    assert!(bad.metric("shoal_relay_bytes_served_total") > 0, "the relay did serve (bad) bytes");
    b.stop(false);
    drop(bad);
    assert!(coord.admin(&["relay", "remove", "bad"]).0);

    // Killed part-way through a download held to 1 MiB/s: the origin finishes it.
    let mut good = Relay::start(&coord, "good", "eu", "127.0.0.1", &tmp.path().join("good"), "64MiB", &[]);
    let big = noise(83, 6 * 1024 * 1024);
    author.write("b.bin", &big);
    author.sync();
    let mut c = regional(tmp.path(), &coord, "vera", "c", "127.0.2.1", "eu");
    c.configure(|cfg| cfg.download_limit = Some(shoal_agent::limit::Rate::parse("1MiB").unwrap()));
    c.start();
    wait_for(SETTLE, || (good.metric("shoal_relay_bytes_served_total") > 0).then_some(()))
        .unwrap_or_else(|| panic!("C never fetched through the relay:\n{}", c.log()));
    good.stop(true);
    wait_for_file(&c, "b.bin", &big);
    wait_for_file(&c, "a.bin", &data);
    let s = by_source(&c);
    assert!(s[2] > 0 && s[3] > 0 && s[2] + s[3] >= big.len() as u64, "C's bytes by source {s:?}");
    c.stop(false);
}

#[test]
fn a_device_with_no_region_uses_a_relay_that_answers_and_another_once_it_dies() {
    let tmp = test_dir();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let mut relays = [
        Relay::start(&coord, "eu1", "eu", "127.0.0.1", &tmp.path().join("eu1"), "64MiB", &[]),
        Relay::start(&coord, "us1", "us", "127.0.0.1", &tmp.path().join("us1"), "64MiB", &[]),
    ];
    let author = Device::enroll(tmp.path(), &coord, "wes", "author");
    author.configure(|c| c.relays = false);
    let first = noise(84, 1024 * 1024);
    author.write("first.bin", &first);
    author.sync();

    let mut d = Device::enroll(tmp.path(), &coord, "wes", "d");
    d.configure(|c| {
        c.bind = Some("127.0.1.1".parse().unwrap());
        c.lan_sync = false;
        c.region = None;
    });
    d.start();
    wait_for_file(&d, "first.bin", &first);
    assert_eq!(by_source(&d)[2], first.len() as u64, "D's bytes by source:\n{}", d.log());
    let chosen = daemon_status(&d).relay.map(|r| r.name).unwrap_or_default();
    let (dead, other) = if chosen == "eu1" { (0, 1) } else { (1, 0) };
    relays[dead].stop(true);

    // The dead relay stays listed (its heartbeat has not lapsed): the next files still arrive,
    // from the origin while the dead relay fails, then through the one that answers.
    for (i, seed) in [85u64, 86].into_iter().enumerate() {
        let data = noise(seed, 1024 * 1024);
        author.write(&format!("next{i}.bin"), &data);
        author.sync();
        wait_for_file(&d, &format!("next{i}.bin"), &data);
    }
    let other_name = if other == 0 { "eu1" } else { "us1" };
    wait_for(SETTLE, || (daemon_status(&d).relay.is_some_and(|r| r.name == other_name)).then_some(()))
        .unwrap_or_else(|| panic!("D never moved to {other_name}:\n{}", d.log()));
    assert!(relays[other].metric("shoal_relay_bytes_served_total") > 0, "{other_name} served nothing");
    d.stop(false);
}

#[test]
fn a_relay_started_while_its_coordinator_is_down_comes_up_with_it_and_a_bad_token_stays_fatal() {
    let tmp = test_dir();
    let mut coord = Coordinator::start(&tmp.path().join("coord"));
    let mut relay = Relay::start(&coord, "eu1", "eu", "127.0.0.1", &tmp.path().join("eu1"), "64MiB", &[]);
    relay.stop(false);
    coord.stop(false);

    relay.respawn();
    std::thread::sleep(Duration::from_secs(3));
    assert!(relay.running(), "the relay gave up while the coordinator was down:\n{}", relay.log());
    assert!(relay.wait_ready(Duration::from_millis(100)).is_err(), "served before it had registered");
    coord.restart(false);
    relay.wait_ready(SETTLE).unwrap_or_else(|e| panic!("{e}"));

    // It serves: a device of the region downloads through it.
    let author = Device::enroll(tmp.path(), &coord, "ines", "author");
    author.configure(|c| c.relays = false);
    let data = noise(91, 512 * 1024);
    author.write("a.bin", &data);
    author.sync();
    let mut d = regional(tmp.path(), &coord, "ines", "d", "127.0.1.1", "eu");
    d.start();
    wait_for_file(&d, "a.bin", &data);
    // The counts are in the status the daemon writes at the end of its cycle.
    wait_for(SETTLE, || (by_source(&d)[2] == data.len() as u64).then_some(()))
        .unwrap_or_else(|| panic!("D's bytes by source {:?}:\n{}", by_source(&d), d.log()));
    d.stop(false);

    // A token the coordinator refuses is not waited out: the relay exits with the reason.
    relay.stop(false);
    let (ok, out) = coord.admin(&["relay", "remove", "eu1"]);
    assert!(ok, "{out}");
    relay.respawn();
    wait_for(SETTLE, || (!relay.running()).then_some(()))
        .unwrap_or_else(|| panic!("the relay kept going with a removed token:\n{}", relay.log()));
    assert!(relay.log().contains("registering:"), "{}", relay.log());
}
