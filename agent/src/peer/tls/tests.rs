//! Real quinn endpoints on loopback running the introduction (`peer::intro`), with certificates
//! made with the coordinator's own parameters (`shoal_net::ca`).

use std::net::SocketAddr;
use std::time::Duration;

use rcgen::KeyPair;
use shoal_net::ca::UserCa as Ca;
use shoal_protocol::api::{DeviceInfo, LanKey, LanKeys};

use super::*;
use crate::peer::intro::{self, Introduced};

const DAY: Duration = Duration::from_secs(86_400);

pub(crate) fn user_ca(name: &str) -> Ca {
    shoal_net::ca::new_user_ca(name).unwrap()
}

/// A device of `ca`'s user (valid from yesterday for `days`, which may be negative: expired),
/// or self-signed when `ca` is `None`. Returns its identity (trusting `trust`'s CA) and its
/// roster entry.
pub(crate) fn device(ca: Option<&Ca>, trust: &Ca, days: i64) -> (Identity, DeviceInfo) {
    let ((key, cert, ca_cert), info) = device_parts(ca, trust, days);
    (Identity::from_der(key, cert, ca_cert).unwrap(), info)
}

/// The DER of a device's key, its certificate and the CA it trusts.
pub(crate) type Parts = (Vec<u8>, Vec<u8>, Vec<u8>);

/// `device`, as the DER of its key, certificate and trusted CA (to make its identity again).
pub(crate) fn device_parts(ca: Option<&Ca>, trust: &Ca, days: i64) -> (Parts, DeviceInfo) {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).unwrap();
    let id = DeviceId(id);
    let now = std::time::SystemTime::now();
    let start = now - DAY * 2;
    let end = if days >= 0 { now + DAY * days as u32 } else { now - DAY * days.unsigned_abs() as u32 / 2 };
    let key = KeyPair::generate().unwrap();
    let params = shoal_net::ca::device_params(&id, start..end).unwrap();
    let cert = match ca {
        Some(ca) => params.signed_by(&key, &shoal_net::ca::issuer(ca).unwrap()).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    let info = DeviceInfo {
        id,
        name: "d".into(),
        enrolled_ms: 0,
        last_seen_ms: 0,
        cursor: 0,
        revoked: false,
        cert_fingerprint: ChunkId::of(cert.der()),
        revoke_requested: None,
    };
    ((key.serialize_der(), cert.der().to_vec(), trust.cert.clone()), info)
}

/// A user's LAN keys, as the coordinator hands them out.
pub(crate) fn lan(seed: u8) -> LanKeys {
    LanKeys { current: LanKey::new([seed; 32]), previous: None, previous_until_ms: 0 }
}

/// A roster listing `devices`, with LAN keys `keys`.
pub(crate) fn roster(devices: &[&DeviceInfo], keys: LanKeys) -> Roster {
    let r = Roster::default();
    r.replace(devices.iter().map(|d| (*d).clone()).collect(), Some(keys));
    r
}

/// A called device on loopback: each connection is introduced, and the outcome sent back on
/// `told`.
async fn called(
    identity: Identity,
    roster: Roster,
) -> (quinn::Endpoint, SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Result<Introduced, String>>) {
    let ep = quinn::Endpoint::server(identity.server_config().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let accepting = ep.clone();
    let identity = std::sync::Arc::new(identity);
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            let (roster, tx, identity) = (roster.clone(), tx.clone(), identity.clone());
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let r = intro::as_called(&conn, &identity, &roster, [2; 16]).await.map_err(|e| e.to_string());
                let admitted = r.is_ok();
                let _ = tx.send(r);
                if admitted {
                    let _ = conn.closed().await;
                }
            });
        }
    });
    (ep, addr, rx)
}

/// Calls `addr` as `identity` expecting `to` (if given): the introduction's outcome.
async fn call(
    identity: &Identity,
    roster: &Roster,
    addr: SocketAddr,
    to: Option<DeviceId>,
) -> Result<Introduced, String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(identity.client_config().unwrap());
    let exchange = async {
        let conn = ep.connect(addr, SERVER_NAME).map_err(|e| format!("{e:?}"))?.await.map_err(|e| format!("{e:?}"))?;
        let r = intro::as_caller(&conn, identity, roster, [1; 16], to).await.map_err(|e| e.to_string());
        conn.close(0u32.into(), b"done");
        r
    };
    let out = tokio::time::timeout(Duration::from_secs(10), exchange).await.unwrap_or_else(|_| Err("timed out".into()));
    ep.wait_idle().await;
    out
}

