//! Signing and checking relay tickets (`shoal_protocol::ticket` has the format): Ed25519 through
//! ring. The coordinator holds the key ([`TicketKey`], one file, made on first start); a relay
//! holds only the public key and checks every ticket offline ([`verify`]).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use shoal_protocol::ticket::{SIGNATURE_LEN, TicketBody, TicketError, signed_message, split_signed};
use shoal_sys::fs::{Durability, write_atomic};

/// Longest ticket text accepted: an id list at its largest, signed, in base64.
pub const MAX_TICKET_TEXT: usize =
    4 * (1 + 8 + 8 + 1 + 2 + 32 * shoal_protocol::ticket::MAX_TICKET_IDS + SIGNATURE_LEN) / 3 + 4;

/// The coordinator's ticket-signing key.
pub struct TicketKey(Ed25519KeyPair);

impl TicketKey {
    /// Loads the PKCS#8 key in `path`, or makes one and writes it there (mode 0600) on first use.
    pub fn load_or_create(path: &Path) -> Result<TicketKey, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                    .map_err(|_| "could not make a ticket key".to_string())?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                }
                write_atomic(path, doc.as_ref(), Durability::Synced)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        Ed25519KeyPair::from_pkcs8(&bytes)
            .map(TicketKey)
            .map_err(|e| format!("{} is not an Ed25519 key: {e}", path.display()))
    }

    /// The public key relays check tickets with.
    pub fn public_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        k
    }

    /// The ticket for `body`, as it travels.
    pub fn sign(&self, body: &TicketBody) -> String {
        let body = body.encode();
        let sig = self.0.sign(&signed_message(&body));
        URL_SAFE_NO_PAD.encode([&body[..], sig.as_ref()].concat())
    }
}

/// The body of `ticket` if the key whose public half is `public_key` signed it. Expiry and
/// coverage are the caller's to check (`TicketBody::allows`), with the request in hand.
pub fn verify(ticket: &str, public_key: &[u8; 32]) -> Result<TicketBody, TicketError> {
    if ticket.len() > MAX_TICKET_TEXT {
        return Err(TicketError::Malformed("too long"));
    }
    let bytes = URL_SAFE_NO_PAD.decode(ticket).map_err(|_| TicketError::Malformed("not base64url"))?;
    let (body, sig) = split_signed(&bytes)?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&signed_message(body), sig)
        .map_err(|_| TicketError::BadSignature)?;
    TicketBody::decode(body)
}

#[cfg(test)]
mod tests {
    use shoal_protocol::ChunkId;
    use shoal_protocol::ticket::{MAX_TICKET_IDS, Scope};

    use super::*;

    #[test]
    fn tickets_verify_with_their_key_only_and_forgeries_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticket.key");
        let key = TicketKey::load_or_create(&path).unwrap();
        let again = TicketKey::load_or_create(&path).unwrap();
        assert_eq!(key.public_key(), again.public_key(), "the key is kept");
        let other = TicketKey::load_or_create(&dir.path().join("other.key")).unwrap();

        let ids: Vec<ChunkId> = (0..3u8).map(|i| ChunkId::of(&[i])).collect();
        let body = TicketBody::for_chunks(4, 10_000, &ids).unwrap();
        let t = key.sign(&body);
        assert_eq!(verify(&t, &key.public_key()), Ok(body.clone()));
        assert_eq!(verify(&t, &other.public_key()), Err(TicketError::BadSignature));
        assert_eq!(verify(&other.sign(&body), &key.public_key()), Err(TicketError::BadSignature));

        // Any change to the body (another user, a later expiry, another chunk) breaks the
        // signature; so does a changed signature.
        let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        for at in [0, 5, 12, 20, raw.len() - 1] {
            let mut bad = raw.clone();
            bad[at] ^= 1;
            assert!(verify(&URL_SAFE_NO_PAD.encode(&bad), &key.public_key()).is_err(), "byte {at}");
        }
        let mut longer = body.clone();
        longer.expires_ms += 1;
        let spliced = [&longer.encode()[..], &raw[raw.len() - SIGNATURE_LEN..]].concat();
        assert_eq!(verify(&URL_SAFE_NO_PAD.encode(spliced), &key.public_key()), Err(TicketError::BadSignature));

        assert_eq!(verify("not a ticket!", &key.public_key()), Err(TicketError::Malformed("not base64url")));
        assert_eq!(verify("", &key.public_key()), Err(TicketError::Malformed("too short")));
        let big = TicketBody { user: u64::MAX, expires_ms: u64::MAX, scope: Scope::Ids(vec![ids[0]; MAX_TICKET_IDS]) };
        assert!(key.sign(&big).len() <= MAX_TICKET_TEXT);
        assert_eq!(
            verify(&"A".repeat(MAX_TICKET_TEXT + 1), &key.public_key()),
            Err(TicketError::Malformed("too long"))
        );
    }

    #[test]
    fn a_key_file_that_is_not_a_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticket.key");
        std::fs::write(&path, b"garbage").unwrap();
        let e = TicketKey::load_or_create(&path).err().unwrap();
        assert!(e.contains("is not an Ed25519 key"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"garbage", "left as it was");
    }
}
