//! The coordinator's config file (TOML): the same settings as `serve`'s flags, which override
//! it. Unknown keys are refused, so a typo never silently means the default.
//!
//! ```toml
//! data = "/var/lib/shoal"
//! listen = "0.0.0.0:7443"
//! public_addr = "sync.example.com:7443"
//! metrics_listen = "127.0.0.1:7444"   # or "off"
//! pending_stuck_after = "10m"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::ServeOptions;

/// What a config file holds; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub public_addr: Option<String>,
    /// An address, or `off`.
    pub metrics_listen: Option<String>,
    /// A duration ("10m", "1h").
    pub pending_stuck_after: Option<String>,
}

/// `serve`'s flags: each overrides the file's key of the same name.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub data: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub public_addr: Option<String>,
    pub metrics_listen: Option<Option<SocketAddr>>,
    pub pending_stuck_after: Option<Duration>,
}

impl FileConfig {
    /// Reads and parses `path`. Errors name the file and, for a parse error, the line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{} is not a valid coordinator config", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

/// `--metrics-listen` and `metrics_listen`: an address, or `off`.
pub fn parse_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| format!("{e}: expected HOST:PORT or `off`"))
}

/// The options to serve with: each flag given, else the file's key, else the default.
pub fn serve_options(file: FileConfig, flags: Flags) -> anyhow::Result<ServeOptions> {
    let data = flags
        .data
        .or(file.data)
        .context("no data directory: pass --data DIR (or SHOAL_COORDINATOR_DATA), or set `data` in the config file")?;
    let metrics_listen = match (flags.metrics_listen, file.metrics_listen) {
        (Some(m), _) => m,
        (None, Some(s)) => parse_listen(&s).map_err(|e| anyhow::anyhow!("metrics_listen = {s:?}: {e}"))?,
        (None, None) => parse_listen(crate::DEFAULT_METRICS_LISTEN).expect("the default metrics address parses"),
    };
    let pending_stuck_after = match (flags.pending_stuck_after, file.pending_stuck_after) {
        (Some(d), _) => d,
        (None, Some(s)) => humantime::parse_duration(&s)
            .map_err(|e| anyhow::anyhow!("pending_stuck_after = {s:?}: {e} (expected e.g. \"10m\")"))?,
        (None, None) => crate::DEFAULT_PENDING_STUCK_AFTER,
    };
    Ok(ServeOptions {
        data,
        listen: flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| crate::DEFAULT_LISTEN.parse().expect("the default listen address parses")),
        public_addr: flags.public_addr.or(file.public_addr),
        metrics_listen,
        pending_stuck_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_their_place() {
        let e = FileConfig::parse("data = \"/d\"\nlisten_addr = \"1.2.3.4:5\"\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("unknown field `listen_addr`") && msg.contains("line 2"), "{msg}");
        let e = FileConfig::parse("listen = \"nowhere\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        let file = FileConfig::parse("data = \"/d\"\nmetrics_listen = \"loopback\"\n").unwrap();
        let e = serve_options(file, Flags::default()).unwrap_err();
        assert!(e.to_string().contains("metrics_listen = \"loopback\""), "{e}");
        let file = FileConfig::parse("data = \"/d\"\npending_stuck_after = \"soon\"\n").unwrap();
        assert!(serve_options(file, Flags::default()).unwrap_err().to_string().contains("pending_stuck_after"));
        assert!(serve_options(FileConfig::default(), Flags::default()).unwrap_err().to_string().contains("--data"));
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let text =
            "data = \"/file\"\nlisten = \"127.0.0.1:9000\"\nmetrics_listen = \"off\"\npending_stuck_after = \"2m\"\n";
        let opts = serve_options(FileConfig::parse(text).unwrap(), Flags::default()).unwrap();
        assert_eq!(opts.data, PathBuf::from("/file"));
        assert_eq!(opts.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(opts.metrics_listen, None);
        assert_eq!(opts.pending_stuck_after, Duration::from_secs(120));
        let flags = Flags {
            data: Some("/flag".into()),
            metrics_listen: Some(Some("127.0.0.1:1".parse().unwrap())),
            pending_stuck_after: Some(Duration::from_secs(5)),
            ..Flags::default()
        };
        let opts = serve_options(FileConfig::parse(text).unwrap(), flags).unwrap();
        assert_eq!(opts.data, PathBuf::from("/flag"));
        assert_eq!(opts.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(opts.metrics_listen, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(opts.pending_stuck_after, Duration::from_secs(5));
        let opts = serve_options(FileConfig::default(), Flags { data: Some("/d".into()), ..Flags::default() }).unwrap();
        assert_eq!(opts.listen, crate::DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(opts.pending_stuck_after, crate::DEFAULT_PENDING_STUCK_AFTER);
    }
}
