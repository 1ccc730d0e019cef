//! The coordinator's config file (TOML): the same settings as `serve`'s flags, which override
//! it. Unknown keys are refused, so a typo never silently means the default.
//!
//! ```toml
//! data = "/var/lib/shoal"
//! listen = "0.0.0.0:7443"
//! public_addr = "sync.example.com:7443"
//! metrics_listen = "127.0.0.1:7444"   # or "off"
//! pending_stuck_after = "10m"
//!
//! [s3]                                 # chunks in a bucket instead of DATA/chunks
//! bucket = "shoal-chunks"
//! prefix = "prod/"                     # optional
//! region = "eu-west-1"                 # default us-east-1
//! endpoint = "https://s3.example.com"  # optional: AWS's own endpoint for the region
//! path_style = true                    # optional, default false
//! access_key_id = "..."                # or AWS_ACCESS_KEY_ID
//! secret_access_key = "..."            # or AWS_SECRET_ACCESS_KEY
//!
//! [retention]
//! keep = "30d"                         # or "forever"
//! gc_interval = "1h"                   # or "off"
//! gc_grace = "1h"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::ServeOptions;
use crate::packs::s3::S3Config;

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
    pub s3: Option<S3Section>,
    pub retention: Option<RetentionSection>,
}

/// The `[retention]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// How long a replaced version is kept ("30d"), or "forever".
    pub keep: Option<String>,
    /// How often garbage collection runs ("1h"), or "off".
    pub gc_interval: Option<String>,
    /// How long an unreferenced chunk stays condemned before it is deleted ("1h").
    pub gc_grace: Option<String>,
}

/// The `[s3]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// `serve`'s flags: each overrides the file's key of the same name.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub data: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub public_addr: Option<String>,
    pub metrics_listen: Option<Option<SocketAddr>>,
    pub pending_stuck_after: Option<Duration>,
    pub s3_bucket: Option<String>,
    pub s3_prefix: Option<String>,
    pub s3_region: Option<String>,
    pub s3_endpoint: Option<String>,
    /// `--s3-path-style` given.
    pub s3_path_style: bool,
    /// From `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    pub keep_versions: Option<String>,
    pub gc_interval: Option<String>,
    pub gc_grace: Option<String>,
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

/// A duration, or `word` (`forever`, `off`) for none.
fn duration_or(key: &str, value: &str, word: &str) -> anyhow::Result<Option<Duration>> {
    if value == word {
        return Ok(None);
    }
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => anyhow::bail!("{key} = {value:?}: must be longer than 0 (or {word:?})"),
        Err(e) => anyhow::bail!("{key} = {value:?}: {e} (expected e.g. \"30d\", or {word:?})"),
    }
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
    let retention = file.retention.unwrap_or_default();
    let keep = match flags.keep_versions.or(retention.keep) {
        Some(v) => duration_or("keep", &v, "forever")?,
        None => Some(crate::gc::DEFAULT_KEEP),
    };
    let gc_interval = match flags.gc_interval.or(retention.gc_interval) {
        Some(v) => duration_or("gc_interval", &v, "off")?,
        None => Some(crate::DEFAULT_GC_INTERVAL),
    };
    let grace = match flags.gc_grace.or(retention.gc_grace) {
        Some(v) => duration_or("gc_grace", &v, "")?.context("gc_grace needs a duration")?,
        None => crate::gc::DEFAULT_GRACE,
    };
    Ok(ServeOptions {
        retention: crate::gc::Policy { keep, grace },
        gc_interval,
        data,
        listen: flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| crate::DEFAULT_LISTEN.parse().expect("the default listen address parses")),
        public_addr: flags.public_addr.or(file.public_addr),
        metrics_listen,
        pending_stuck_after,
        s3: s3_config(
            file.s3,
            flags.s3_bucket,
            flags.s3_prefix,
            flags.s3_region,
            flags.s3_endpoint,
            flags.s3_path_style,
            flags.s3_access_key_id,
            flags.s3_secret_access_key,
        )?,
    })
}

