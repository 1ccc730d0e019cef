//! The coordinator attacked as an attacker or a careless operator would: revocation races, file
//! permissions, connection floods, oversized unauthenticated bodies, unbounded responses, one user
//! stalling others, corrupt chunks, crashes that lose a pack, and early visibility of commits.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use shoal_agent::client::Client;
use shoal_agent::config::Config;
use shoal_protocol::api::{CommitRequest, encode_frame};
use shoal_protocol::{Change, ChunkId, ChunkRef, CommitId, EntryKind, Manifest, SyncPath};

use crate::harness::*;

fn random_commit_id() -> CommitId {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    CommitId(b)
}

fn dir_change(path: &str) -> Change {
    Change {
        path: SyncPath::parse(path).unwrap(),
        kind: EntryKind::Dir,
        manifest: None,
        exec: false,
        mtime_ns: 0,
        deleted: false,
        base: None,
    }
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn revocation_is_never_undone_by_requests_in_flight() {
    let names = ["keeper", "v1", "v2", "v3", "v4", "v5", "v6"];
    let (_tmp, _coord, devices) = world("rita", &names);
    let keeper = client_of(&devices[0]);
    for victim in &devices[1..] {
        let cfg = Config::load(&victim.home).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // Eight threads keep reporting the victim's cursor while another device revokes it.
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cfg, stop) = (cfg.clone(), stop.clone());
                std::thread::spawn(move || {
                    let c = Client::new(&cfg).unwrap();
                    block_on(async {
                        while !stop.load(Ordering::Relaxed) {
                            let _ = c.report_cursor(0).await;
                        }
                    })
                })
            })
            .collect();
        // One more report whose token is checked before the revocation and whose body only
        // arrives after it has returned: the widest a request in flight can straddle it.
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let straddler = {
            let c = Client::new(&cfg).unwrap();
            std::thread::spawn(move || {
                block_on(async {
                    let body = futures::stream::once(async move {
                        let _ = held.await;
                        Ok::<_, std::io::Error>(br#"{"seq":0}"#.to_vec())
                    });
                    let _ = c
                        .request(Method::POST, "/v1/cursor")
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(reqwest::Body::wrap_stream(body))
                        .send()
                        .await;
                })
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        // A device may revoke itself (it is not the user's last).
        block_on(Client::new(&cfg).unwrap().revoke(cfg.device_id)).unwrap();
        let _ = release.send(());
        straddler.join().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let c = Client::new(&cfg).unwrap();
        let err = block_on(c.tree(None)).expect_err("a revoked device reads nothing");
        assert_eq!(err.code(), Some(shoal_protocol::api::ErrorCode::Unauthorized), "{err}");
        let list = block_on(keeper.devices()).unwrap();
        assert!(list.iter().find(|d| d.id == cfg.device_id).unwrap().revoked, "{}: listed as not revoked", victim.name);
    }
}

#[test]
fn data_directory_is_private_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("coord");
    // Started under umask 000, everything it creates is still for its own account only.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" serve --data \"$1\" --listen 127.0.0.1:0 --metrics-listen off"])
        .arg(bin("shoal-coordinator"))
        .arg(&data)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(30), || data.join("server.json").exists().then_some(())).expect("coordinator started");
    for sub in ["", "meta", "chunks", "tls"] {
        assert_eq!(mode(&data.join(sub)), 0o700, "{sub}/");
    }
    for file in ["tls/key.der", "server.json", "admin.sock"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    signal(&child, "TERM");
    child.wait().unwrap();

    // A data directory other users can write to is refused, with a message saying what to do.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(bin("shoal-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success(), "started on a world-writable data directory");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by other users") && err.contains("chmod 700"), "{err}");
}

/// A TLS client that trusts `coord`'s certificate, as a device does: enough to play a
/// misbehaving client.
fn raw_tls(coord: &Coordinator) -> tokio_rustls::TlsConnector {
    let cert = std::fs::read(coord.data.join("tls/cert.der")).unwrap();
    let cfg = shoal_net::pinned::client_config(shoal_protocol::ChunkId::of(&cert)).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

#[test]
fn half_open_connections_cannot_exhaust_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let addr: std::net::SocketAddr = coord.addr.parse().unwrap();
    /// More than one address may hold (`MAX_CONNECTIONS_PER_ADDR`).
    const FLOOD: usize = 300;
    block_on(async {
        let connector = raw_tls(&coord);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..FLOOD {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            match tokio::time::timeout(Duration::from_secs(5), connector.connect(name.clone(), tcp)).await {
                Ok(Ok(mut tls)) => {
                    // Half a request, never finished.
                    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
                    tls.flush().await.unwrap();
                    held.push(tls);
                }
                _ => refused += 1,
            }
        }
        assert!(held.len() <= shoal_net::listener::MAX_CONNECTIONS_PER_ADDR, "{} held", held.len());
        assert!(refused >= FLOOD - shoal_net::listener::MAX_CONNECTIONS_PER_ADDR);

        // Meanwhile a client from another address is served at once.
        let other = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .local_address(Some("127.0.0.2".parse().unwrap()))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let started = Instant::now();
        let resp = other.get(format!("https://{addr}/healthz")).send().await.expect("healthz answered");
        assert_eq!(resp.text().await.unwrap().trim(), "ok");
        assert!(started.elapsed() < Duration::from_secs(5), "healthz took {:?}", started.elapsed());

        // The half-finished requests are closed once the header deadline passes.
        let deadline = shoal_net::listener::HEADER_READ_TIMEOUT + Duration::from_secs(5);
        for mut tls in held {
            let mut buf = [0u8; 256];
            let r = tokio::time::timeout(deadline, tls.read(&mut buf)).await;
            assert!(r.is_ok(), "a half-open connection stayed open past the header deadline");
        }
    });
    assert!(coord.metric("shoal_connections_refused_total") >= (FLOOD - 256) as u64);
}

#[test]
fn unauthenticated_bodies_and_responses_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let alice = Device::enroll(tmp.path(), &coord, "alice", "a");
    let anon = coord.client();
    block_on(async {
        // A large enrollment body is refused before it is read, declared or chunked: a moderately
        // large one with a 413, a huge one possibly by closing the connection mid-upload.
        let resp = anon.request(Method::POST, "/v1/enroll").body(vec![b' '; 40 * 1024]).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 413);
        let refused = |r: Result<reqwest::Response, reqwest::Error>| r.map_or(true, |r| r.status().as_u16() == 413);
        let huge = anon.request(Method::POST, "/v1/enroll").body(vec![b' '; 8 * 1024 * 1024]).send().await;
        assert!(refused(huge));
        let stream = futures::stream::iter((0..128).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
        let chunked = anon.request(Method::POST, "/v1/enroll").body(reqwest::Body::wrap_stream(stream)).send().await;
        assert!(refused(chunked));
    });

    // Enrollment answers the same whether or not the user exists (no user enumeration).
    let invite: shoal_protocol::api::Invite = coord.invite("alice").parse().unwrap();
    block_on(async {
        let enroll = |user: &str, secret: &str| json!({"user": user, "secret": secret, "device_name": "x", "csr": "not a certificate request"});
        let bogus = "0".repeat(32);
        let mut answers = Vec::new();
        for body in [enroll("alice", &bogus), enroll("nobody", &bogus)] {
            let resp = anon.request(Method::POST, "/v1/enroll").json(&body).send().await.unwrap();
            answers.push((resp.status().as_u16(), resp.json::<Value>().await.unwrap()));
        }
        assert_eq!(answers[0], answers[1]);
        assert_eq!(answers[0].0, 403);
        // With a valid invite, the bad certificate request is what is refused.
        let resp =
            anon.request(Method::POST, "/v1/enroll").json(&enroll("alice", &invite.secret)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 400);
    });

    // Responses are paged by bytes: commits of large manifests (many references to one chunk,
    // the way a file of repeated content dedups) come back one per page, not all at once.
    let a = client_of(&alice);
    let chunk = vec![7u8; shoal_protocol::CHUNK_PARAMS.min];
    let id = ChunkId::of(&chunk);
    let refs = 100_000;
    block_on(async {
        let mut frames = Vec::new();
        encode_frame(&mut frames, &id, &chunk);
        a.upload_frames(frames).await.unwrap();
        let manifest = Manifest {
            size: (refs * chunk.len()) as u64,
            hash: ChunkId::of(b"whole file hash is not checked by the server"),
            chunks: vec![ChunkRef { id, len: chunk.len() as u32 }; refs],
        };
        for i in 0..3 {
            let change = Change {
                kind: EntryKind::File,
                manifest: Some(manifest.clone()),
                ..dir_change(&format!("big{i}.bin"))
            };
            a.commit(&CommitRequest { commit_id: random_commit_id(), changes: vec![change], pending_ok: false })
                .await
                .unwrap();
        }
        let resp = a.request(Method::GET, "/v1/changes?since=0&limit=3").send().await.unwrap();
        let body = resp.bytes().await.unwrap();
        let page: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(page["entries"].as_array().unwrap().len(), 1, "one large entry per page");
        assert!(body.len() < 16 * 1024 * 1024, "page of {} bytes", body.len());
        // Three versions of one path, read two at a time.
        let mut base = None;
        for deleted in [false, true, false] {
            let change = Change { deleted, base, ..dir_change("h") };
            let resp = a
                .commit(&CommitRequest { commit_id: random_commit_id(), changes: vec![change], pending_ok: false })
                .await
                .unwrap();
            base = Some(resp.entries[0].version);
        }
        let page: Value =
            a.request(Method::GET, "/v1/history?path=h&limit=2").send().await.unwrap().json().await.unwrap();
        assert_eq!(page["entries"].as_array().unwrap().len(), 2);
        let after = page["more_after"].as_u64().expect("more versions follow");
        let url = format!("/v1/history?path=h&limit=2&after={after}");
        let page: Value = a.request(Method::GET, &url).send().await.unwrap().json().await.unwrap();
        assert_eq!(page["entries"].as_array().unwrap().len(), 1);
        assert!(page["more_after"].is_null());
        // The client reads every page.
        assert_eq!(a.history(&SyncPath::parse("h").unwrap()).await.unwrap().len(), 3);
    });
}