#[tokio::test]
async fn only_this_users_listed_unrevoked_devices_are_admitted() {
    let ca = user_ca("alice");
    let keys = lan(7);
    let (server, server_info) = device(Some(&ca), &ca, 365);
    let (laptop, laptop_info) = device(Some(&ca), &ca, 365);
    let server_roster = roster(&[&server_info, &laptop_info], keys);
    let (_ep, addr, mut told) = called(server, server_roster.clone()).await;

    // A device of the same user, listed: each side knows the other by its id.
    let laptop_roster = roster(&[&server_info, &laptop_info], keys);
    let met = call(&laptop, &laptop_roster, addr, Some(server_info.id)).await.unwrap();
    assert_eq!((met.device, met.session), (server_info.id, [2; 16]));
    let seen = told.recv().await.unwrap().unwrap();
    assert_eq!((seen.device, seen.session, seen.fingerprint), (laptop_info.id, [1; 16], laptop_info.cert_fingerprint));

    // Another user's device, with its own LAN key: refused before the server says who it is.
    let bob = user_ca("bob");
    let (mallory, mallory_info) = device(Some(&bob), &bob, 365);
    let r = call(&mallory, &roster(&[&mallory_info], lan(9)), addr, None).await;
    assert!(r.is_err(), "{r:?}");
    assert!(told.recv().await.unwrap().unwrap_err().contains("does not hold the user's LAN key"));

    // Whoever holds the LAN key but not a certificate of the user's CA, or an expired one, or
    // one the coordinator does not list, or a revoked device: refused.
    let (forged, forged_info) = device(None, &ca, 365);
    let (bobs, bobs_info) = device(Some(&bob), &ca, 365);
    let (old, old_info) = device(Some(&ca), &ca, -1);
    let (unlisted, unlisted_info) = device(Some(&ca), &ca, 365);
    server_roster.replace(
        vec![server_info.clone(), laptop_info.clone(), old_info.clone(), forged_info.clone(), bobs_info.clone()],
        Some(keys),
    );
    for (who, info, why) in [
        (&forged, &forged_info, "not a valid one from the user's CA"),
        (&bobs, &bobs_info, "not a valid one from the user's CA"),
        (&old, &old_info, "not a valid one from the user's CA"),
        (&unlisted, &unlisted_info, "not one the coordinator lists"),
    ] {
        let r = call(who, &roster(&[&server_info, info], keys), addr, Some(server_info.id)).await;
        assert!(r.is_err(), "{r:?}");
        let refusal = told.recv().await.unwrap().unwrap_err();
        assert!(refusal.contains(why), "{refusal}");
    }

    // Revoked: refused from the next roster on, without a restart.
    let mut revoked = laptop_info.clone();
    revoked.revoked = true;
    server_roster.replace(vec![server_info.clone(), revoked], None);
    assert!(call(&laptop, &laptop_roster, addr, Some(server_info.id)).await.is_err());
    assert!(told.recv().await.unwrap().unwrap_err().contains("revoked"));

    // After a rotation, the previous LAN key still counts for a while, and then no longer.
    let far = shoal_sys::clock::now_ms() + 600_000;
    let rotated = LanKeys { current: LanKey::new([8; 32]), previous: Some(keys.current), previous_until_ms: far };
    server_roster.replace(vec![server_info.clone(), laptop_info.clone()], Some(rotated));
    assert!(call(&laptop, &laptop_roster, addr, Some(server_info.id)).await.is_ok());
    assert!(told.recv().await.unwrap().is_ok());
    server_roster
        .replace(vec![server_info.clone(), laptop_info.clone()], Some(LanKeys { previous_until_ms: 1, ..rotated }));
    assert!(call(&laptop, &laptop_roster, addr, Some(server_info.id)).await.is_err());
    assert!(told.recv().await.unwrap().unwrap_err().contains("does not hold the user's LAN key"));
}

#[tokio::test]
async fn a_caller_only_accepts_the_device_it_dialled_and_one_of_its_user() {
    let ca = user_ca("alice");
    let keys = lan(7);
    let (server, server_info) = device(Some(&ca), &ca, 365);
    let (laptop, laptop_info) = device(Some(&ca), &ca, 365);
    let (_ep, addr, _told) = called(server, roster(&[&server_info, &laptop_info], keys)).await;
    let mine = roster(&[&server_info, &laptop_info], keys);
    assert!(call(&laptop, &mine, addr, Some(server_info.id)).await.is_ok());
    // The server is alice's, but not the device the laptop meant to reach.
    let err = call(&laptop, &mine, addr, Some(laptop_info.id)).await.unwrap_err();
    assert!(err.contains("is ") && err.contains("not"), "{err}");
    // A server the laptop's roster does not list (another user's, holding this user's LAN key
    // somehow): refused before the laptop says who it is.
    let bob = user_ca("bob");
    let (bobs, bobs_info) = device(Some(&bob), &bob, 365);
    let (_ep2, addr2, _told2) = called(bobs, roster(&[&bobs_info], keys)).await;
    let err = call(&laptop, &mine, addr2, None).await.unwrap_err();
    assert!(err.contains("not a valid one from the user's CA"), "{err}");
}