/// The S3 backend's settings, if a bucket is named (by flag or file); the other keys without a
/// bucket are an error, not silently ignored.
#[allow(clippy::too_many_arguments)]
fn s3_config(
    file: Option<S3Section>,
    bucket: Option<String>,
    prefix: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    path_style: bool,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
) -> anyhow::Result<Option<S3Config>> {
    let file_given = file.is_some();
    let file = file.unwrap_or_default();
    let Some(bucket) = bucket.or(file.bucket) else {
        anyhow::ensure!(
            !file_given && prefix.is_none() && region.is_none() && endpoint.is_none() && !path_style,
            "S3 settings without a bucket: pass --s3-bucket BUCKET (or set `bucket` in [s3])"
        );
        return Ok(None);
    };
    anyhow::ensure!(!bucket.is_empty(), "the S3 bucket name is empty");
    let mut prefix = prefix.or(file.prefix).unwrap_or_default().trim_start_matches('/').to_string();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    let endpoint = endpoint.or(file.endpoint);
    if let Some(url) = &endpoint {
        anyhow::ensure!(
            url.starts_with("https://") || url.starts_with("http://"),
            "S3 endpoint {url:?} is not an http:// or https:// URL"
        );
    }
    let access_key_id = access_key_id.or(file.access_key_id).context(
        "no S3 access key id: set AWS_ACCESS_KEY_ID (or access_key_id in [s3]); instance metadata is never used",
    )?;
    let secret_access_key = secret_access_key
        .or(file.secret_access_key)
        .context("no S3 secret access key: set AWS_SECRET_ACCESS_KEY (or secret_access_key in [s3])")?;
    Ok(Some(S3Config {
        bucket,
        prefix,
        region: region.or(file.region).unwrap_or_else(|| "us-east-1".to_string()),
        endpoint,
        path_style: path_style || file.path_style.unwrap_or(false),
        access_key_id,
        secret_access_key,
    }))
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
        assert_eq!(opts.s3, None);
        assert_eq!(opts.retention, crate::gc::Policy::default());
        assert_eq!(opts.gc_interval, Some(crate::DEFAULT_GC_INTERVAL));
    }

    #[test]
    fn retention_comes_from_flags_or_the_file() {
        let text = "data = \"/d\"\n[retention]\nkeep = \"forever\"\ngc_interval = \"off\"\ngc_grace = \"10m\"\n";
        let opts = serve_options(FileConfig::parse(text).unwrap(), Flags::default()).unwrap();
        assert_eq!(opts.retention.keep, None);
        assert_eq!(opts.retention.grace, Duration::from_secs(600));
        assert_eq!(opts.gc_interval, None);
        let flags = Flags { keep_versions: Some("7d".into()), gc_interval: Some("6h".into()), ..Flags::default() };
        let opts = serve_options(FileConfig::parse(text).unwrap(), flags).unwrap();
        assert_eq!(opts.retention.keep, Some(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(opts.gc_interval, Some(Duration::from_secs(6 * 3600)));
        let bad = FileConfig::parse("data = \"/d\"\n[retention]\nkeep = \"a month\"\n").unwrap();
        assert!(serve_options(bad, Flags::default()).unwrap_err().to_string().contains("keep = \"a month\""));
        let zero = Flags { data: Some("/d".into()), keep_versions: Some("0s".into()), ..Flags::default() };
        assert!(serve_options(FileConfig::default(), zero).unwrap_err().to_string().contains("longer than 0"));
        assert!(FileConfig::parse("[retention]\nkeep_for = \"1d\"\n").is_err());
    }

    #[test]
    fn s3_settings_come_from_flags_the_file_and_the_environment() {
        let text = "data = \"/d\"\n[s3]\nbucket = \"b\"\nprefix = \"/x\"\npath_style = true\naccess_key_id = \"fk\"\nsecret_access_key = \"fs\"\n";
        let opts = serve_options(FileConfig::parse(text).unwrap(), Flags::default()).unwrap();
        let s3 = opts.s3.unwrap();
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str(), s3.region.as_str()), ("b", "x/", "us-east-1"));
        assert!(s3.path_style && s3.endpoint.is_none());
        assert_eq!((s3.access_key_id.as_str(), s3.secret_access_key.as_str()), ("fk", "fs"));
        let flags = Flags {
            s3_bucket: Some("other".into()),
            s3_endpoint: Some("http://127.0.0.1:9000".into()),
            s3_access_key_id: Some("ek".into()),
            s3_secret_access_key: Some("es".into()),
            ..Flags::default()
        };
        let s3 = serve_options(FileConfig::parse(text).unwrap(), flags).unwrap().s3.unwrap();
        assert_eq!((s3.bucket.as_str(), s3.access_key_id.as_str()), ("other", "ek"));
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        let e = FileConfig::parse("[s3]\nbucket = \"b\"\nsecret = \"x\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field `secret`"), "{e:#}");
        let no_key = FileConfig::parse("data = \"/d\"\n[s3]\nbucket = \"b\"\n").unwrap();
        assert!(serve_options(no_key, Flags::default()).unwrap_err().to_string().contains("AWS_ACCESS_KEY_ID"));
        let no_bucket = Flags { data: Some("/d".into()), s3_prefix: Some("p".into()), ..Flags::default() };
        assert!(serve_options(FileConfig::default(), no_bucket).unwrap_err().to_string().contains("--s3-bucket"));
        let bad_url = Flags {
            data: Some("/d".into()),
            s3_bucket: Some("b".into()),
            s3_endpoint: Some("s3.example.com".into()),
            ..Flags::default()
        };
        assert!(serve_options(FileConfig::default(), bad_url).unwrap_err().to_string().contains("not an http"));
    }
}