#[test]
fn one_users_huge_commit_does_not_stall_another_user() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let heavy = Device::enroll(tmp.path(), &coord, "heavy", "h");
    let light = Device::enroll(tmp.path(), &coord, "light", "l");
    let (h, l) = (client_of(&heavy), client_of(&light));
    // A chain 240 directories deep, then the most directories one commit may hold at its bottom.
    let chain: Vec<String> = (1..=240).map(|d| vec!["n"; d].join("/")).collect();
    block_on(async {
        let changes: Vec<Change> = chain.iter().map(|p| dir_change(p)).collect();
        h.commit(&CommitRequest { commit_id: random_commit_id(), changes, pending_ok: false }).await.unwrap();
    });
    let bottom = chain.last().unwrap().clone();
    let n = shoal_protocol::api::MAX_COMMIT_CHANGES;
    let changes: Vec<Change> = (0..n).map(|i| dir_change(&format!("{bottom}/x{i}"))).collect();
    let big = CommitRequest { commit_id: random_commit_id(), changes, pending_ok: false };
    let done = Arc::new(AtomicBool::new(false));
    let heavy_thread = {
        let done = done.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            block_on(h.commit(&big)).unwrap();
            done.store(true, Ordering::Relaxed);
            started.elapsed()
        })
    };
    let mut worst = Duration::ZERO;
    let mut n = 0;
    block_on(async {
        while !done.load(Ordering::Relaxed) || n < 3 {
            let started = Instant::now();
            let c = dir_change(&format!("l{n}"));
            l.commit(&CommitRequest { commit_id: random_commit_id(), changes: vec![c], pending_ok: false })
                .await
                .unwrap();
            worst = worst.max(started.elapsed());
            n += 1;
        }
    });
    let heavy_took = heavy_thread.join().unwrap();
    assert!(
        worst < Duration::from_millis(2000),
        "another user's commit took {worst:?} while the large commit ran ({heavy_took:?})"
    );
    // Paths deeper than the bound are refused outright.
    let too_deep = vec!["n"; shoal_protocol::path::MAX_DEPTH + 1].join("/");
    assert!(SyncPath::parse(&too_deep).is_err());
}

