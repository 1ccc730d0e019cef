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
//! cache_size = "1GiB"                  # recent packs kept on local disk; 0 for none
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
use shoal_packs::s3::S3Config;

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
    /// A size ("1GiB"), or 0.
    pub cache_size: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// `serve`'s flags: each overrides the file's key of the same name.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// Data directory (metadata, chunks, TLS identity). Created 0700; refused if other users
    /// can write to it.
    #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
    pub data: Option<PathBuf>,
    /// Address to listen on (port 0 picks one; see DATA/server.json) [default: 127.0.0.1:7443].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address devices should dial, written into invites (default: the bound address).
    #[arg(long)]
    pub public_addr: Option<String>,
    /// Plain-HTTP address for `/metrics` (Prometheus) and `/healthz`, or `off`. Keep it on a
    /// private network: the counters describe every user's activity [default: 127.0.0.1:7444].
    #[arg(long, value_parser = parse_listen_flag)]
    pub metrics_listen: Option<Listen>,
    /// How long a pending version (committed before its chunks were uploaded) may go without
    /// a chunk of it arriving before it counts as stuck: devices stop trying to fetch it and
    /// /metrics counts it [default: 10m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub pending_stuck_after: Option<Duration>,
    #[command(flatten)]
    pub s3: S3Flags,
    /// How long a version is kept after a newer one (or a deletion) replaced it ("30d"), or
    /// `forever`; the head of every path is always kept [default: 30d].
    #[arg(long)]
    pub keep_versions: Option<String>,
    /// How often garbage collection runs in the background ("1h"), or `off` [default: 1h].
    #[arg(long)]
    pub gc_interval: Option<String>,
    /// How long an unreferenced chunk (or an emptied pack) waits before it is deleted; longer
    /// than a device may take between an upload and its commit [default: 1h].
    #[arg(long)]
    pub gc_grace: Option<String>,
}

/// The `--s3-*` flags.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct S3Flags {
    /// Keep chunks in this S3 bucket instead of DATA/chunks. Credentials come from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the config file); instance metadata
    /// is never used.
    #[arg(long = "s3-bucket")]
    pub bucket: Option<String>,
    /// Key prefix inside the bucket (e.g. "shoal/").
    #[arg(long = "s3-prefix")]
    pub prefix: Option<String>,
    /// The bucket's region [default: us-east-1].
    #[arg(long = "s3-region")]
    pub region: Option<String>,
    /// An S3-compatible service's URL (default: AWS's endpoint for the region).
    #[arg(long = "s3-endpoint")]
    pub endpoint: Option<String>,
    /// Path-style requests (ENDPOINT/BUCKET/KEY), which most S3-compatible services want.
    #[arg(long = "s3-path-style")]
    pub path_style: bool,
    /// Local disk kept for packs written recently ("1GiB"; 0 for none), so the user's other
    /// devices fetch what one just uploaded without a GET to S3 [default: 1GiB].
    #[arg(long = "s3-cache-size")]
    pub cache_size: Option<String>,
    #[arg(long = "s3-access-key-id", env = "AWS_ACCESS_KEY_ID", hide = true)]
    pub access_key_id: Option<String>,
    #[arg(long = "s3-secret-access-key", env = "AWS_SECRET_ACCESS_KEY", hide = true, hide_env_values = true)]
    pub secret_access_key: Option<String>,
}

/// `--metrics-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen_flag(s: &str) -> Result<Listen, String> {
    parse_listen(s).map(Listen)
}

/// Disk kept for recently written packs when neither flag nor file says.
pub const DEFAULT_S3_CACHE: u64 = 1 << 30;

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
        (Some(m), _) => m.0,
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
        s3: s3_config(file.s3, flags.s3)?,
    })
}

/// The S3 backend's settings, if a bucket is named (by flag or file); the other keys without a
/// bucket are an error, not silently ignored.
fn s3_config(file: Option<S3Section>, flags: S3Flags) -> anyhow::Result<Option<S3Config>> {
    let S3Flags { bucket, prefix, region, endpoint, path_style, cache_size, access_key_id, secret_access_key } = flags;
    let file_given = file.is_some();
    let file = file.unwrap_or_default();
    let Some(bucket) = bucket.or(file.bucket) else {
        anyhow::ensure!(
            !file_given
                && prefix.is_none()
                && region.is_none()
                && endpoint.is_none()
                && !path_style
                && cache_size.is_none(),
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
    let cache_bytes = match cache_size.or(file.cache_size) {
        None => DEFAULT_S3_CACHE,
        Some(v) if v.trim() == "0" => 0,
        Some(v) => shoal_protocol::size::parse_bytes(&v).map_err(|e| anyhow::anyhow!("S3 cache size {v:?}: {e}"))?,
    };
    Ok(Some(S3Config {
        bucket,
        prefix,
        cache_bytes,
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
            metrics_listen: Some(Listen(Some("127.0.0.1:1".parse().unwrap()))),
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
        assert_eq!(s3.cache_bytes, DEFAULT_S3_CACHE);
        let flags = Flags {
            s3: S3Flags {
                bucket: Some("other".into()),
                endpoint: Some("http://127.0.0.1:9000".into()),
                access_key_id: Some("ek".into()),
                secret_access_key: Some("es".into()),
                cache_size: Some("0".into()),
                ..S3Flags::default()
            },
            ..Flags::default()
        };
        let s3 = serve_options(FileConfig::parse(text).unwrap(), flags).unwrap().s3.unwrap();
        assert_eq!((s3.bucket.as_str(), s3.access_key_id.as_str()), ("other", "ek"));
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.cache_bytes, 0);
        let sized = FileConfig::parse(&format!("{text}cache_size = \"256MiB\"\n")).unwrap();
        assert_eq!(serve_options(sized, Flags::default()).unwrap().s3.unwrap().cache_bytes, 256 << 20);
        let bad = FileConfig::parse(&format!("{text}cache_size = \"lots\"\n")).unwrap();
        assert!(serve_options(bad, Flags::default()).unwrap_err().to_string().contains("cache size \"lots\""));
        let e = FileConfig::parse("[s3]\nbucket = \"b\"\nsecret = \"x\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field `secret`"), "{e:#}");
        let no_key = FileConfig::parse("data = \"/d\"\n[s3]\nbucket = \"b\"\n").unwrap();
        assert!(serve_options(no_key, Flags::default()).unwrap_err().to_string().contains("AWS_ACCESS_KEY_ID"));
        let no_bucket = Flags {
            data: Some("/d".into()),
            s3: S3Flags { prefix: Some("p".into()), ..S3Flags::default() },
            ..Flags::default()
        };
        assert!(serve_options(FileConfig::default(), no_bucket).unwrap_err().to_string().contains("--s3-bucket"));
        let bad_url = Flags {
            data: Some("/d".into()),
            s3: S3Flags { bucket: Some("b".into()), endpoint: Some("s3.example.com".into()), ..S3Flags::default() },
            ..Flags::default()
        };
        assert!(serve_options(FileConfig::default(), bad_url).unwrap_err().to_string().contains("not an http"));
    }
}
