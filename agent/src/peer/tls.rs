//! Identity and authorization between a user's devices. Two checks, in two places:
//! - the TLS handshake (both directions) accepts only a certificate chaining to this user's CA
//!   and valid now: another user's device, a self-signed or an expired certificate never gets a
//!   connection; a client also checks the server is the device it meant to reach;
//! - `Roster::authorize`, called when the first application message arrives rather than at the
//!   end of the handshake, accepts only a certificate that is exactly the one the coordinator
//!   lists for a device of this user that is not revoked. The roster is the user's device list
//!   as last heard from the coordinator, kept for offline use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use shoal_protocol::api::DeviceInfo;
use shoal_protocol::{ChunkId, DeviceId};

/// The application protocol peers speak.
pub const ALPN: &[u8] = b"shoal/peer/1";

/// This device's TLS identity: its key and certificate, and the user's CA.
pub struct Identity {
    key: PrivateKeyDer<'static>,
    cert: CertificateDer<'static>,
    ca: CertificateDer<'static>,
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
        Ok(Identity { key, cert, ca })
    }

    /// An identity from DER parts.
    pub fn from_der(key: Vec<u8>, cert: Vec<u8>, ca: Vec<u8>) -> anyhow::Result<Identity> {
        let key = PrivateKeyDer::try_from(key).map_err(|e| anyhow::anyhow!("bad device key: {e}"))?;
        Ok(Identity { key, cert: cert.into(), ca: ca.into() })
    }

    fn roots(&self) -> anyhow::Result<Arc<rustls::RootCertStore>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).context("the user's CA certificate is not usable")?;
        Ok(Arc::new(roots))
    }

    /// The endpoint configuration for accepting peers: a client certificate is required and must
    /// chain to the user's CA.
    pub fn server_config(&self) -> anyhow::Result<quinn::ServerConfig> {
        let provider = provider();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone()).build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }

    /// The endpoint configuration for reaching peers: the server must chain to the user's CA and
    /// carry the name of the device dialled (see `server_name`).
    pub fn client_config(&self) -> anyhow::Result<quinn::ClientConfig> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }
}

/// Connections between peers stay open while both run (keep-alives well inside the idle
/// timeout), a peer that vanishes is noticed within the idle timeout, and what one connection
/// may make this device buffer is bounded: per peer, at most `PEER_STREAMS` requests at once
/// and `PEER_WINDOW` bytes unread (and as much queued to send).
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(PEER_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((PEER_WINDOW / 4).into());
    t.receive_window(PEER_WINDOW.into());
    t.send_window(u64::from(PEER_WINDOW));
    t.keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    t.max_idle_timeout(Some(std::time::Duration::from_secs(30).try_into().expect("30 s is a valid idle timeout")));
    Arc::new(t)
}

/// Requests one peer may have open at once on a connection (each a bidirectional stream).
pub const PEER_STREAMS: u32 = 4;
/// Bytes one connection may have in flight each way: enough for LAN speed at a few milliseconds
/// of round trip, little enough that a dozen peers cost tens of MiB at most.
pub const PEER_WINDOW: u32 = 4 * 1024 * 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS server name to dial device `id` by: its certificate names it.
pub fn server_name(id: &DeviceId) -> String {
    shoal_sys::identity::device_name(id)
}

/// Why a peer was refused after its handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate is not one the coordinator lists for this user's devices")]
    UnknownCertificate,
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
}

/// The user's devices as last heard from the coordinator: who may talk to this device. Cheap to
/// clone; updated in place.
#[derive(Clone, Default)]
pub struct Roster(Arc<RwLock<HashMap<ChunkId, DeviceInfo>>>);

/// Where the roster is kept between runs, in the agent's home.
pub const ROSTER_FILE: &str = "devices.json";

impl Roster {
    /// Replaces the roster with the coordinator's current device list.
    pub fn replace(&self, devices: Vec<DeviceInfo>) {
        let map = devices.into_iter().map(|d| (d.cert_fingerprint, d)).collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// The name of device `id`, if listed.
    pub fn name(&self, id: &DeviceId) -> Option<String> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.values().find(|d| d.id == *id).map(|d| d.name.clone())
    }

    /// The devices, sorted by id.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let mut v: Vec<DeviceInfo> = self.0.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by_key(|d| d.id.0);
        v
    }

    /// The roster saved in `home` by an earlier run (empty if there is none): peers stay known
    /// while the coordinator is unreachable. An unreadable file is an error, not an empty roster
    /// that would silently refuse every peer.
    pub fn load(home: &Path) -> anyhow::Result<Roster> {
        let path = home.join(ROSTER_FILE);
        let roster = Roster::default();
        match std::fs::read(&path) {
            Ok(b) => roster.replace(
                serde_json::from_slice(&b).with_context(|| format!("{} is not a device list", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Ok(roster)
    }

    /// Saves the roster in `home` (atomically; synced, so a revocation seen is never forgotten).
    pub fn save(&self, home: &Path) -> anyhow::Result<()> {
        let path = home.join(ROSTER_FILE);
        let json = serde_json::to_vec_pretty(&self.devices())?;
        shoal_sys::fs::write_atomic(&path, &json, shoal_sys::fs::Durability::Synced)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The device a connection's peer certificate belongs to, if it may talk to this device.
    pub fn authorize(&self, conn: &quinn::Connection) -> Result<DeviceId, Refusal> {
        let chain = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or(Refusal::NoCertificate)?;
        let leaf = chain.first().ok_or(Refusal::NoCertificate)?;
        self.authorize_cert(leaf)
    }

    fn authorize_cert(&self, leaf: &CertificateDer<'_>) -> Result<DeviceId, Refusal> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        match map.get(&ChunkId::of(leaf.as_ref())) {
            None => Err(Refusal::UnknownCertificate),
            Some(d) if d.revoked => Err(Refusal::Revoked(d.id)),
            Some(d) => Ok(d.id),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