/// Flips one byte of chunk `id` in the coordinator's packs (found by scanning for its frame).
fn corrupt_chunk(data: &std::path::Path, id: &ChunkId) {
    use std::os::unix::fs::FileExt;
    for e in std::fs::read_dir(data.join("chunks")).unwrap() {
        let path = e.unwrap().path();
        let mut bytes = Vec::new();
        std::fs::File::open(&path).unwrap().read_to_end(&mut bytes).unwrap();
        if let Some(at) = bytes.windows(32).position(|w| w == id.as_bytes()) {
            let pos = (at + 36) as u64;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[bytes[at + 36] ^ 0xff], pos).unwrap();
            f.sync_all().unwrap();
            return;
        }
    }
    panic!("chunk {id} not found in any pack");
}

#[test]
fn a_corrupt_chunk_is_never_served_and_a_correct_upload_repairs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let a = Device::enroll(tmp.path(), &coord, "carl", "a");
    let victim = b"these bytes will rot on the server".to_vec();
    a.write("victim.txt", &victim);
    for i in 0..20 {
        a.write(&format!("small/{i}.txt"), format!("file {i}").as_bytes());
    }
    a.sync();
    let id = ChunkId::of(&victim);
    corrupt_chunk(&coord.data, &id);

    let ac = client_of(&a);
    let err = block_on(ac.fetch_one(id)).expect_err("corrupt bytes are not served");
    assert_eq!(err.code(), Some(shoal_protocol::api::ErrorCode::ChunkUnavailable), "{err}");
    assert!(coord.metric("shoal_chunks_corrupt_total") >= 1);
    // Quarantined: the coordinator asks for it again.
    assert_eq!(block_on(ac.missing(&[id])).unwrap(), vec![id]);

    // A new device never gets wrong bytes on disk.
    let b = Device::enroll(tmp.path(), &coord, "carl", "b");
    let _ = b.shoal(&["sync", "--once"]);
    assert!(b.read("victim.txt").is_none(), "a file whose chunk is unavailable was installed");
    for i in 0..20 {
        assert!(b.read(&format!("small/{i}.txt")).is_some(), "small/{i}.txt did not arrive");
    }

    // A device that holds the content uploads it again (here: `put` of the same bytes), which
    // repairs the store; then everyone converges.
    let copy = tmp.path().join("victim-copy");
    std::fs::write(&copy, &victim).unwrap();
    let out = a.shoal(&["put", copy.to_str().unwrap(), "victim-again.txt"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(block_on(ac.fetch_one(id)).unwrap().as_ref(), &victim[..]);
    let tree = sync_all(&[&a, &b]);
    assert_eq!(b.read("victim.txt").unwrap(), victim);
    assert_eq!(tree.len(), 23);
}

#[test]
fn a_pack_lost_in_a_crash_never_lends_its_number_to_other_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::start(&tmp.path().join("coord"));
    let a = Device::enroll(tmp.path(), &coord, "paula", "a");
    let c = client_of(&a);
    let (first, second) = (vec![1u8; 4000], vec![2u8; 4000]);
    let (x, y) = (ChunkId::of(&first), ChunkId::of(&second));
    let upload = |data: &[u8]| {
        let mut frames = Vec::new();
        encode_frame(&mut frames, &ChunkId::of(data), data);
        block_on(c.upload_frames(frames)).unwrap();
    };
    upload(&first);
    // Let sled's background flush persist the index entry, then crash and lose the newest pack.
    std::thread::sleep(Duration::from_millis(1500));
    coord.stop(true);
    let newest = std::fs::read_dir(coord.data.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .max()
        .unwrap();
    std::fs::remove_file(newest).unwrap();
    coord.restart(false);
    upload(&second);
    let c = client_of(&a);
    assert_eq!(block_on(c.missing(&[x, y])).unwrap(), vec![x], "the lost chunk is asked for again");
    let change = Change {
        kind: EntryKind::File,
        manifest: Some(Manifest { size: 4000, hash: x, chunks: vec![ChunkRef { id: x, len: 4000 }] }),
        ..dir_change("lost.bin")
    };
    let err =
        block_on(c.commit(&CommitRequest { commit_id: random_commit_id(), changes: vec![change], pending_ok: false }))
            .expect_err("a commit naming the lost chunk is refused");
    assert_eq!(err.code(), Some(shoal_protocol::api::ErrorCode::UnknownChunk));
    assert!(block_on(c.fetch_one(x)).is_err(), "the lost chunk never reads as other bytes");
    assert_eq!(block_on(c.fetch_one(y)).unwrap().as_ref(), &second[..]);
}

#[test]
fn nobody_sees_an_entry_before_its_writer_is_acknowledged() {
    let (tmp, _coord, devices) = world("vera", &["writer", "reader"]);
    let (w, r) = (client_of(&devices[0]), client_of(&devices[1]));
    // Dirty page cache on the coordinator's file system makes each commit's sync take a while,
    // which widens the window in which an entry is stored but not yet durable.
    let junk = tmp.path().join("junk");
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let reader = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            block_on(async {
                let mut since = 0;
                while !stop.load(Ordering::Relaxed) {
                    let page = r.changes(since, 100, Duration::ZERO).await.unwrap();
                    let now = Instant::now();
                    for e in &page.entries {
                        seen.lock().unwrap().push((e.version, now));
                    }
                    since = page.next;
                }
            })
        })
    };
    let mut acked = Vec::new();
    for i in 0..6 {
        std::fs::write(&junk, vec![i as u8; 96 * 1024 * 1024]).unwrap();
        let resp = block_on(w.commit(&CommitRequest {
            commit_id: random_commit_id(),
            changes: vec![dir_change(&format!("d{i}"))],
            pending_ok: false,
        }))
        .unwrap();
        acked.push((resp.entries[0].version, Instant::now()));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let seen = seen.lock().unwrap();
    for (seq, ack) in acked {
        let (_, when) = seen.iter().find(|(s, _)| *s == seq).expect("the reader saw every entry");
        // The reader may hear of it a moment before the writer's acknowledgement arrives (the
        // margin absorbs a busy machine's scheduling), never while the commit is still being
        // made durable (before this change: 131 ms early with half the dirty data).
        assert!(
            *when + Duration::from_millis(100) >= ack,
            "entry {seq} was served {:?} before its commit was acknowledged",
            ack - *when
        );
    }
}

