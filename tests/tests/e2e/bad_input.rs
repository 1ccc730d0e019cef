//! Bad input gets a JSON error with a stable code and changes nothing: malformed JSON, oversized
//! bodies, missing or bad tokens, another user's chunks and paths, invalid paths, unknown chunks,
//! stale bases, hash mismatches, used invites and revoked devices.

use reqwest::Method;
use serde_json::{Value, json};
use shoal_agent::client::Client;
use shoal_agent::config::Config;

use crate::harness::*;

/// Sends a request and returns (status, JSON body).
async fn call(rb: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = rb.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn check(got: (u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["code"], code, "{got:?}");
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()), "errors carry a message");
}

async fn head(c: &Client) -> u64 {
    c.changes(0, 1, std::time::Duration::ZERO).await.unwrap().head
}

#[test]
fn every_bad_input_is_refused_without_changing_state() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let alice = Device::enroll(tmp.path(), &coord, "alice", "a");
    let bob = Device::enroll(tmp.path(), &coord, "bob", "b");
    alice.write("secret.txt", b"alice's secret");
    alice.sync();
    block_on(async {
        let a = client_of(&alice);
        let b = client_of(&bob);
        let start = head(&a).await;
        let secret_entry = a.history(&"secret.txt".parse().unwrap()).await.unwrap().pop().unwrap();
        let secret_chunk = secret_entry.manifest.as_ref().unwrap().chunks[0].id;
        let commit = |changes: Value| json!({"commit_id": "00112233445566778899aabbccddeeff", "changes": changes});

        // Malformed JSON and unknown fields.
        check(call(a.request(Method::POST, "/v1/commit").body("{not json")).await, 400, "invalid_json");
        check(
            call(a.request(Method::POST, "/v1/chunks/missing").json(&json!({"chunks": [], "extra": 1}))).await,
            400,
            "invalid_json",
        );
        // Oversized bodies.
        check(
            call(a.request(Method::POST, "/v1/chunks").body(vec![0u8; 17 * 1024 * 1024])).await,
            413,
            "body_too_large",
        );
        // Missing and bad tokens.
        let anon = coord.client();
        check(call(anon.request(Method::GET, "/v1/tree")).await, 401, "unauthorized");
        check(call(anon.request(Method::GET, "/v1/tree").bearer_auth("not-a-token")).await, 401, "unauthorized");
        // Another user's chunk: not readable, not revealed, not committable.
        check(call(b.request(Method::GET, &format!("/v1/chunks/{secret_chunk}"))).await, 404, "not_found");
        assert_eq!(b.missing(&[secret_chunk]).await.unwrap(), vec![secret_chunk], "missing is answered per user");
        let steal =
            commit(json!([{"path": "stolen.txt", "kind": "file", "manifest": secret_entry.manifest, "base": null}]));
        check(call(b.request(Method::POST, "/v1/commit").json(&steal)).await, 422, "unknown_chunk");
        let fetch = json!({"chunks": [secret_chunk]});
        check(call(b.request(Method::POST, "/v1/chunks/fetch").json(&fetch)).await, 404, "not_found");
        // Another user's path: invisible.
        assert!(b.history(&"secret.txt".parse().unwrap()).await.unwrap().is_empty());
        assert!(b.tree(None).await.unwrap().1.is_empty());
        // Invalid paths.
        let evil = commit(json!([{"path": "../../etc/passwd", "kind": "dir", "base": null}]));
        check(call(a.request(Method::POST, "/v1/commit").json(&evil)).await, 400, "invalid_path");
        let reserved = commit(json!([{"path": ".shoal/tmp/x", "kind": "dir", "base": null}]));
        check(call(a.request(Method::POST, "/v1/commit").json(&reserved)).await, 400, "invalid_path");
        check(call(a.request(Method::GET, "/v1/history?path=/abs")).await, 400, "invalid_path");
        // Unknown chunk.
        let unknown = shoal_protocol::ChunkId::of(b"never uploaded");
        let m = json!({"size": 14, "hash": unknown, "chunks": [{"id": unknown, "len": 14}]});
        let c = commit(json!([{"path": "u.txt", "kind": "file", "manifest": m, "base": null}]));
        check(call(a.request(Method::POST, "/v1/commit").json(&c)).await, 422, "unknown_chunk");
        // Inconsistent manifest.
        let m = json!({"size": 99, "hash": secret_chunk, "chunks": [{"id": secret_chunk, "len": 14}]});
        let c = commit(json!([{"path": "m.txt", "kind": "file", "manifest": m, "base": null}]));
        check(call(a.request(Method::POST, "/v1/commit").json(&c)).await, 400, "invalid_manifest");
        // Stale base: the refusal carries the current head.
        let c = commit(json!([{"path": "secret.txt", "kind": "dir", "base": null}]));
        let got = call(a.request(Method::POST, "/v1/commit").json(&c)).await;
        assert_eq!(got.1["conflicts"][0]["head"]["version"], secret_entry.version, "{got:?}");
        check(got, 409, "stale_base");
        // Nothing may live under a file.
        let under = commit(json!([{"path": "secret.txt/inside", "kind": "dir", "base": null}]));
        check(call(a.request(Method::POST, "/v1/commit").json(&under)).await, 409, "conflict");
        // Hash mismatch on upload.
        let mut frame = Vec::new();
        shoal_protocol::api::encode_frame(&mut frame, &unknown, b"other bytes");
        check(call(a.request(Method::POST, "/v1/chunks").body(frame)).await, 400, "hash_mismatch");
        check(call(a.request(Method::PUT, &format!("/v1/chunks/{unknown}")).body("x")).await, 400, "hash_mismatch");
        // Duplicate paths in one commit, empty commits, bad query strings, unknown endpoints.
        let dup =
            commit(json!([{"path": "d", "kind": "dir", "base": null}, {"path": "d", "kind": "dir", "base": null}]));
        check(call(a.request(Method::POST, "/v1/commit").json(&dup)).await, 400, "bad_request");
        check(call(a.request(Method::POST, "/v1/commit").json(&commit(json!([])))).await, 400, "bad_request");
        check(call(a.request(Method::GET, "/v1/changes?since=banana")).await, 400, "bad_request");
        check(call(a.request(Method::GET, "/v1/nope")).await, 404, "not_found");
        // A used invite cannot enroll again.
        let invite: shoal_protocol::api::Invite = coord.invite("alice").parse().unwrap();
        let (_, csr) = shoal_sys::identity::device_request().unwrap();
        let garbage = json!({"user": "alice", "secret": invite.secret, "device_name": "x", "csr": "garbage"});
        check(call(anon.request(Method::POST, "/v1/enroll").json(&garbage)).await, 400, "bad_request");
        let enroll = json!({"user": "alice", "secret": invite.secret, "device_name": "x", "csr": csr});
        assert_eq!(call(anon.request(Method::POST, "/v1/enroll").json(&enroll)).await.0, 200);
        check(call(anon.request(Method::POST, "/v1/enroll").json(&enroll)).await, 403, "invite_invalid");
        let wrong_user = json!({"user": "bob", "secret": coord.invite("alice").split("secret=").nth(1).unwrap()[..32].to_string(), "device_name": "x", "csr": csr});
        check(call(anon.request(Method::POST, "/v1/enroll").json(&wrong_user)).await, 403, "invite_invalid");

        assert_eq!(head(&a).await, start, "no refused request changed the journal");
        assert_eq!(head(&b).await, 0);

        // A user's last active device cannot revoke itself (that would lock the user out); the
        // operator can, and a revoked device is locked out.
        let me = Config::load(&bob.home).unwrap().device_id;
        check(
            call(b.request(Method::POST, &format!("/v1/devices/{me}/revoke")).json(&json!({}))).await,
            403,
            "forbidden",
        );
        assert_eq!(call(b.request(Method::GET, "/v1/tree")).await.0, 200, "still active");
        let (ok, text) = coord.admin(&["device", "revoke", "bob", "b"]);
        assert!(ok, "{text}");
        check(call(b.request(Method::GET, "/v1/tree")).await, 401, "unauthorized");
    });
    assert!(alice.remote_tree().contains_key("secret.txt"));
    alice.sync();
    converge(&[&alice], std::time::Duration::from_secs(5));
}

/// A config file with a key the coordinator does not know, or a value it cannot use, stops it
/// before it touches the data directory, with the file, the line and the key in one message.
#[test]
fn a_bad_coordinator_config_file_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |text: &str| {
        let cfg = dir.path().join("coordinator.toml");
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new(bin("shoal-coordinator"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let base = format!("data = {:?}\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\n", data.display().to_string());
    let (ok, err) = run(&format!("{base}pending_stuck_afterr = \"5m\"\n"));
    assert!(!ok);
    assert!(
        err.contains("coordinator.toml") && err.contains("line 4") && err.contains("pending_stuck_afterr"),
        "{err}"
    );
    let (ok, err) = run(&format!("{base}pending_stuck_after = \"a while\"\n"));
    assert!(!ok);
    assert!(err.contains("pending_stuck_after = \"a while\""), "{err}");
    assert!(!data.exists(), "a refused config changes nothing");
}
