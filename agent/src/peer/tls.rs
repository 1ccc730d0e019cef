//! Identity and authorization between a user's devices, in two layers:
//! - QUIC's TLS 1.3 handshake encrypts the connection and says nothing about who is at either
//!   end: the called device presents a throwaway self-signed certificate (made anew every
//!   minute, naming nobody), the caller sends the same server name whoever it calls and no
//!   certificate, and neither side judges the other's certificate here. So a stranger on the LAN
//!   who connects, or whom a device is tricked into calling, learns no user name and no stable
//!   identifier;
//! - the introduction (`peer::intro`) then authenticates both devices inside the connection,
//!   bound to it: with the user's LAN key first, then with their device certificates (issued by
//!   the user's CA), each checked here: it must chain to the user's CA and be valid now
//!   (`Identity::check`), and be exactly the certificate the coordinator lists for a device of
//!   this user that is not revoked (`Roster::authorize_cert`).
//!
//! The roster is the user's device list and LAN keys as last heard from the coordinator, kept
//! for offline use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::SignatureScheme;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use shoal_protocol::api::{DeviceInfo, LanKeys};
use shoal_protocol::{ChunkId, DeviceId};

/// The application protocol peers speak (see `shoal_protocol::peer`).
pub const ALPN: &[u8] = b"shoal/peer/2";
/// The server name every caller sends, in the clear: the same whichever device it calls.
pub const SERVER_NAME: &str = "peer.shoal";
/// How long the called side's throwaway certificate serves before another is made.
const THROWAWAY_FOR: Duration = Duration::from_secs(60);

/// Signature schemes a device key may sign the introduction with (the coordinator's enrollment
/// makes P-256 keys; the others are accepted as rustls accepts them).
const SCHEMES: [SignatureScheme; 3] =
    [SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::ECDSA_NISTP384_SHA384, SignatureScheme::ED25519];

/// This device's identity: its key and certificate, and the user's CA.
pub struct Identity {
    cert: CertificateDer<'static>,
    signer: Arc<dyn rustls::sign::SigningKey>,
    /// Checks a certificate chains to the user's CA and is valid now.
    chain: Arc<dyn ClientCertVerifier>,
}

/// Why a peer was refused during its introduction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this device has no LAN key yet (the coordinator has not been reached)")]
    NoLanKey,
    #[error("the caller does not hold the user's LAN key")]
    NotOfThisUser,
    #[error("the certificate is not a valid one from the user's CA: {0}")]
    BadCertificate(String),
    #[error("the signature does not match the certificate")]
    BadSignature,
    #[error("the certificate is not one the coordinator lists for this user's devices")]
    UnknownCertificate,
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    #[error("the device is {found}, not {expected}")]
    WrongDevice { expected: DeviceId, found: DeviceId },
}

impl Identity {
    /// Reads `device.key`, `device.crt` and `user-ca.crt` from the agent's home.
    pub fn load(home: &Path) -> anyhow::Result<Identity> {
        let read = |name: &str| {
            let path = home.join(name);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        let key = PrivateKeyDer::from_pem_slice(&read("device.key")?).context("device.key holds no private key")?;
        let cert = CertificateDer::from_pem_slice(&read("device.crt")?).context("device.crt holds no certificate")?;
        let ca = CertificateDer::from_pem_slice(&read("user-ca.crt")?).context("user-ca.crt holds no certificate")?;
        Identity::new(key, cert, ca)
    }

    /// An identity from DER parts.
    pub fn from_der(key: Vec<u8>, cert: Vec<u8>, ca: Vec<u8>) -> anyhow::Result<Identity> {
        let key = PrivateKeyDer::try_from(key).map_err(|e| anyhow::anyhow!("bad device key: {e}"))?;
        Identity::new(key, cert.into(), ca.into())
    }

    fn new(
        key: PrivateKeyDer<'static>,
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
    ) -> anyhow::Result<Identity> {
        let provider = provider();
        let signer = provider.key_provider.load_private_key(key).context("the device key is not usable")?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).context("the user's CA certificate is not usable")?;
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        Ok(Identity { cert, signer, chain })
    }

    /// This device's certificate (DER).
    pub fn cert(&self) -> &[u8] {
        self.cert.as_ref()
    }

    /// Signs `context` followed by `binding` with the device key: the scheme's TLS code and the
    /// signature.
    pub fn sign(&self, context: &[u8], binding: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        let signer = self.signer.choose_scheme(&SCHEMES).context("the device key signs with no usable scheme")?;
        let sig = signer.sign(&[context, binding].concat())?;
        Ok((u16::from(signer.scheme()), sig))
    }