#[test]
fn revoking_a_device_ends_its_subscription_and_long_polls() {
    let (_tmp, coord, devices) = world("sam", &["keeper", "lost"]);
    let lost = client_of(&devices[1]);
    let lost_id = Config::load(&devices[1].home).unwrap().device_id;
    block_on(async {
        let mut sub = lost.subscribe().await.unwrap();
        assert!(sub.next_head().await.is_some(), "the subscription starts with the head");
        let poll = lost.changes(0, 10, Duration::from_secs(30));
        let revoke = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            lost.revoke(lost_id).await.unwrap();
        };
        let started = Instant::now();
        let (polled, ()) = tokio::join!(poll, revoke);
        let err = polled.expect_err("a revoked device's long-poll ends");
        assert_eq!(err.code(), Some(shoal_protocol::api::ErrorCode::Unauthorized), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10), "the long-poll ran on for {:?}", started.elapsed());
        let closed = tokio::time::timeout(Duration::from_secs(10), sub.next_head()).await;
        assert_eq!(closed.expect("the subscription was closed"), None);
    });
    // The operator's view: listed as revoked.
    let out = std::process::Command::new(bin("shoal-coordinator"))
        .args(["device", "list", "sam", "--data"])
        .arg(&coord.data)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.lines().any(|l| l.contains(&lost_id.to_string()) && l.contains("revoked")), "{list}");
}

