//! A server's TLS identity: a self-signed certificate made with rcgen on first start and kept in
//! a directory of its own. Clients pin its BLAKE3 fingerprint (devices get the coordinator's in
//! their invite), so no CA is involved. rustls runs on ring only, passed explicitly.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use shoal_protocol::ChunkId;
use shoal_sys::fs::{Durability, write_atomic};

/// The server's certificate and key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    /// Loads `dir/{cert,key}.der`, generating them on first use for the DNS names or addresses
    /// `names`.
    pub fn load_or_create(dir: &Path, names: &[&str]) -> anyhow::Result<Self> {
        let (cert_path, key_path) = (dir.join("cert.der"), dir.join("key.der"));
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
            let key = std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
            return Ok(Identity { cert: CertificateDer::from(cert), key: PrivatePkcs8KeyDer::from(key) });
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).context("generating the TLS certificate")?;
        let cert = ck.cert.der().to_vec();
        let key = ck.signing_key.serialize_der();
        for (path, bytes) in [(&key_path, &key), (&cert_path, &cert)] {
            write_atomic(path, bytes, Durability::Synced).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(Identity { cert: CertificateDer::from(cert), key: PrivatePkcs8KeyDer::from(key) })
    }

    /// The fingerprint devices pin: BLAKE3 of the certificate's DER.
    pub fn fingerprint(&self) -> ChunkId {
        ChunkId::of(self.cert.as_ref())
    }

    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}