    /// Checks that `cert` chains to the user's CA and is valid now, and that `signature` (with
    /// `scheme`) is its key's over `context` followed by `binding`.
    pub fn check(
        &self,
        cert: &[u8],
        scheme: u16,
        signature: &[u8],
        context: &[u8],
        binding: &[u8],
    ) -> Result<(), Refusal> {
        let der = CertificateDer::from(cert);
        self.chain
            .verify_client_cert(&der, &[], UnixTime::now())
            .map_err(|e| Refusal::BadCertificate(e.to_string()))?;
        let alg: &dyn rustls::pki_types::SignatureVerificationAlgorithm = match SignatureScheme::from(scheme) {
            SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384 => webpki::ring::ECDSA_P384_SHA384,
            SignatureScheme::ED25519 => webpki::ring::ED25519,
            _ => return Err(Refusal::BadSignature),
        };
        let ee = webpki::EndEntityCert::try_from(&der).map_err(|e| Refusal::BadCertificate(e.to_string()))?;
        ee.verify_signature(alg, &[context, binding].concat(), signature).map_err(|_| Refusal::BadSignature)
    }

    /// The endpoint configuration for accepting peers: a throwaway certificate, no client
    /// certificate asked for (the introduction authenticates both sides).
    pub fn server_config(&self) -> anyhow::Result<quinn::ServerConfig> {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Throwaway::default()));
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // No session tickets: a ticket a caller keeps and offers again, in the clear, to whoever
        // it calls next would follow it from network to network.
        tls.send_tls13_tickets = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport());
        // Connection attempts held before this device decides on them (each is a few hundred
        // bytes); the accept loop's limits decide the rest.
        cfg.max_incoming(256);
        Ok(cfg)
    }

    /// The endpoint configuration for calling peers: whatever certificate the called side
    /// presents is taken (its TLS signature is still checked, so the session is its key's); who
    /// it is, the introduction establishes.
    pub fn client_config(&self) -> anyhow::Result<quinn::ClientConfig> {
        let provider = provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // Nor resumption: the tickets a stranger handed out would mark this device.
        tls.resumption = rustls::client::Resumption::disabled();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }
}

/// The called side's certificate: self-signed, naming nobody, made anew every `THROWAWAY_FOR`,
/// so it is no identifier either.
#[derive(Default, Debug)]
struct Throwaway(Mutex<Option<(Instant, Arc<CertifiedKey>)>>);

impl Throwaway {
    fn make() -> Option<Arc<CertifiedKey>> {
        let key = rcgen::KeyPair::generate().ok()?;
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).ok()?.self_signed(&key).ok()?;
        let der = PrivateKeyDer::try_from(key.serialize_der()).ok()?;
        let signer = provider().key_provider.load_private_key(der).ok()?;
        Some(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)))
    }
}

impl rustls::server::ResolvesServerCert for Throwaway {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((made, key)) = current.as_ref()
            && made.elapsed() < THROWAWAY_FOR
        {
            return Some(key.clone());
        }
        let key = Throwaway::make()?;
        *current = Some((Instant::now(), key.clone()));
        Some(key)
    }
}

/// Takes any server certificate, checking only that the handshake was signed with its key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connections between peers stay open while both run (keep-alives well inside the idle
/// timeout), a peer that vanishes is noticed within the idle timeout, and what one connection
/// may make this device buffer is bounded: until the introduction admits the other side, one
/// stream and `INTRO_WINDOW` bytes unread; after it (`admitted`), at most `PEER_STREAMS`
/// requests at once and `PEER_WINDOW` bytes unread (and as much queued to send).
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((PEER_WINDOW / 4).into());
    t.receive_window(INTRO_WINDOW.into());
    t.send_window(u64::from(PEER_WINDOW));
    t.keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    t.max_idle_timeout(Some(std::time::Duration::from_secs(30).try_into().expect("30 s is a valid idle timeout")));
    Arc::new(t)
}

/// Opens a connection up for requests once its introduction admitted the other side.
pub fn admitted(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(PEER_STREAMS.into());
    conn.set_receive_window(PEER_WINDOW.into());
}

