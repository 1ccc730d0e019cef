//! The agent's configuration (`$SHOAL_HOME/config.toml`) and where its state lives. Written by
//! `shoal init`; unknown fields are rejected so a typo is an error, not a silent default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_protocol::{ChunkId, DeviceId};
use shoal_sys::fs::{Durability, write_atomic};

/// The agent's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Coordinator address, `HOST:PORT`.
    pub server: String,
    /// BLAKE3 of the coordinator's certificate (DER); the connection is refused otherwise.
    pub fingerprint: ChunkId,
    /// User name this device belongs to.
    pub user: String,
    pub device_id: DeviceId,
    pub device_name: String,
    /// Bearer token (secret; the file is mode 0600).
    pub token: String,
    /// The synced folder, absolute. `None` for a device used only with `put`/`get`.
    pub root: Option<PathBuf>,
    /// Full rescan interval, the backstop for missed watcher events. Default "10m".
    #[serde(default = "default_rescan", with = "human_duration")]
    pub rescan_interval: Duration,
    /// Quiet time before watcher events trigger a scan. Default "50ms".
    #[serde(default = "default_debounce", with = "human_duration")]
    pub debounce: Duration,
    /// Local address every outgoing connection is made from (an address of this machine).
    /// Default: none, the OS picks.
    #[serde(default)]
    pub bind: Option<std::net::IpAddr>,
    /// UDP address the peer endpoint listens on. Default: `bind` (or every interface), a port
    /// the OS picks.
    #[serde(default)]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// Exchange file contents directly with the user's other devices on the LAN (the peer
    /// endpoint, coordinator hints, mDNS). Off: everything goes through the coordinator.
    /// Default: on.
    #[serde(default = "default_true")]
    pub lan_sync: bool,
    /// Announce this device on the LAN and look for the user's other devices there (mDNS), besides
    /// the coordinator's hints. Default: on.
    #[serde(default = "default_true")]
    pub mdns: bool,
    /// Fetch through a regional relay, when the coordinator lists one, before the origin.
    /// Default: on.
    #[serde(default = "default_true")]
    pub relays: bool,
    /// The region whose relay this device uses (as the operator named it). Default: none, the
    /// relay a TCP connection reaches soonest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Most bytes per second sent to the coordinator (and relays). Default: no limit.
    #[serde(default)]
    pub upload_limit: Option<crate::limit::Rate>,
    /// Most bytes per second received from the coordinator (and relays). Default: no limit.
    #[serde(default)]
    pub download_limit: Option<crate::limit::Rate>,
    /// Most bytes per second sent, and received, between this device and its LAN peers.
    /// Default: no limit.
    #[serde(default)]
    pub lan_limit: Option<crate::limit::Rate>,
    /// How long `shoal run`, asked to stop, keeps going to finish the uploads this device owes
    /// (its unsent commits, its own versions not yet backed up, other devices' it holds). A
    /// second signal stops it at once. Default "30s".
    #[serde(default = "default_shutdown_grace", with = "human_duration")]
    pub shutdown_grace: Duration,
}

impl Config {
    /// Where the peer endpoint listens.
    pub fn peer_listen(&self) -> std::net::SocketAddr {
        self.peer_listen.unwrap_or_else(|| {
            std::net::SocketAddr::new(self.bind.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()), 0)
        })
    }
}

fn default_true() -> bool {
    true
}

