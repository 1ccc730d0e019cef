//! Accounts: users, invites (with expiry), devices (changed only by compare-and-swap) and each
//! user's LAN keys.

use super::*;

/// How long, after a rotation, the user's previous LAN key still counts: running devices fetch the
/// new one within a minute (at once, when the coordinator tells them their device list changed);
/// after this the revoked device's key opens nothing.
pub const PREVIOUS_LAN_KEY_MS: u64 = 10 * 60 * 1000;

/// The user's LAN keys as stored: the current one, the one before it and when it was replaced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LanKeyRec {
    pub(super) current: LanKey,
    pub(super) previous: Option<LanKey>,
    pub(super) rotated_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRec {
    pub id: UserId,
    pub name: String,
    pub created_ms: u64,
    /// The user's CA certificate and private key (DER), which sign device certificates.
    pub ca_cert: Vec<u8>,
    pub ca_key: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InviteRec {
    pub user: UserId,
    pub created_ms: u64,
    /// After this instant the invite no longer enrolls anything.
    pub expires_ms: u64,
}

/// Invites written before they carried an expiry (format version 1).
#[derive(Deserialize)]
pub(super) struct InviteRecV1 {
    pub(super) user: UserId,
    pub(super) created_ms: u64,
}

/// Format version of invite records: 2 added `expires_ms`.
pub(super) const INVITE_VERSION: u8 = 2;

/// How long an invite stored before invites carried an expiry stays valid, counted from its
/// creation: the default expiry of new invites.
pub const DEFAULT_INVITE_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

impl InviteRec {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = vec![INVITE_VERSION];
        out.extend(postcard::to_stdvec(self).expect("postcard serializes store records"));
        out
    }

    pub(super) fn decode(key: &[u8], bytes: &[u8]) -> Result<InviteRec, StoreError> {
        let corrupt = || StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned() };
        match bytes.split_first() {
            Some((&INVITE_VERSION, rest)) => postcard::from_bytes(rest).map_err(|_| corrupt()),
            Some((&VALUE_VERSION, rest)) => {
                let old: InviteRecV1 = postcard::from_bytes(rest).map_err(|_| corrupt())?;
                Ok(InviteRec {
                    user: old.user,
                    created_ms: old.created_ms,
                    expires_ms: old.created_ms.saturating_add(DEFAULT_INVITE_TTL_MS),
                })
            }
            _ => Err(corrupt()),
        }
    }
}

/// Why an invite did not enroll a device. Every variant is answered the same way on the wire, so
/// the API reveals neither which users exist nor which invites did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteRefusal {
    Unknown,
    Expired,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRec {
    pub id: DeviceId,
    pub user: UserId,
    pub name: String,
    pub token_hash: [u8; 32],
    pub enrolled_ms: u64,
    pub last_seen_ms: u64,
    pub cursor: Seq,
    pub revoked: bool,
    /// The device certificate (DER) signed by the user's CA at enrollment.
    pub cert: Vec<u8>,
}

pub(super) fn random_lan_key() -> Result<LanKey, StoreError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| StoreError::Db(sled::Error::Io(std::io::Error::other(e.to_string()))))?;
    Ok(LanKey::new(b))
}

impl Store {
    pub fn user(&self, name: &str) -> Result<Option<UserRec>, StoreError> {
        self.get(&key(b"u/", &[name.as_bytes()]))
    }

    /// Creates a user; `Ok(None)` if the name is taken.
    pub fn add_user(&self, name: &str, now_ms: u64, ca: shoal_net::ca::UserCa) -> Result<Option<UserRec>, StoreError> {
        let k = key(b"u/", &[name.as_bytes()]);
        let rec = UserRec {
            id: self.db.generate_id()? + 1,
            name: name.to_string(),
            created_ms: now_ms,
            ca_cert: ca.cert,
            ca_key: ca.key,
        };
        match self.meta.compare_and_swap(&k, None as Option<&[u8]>, Some(encode(&rec)))? {
            Ok(()) => Ok(Some(rec)),
            Err(_) => Ok(None),
        }
    }

    pub fn add_invite(&self, secret_hash: &[u8; 32], rec: &InviteRec) -> Result<(), StoreError> {
        self.meta.insert(key(b"i/", &[secret_hash]), rec.encode())?;
        Ok(())
    }

