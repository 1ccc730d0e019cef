//! The relay's settings: flags, and a TOML config file with the same keys (`cache-size` is
//! `cache_size` there); a flag overrides its key, unknown keys are refused, and every setting is
//! checked before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::Options;

/// `shoal-relay serve`'s flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// The region this relay serves (as `relay add --region` named it).
    #[arg(long)]
    pub region: Option<String>,
    /// The coordinator, HOST:PORT.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// BLAKE3 fingerprint of the coordinator's certificate (hex), which the relay pins.
    #[arg(long)]
    pub coordinator_fingerprint: Option<String>,
    /// The relay's token, as `shoal-coordinator relay add` printed it.
    #[arg(long, env = "SHOAL_RELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where the cache (and the relay's certificate) are kept.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Most disk the cache may take ("10GiB", "500MB").
    #[arg(long)]
    pub cache_size: Option<String>,
    /// Address to listen on for devices [default: 0.0.0.0:7444].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address of the plain-HTTP metrics listener, or `off` [default: 127.0.0.1:7445].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// https://HOST:PORT as devices should reach the relay [default: https://LISTEN].
    #[arg(long)]
    pub public_url: Option<String>,
}

/// The config file: the same keys as the flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub region: Option<String>,
    pub coordinator: Option<String>,
    pub coordinator_fingerprint: Option<String>,
    pub token: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub cache_size: Option<String>,
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<String>,
    pub public_url: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// The settings from `flags` over `file`, checked.
pub fn options(flags: Flags, file: FileConfig) -> anyhow::Result<Options> {
    let need = |v: Option<String>, what: &str| {
        v.with_context(|| format!("--{what} is required (or `{}` in the config file)", what.replace('-', "_")))
    };
    let region = need(flags.region.or(file.region), "region")?;
    let coordinator = need(flags.coordinator.or(file.coordinator), "coordinator")?;
    let fingerprint = need(flags.coordinator_fingerprint.or(file.coordinator_fingerprint), "coordinator-fingerprint")?;
    let coordinator_fingerprint =
        fingerprint.trim().parse().map_err(|e| anyhow::anyhow!("bad coordinator fingerprint {fingerprint:?}: {e}"))?;
    let token = need(flags.token.or(file.token), "token")?;
    anyhow::ensure!(!token.trim().is_empty(), "the relay token is empty");
    let cache_dir =
        flags.cache_dir.or(file.cache_dir).context("--cache-dir is required (or `cache_dir` in the config file)")?;
    let size = need(flags.cache_size.or(file.cache_size), "cache-size")?;
    let cache_size =
        shoal_protocol::size::parse_bytes(&size).map_err(|e| anyhow::anyhow!("bad cache size {size:?}: {e}"))?;
    anyhow::ensure!(cache_size >= 4 * 1024 * 1024, "the cache size must be at least 4 MiB");
    anyhow::ensure!(
        shoal_protocol::api::valid_user_name(&region),
        "bad region {region:?}: 1-32 characters, lowercase letters, digits, '_' and '-'"
    );
    let listen =
        flags.listen.or(file.listen).unwrap_or_else(|| crate::DEFAULT_LISTEN.parse().expect("a valid address"));
    let metrics_listen = match flags.metrics_listen.or(file.metrics_listen).as_deref() {
        Some("off") => None,
        Some(a) => Some(a.parse().map_err(|e| anyhow::anyhow!("bad metrics address {a:?}: {e}"))?),
        None => Some(crate::DEFAULT_METRICS_LISTEN.parse().expect("a valid address")),
    };
    let public_url = flags.public_url.or(file.public_url);
    if let Some(u) = &public_url {
        anyhow::ensure!(
            u.starts_with("https://") && u.len() > 8,
            "the public url must be https://HOST:PORT, not {u:?}"
        );
    }
    Ok(Options {
        region,
        coordinator,
        coordinator_fingerprint,
        token,
        cache_dir,
        cache_size,
        listen,
        metrics_listen,
        public_url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Flags {
        Flags {
            region: Some("eu".into()),
            coordinator: Some("127.0.0.1:7443".into()),
            coordinator_fingerprint: Some("ab".repeat(32)),
            token: Some("t".into()),
            cache_dir: Some("/tmp/c".into()),
            cache_size: Some("10GiB".into()),
            ..Flags::default()
        }
    }

    #[test]
    fn flags_override_the_file_and_bad_values_are_refused() {
        let o = options(full(), FileConfig { region: Some("apac".into()), ..Default::default() }).unwrap();
        assert_eq!((o.region.as_str(), o.cache_size), ("eu", 10 << 30));
        assert_eq!(o.metrics_listen, Some(crate::DEFAULT_METRICS_LISTEN.parse().unwrap()));
        let from_file =
            options(Flags { region: None, ..full() }, FileConfig { region: Some("apac".into()), ..Default::default() });
        assert_eq!(from_file.unwrap().region, "apac");
        let e = options(Flags { region: None, ..full() }, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--region is required"), "{e}");
        for bad in [
            Flags { cache_size: Some("lots".into()), ..full() },
            Flags { cache_size: Some("1MiB".into()), ..full() },
            Flags { coordinator_fingerprint: Some("xyz".into()), ..full() },
            Flags { region: Some("Europe West".into()), ..full() },
            Flags { metrics_listen: Some("nowhere".into()), ..full() },
            Flags { public_url: Some("http://relay:1".into()), ..full() },
        ] {
            assert!(options(bad.clone(), FileConfig::default()).is_err(), "{bad:?}");
        }
        let off = options(Flags { metrics_listen: Some("off".into()), ..full() }, FileConfig::default()).unwrap();
        assert_eq!(off.metrics_listen, None);
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "region = \"eu\"\ncache_sise = \"1GiB\"\n").unwrap();
        let e = FileConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("cache_sise") && e.contains("line 2"), "{e}");
    }
}
