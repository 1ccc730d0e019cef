//! The coordinator's notification paths and operator endpoints, driven directly: long-poll
//! changes, the WebSocket push subscription, `/healthz`, `/metrics` and `shoal status`.

use std::time::{Duration, Instant};

use shoal_agent::client::Client;
use shoal_agent::config::Config;

use crate::harness::*;

#[test]
fn long_poll_and_push_wake_up_on_commits() {
    let (_tmp, coord, devices) = world("ida", &["a", "b"]);
    let [a, mut b] = <[Device; 2]>::try_from(devices).ok().unwrap();
    a.write("one.txt", b"1");
    a.sync();
    let client = Client::new(&Config::load(&b.home).unwrap()).unwrap();
    block_on(async {
        let head = client.changes(0, 10, Duration::ZERO).await.unwrap().head;
        assert!(head >= 1);
        let mut sub = client.subscribe().await.unwrap();
        assert_eq!(sub.next_head().await, Some(head), "the subscription starts with the current head");

        // A long-poll from the head waits, then returns the new entry as soon as it is committed.
        let started = Instant::now();
        let poll = client.changes(head, 10, Duration::from_secs(20));
        let (file, mut sync) = (a.path("two.txt"), a.cmd());
        let commit = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(file, b"2").unwrap();
            assert!(sync.args(["sync", "--once"]).status().unwrap().success());
        });
        let (page, done) = tokio::join!(poll, commit);
        done.unwrap();
        let page = page.unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "long-poll returned on the commit");
        assert!(started.elapsed() >= Duration::from_millis(250), "long-poll waited for it");
        assert_eq!(page.entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), ["two.txt"]);
        assert_eq!(page.next, page.head);

        // The push subscription saw the head move.
        let pushed = tokio::time::timeout(Duration::from_secs(10), sub.next_head()).await.unwrap();
        assert_eq!(pushed, Some(page.head));
        // An empty long-poll with no wait returns at once.
        let empty = client.changes(page.head, 10, Duration::ZERO).await.unwrap();
        assert!(empty.entries.is_empty() && empty.next == page.head);
    });

    // Operator endpoints.
    let anon = coord.client();
    let health = block_on(async { anon.request(reqwest::Method::GET, "/healthz").send().await.unwrap().text().await });
    assert_eq!(health.unwrap().trim(), "ok");
    assert!(coord.metric("shoal_commits_total") >= 2);
    // Metrics describe every user's activity: not served on the public listener.
    let public = block_on(async { anon.request(reqwest::Method::GET, "/metrics").send().await.unwrap().status() });
    assert_eq!(public, reqwest::StatusCode::NOT_FOUND);
    assert!(coord.metric("shoal_users") == 1);

    // `shoal status` reports a running, in-sync daemon.
    b.start();
    converge(&[&a, &b], SETTLE);
    let st = wait_for(SETTLE, || {
        let out = b.shoal(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["daemon_running"] == true && v["status"]["in_sync"] == true).then_some(v)
    })
    .expect("status shows the daemon in sync");
    assert_eq!(st["status"]["pending_uploads"], 0);
    b.stop(false);
    let out = b.shoal(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon_running"], false);
}

#[test]
fn an_upload_of_thousands_of_tiny_files_keeps_to_the_coordinators_batch_limit() {
    // More tiny chunks than one upload request may carry, though their bytes fit in one: owed
    // uploads of many small files are sent like this, all at once.
    let (tmp, _coord, devices) = world("ines", &["a"]);
    let n = shoal_protocol::api::MAX_CHUNK_IDS + 600;
    let dir = tmp.path().join("tiny");
    std::fs::create_dir(&dir).unwrap();
    let chunker = shoal_protocol::Chunker::default();
    let files: Vec<(std::path::PathBuf, shoal_protocol::Manifest)> = (0..n)
        .map(|i| {
            let (path, data) = (dir.join(format!("{i}")), format!("tiny file number {i}"));
            std::fs::write(&path, &data).unwrap();
            (path, chunker.manifest(data.as_bytes()).unwrap())
        })
        .collect();
    let ids: Vec<shoal_protocol::ChunkId> = files.iter().map(|(_, m)| m.chunks[0].id).collect();
    let client = client_of(&devices[0]);
    block_on(async {
        let missing = client.missing(&ids).await.unwrap().into_iter().collect();
        let counter = std::sync::atomic::AtomicU64::new(0);
        shoal_agent::transfer::upload_chunks(&client, files, missing, None, &counter).await.unwrap();
        assert_eq!(client.missing(&ids).await.unwrap(), vec![], "some chunks never reached the coordinator");
    });
}
