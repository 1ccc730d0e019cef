//! Packs as objects in an S3-compatible bucket, `PREFIX/packs/NNNNNNNN.pack`.
//!
//! An object is written once, whole, so a pack is *sealed* when it is made durable: one PUT of
//! what the writer staged. The writer stages in memory and a pack is closed at [`PACK_BYTES`]
//! (8 MiB), so a 1 GiB file streams through in bounded memory: the pack being filled, and the
//! few closed ones the chunk store lets wait for their PUT (a background thread sends them while
//! uploads go on). A commit that needs its chunks durable seals the pack it fills at once, so a
//! small commit waits for one small PUT, never for a pack to fill. A PUT is atomic: a crash
//! leaves no half-written pack behind. Reads are ranged GETs of exactly the frames asked for.
//!
//! Packs just written are also kept in a local cache ([`PackCache`], `--s3-cache-size`, 1 GiB
//! by default), written by a thread of its own after the PUT: what one device uploads is what
//! the user's other devices fetch next, and they then read it from the coordinator's disk with
//! no GET at all. The chunk store verifies every
//! byte it reads, from the cache as from S3; a cached copy that fails is dropped and the range
//! read from S3 instead.
//!
//! Every request retries transient failures (timeouts, resets, 5xx, throttling) with jittered
//! exponential backoff; permanent ones (bad credentials, no such bucket, access denied) fail at
//! once with one line saying what to fix. Credentials are static (flags, config file or
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`): no credential chain, so no instance-metadata
//! probe ever. Checksums are sent only when an operation requires them, and stalled-stream
//! protection is off (a slow link is not a failure; the retry bounds a dead one).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::{MakeDurable, PackBackend, PackError, PackErrorKind, PackId, PackInfo, PackWriter};

/// A pack object is closed past this size (then the next append starts another). One PUT per
/// 8 MiB: 128 PUTs per GiB stored, against 16,384 for one object per 64 KiB chunk; a single PUT
/// costs the server less than a multipart upload of the same bytes, which it has to assemble;
/// and the packs waiting for their PUT hold 8 MiB of memory each (bench/results has the
/// figures for 8, 16 and 64 MiB).
pub const PACK_BYTES: u64 = 8 * 1024 * 1024;
/// Attempts of one request, the first included.
const ATTEMPTS: usize = 6;
/// How long one attempt may take before it counts as a transient failure.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the packs go and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix, "" or ending in `/`.
    pub prefix: String,
    pub region: String,
    /// `None`: AWS's own endpoint for the region.
    pub endpoint: Option<String>,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`), which most S3-compatible servers want.
    pub path_style: bool,
    /// Bytes of recently written packs kept on local disk for reads (0: none).
    pub cache_bytes: u64,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Requests made, by kind, since start.
#[derive(Debug, Default)]
pub struct Requests {
    pub put: AtomicU64,
    pub get: AtomicU64,
    pub list: AtomicU64,
    pub delete: AtomicU64,
    pub retries: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Reads answered by the local cache, and reads that went to S3.
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
}

/// Packs in a bucket.
pub struct S3Packs {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    cfg: S3Config,
    rt: tokio::runtime::Handle,
    requests: Requests,
    cache: Option<Arc<PackCache>>,
}

/// The key of pack `pack` under `prefix`.
pub fn pack_key(prefix: &str, pack: PackId) -> String {
    format!("{prefix}packs/{pack:08}.pack")
}

/// What a failed request means for the caller.
fn classify<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    what: &str,
    bucket: &str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> PackError {
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_owned);
    let kind = match (&e, status, code.as_deref()) {
        (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_), _, _) => {
            PackErrorKind::Transient
        }
        (_, Some(501), _) | (_, _, Some("NotImplemented")) => PackErrorKind::Permanent,
        (_, _, Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable" | "Throttling")) => {
            PackErrorKind::Transient
        }
        (_, Some(s), _) if s >= 500 || s == 429 || s == 408 => PackErrorKind::Transient,
        (_, _, Some("NoSuchKey" | "InvalidRange")) | (_, Some(404 | 416), _)
            if !matches!(code.as_deref(), Some("NoSuchBucket")) =>
        {
            PackErrorKind::NotFound
        }
        _ => PackErrorKind::Permanent,
    };
    let hint = match (status, code.as_deref()) {
        (_, Some("NoSuchBucket")) => format!(": bucket {bucket:?} does not exist"),
        (_, Some("InvalidAccessKeyId" | "SignatureDoesNotMatch")) | (Some(403), None) => {
            " (check the access key id and secret access key)".to_string()
        }
        (_, Some("AccessDenied")) => format!(": access to bucket {bucket:?} denied"),
        _ => String::new(),
    };
    let status = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
    PackError::new(kind, format!("S3 {what} failed{status}{hint}: {}", DisplayErrorContext(&e)))
}

