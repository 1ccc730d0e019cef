//! The coordinator's side of relays, driven over its real HTTPS API: an operator adds relays and
//! gets their tokens; a relay registers and is listed to devices; devices get tickets only for
//! chunks they may read; a relay fetches its misses only with its token and a ticket that
//! covers them; a removed relay's token stops working.

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
