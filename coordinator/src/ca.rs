//! Per-user certificate authorities. Each user gets a CA (rcgen, ECDSA P-256) when created; at
//! enrollment the coordinator signs the device's certificate request with it. Devices of one user
//! authenticate each other with these certificates (mutual TLS between peers): a certificate that
//! does not chain to the same user's CA belongs to someone else.
//!
//! The request only contributes its public key: names, validity and usages come from here, so a
//! device cannot ask for a CA certificate or another device's name. Making the request, the
//! device names and PEM are shared with the agent (`shoal_sys::identity`); signing is only here.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use shoal_protocol::DeviceId;
use shoal_sys::identity::device_name;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the certificate request is invalid: {0}")]
    BadRequest(rcgen::Error),
    #[error("certificate generation failed: {0}")]
    Internal(rcgen::Error),
}

/// A user's CA: its certificate and private key (PKCS#8), both DER.
pub struct UserCa {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

fn validity(params: &mut CertificateParams, years: i64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs((now - 86_400).max(0) as u64);
    params.not_after = params.not_before + std::time::Duration::from_secs((years * 365 * 86_400) as u64);
}

/// Creates the CA of user `name`.
pub fn new_user_ca(name: &str) -> Result<UserCa, CaError> {
    let key = KeyPair::generate().map_err(CaError::Internal)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Shoal user {name} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, 30);
    let cert = params.self_signed(&key).map_err(CaError::Internal)?;
    Ok(UserCa { cert: cert.der().to_vec(), key: key.serialize_der() })
}

/// Signs a device certificate for `device` from its PEM certificate request.
pub fn sign_device(ca: &UserCa, csr_pem: &str, device: &DeviceId) -> Result<Vec<u8>, CaError> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadRequest)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, device_name(device));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(device_name(device).try_into().map_err(CaError::Internal)?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, 10);
    csr.params = params;
    let key = KeyPair::try_from(ca.key.as_slice()).map_err(CaError::Internal)?;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca.cert.as_slice()), key).map_err(CaError::Internal)?;
    Ok(csr.signed_by(&issuer).map_err(CaError::Internal)?.der().to_vec())
}

#[cfg(test)]
mod tests {
    use shoal_sys::identity::{cert_pem, device_request};
    use x509_parser::prelude::*;

    use super::*;

    #[test]
    fn device_certificates_chain_to_their_users_ca_only() {
        let alice = new_user_ca("alice").unwrap();
        let bob = new_user_ca("bob").unwrap();
        let (_key, csr) = device_request().unwrap();
        let id = DeviceId([9; 16]);
        let der = sign_device(&alice, &csr, &id).unwrap();

        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let (_, alice_ca) = X509Certificate::from_der(&alice.cert).unwrap();
        let (_, bob_ca) = X509Certificate::from_der(&bob.cert).unwrap();
        assert!(cert.verify_signature(Some(alice_ca.public_key())).is_ok());
        assert!(cert.verify_signature(Some(bob_ca.public_key())).is_err(), "not bob's device");
        assert_eq!(cert.issuer(), alice_ca.subject());
        assert!(!cert.is_ca());
        assert!(alice_ca.is_ca());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            format!("{:?}", [GeneralName::DNSName(&device_name(&id))])
        );
        assert!(cert_pem(&der).starts_with("-----BEGIN CERTIFICATE-----\n"));
    }

    #[test]
    fn garbage_requests_are_refused() {
        let ca = new_user_ca("carol").unwrap();
        assert!(matches!(sign_device(&ca, "not a csr", &DeviceId([1; 16])), Err(CaError::BadRequest(_))));
    }
}