impl Inner {
    /// Runs `op` on the runtime from this (blocking) thread, retrying transient failures.
    fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, PackError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, PackError>>,
    {
        use backon::BackoffBuilder;
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .with_max_times(ATTEMPTS - 1)
            .build();
        loop {
            let res = self.rt.block_on(async {
                match tokio::time::timeout(ATTEMPT_TIMEOUT, op()).await {
                    Ok(r) => r,
                    Err(_) => Err(PackError::new(
                        PackErrorKind::Transient,
                        format!("S3 {what} took more than {}s", ATTEMPT_TIMEOUT.as_secs()),
                    )),
                }
            });
            match res {
                Err(e) if e.kind == PackErrorKind::Transient => match delays.next() {
                    Some(d) => {
                        tracing::debug!(error = %e, delay = ?d, "S3 request failed; retrying");
                        self.requests.retries.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(d);
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    fn put_object(&self, key: &str, data: Bytes) -> Result<(), PackError> {
        self.call("PUT", || {
            let body = ByteStream::from(data.clone());
            let len = data.len() as u64;
            async move {
                self.requests.put.fetch_add(1, Ordering::Relaxed);
                self.client
                    .put_object()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| classify("PUT", &self.cfg.bucket, e))?;
                self.requests.bytes_up.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
        })
    }
}

/// Packs written recently, as local pack files (direct I/O, like the local backend's: a cached
/// gigabyte neither costs a page-cache copy nor evicts the metadata store's pages), bounded in
/// bytes; the least recently used go first. A cache only: emptied at start (a copy is never
/// trusted across a crash), filled as packs are sealed, read before S3, and every byte read from
/// it is verified by the chunk store like any other. Losing it costs GETs, never data.
struct PackCache {
    files: super::local::LocalPacks,
    cap: u64,
    state: std::sync::Mutex<CacheState>,
    /// Sealed packs waiting to be written by the cache's thread, so a PUT's job (and the
    /// uploads waiting for it) never waits for the local copy; a full queue skips the copy.
    queue: std::sync::Mutex<std::sync::mpsc::SyncSender<(PackId, Bytes)>>,
    queued: AtomicU64,
}

/// Packs waiting for their cached copy to be written, at most.
const CACHE_QUEUE: usize = 2;

#[derive(Default)]
struct CacheState {
    /// Cached pack → its entry.
    packs: std::collections::HashMap<PackId, Cached>,
    /// Cached packs by last use, oldest first.
    by_use: std::collections::BTreeMap<u64, PackId>,
    /// Disk taken by the cached files.
    bytes: u64,
    clock: u64,
}

#[derive(Clone, Copy)]
struct Cached {
    /// The pack's length, and what its file takes on disk (padded to the direct-I/O block).
    len: u64,
    disk: u64,
    used: u64,
}

impl CacheState {
    /// Marks `pack` used now.
    fn touch(&mut self, pack: PackId) -> Option<Cached> {
        self.clock += 1;
        let now = self.clock;
        let c = self.packs.get_mut(&pack)?;
        self.by_use.remove(&c.used);
        c.used = now;
        self.by_use.insert(now, pack);
        Some(*c)
    }

    fn forget(&mut self, pack: PackId) -> Option<Cached> {
        let c = self.packs.remove(&pack)?;
        self.by_use.remove(&c.used);
        self.bytes -= c.disk;
        Some(c)
    }
}

impl PackCache {
    /// An empty cache in `dir` of at most `cap` bytes, with the thread that fills it; `None` for
    /// a cap of 0.
    fn open(dir: std::path::PathBuf, cap: u64) -> Result<Option<Arc<Self>>, PackError> {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(PackError::new(PackErrorKind::Permanent, format!("cannot empty {}: {e}", dir.display())));
            }
        }
        if cap == 0 {
            return Ok(None);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<(PackId, Bytes)>(CACHE_QUEUE);
        let cache = Arc::new(PackCache {
            files: super::local::LocalPacks::open(&dir)?,
            cap,
            state: Default::default(),
            queue: std::sync::Mutex::new(tx),
            queued: AtomicU64::new(0),
        });
        // Ends when the cache is dropped (with it, the queue's sender).
        let weak = Arc::downgrade(&cache);
        std::thread::Builder::new()
            .name("s3-cache".into())
            .spawn(move || {
                while let Ok((pack, data)) = rx.recv() {
                    let Some(cache) = weak.upgrade() else {
                        break;
                    };
                    cache.insert(pack, &data);
                    cache.queued.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(|e| PackError::new(PackErrorKind::Permanent, format!("cannot start the pack cache: {e}")))?;
        Ok(Some(cache))
    }

    /// Hands sealed pack `pack` to the cache's thread, unless it is behind.
    fn insert_later(&self, pack: PackId, data: Bytes) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let sent = self.queue.lock().unwrap_or_else(|p| p.into_inner()).try_send((pack, data));
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            tracing::debug!(pack, "pack cache behind; this pack is not cached");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `data` as `pack`'s file, padded with zeros to the file's alignment; returns the
    /// file's length.
    fn write(&self, pack: PackId, data: &[u8]) -> Result<u64, PackError> {
        let mut w = self.files.create(pack)?;
        w.append(data)?;
        let pad = (w.alignment() - data.len() % w.alignment()) % w.alignment();
        w.append(&vec![0u8; pad])?;
        w.flush()?;
        Ok((data.len() + pad) as u64)
    }

    /// Keeps a copy of sealed pack `pack`, evicting the least recently used past the cap. A
    /// failure to write it only costs the reads it would have saved.
    fn insert(&self, pack: PackId, data: &[u8]) {
        let len = data.len() as u64;
        if len == 0 || len > self.cap {
            return;
        }
        let disk = match self.write(pack, data) {
            Ok(disk) => disk,
            Err(e) => {
                tracing::warn!(pack, error = %e, cache = self.files.describe(), "could not cache a pack");
                let _ = self.files.delete(pack);
                return;
            }
        };
        let mut evicted = Vec::new();
        {
            let mut s = self.lock();
            s.forget(pack);
            s.packs.insert(pack, Cached { len, disk, used: 0 });
            s.by_use.insert(0, pack);
            s.bytes += disk;
            s.touch(pack);
            while s.bytes > self.cap {
                let Some((_, &victim)) = s.by_use.iter().find(|(_, p)| **p != pack) else {
                    break;
                };
                s.forget(victim);
                evicted.push(victim);
            }
        }
        for victim in evicted {
            let _ = self.files.delete(victim);
        }
    }

    /// `len` bytes of `pack` from `offset`, if the cache holds them.
    fn read(&self, pack: PackId, offset: u64, len: usize) -> Option<Bytes> {
        let cached = self.lock().touch(pack)?;
        if offset + len as u64 > cached.len {
            return None;
        }
        match self.files.read(pack, offset, len) {
            Ok(bytes) if bytes.len() == len => Some(bytes),
            other => {
                // Evicted meanwhile, or unreadable: S3 has it.
                if let Err(e) = other
                    && e.kind != PackErrorKind::NotFound
                {
                    tracing::warn!(pack, error = %e, "could not read a cached pack; reading it from S3");
                }
                self.remove(pack);
                None
            }
        }
    }

    /// Drops `pack`'s copy; `true` if there was one.
    fn remove(&self, pack: PackId) -> bool {
        let had = self.lock().forget(pack).is_some();
        if had {
            let _ = self.files.delete(pack);
        }
        had
    }
}

impl S3Packs {
    /// Connects to the bucket: checks it exists and the credentials work (a permanent failure
    /// is an error naming what to fix), and starts an empty pack cache in `state_dir/cache`.
    /// Call it from a blocking thread; `rt` runs the requests.
    pub fn open(cfg: S3Config, state_dir: &std::path::Path, rt: tokio::runtime::Handle) -> Result<Self, PackError> {
        if cfg.bucket.is_empty() {
            return Err(PackError::new(PackErrorKind::Permanent, "no S3 bucket given"));
        }
        if !(cfg.prefix.is_empty() || cfg.prefix.ends_with('/')) || cfg.prefix.starts_with('/') {
            return Err(PackError::new(
                PackErrorKind::Permanent,
                format!("S3 prefix {:?} must end with '/' and not start with one", cfg.prefix),
            ));
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let creds = Credentials::new(&cfg.access_key_id, &cfg.secret_access_key, None, None, "shoal-config");
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(cfg.region.clone()))
            .credentials_provider(creds)
            .force_path_style(cfg.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            // The retries are ours (above), so each attempt is counted and bounded.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled());
        if let Some(url) = &cfg.endpoint {
            conf = conf.endpoint_url(url);
        }
        std::fs::create_dir_all(state_dir)?;
        let cache = PackCache::open(state_dir.join("cache"), cfg.cache_bytes)?;
        let inner = Inner { client: Client::from_conf(conf.build()), cfg, rt, requests: Requests::default(), cache };
        inner.call("HeadBucket", || async {
            inner.requests.list.fetch_add(1, Ordering::Relaxed);
            match inner.client.head_bucket().bucket(&inner.cfg.bucket).send().await {
                Ok(_) => Ok(()),
                // HEAD answers carry no error code: say what a 404 and a 403 mean here.
                Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
                    Some(404) => Err(PackError::new(
                        PackErrorKind::Permanent,
                        format!("S3 bucket {:?} does not exist", inner.cfg.bucket),
                    )),
                    Some(403) => Err(PackError::new(
                        PackErrorKind::Permanent,
                        format!(
                            "S3 refused access to bucket {:?} (HTTP 403): check the access key id and secret access key",
                            inner.cfg.bucket
                        ),
                    )),
                    _ => Err(classify("HeadBucket", &inner.cfg.bucket, e)),
                },
            }
        })?;
        Ok(S3Packs { inner: Arc::new(inner) })
    }

    /// Requests made since start.
    pub fn requests(&self) -> &Requests {
        &self.inner.requests
    }

    /// Waits until every pack handed to the local cache has been written to it (or dropped).
    pub fn wait_for_cache(&self) {
        if let Some(cache) = &self.inner.cache {
            while cache.queued.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl PackBackend for S3Packs {
    fn describe(&self) -> String {
        let cfg = &self.inner.cfg;
        format!("s3://{}/{}", cfg.bucket, cfg.prefix)
    }

    fn create(&self, pack: PackId) -> Result<Box<dyn PackWriter>, PackError> {
        Ok(Box::new(S3Writer { inner: self.inner.clone(), pack, staged: Vec::new() }))
    }

    fn read(&self, pack: PackId, offset: u64, len: usize) -> Result<Bytes, PackError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let inner = &self.inner;
        if let Some(cache) = &inner.cache {
            if let Some(bytes) = cache.read(pack, offset, len) {
                inner.requests.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(bytes);
            }
            inner.requests.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        let key = pack_key(&inner.cfg.prefix, pack);
        let range = format!("bytes={}-{}", offset, offset + len as u64 - 1);
        inner.call("GET", || async {
            inner.requests.get.fetch_add(1, Ordering::Relaxed);
            let out = inner
                .client
                .get_object()
                .bucket(&inner.cfg.bucket)
                .key(&key)
                .range(&range)
                .send()
                .await
                .map_err(|e| classify("GET", &inner.cfg.bucket, e))?;
            let body = out
                .body
                .collect()
                .await
                .map_err(|e| PackError::new(PackErrorKind::Transient, format!("S3 GET of {key} cut short: {e}")))?;
            let bytes = body.into_bytes();
            inner.requests.bytes_down.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            // A server that ignored the range (or an object shorter than asked) is not what
            // was asked for; the frames' own checks catch a wrong range of the right length.
            if bytes.len() != len {
                return Err(PackError::not_found(format!(
                    "S3 GET of {key} {range} returned {} bytes instead of {len}",
                    bytes.len()
                )));
            }
            Ok(bytes)
        })
    }

    fn list(&self) -> Result<Vec<PackInfo>, PackError> {
        let inner = &self.inner;
        let prefix = format!("{}packs/", inner.cfg.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = inner.call("LIST", || {
                let token = token.clone();
                let prefix = &prefix;
                async move {
                    inner.requests.list.fetch_add(1, Ordering::Relaxed);
                    inner
                        .client
                        .list_objects_v2()
                        .bucket(&inner.cfg.bucket)
                        .prefix(prefix)
                        .set_continuation_token(token)
                        .send()
                        .await
                        .map_err(|e| classify("LIST", &inner.cfg.bucket, e))
                }
            })?;
            for obj in page.contents() {
                let pack = obj
                    .key()
                    .and_then(|k| k.strip_prefix(prefix.as_str()))
                    .and_then(|n| n.strip_suffix(".pack"))
                    .and_then(|n| n.parse::<u32>().ok());
                if let (Some(pack), Some(size)) = (pack, obj.size()) {
                    out.push(PackInfo { pack, len: u64::try_from(size).unwrap_or(0) });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    fn delete(&self, pack: PackId) -> Result<(), PackError> {
        let inner = &self.inner;
        if let Some(cache) = &inner.cache {
            cache.remove(pack);
        }
        let key = pack_key(&inner.cfg.prefix, pack);
        inner.call("DELETE", || async {
            inner.requests.delete.fetch_add(1, Ordering::Relaxed);
            inner
                .client
                .delete_object()
                .bucket(&inner.cfg.bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| classify("DELETE", &inner.cfg.bucket, e))?;
            Ok(())
        })
    }

    fn pack_bytes(&self) -> u64 {
        PACK_BYTES
    }

    fn read_ahead(&self) -> usize {
        4
    }

    fn release_memory(&self) {
        if let Some(cache) = &self.inner.cache {
            cache.files.release_memory();
        }
    }

    fn request_counts(&self) -> Vec<(&'static str, u64)> {
        let r = &self.inner.requests;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![("put", get(&r.put)), ("get", get(&r.get)), ("list", get(&r.list)), ("delete", get(&r.delete))]
    }

    fn cache_reads(&self) -> Vec<(&'static str, u64)> {
        let r = &self.inner.requests;
        match self.inner.cache {
            Some(_) => {
                vec![("hit", r.cache_hits.load(Ordering::Relaxed)), ("miss", r.cache_misses.load(Ordering::Relaxed))]
            }
            None => Vec::new(),
        }
    }

    fn forget_cached(&self, pack: PackId) -> bool {
        self.inner.cache.as_ref().is_some_and(|c| c.remove(pack))
    }
}

/// One pack on its way up: staged in memory until it is sealed by one PUT.
struct S3Writer {
    inner: Arc<Inner>,
    pack: PackId,
    staged: Vec<u8>,
}

impl PackWriter for S3Writer {
    fn alignment(&self) -> usize {
        1
    }

    fn append(&mut self, data: &[u8]) -> Result<(), PackError> {
        if self.staged.capacity() == 0 {
            // A pack closes at the first append past PACK_BYTES: room for it and the usual
            // batch, so filling a pack does not double its buffer (only pages written count).
            self.staged.reserve(PACK_BYTES as usize + 4 * 1024 * 1024);
        }
        self.staged.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), PackError> {
        Ok(())
    }

    fn readable_before_durable(&self) -> bool {
        false
    }

    fn seals(&self) -> bool {
        true
    }

    fn make_durable(&mut self) -> Result<MakeDurable, PackError> {
        // A small pack (a commit's few chunks) keeps no room reserved for a full one while it
        // waits for its PUT and its cached copy.
        if self.staged.len() < self.staged.capacity() / 2 {
            self.staged.shrink_to_fit();
        }
        let (inner, pack) = (self.inner.clone(), self.pack);
        let key = pack_key(&inner.cfg.prefix, pack);
        let data = Bytes::from(std::mem::take(&mut self.staged));
        Ok(Box::new(move || {
            inner.put_object(&key, data.clone())?;
            if let Some(cache) = &inner.cache {
                cache.insert_later(pack, data.clone());
            }
            Ok(())
        }))
    }
}
