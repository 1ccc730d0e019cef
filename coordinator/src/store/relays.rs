//! Relays the operator added: name, region, and the hash of the token a relay authenticates
//! with (`r/NAME`). Where a relay listens and when it was last heard from are kept in memory by
//! the server (`App::relays`), since relays say so again every heartbeat.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRec {
    pub name: String,
    pub region: String,
    /// BLAKE3 of the relay's operator token.
    pub token_hash: [u8; 32],
    pub added_ms: u64,
}

impl Store {
    /// Adds a relay; `Ok(None)` if the name is taken.
    pub fn add_relay(&self, rec: &RelayRec) -> Result<Option<RelayRec>, StoreError> {
        let k = key(b"r/", &[rec.name.as_bytes()]);
        match self.meta.compare_and_swap(&k, None as Option<&[u8]>, Some(encode(rec)))? {
            Ok(()) => Ok(Some(rec.clone())),
            Err(_) => Ok(None),
        }
    }

    /// Every relay, by name.
    pub fn relays(&self) -> Result<Vec<RelayRec>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(b"r/") {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Removes a relay: its token stops working at once. `false` if there was none.
    pub fn remove_relay(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.meta.remove(key(b"r/", &[name.as_bytes()]))?.is_some())
    }

    /// The relay whose token hashes to `token_hash` (relays are few: a scan).
    pub fn relay_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<RelayRec>, StoreError> {
        Ok(self.relays()?.into_iter().find(|r| r.token_hash == *token_hash))
    }
}
