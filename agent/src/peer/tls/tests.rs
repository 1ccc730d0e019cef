//! Real quinn endpoints on loopback, with certificates made here with the same parameters as the
//! coordinator's (`coordinator/src/ca.rs`), which the agent cannot link.

use std::net::SocketAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use shoal_protocol::api::DeviceInfo;

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

/// A user's CA: its certificate and key, both DER.
pub(crate) struct Ca {
    cert: Vec<u8>,
    key: Vec<u8>,
}

pub(crate) fn user_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Shoal user {name} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    Ca { cert: cert.der().to_vec(), key: key.serialize_der() }
}

fn device_params(id: &DeviceId, valid: std::ops::Range<std::time::SystemTime>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, server_name(id));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(server_name(id).try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = valid.start.into();
    params.not_after = valid.end.into();
    params
}

/// A device of `ca`'s user (valid from yesterday for `days`, which may be negative: expired),
/// or self-signed when `ca` is `None`. Returns its identity (trusting `trust`'s CA) and its
/// roster entry.
pub(crate) fn device(ca: Option<&Ca>, trust: &Ca, days: i64) -> (Identity, DeviceInfo) {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).unwrap();
    let id = DeviceId(id);
    let now = std::time::SystemTime::now();
    let start = now - DAY * 2;
    let end = if days >= 0 { now + DAY * days as u32 } else { now - DAY * days.unsigned_abs() as u32 / 2 };
    let key = KeyPair::generate().unwrap();
    let params = device_params(&id, start..end);
    let cert = match ca {
        Some(ca) => {
            let issuer =
                Issuer::from_ca_cert_der(&ca.cert.clone().into(), KeyPair::try_from(ca.key.as_slice()).unwrap())
                    .unwrap();
            params.signed_by(&key, &issuer).unwrap()
        }
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
    let identity = Identity::from_der(key.serialize_der(), cert.der().to_vec(), trust.cert.clone()).unwrap();
    (identity, info)
}

/// A peer that answers a client's first message with "welcome" only if the roster allows it.
async fn serve(identity: &Identity, roster: Roster) -> (quinn::Endpoint, SocketAddr) {
    let ep = quinn::Endpoint::server(identity.server_config().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let accepting = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            let roster = roster.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
                let Ok(_hello) = recv.read_to_end(1024).await else { return };
                match roster.authorize(&conn) {
                    Ok(id) => {
                        let _ = send.write_all(format!("welcome {id}").as_bytes()).await;
                        let _ = send.finish();
                        let _ = conn.closed().await;
                    }
                    Err(_) => conn.close(1u32.into(), b"refused"),
                }
            });
        }
    });
    (ep, addr)
}

/// Dials the device `to` at `addr` and says hello; the answer, or why there was none.
async fn hello(identity: &Identity, addr: SocketAddr, to: &DeviceId) -> Result<String, String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(identity.client_config().unwrap());
    let exchange = async {
        let conn =
            ep.connect(addr, &server_name(to)).map_err(|e| format!("{e:?}"))?.await.map_err(|e| format!("{e:?}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("{e:?}"))?;
        send.write_all(b"hello").await.map_err(|e| format!("{e:?}"))?;
        send.finish().map_err(|e| format!("{e:?}"))?;
        let reply = recv.read_to_end(1024).await.map_err(|e| format!("{e:?}"))?;
        conn.close(0u32.into(), b"done");
        String::from_utf8(reply).map_err(|e| format!("{e:?}"))
    };
    let out = tokio::time::timeout(Duration::from_secs(10), exchange).await.unwrap_or_else(|_| Err("timed out".into()));
    ep.wait_idle().await;
    out
}

#[tokio::test]
async fn only_this_users_listed_unrevoked_devices_get_an_answer() {
    let ca = user_ca("alice");
    let (server, server_info) = device(Some(&ca), &ca, 365);
    let (laptop, laptop_info) = device(Some(&ca), &ca, 365);
    let roster = Roster::default();
    roster.replace(vec![server_info.clone(), laptop_info.clone()]);
    let (_ep, addr) = serve(&server, roster.clone()).await;

    // A device of the same user, listed: answered, and known by its id.
    assert_eq!(hello(&laptop, addr, &server_info.id).await, Ok(format!("welcome {}", laptop_info.id)));

    // Another user's device (its own CA, trusting alice's CA to reach the server): refused in
    // the handshake, no answer.
    let bob = user_ca("bob");
    let (mallory, _) = device(Some(&bob), &ca, 365);
    let refused_in_handshake = |r: Result<String, String>, why: &str| {
        let err = r.expect_err("answered");
        assert!(err.contains("crypto") && err.contains(why), "{err}");
    };
    refused_in_handshake(hello(&mallory, addr, &server_info.id).await, "UnknownIssuer");

    // A self-signed certificate naming a device: refused.
    let (forged, _) = device(None, &ca, 365);
    refused_in_handshake(hello(&forged, addr, &server_info.id).await, "UnknownIssuer");

    // An expired certificate from the right CA, even one the roster lists: refused.
    let (old, old_info) = device(Some(&ca), &ca, -1);
    roster.replace(vec![server_info.clone(), laptop_info.clone(), old_info]);
    refused_in_handshake(hello(&old, addr, &server_info.id).await, "expired");

    // A valid certificate of this user the coordinator does not list (never enrolled, or
    // forgotten): the handshake passes, the first message is refused.
    let (unlisted, _) = device(Some(&ca), &ca, 365);
    let refused_at_first_message = |r: Result<String, String>| {
        let err = r.expect_err("answered");
        assert!(err.contains("ApplicationClosed") && err.contains("refused"), "{err}");
    };
    refused_at_first_message(hello(&unlisted, addr, &server_info.id).await);

    // Revoked: refused from the next roster on, without a restart.
    let mut revoked = laptop_info.clone();
    revoked.revoked = true;
    roster.replace(vec![server_info.clone(), revoked]);
    refused_at_first_message(hello(&laptop, addr, &server_info.id).await);
}

#[tokio::test]
async fn a_client_only_accepts_the_device_it_dialled() {
    let ca = user_ca("alice");
    let (server, server_info) = device(Some(&ca), &ca, 365);
    let (laptop, laptop_info) = device(Some(&ca), &ca, 365);
    let roster = Roster::default();
    roster.replace(vec![server_info.clone(), laptop_info.clone()]);
    let (_ep, addr) = serve(&server, roster).await;
    assert!(hello(&laptop, addr, &server_info.id).await.is_ok());
    // The server is alice's, but not the device the laptop meant to reach.
    let err = hello(&laptop, addr, &laptop_info.id).await.unwrap_err();
    assert!(err.contains("not valid for name") || err.contains("NotValidForName"), "{err}");
}

#[test]
fn authorize_checks_the_exact_certificate() {
    let ca = user_ca("alice");
    let (_, info) = device(Some(&ca), &ca, 365);
    let roster = Roster::default();
    let cert = CertificateDer::from(vec![1, 2, 3]);
    assert_eq!(roster.authorize_cert(&cert), Err(Refusal::UnknownCertificate));
    let mut listed = info.clone();
    listed.cert_fingerprint = ChunkId::of(&[1, 2, 3]);
    roster.replace(vec![listed.clone()]);
    assert_eq!(roster.authorize_cert(&cert), Ok(info.id));
    listed.revoked = true;
    roster.replace(vec![listed]);
    assert_eq!(roster.authorize_cert(&cert), Err(Refusal::Revoked(info.id)));
}