#[test]
fn operators_revoke_devices_and_invites_expire() {
    let (tmp, coord, devices) = world("olga", &["laptop", "phone"]);
    let admin = |args: &[&str]| {
        let out = std::process::Command::new(bin("shoal-coordinator"))
            .args(args)
            .arg("--data")
            .arg(&coord.data)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Revoke by name while the server runs: the device's token stops working at once.
    let (ok, text) = admin(&["device", "revoke", "olga", "phone"]);
    assert!(ok, "{text}");
    let err = block_on(client_of(&devices[1]).tree(None)).expect_err("a revoked device reads nothing");
    assert_eq!(err.code(), Some(shoal_protocol::api::ErrorCode::Unauthorized));
    assert!(block_on(client_of(&devices[0]).tree(None)).is_ok(), "the other device is untouched");
    let (ok, text) = admin(&["device", "revoke", "olga", "tablet"]);
    assert!(!ok && text.contains("no device"), "{text}");

    // An invite past its expiry enrolls nothing, and says so like any other refusal.
    let (ok, text) = admin(&["user", "invite", "olga", "--expires", "1s"]);
    assert!(ok, "{text}");
    let invite = text.lines().find(|l| l.starts_with("shoal://")).unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1500));
    let out = std::process::Command::new(bin("shoal"))
        .arg("--home")
        .arg(tmp.path().join("late-home"))
        .args(["init", "--invite", &invite, "--dir"])
        .arg(tmp.path().join("late"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "an expired invite enrolled a device");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired"), "{err}");
}

