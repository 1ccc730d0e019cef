//! A device's TLS identity, the parts every side needs: the device makes its key and a
//! certificate request at enrollment, the coordinator signs it for the name `device_name` gives,
//! and peers check that name. Signing stays with the coordinator, which holds the user CAs.

use rcgen::{CertificateParams, KeyPair};
use shoal_protocol::DeviceId;

/// Why a device identity could not be made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("generating the device key failed: {0}")]
    Key(rcgen::Error),
    #[error("making the certificate request failed: {0}")]
    Request(rcgen::Error),
}

/// The DNS name a device's certificate carries: `<device id>.device.shoal`.
pub fn device_name(id: &DeviceId) -> String {
    format!("{id}.device.shoal")
}

/// A new device key and its certificate request (PEM), as an agent makes them at enrollment.
/// Only the request's public key counts: the coordinator chooses the name, validity and usages.
pub fn device_request() -> Result<(KeyPair, String), IdentityError> {
    let key = KeyPair::generate().map_err(IdentityError::Key)?;
    let params = CertificateParams::new(vec!["shoal-device".to_string()]).map_err(IdentityError::Request)?;
    let csr = params.serialize_request(&key).map_err(IdentityError::Request)?;
    Ok((key, csr.pem().map_err(IdentityError::Request)?))
}

/// PEM of a DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_pem_wraps_at_64_columns() {
        let (_key, csr) = device_request().unwrap();
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&csr).is_ok(), "{csr}");
        let pem = cert_pem(&[0xAB; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN CERTIFICATE-----"));
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.len(), 5, "136 base64 characters make three lines");
        assert_eq!(device_name(&DeviceId([0; 16])), format!("{}.device.shoal", "0".repeat(32)));
    }
}
