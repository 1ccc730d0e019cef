//! Relays the operator added: name, region, and the hash of the token a relay authenticates
//! with (`e/NAME`). Where a relay listens and when it was last heard from are kept in memory by
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
        let k = key(b"e/", &[rec.name.as_bytes()]);
        match self.meta.compare_and_swap(&k, None as Option<&[u8]>, Some(encode(rec)))? {
            Ok(()) => Ok(Some(rec.clone())),
            Err(_) => Ok(None),
        }
    }

    /// Every relay, by name.
    pub fn relays(&self) -> Result<Vec<RelayRec>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(b"e/") {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Removes a relay: its token stops working at once. `false` if there was none.
    pub fn remove_relay(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.meta.remove(key(b"e/", &[name.as_bytes()]))?.is_some())
    }

    /// The relay whose token hashes to `token_hash` (relays are few: a scan).
    pub fn relay_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<RelayRec>, StoreError> {
        Ok(self.relays()?.into_iter().find(|r| r.token_hash == *token_hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_live_beside_every_other_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rec = RelayRec { name: "eu1".into(), region: "eu".into(), token_hash: [7; 32], added_ms: 1 };
        assert_eq!(store.add_relay(&rec).unwrap(), Some(rec.clone()));
        assert_eq!(store.add_relay(&rec).unwrap(), None, "the name is taken");
        // Records of other kinds (a retired pack: `r/`) neither read as relays nor break them.
        store.retire_packs(&[3, 4], 99).unwrap();
        assert_eq!(store.relays().unwrap(), vec![rec.clone()]);
        assert_eq!(store.retired_packs().unwrap(), vec![(3, 99), (4, 99)]);
        assert_eq!(store.relay_by_token(&[7; 32]).unwrap(), Some(rec));
        assert_eq!(store.relay_by_token(&[8; 32]).unwrap(), None);
        assert!(store.remove_relay("eu1").unwrap());
        assert!(!store.remove_relay("eu1").unwrap());
        assert!(store.relays().unwrap().is_empty());
        assert_eq!(store.retired_packs().unwrap().len(), 2);
    }
}