/// One device, stolen or buggy, cannot lock its user out: alone it revokes only itself, and never
/// the user's last active device; revoking another device takes a second one; the coordinator's
/// log names who revoked whom; the operator reinstates a device revoked by mistake.
#[test]
fn one_device_cannot_lock_its_user_out() {
    let (_tmp, coord, devices) = world("zed", &["a", "b", "c"]);
    let [a, b, c] = <[Device; 3]>::try_from(devices).ok().unwrap();
    let id = |d: &Device| Config::load(&d.home).unwrap().device_id.to_string();
    let works = |d: &Device| block_on(client_of(d).tree(None)).is_ok();
    let revoke = |by: &Device, which: &str| {
        let out = by.shoal(&["devices", "--revoke", which]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };

    // A alone asks, twice, to revoke each other device: both keep working, and the others see
    // the requests.
    for _ in 0..2 {
        for t in [&b, &c] {
            let (ok, text) = revoke(&a, &id(t));
            assert!(ok && text.contains("A second device must confirm"), "{text}");
        }
    }
    assert!(works(&b) && works(&c), "one device revoked another on its own");
    let list = String::from_utf8_lossy(&c.shoal(&["devices"]).stdout).into_owned();
    assert!(list.contains("revocation asked for by a ("), "{list}");

    // B confirms A's request to revoke C (naming it): C is out, and the log says who did it.
    let (ok, text) = revoke(&b, "c");
    assert!(ok && text.contains("revoked c ("), "{text}");
    assert!(!works(&c) && works(&a) && works(&b));
    let logged = coord.log();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("device revoked") && l.contains(&id(&c)) && l.contains(&id(&a)) && l.contains(&id(&b))),
        "the log does not name who revoked c:\n{logged}"
    );

    // A revokes itself; B, now the user's last active device, cannot.
    let (ok, text) = revoke(&a, &id(&a));
    assert!(ok && text.contains("revoked this device"), "{text}");
    assert!(!works(&a));
    let (ok, text) = revoke(&b, &id(&b));
    assert!(!ok && text.contains("last active device"), "{text}");
    assert!(works(&b), "the user still has a device");

    // The operator reinstates A and C, which sync again.
    let (ok, text) = coord.admin(&["device", "reinstate", "zed", "a"]);
    assert!(ok, "{text}");
    let (ok, text) = coord.admin(&["device", "reinstate", "zed", &id(&c)]);
    assert!(ok, "{text}");
    let (ok, text) = coord.admin(&["device", "reinstate", "zed", "b"]);
    assert!(!ok && text.contains("not revoked"), "{text}");
    assert!(works(&a) && works(&c));
    assert!(coord.log().contains("device reinstated"));
    a.write("back.txt", b"reinstated");
    sync_all(&[&a, &b, &c]);
    assert_eq!(c.read("back.txt").unwrap(), b"reinstated");
}

