//! Per-user certificate authorities. Each user gets a CA (rcgen, ECDSA P-256) when created; at
//! enrollment the coordinator signs the device's certificate request with it. Devices of one user
//! authenticate each other with these certificates (mutual TLS between peers): a certificate that
//! does not chain to the same user's CA belongs to someone else.
//!
//! The request only contributes its public key: names, validity and usages come from here, so a
//! device cannot ask for a CA certificate or another device's name. Making the request, the
//! device names and PEM are in `shoal_sys::identity`. Only the coordinator signs; the agent's
//! tests make their devices' certificates with the same parameters from here.

use std::ops::Range;
use std::time::{Duration, SystemTime};

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

const DAY: Duration = Duration::from_secs(86_400);

/// From a day ago (clocks differ) for `years`.
fn validity(years: u32) -> Range<SystemTime> {
    let start = SystemTime::now() - DAY;
    start..start + DAY * 365 * years
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
    let valid = validity(30);
    (params.not_before, params.not_after) = (valid.start.into(), valid.end.into());
    let cert = params.self_signed(&key).map_err(CaError::Internal)?;
    Ok(UserCa { cert: cert.der().to_vec(), key: key.serialize_der() })
}

/// What a device certificate of `device` says: its name, usages and `valid` period.
pub fn device_params(device: &DeviceId, valid: Range<SystemTime>) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, device_name(device));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(device_name(device).try_into().map_err(CaError::Internal)?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = (valid.start.into(), valid.end.into());
    Ok(params)
}

/// `ca` as the issuer of the certificates it signs.
pub fn issuer(ca: &UserCa) -> Result<Issuer<'static, KeyPair>, CaError> {
    let key = KeyPair::try_from(ca.key.as_slice()).map_err(CaError::Internal)?;
    Issuer::from_ca_cert_der(&CertificateDer::from(ca.cert.clone()), key).map_err(CaError::Internal)
}

/// Signs a device certificate for `device` from its PEM certificate request, valid for 10 years.
pub fn sign_device(ca: &UserCa, csr_pem: &str, device: &DeviceId) -> Result<Vec<u8>, CaError> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadRequest)?;
    csr.params = device_params(device, validity(10))?;
    Ok(csr.signed_by(&issuer(ca)?).map_err(CaError::Internal)?.der().to_vec())
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