/// Bytes a connection may have unread before its introduction is over: the introduction's four
/// messages, a few KiB.
const INTRO_WINDOW: u32 = 64 * 1024;
/// Requests one peer may have open at once on a connection (each a bidirectional stream).
pub const PEER_STREAMS: u32 = 4;
/// Bytes one connection may have in flight each way: enough for LAN speed at a few milliseconds
/// of round trip, little enough that a dozen peers cost tens of MiB at most.
pub const PEER_WINDOW: u32 = 4 * 1024 * 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The user's devices and LAN keys as last heard from the coordinator: who may talk to this
/// device. Cheap to clone; updated in place.
#[derive(Clone, Default)]
pub struct Roster(Arc<RwLock<Known>>);

#[derive(Default)]
struct Known {
    /// By certificate fingerprint.
    devices: HashMap<ChunkId, DeviceInfo>,
    lan: Option<LanKeys>,
    /// Bumped by every replacement, so derived state (mDNS identities) knows to follow.
    generation: u64,
}

/// What `devices.json` holds.
#[derive(Serialize, Deserialize)]
struct Saved {
    devices: Vec<DeviceInfo>,
    #[serde(default)]
    lan: Option<LanKeys>,
}

/// Where the roster is kept between runs, in the agent's home.
pub const ROSTER_FILE: &str = "devices.json";

impl Roster {
    /// Replaces the roster with the coordinator's current device list and LAN keys (`None`
    /// keeps the keys known).
    pub fn replace(&self, devices: Vec<DeviceInfo>, lan: Option<LanKeys>) {
        let mut k = self.0.write().unwrap_or_else(|p| p.into_inner());
        k.devices = devices.into_iter().map(|d| (d.cert_fingerprint, d)).collect();
        if lan.is_some() {
            k.lan = lan;
        }
        k.generation += 1;
    }

    /// The name of device `id`, if listed.
    pub fn name(&self, id: &DeviceId) -> Option<String> {
        let k = self.0.read().unwrap_or_else(|p| p.into_inner());
        k.devices.values().find(|d| d.id == *id).map(|d| d.name.clone())
    }

    /// The devices, sorted by id.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let k = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<DeviceInfo> = k.devices.values().cloned().collect();
        v.sort_by_key(|d| d.id.0);
        v
    }

    /// The user's LAN keys that count now (the previous one only until the coordinator said it
    /// ends), once known.
    pub fn lan(&self) -> Option<LanKeys> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).lan.map(|k| k.at(shoal_sys::clock::now_ms()))
    }

    /// Changes with every replacement of the roster.
    pub fn generation(&self) -> u64 {
        self.0.read().unwrap_or_else(|p| p.into_inner()).generation
    }

    /// The roster saved in `home` by an earlier run (empty if there is none): peers stay known
    /// while the coordinator is unreachable. An unreadable file is an error, not an empty roster
    /// that would silently refuse every peer. Earlier releases saved the device list alone.
    pub fn load(home: &Path) -> anyhow::Result<Roster> {
        let path = home.join(ROSTER_FILE);
        let roster = Roster::default();
        match std::fs::read(&path) {
            Ok(b) => {
                let saved = serde_json::from_slice::<Saved>(&b)
                    .or_else(|_| {
                        serde_json::from_slice::<Vec<DeviceInfo>>(&b).map(|devices| Saved { devices, lan: None })
                    })
                    .with_context(|| format!("{} is not a device list", path.display()))?;
                roster.replace(saved.devices, saved.lan);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Ok(roster)
    }

    /// Saves the roster in `home` (atomically; synced, so a revocation seen is never forgotten;
    /// mode 0600, as it holds the LAN keys).
    pub fn save(&self, home: &Path) -> anyhow::Result<()> {
        let path = home.join(ROSTER_FILE);
        let json = serde_json::to_vec_pretty(&Saved { devices: self.devices(), lan: self.lan() })?;
        shoal_sys::fs::write_atomic(&path, &json, shoal_sys::fs::Durability::Synced)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The device whose certificate this is, if it may talk to this device: exactly the
    /// certificate the coordinator lists, for a device not revoked.
    pub fn authorize_cert(&self, cert: &[u8]) -> Result<DeviceId, Refusal> {
        self.authorize_fingerprint(&ChunkId::of(cert))
    }

    /// As `authorize_cert`, by the certificate's fingerprint.
    pub fn authorize_fingerprint(&self, fingerprint: &ChunkId) -> Result<DeviceId, Refusal> {
        let k = self.0.read().unwrap_or_else(|p| p.into_inner());
        match k.devices.get(fingerprint) {
            None => Err(Refusal::UnknownCertificate),
            Some(d) if d.revoked => Err(Refusal::Revoked(d.id)),
            Some(d) => Ok(d.id),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
