//! The agent's configuration (`$SHOAL_HOME/config.toml`) and where its state lives. Written by
//! `shoal init`; unknown fields are rejected so a typo is an error, not a silent default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_protocol::{ChunkId, DeviceId};

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
}

fn default_rescan() -> Duration {
    Duration::from_secs(600)
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
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
        let path = Self::path(home);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(toml::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The sync root, or an error saying how to get one.
    pub fn root(&self) -> anyhow::Result<&Path> {
        self.root.as_deref().context("this device has no sync folder; run `shoal init` with --dir")
    }
}

/// Stores the device's TLS identity in its home: `device.key` (0600), `device.crt` (signed by the
/// user's CA) and `user-ca.crt`. Devices of one user authenticate each other with these.
pub fn save_identity(home: &Path, key_pem: &str, cert_pem: &str, ca_pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(home.join("device.key"))?;
    f.write_all(key_pem.as_bytes())?;
    f.sync_all()?;
    std::fs::write(home.join("device.crt"), cert_pem)?;
    std::fs::write(home.join("user-ca.crt"), ca_pem)?;
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

/// Parses "250ms", "30s", "10m", "1h" (and bare seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}: expected e.g. 500ms, 30s, 10m"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        u => {
            return Err(format!("bad duration unit {u:?} in {s:?}: use ms, s, m or h"));
        }
    };
    Ok(d)
}

mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
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
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 weeks").is_err());
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