/// A stranger who connects to a device learns nothing that identifies it or its user: the
/// certificate in the TLS handshake is a throwaway naming nobody, and with a wrong LAN proof the
/// connection closes without a byte of introduction. And a stranger a device calls receives a
/// proof bound to that connection, nothing else.
#[tokio::test]
async fn strangers_learn_nothing_identifying() {
    let ca = user_ca("alice-the-user");
    let keys = lan(7);
    let (server, server_info) = device(Some(&ca), &ca, 365);
    let device_cert = server.cert().to_vec();
    let (laptop, laptop_info) = device(Some(&ca), &ca, 365);
    let (_ep, addr, mut told) = called(server, roster(&[&server_info, &laptop_info], keys)).await;

    // The stranger's client takes any certificate, as the agent's does.
    let (stranger, _) = device(None, &ca, 365);
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(stranger.client_config().unwrap());
    let conn = ep.connect(addr, SERVER_NAME).unwrap().await.unwrap();
    let presented = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .expect("a certificate in the handshake");
    let der = presented[0].as_ref().to_vec();
    assert_ne!(der, device_cert, "the device certificate was shown to a stranger");
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    for secret in [server_info.id.to_string().as_bytes(), &server_info.id.0[..], b"alice-the-user", b"Shoal user"] {
        assert!(!contains(&der, secret), "the handshake's certificate carries {:?}", String::from_utf8_lossy(secret));
    }
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&shoal_protocol::peer::frame_intro(&[0u8; 32]).unwrap()).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut b = [0u8; 64];
        while let Ok(Some(n)) = recv.read(&mut b).await {
            buf.extend_from_slice(&b[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the device kept the connection open");
    assert!(buf.is_empty(), "the device answered a stranger with {} bytes", buf.len());
    assert!(told.recv().await.unwrap().is_err());
    conn.close(0u32.into(), b"");
    ep.wait_idle().await;

    // A stranger posing as a device the laptop calls receives 34 bytes (a length and a keyed
    // hash bound to its own connection) and then nothing: no certificate, no device id.
    let (imposter, _) = device(None, &ca, 365);
    let ep = quinn::Endpoint::server(imposter.server_config().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let at = ep.local_addr().unwrap();
    let listening = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 64];
        // Answer the proof with junk, as a stranger would, then keep reading.
        let n = recv.read(&mut b).await.unwrap().unwrap_or(0);
        got.extend_from_slice(&b[..n]);
        let _ = send.write_all(&shoal_protocol::peer::frame_intro(&[1; 40]).unwrap()).await;
        while let Ok(Some(n)) = recv.read(&mut b).await {
            got.extend_from_slice(&b[..n]);
        }
        got
    });
    let r = call(&laptop, &roster(&[&server_info, &laptop_info], keys), at, None).await;
    assert!(matches!(r, Err(ref e) if e.contains("malformed") || e.contains("refused")), "{r:?}");
    let got = listening.await.unwrap();
    assert_eq!(got.len(), 34, "the caller sent more than its proof: {got:?}");
}

#[test]
fn authorize_checks_the_exact_certificate() {
    let ca = user_ca("alice");
    let (_, info) = device(Some(&ca), &ca, 365);
    let roster = Roster::default();
    let cert = [1u8, 2, 3];
    assert_eq!(roster.authorize_cert(&cert), Err(Refusal::UnknownCertificate));
    let mut listed = info.clone();
    listed.cert_fingerprint = ChunkId::of(&[1, 2, 3]);
    roster.replace(vec![listed.clone()], None);
    assert_eq!(roster.authorize_cert(&cert), Ok(info.id));
    listed.revoked = true;
    roster.replace(vec![listed], None);
    assert_eq!(roster.authorize_cert(&cert), Err(Refusal::Revoked(info.id)));
}

#[test]
fn the_saved_roster_keeps_the_lan_keys_and_reads_the_old_form() {
    let ca = user_ca("alice");
    let (_, info) = device(Some(&ca), &ca, 365);
    let home = tempfile::tempdir().unwrap();
    roster(&[&info], lan(3)).save(home.path()).unwrap();
    let back = Roster::load(home.path()).unwrap();
    assert_eq!((back.devices().len(), back.lan()), (1, Some(lan(3))));
    // Earlier releases saved the device list alone.
    std::fs::write(home.path().join(ROSTER_FILE), serde_json::to_vec(&vec![info.clone()]).unwrap()).unwrap();
    let old = Roster::load(home.path()).unwrap();
    assert_eq!((old.devices().len(), old.lan()), (1, None));
}