    /// The user an unused, unexpired invite enrolls into.
    pub fn invite(&self, secret_hash: &[u8; 32], now_ms: u64) -> Result<Result<UserRec, InviteRefusal>, StoreError> {
        let ik = key(b"i/", &[secret_hash]);
        let Some(v) = self.meta.get(&ik)? else {
            return Ok(Err(InviteRefusal::Unknown));
        };
        let inv = InviteRec::decode(&ik, &v)?;
        if now_ms >= inv.expires_ms {
            return Ok(Err(InviteRefusal::Expired));
        }
        match self.user_by_id(inv.user)? {
            Some(u) => Ok(Ok(u)),
            None => Ok(Err(InviteRefusal::Unknown)),
        }
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<UserRec>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(b"u/") {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    pub(super) fn user_by_id(&self, id: UserId) -> Result<Option<UserRec>, StoreError> {
        for kv in self.meta.scan_prefix(b"u/") {
            let (k, v) = kv?;
            let u: UserRec = decode(&k, &v)?;
            if u.id == id {
                return Ok(Some(u));
            }
        }
        Ok(None)
    }

    /// Consumes an invite and stores the new device and its token, atomically: an invite enrolls
    /// exactly one device. `false` if the invite was used meanwhile.
    pub fn enroll(&self, secret_hash: &[u8; 32], dev: &DeviceRec) -> Result<bool, StoreError> {
        let ik = key(b"i/", &[secret_hash]);
        let dk = key(b"d/", &[dev.id.as_bytes()]);
        let tk = key(b"t/", &[&dev.token_hash]);
        let res = self.meta.transaction(|t| {
            if t.remove(ik.as_slice())?.is_none() {
                return Ok(false);
            }
            t.insert(dk.as_slice(), encode(dev))?;
            t.insert(tk.as_slice(), dev.id.as_bytes().to_vec())?;
            Ok(true)
        });
        res.map_err(|e: sled::transaction::TransactionError<()>| match e {
            sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
            sled::transaction::TransactionError::Abort(()) => {
                unreachable!("the transaction never aborts")
            }
        })
    }

    // ---- devices ----

    pub fn device_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<DeviceRec>, StoreError> {
        let Some(id) = self.meta.get(key(b"t/", &[token_hash]))? else {
            return Ok(None);
        };
        self.get(&key(b"d/", &[&id]))
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRec>, StoreError> {
        self.get(&key(b"d/", &[id.as_bytes()]))
    }

    /// Changes one device record atomically (compare-and-swap): `change` edits a fresh copy and
    /// says whether to store it; it may run more than once under contention. Concurrent updates
    /// therefore never undo each other, and a revoked device stays revoked whatever `change` does
    /// (only [`Store::reinstate_device`], the operator's, clears it).
    /// Returns the stored record, or `None` when there is no such device or `change` declined.
    pub fn update_device(
        &self,
        id: &DeviceId,
        mut change: impl FnMut(&mut DeviceRec) -> bool,
    ) -> Result<Option<DeviceRec>, StoreError> {
        let k = key(b"d/", &[id.as_bytes()]);
        loop {
            let Some(old) = self.meta.get(&k)? else {
                return Ok(None);
            };
            let mut dev: DeviceRec = decode(&k, &old)?;
            let was_revoked = dev.revoked;
            if !change(&mut dev) {
                return Ok(None);
            }
            dev.revoked |= was_revoked;
            if self.meta.compare_and_swap(&k, Some(&old), Some(encode(&dev)))?.is_ok() {
                return Ok(Some(dev));
            }
        }
    }

    /// Clears a device's revocation (compare-and-swap): the operator's way to undo a revocation
    /// made by mistake, and the only update that clears `revoked`. The device's token and
    /// certificate work again. Returns the stored record, `None` if there is no such device.
    pub fn reinstate_device(&self, id: &DeviceId) -> Result<Option<DeviceRec>, StoreError> {
        let k = key(b"d/", &[id.as_bytes()]);
        loop {
            let Some(old) = self.meta.get(&k)? else {
                return Ok(None);
            };
            let mut dev: DeviceRec = decode(&k, &old)?;
            dev.revoked = false;
            if self.meta.compare_and_swap(&k, Some(&old), Some(encode(&dev)))?.is_ok() {
                return Ok(Some(dev));
            }
        }
    }

    pub fn devices(&self, user: UserId) -> Result<Vec<DeviceRec>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(b"d/") {
            let (k, v) = kv?;
            let d: DeviceRec = decode(&k, &v)?;
            if d.user == user {
                out.push(d);
            }
        }
        out.sort_by_key(|d| d.enrolled_ms);
        Ok(out)
    }

    /// The user's LAN keys (`api::LanKey`), made on first use.
    /// The previous key ends [`PREVIOUS_LAN_KEY_MS`] after the rotation that made it so.
    pub fn lan_keys(&self, user: UserId, now_ms: u64) -> Result<LanKeys, StoreError> {
        let rec = self.lan_key_rec(user)?;
        let until = rec.rotated_ms.saturating_add(PREVIOUS_LAN_KEY_MS);
        let previous = rec.previous.filter(|_| now_ms < until);
        Ok(LanKeys { current: rec.current, previous, previous_until_ms: if previous.is_some() { until } else { 0 } })
    }

    pub(super) fn lan_key_rec(&self, user: UserId) -> Result<LanKeyRec, StoreError> {
        let k = key(b"l/", &[&user.to_be_bytes()]);
        loop {
            if let Some(v) = self.meta.get(&k)? {
                return decode(&k, &v);
            }
            let fresh = LanKeyRec { current: random_lan_key()?, previous: None, rotated_ms: 0 };
            if self.meta.compare_and_swap(&k, None as Option<&[u8]>, Some(encode(&fresh)))?.is_ok() {
                return Ok(fresh);
            }
        }
    }

    /// Replaces the user's LAN key (one of its devices was revoked: it knows the old one), keeping
    /// the old one as `previous` for a while, for the other devices to catch up.
    pub fn rotate_lan_key(&self, user: UserId, now_ms: u64) -> Result<(), StoreError> {
        let old = self.lan_key_rec(user)?;
        let k = key(b"l/", &[&user.to_be_bytes()]);
        let new = LanKeyRec { current: random_lan_key()?, previous: Some(old.current), rotated_ms: now_ms };
        self.meta.insert(k, encode(&new))?;
        Ok(())
    }

    pub fn user_count(&self) -> usize {
        self.meta.scan_prefix(b"u/").count()
    }

    // ---- chunks ----
}