fn default_rescan() -> Duration {
    Duration::from_secs(600)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_debounce() -> Duration {
    Duration::from_millis(50)
}

impl Config {
    pub fn path(home: &Path) -> PathBuf {
        home.join("config.toml")
    }

    pub fn load(home: &Path) -> anyhow::Result<Config> {
        let path = Self::path(home);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("no device configured at {} (run `shoal init --invite ... --dir ...` first)", path.display())
        })?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn save(&self, home: &Path) -> anyhow::Result<()> {
        create_private_dir(home)?;
        let path = Self::path(home);
        write_atomic(&path, toml::to_string_pretty(self)?.as_bytes(), Durability::Synced)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The sync root, or an error saying how to get one.
    pub fn root(&self) -> anyhow::Result<&Path> {
        self.root.as_deref().context("this device has no sync folder; run `shoal init` with --dir")
    }
}

/// Stores the device's TLS identity in its home: `device.key` (0600), `device.crt` (signed by the
/// user's CA) and `user-ca.crt`. Devices of one user authenticate each other with these.
pub fn save_identity(home: &Path, key_pem: &str, cert_pem: &str, ca_pem: &str) -> anyhow::Result<()> {
    create_private_dir(home)?;
    for (name, pem) in [("device.key", key_pem), ("device.crt", cert_pem), ("user-ca.crt", ca_pem)] {
        let path = home.join(name);
        write_atomic(&path, pem.as_bytes(), Durability::Synced)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Mode of the agent's home and every directory in it (the database, the sync folder's
/// `.shoal`): they hold every synced file's name and hash, the device's token and key, so only
/// the owner may list or enter them, whatever the umask.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` (its parents as usual) mode 0700, or tightens it to 0700 if it exists.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    // The umask can only narrow the mode given above; set it exactly all the same.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .with_context(|| format!("making {} private", dir.display()))
}

/// The files the agent keeps directly in its home (besides the `db` directory).
const HOME_FILES: [&str; 7] = [
    "config.toml",
    "device.key",
    "device.crt",
    "user-ca.crt",
    "status.json",
    crate::peer::tls::ROSTER_FILE,
    crate::peer::node::PEERS_FILE,
];

/// Removes group and other access from `path` and, for a directory, everything under it
/// (symbolic links are left alone): directories become 0700, files keep only their owner bits.
/// Returns how many entries were tightened. For the agent's own directories only.
pub fn tighten_tree(path: &Path) -> std::io::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let md = path.symlink_metadata()?;
    let mode = md.permissions().mode() & 0o7777;
    let mut changed = 0;
    if md.is_dir() {
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
            changed += 1;
        }
        for e in std::fs::read_dir(path)? {
            changed += tighten_tree(&e?.path())?;
        }
    } else if md.is_file() && mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
        changed += 1;
    }
    Ok(changed)
}

/// Makes an existing home private again: if it, its database or the files the agent keeps in
/// it are open to group or others, they are tightened (the home is the agent's own directory)
/// and a warning says so. Other entries a user put there are not touched; a missing home stays
/// missing.
pub fn secure_home(home: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = home.symlink_metadata() else { return Ok(()) };
    if !md.is_dir() {
        return Ok(());
    }
    let fail = || format!("making the agent's home {} private", home.display());
    let mut changed = 0;
    if md.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE)).with_context(fail)?;
        changed += 1;
    }
    for name in HOME_FILES.iter().chain(&["db"]) {
        match tighten_tree(&home.join(name)) {
            Ok(n) => changed += n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(fail),
        }
    }
    if changed > 0 {
        tracing::warn!(
            home = %home.display(),
            entries = changed,
            "the agent's home was open to other users; restricted it to its owner (directories 0700, files 0600)"
        );
    }
    Ok(())
}

/// Resolves the agent's home: `--home`, else `$SHOAL_HOME`, else the platform data directory.
pub fn resolve_home(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(h) = flag {
        return Ok(h);
    }
    if let Some(h) = std::env::var_os("SHOAL_HOME") {
        return Ok(PathBuf::from(h));
    }
    let dirs = directories::ProjectDirs::from("dev", "shoal", "shoal")
        .context("cannot find a home directory; set SHOAL_HOME or pass --home")?;
    Ok(dirs.data_dir().to_path_buf())
}

/// Parses a duration as `humantime` does ("250ms", "30s", "10m", "1h 30m"), or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?} ({e}): expected e.g. 500ms, 30s, 10m"))
}

mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("600000ms"), Ok(Duration::from_secs(600)), "as older agents wrote it");
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        for d in [Duration::from_millis(50), Duration::from_secs(600), Duration::from_millis(1500)] {
            assert_eq!(parse_duration(&humantime::format_duration(d).to_string()), Ok(d));
        }
    }

    #[test]
    fn rejects_unknown_fields() {
        let text = r#"
            server = "127.0.0.1:1"
            fingerprint = "0000000000000000000000000000000000000000000000000000000000000000"
            user = "a"
            device_id = "00000000000000000000000000000000"
            device_name = "d"
            token = "t"
            colour = "blue"
        "#;
        let err = toml::from_str::<Config>(text).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }
}
