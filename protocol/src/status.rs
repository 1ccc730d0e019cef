//! What an agent says about itself: the `status.json` its daemon rewrites after every cycle, and
//! the report `shoal status --json` prints around it. Typed here, beside the API's types, so
//! that whatever reads them (the CLI, the end-to-end tests, netsim) reads the daemon's own
//! definition rather than guessing at untyped JSON.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::api::{PendingVersion, UsageResponse};
use crate::ids::{DeviceId, Seq};

/// Where a daemon stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// No cycle has finished yet.
    #[default]
    #[serde(alias = "")]
    NeverSynced,
    /// The last cycle left nothing to do.
    InSync,
    Syncing,
    /// The coordinator cannot be reached; the daemon retries as it backs off.
    Offline,
    /// The coordinator refuses this device's token: it was revoked.
    Unauthorized,
    /// The coordinator refuses uploads or commits for the user's storage quota (see
    /// `Status::quota`).
    OverQuota,
    /// Anything else went wrong; `Status::last_error` says what.
    Error,
    /// Finishing the uploads this device owes before it stops.
    Stopping,
    Stopped,
}

impl SyncState {
    /// As `shoal status` shows it.
    pub fn describe(self) -> &'static str {
        match self {
            SyncState::NeverSynced => "never synced",
            SyncState::InSync => "in_sync",
            SyncState::Syncing => "syncing",
            SyncState::Offline => "offline",
            SyncState::Unauthorized => "unauthorized",
            SyncState::OverQuota => "over quota",
            SyncState::Error => "error",
            SyncState::Stopping => "stopping",
            SyncState::Stopped => "stopped",
        }
    }
}

/// Chunk bytes delivered for downloads, by source, since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytesBySource {
    /// Other files in this device's folder.
    pub local: u64,
    /// Other devices of the user on the LAN.
    pub peer: u64,
    /// A regional relay.
    pub relay: u64,
    /// The coordinator's chunk store.
    pub origin: u64,
}

/// A relay, as the status names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInUse {
    pub name: String,
    pub url: String,
}

/// What `status.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: SyncState,
    pub in_sync: bool,
    pub pid: u32,
    pub cursor: Seq,
    pub pending_uploads: usize,
    pub pending_downloads: usize,
    pub last_sync_ms: u64,
    pub updated_ms: u64,
    /// When the cycle this status reports on started: `in_sync` covers the changes the daemon
    /// had noticed by then (a watcher event arrives `debounce` after the change).
    #[serde(default)]
    pub cycle_started_ms: u64,
    pub last_error: Option<String>,
    pub skipped: Vec<String>,
    /// Watcher wake-ups since the daemon started: changes in the folder that were not the
    /// agent's own writes (a debug counter; it stays put while the agent only applies others').
    #[serde(default)]
    pub watcher_hints: u64,
    /// Stored path records the last cycle decoded, and the paths and directories it looked at
    /// (debug counters: outside full passes they follow the change, not the folder's size).
    #[serde(default)]
    pub last_cycle_reads: u64,
    #[serde(default)]
    pub last_cycle_scope: usize,
    /// Stored path records decoded since the daemon started.
    #[serde(default)]
    pub reads_total: u64,
    /// A full pass over the folder is under way.
    #[serde(default)]
    pub full_pass: bool,
    /// Chunk bytes downloaded since the daemon started, by where they came from.
    #[serde(default)]
    pub bytes_by_source: BytesBySource,
    /// The regional relay downloads go through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayInUse>,
    /// The user's versions not yet backed up (committed before the origin had their chunks), as
    /// last seen by this daemon; and how many of this device's own it still has to upload.
    #[serde(default)]
    pub pending_versions: Vec<PendingVersion>,
    #[serde(default)]
    pub owed_uploads: usize,
    /// Set while the coordinator refuses this device's uploads or commits for the user's storage
    /// quota (state `over_quota`): what is used and the quota. Local files stay as they are;
    /// the daemon tries again as it backs off, and syncs once space is freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<UsageResponse>,
}

/// A peer a device is connected to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub device: DeviceId,
    pub name: String,
    /// How it was found: `hint` (the coordinator named it), `mdns` (seen on the LAN) or
    /// `incoming` (it called).
    pub found: String,
    pub addr: String,
    /// Round-trip time, as the connection measures it.
    pub rtt_ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The largest UDP payload the path carries, as discovered so far.
    #[serde(default)]
    pub mtu: u16,
}

/// What `shoal status --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub device: String,
    pub device_id: DeviceId,
    pub root: Option<PathBuf>,
    pub daemon_running: bool,
    pub status: Status,
    /// The peers the running daemon is connected to.
    pub peers: Vec<PeerStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_as_written_and_an_empty_one_as_never_synced() {
        for s in [SyncState::InSync, SyncState::OverQuota, SyncState::Stopped] {
            let text = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<SyncState>(&text).unwrap(), s);
        }
        assert_eq!(serde_json::to_string(&SyncState::OverQuota).unwrap(), "\"over_quota\"");
        assert_eq!(serde_json::from_str::<SyncState>("\"\"").unwrap(), SyncState::NeverSynced);
        assert!(serde_json::from_str::<SyncState>("\"asleep\"").is_err());
    }

    #[test]
    fn a_status_from_before_the_newer_fields_still_reads() {
        let old = r#"{"state":"in_sync","in_sync":true,"pid":7,"cursor":3,"pending_uploads":0,
            "pending_downloads":0,"last_sync_ms":1,"updated_ms":2,"last_error":null,"skipped":[]}"#;
        let s: Status = serde_json::from_str(old).unwrap();
        assert_eq!((s.state, s.pid, s.bytes_by_source), (SyncState::InSync, 7, BytesBySource::default()));
    }
}