/// Device names cannot hold characters that reorder or hide text: they are shown to people and
/// become part of conflicted copies' names.
#[test]
fn device_names_cannot_reorder_text() {
    let tmp = test_dir();
    let coord = Coordinator::start(&tmp.path().join("coord"));
    let invite = coord.invite("yan");
    let out = std::process::Command::new(bin("shoal"))
        .arg("--home")
        .arg(tmp.path().join("home"))
        .args(["init", "--invite", &invite, "--device", "lap\u{202e}pot", "--dir"])
        .arg(tmp.path().join("folder"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a name with a right-to-left override was enrolled");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("device name"), "{err}");
}

/// A device cannot make the coordinator hold ever more pending versions: past its limit of
/// chunks awaited, a commit with `pending_ok` is refused with `pending_limit` (HTTP 429) and
/// changes nothing.
#[test]
fn pending_versions_are_capped_with_a_clear_error() {
    use shoal_protocol::api::{CommitRequest, ErrorCode};
    use shoal_protocol::{Change, ChunkId, ChunkRef, CommitId, EntryKind, Manifest};
    let (_tmp, coord, devices) = world("yuri", &["a"]);
    let c = client_of(&devices[0]);
    let commit = |name: &str, seed: u64, n: u64| {
        let chunks: Vec<ChunkRef> = (0..n)
            .map(|i| ChunkRef { id: ChunkId::of(&[seed.to_be_bytes(), i.to_be_bytes()].concat()), len: 65_536 })
            .collect();
        let manifest = Manifest { size: n * 65_536, hash: ChunkId::of(name.as_bytes()), chunks };
        let change = Change {
            path: name.parse().unwrap(),
            kind: EntryKind::File,
            manifest: Some(manifest),
            exec: false,
            mtime_ns: 0,
            deleted: false,
            base: None,
        };
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&seed.to_be_bytes());
        block_on(c.commit(&CommitRequest { commit_id: CommitId(id), changes: vec![change], pending_ok: true }))
    };
    // 200,000 chunks nobody uploaded: more than one device may make the coordinator wait for.
    let err = commit("huge.bin", 1, 200_000).expect_err("a commit past the limit was accepted");
    assert_eq!(err.code(), Some(ErrorCode::PendingLimit), "{err}");
    assert!(err.to_string().contains("upload the chunks first"), "{err}");
    // Under it, accepted; then the next one is over.
    commit("big.bin", 2, 100_000).unwrap();
    let err = commit("more.bin", 3, 40_000).expect_err("the device's limit was not kept");
    assert_eq!(err.code(), Some(ErrorCode::PendingLimit), "{err}");
    assert_eq!(coord.metric("shoal_pending_versions"), 1, "refused commits added nothing");
}
