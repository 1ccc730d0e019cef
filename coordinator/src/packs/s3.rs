//! Packs as objects in an S3-compatible bucket, `PREFIX/packs/NNNNNNNN.pack`.
//!
//! An object is written once, so a pack is *sealed* when it is made durable: a commit that needs
//! its chunks durable waits for one PUT of what is staged (a pack shorter than a part), or for
//! the last part and the completion of a multipart upload. The writer stages at most one part
//! ([`PART_BYTES`]) in memory and uploads parts as they fill, so a 1 GiB file streams through
//! in bounded memory; a pack is closed at [`PACK_BYTES`]. Reads are ranged GETs of exactly the
//! frames asked for. Multipart uploads left unfinished by a crash are aborted at start (their
//! parts cost storage and belong to no pack).
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
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use super::{MakeDurable, PackBackend, PackError, PackErrorKind, PackId, PackInfo, PackWriter};

/// A pack object is closed past this size (then the next append starts another).
pub const PACK_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes staged in memory before they go up as one part of a multipart upload (S3 wants at
/// least 5 MiB for every part but the last).
pub const PART_BYTES: usize = 8 * 1024 * 1024;
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
    uploads: UploadLog,
}

fn pack_key(prefix: &str, pack: PackId) -> String {
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

    fn create_upload(&self, key: &str) -> Result<String, PackError> {
        self.call("CreateMultipartUpload", || async move {
            self.requests.put.fetch_add(1, Ordering::Relaxed);
            let out = self
                .client
                .create_multipart_upload()
                .bucket(&self.cfg.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| classify("CreateMultipartUpload", &self.cfg.bucket, e))?;
            out.upload_id.ok_or_else(|| {
                PackError::new(PackErrorKind::Permanent, "S3 CreateMultipartUpload returned no upload id")
            })
        })
        .and_then(|id| {
            self.uploads.change(|open| open.push((key.to_string(), id.clone())))?;
            Ok(id)
        })
    }

    fn upload_part(&self, key: &str, upload: &str, number: i32, data: Bytes) -> Result<CompletedPart, PackError> {
        self.call("UploadPart", || {
            let body = ByteStream::from(data.clone());
            let len = data.len() as u64;
            async move {
                self.requests.put.fetch_add(1, Ordering::Relaxed);
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    .upload_id(upload)
                    .part_number(number)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| classify("UploadPart", &self.cfg.bucket, e))?;
                self.requests.bytes_up.fetch_add(len, Ordering::Relaxed);
                Ok(CompletedPart::builder().set_e_tag(out.e_tag).part_number(number).build())
            }
        })
    }

    /// The length of object `key`, if it exists.
    fn object_len(&self, key: &str) -> Result<Option<u64>, PackError> {
        self.call("HEAD", || async move {
            self.requests.get.fetch_add(1, Ordering::Relaxed);
            match self.client.head_object().bucket(&self.cfg.bucket).key(key).send().await {
                Ok(out) => Ok(Some(out.content_length.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))),
                Err(e) => match classify("HEAD", &self.cfg.bucket, e) {
                    e if e.kind == PackErrorKind::NotFound => Ok(None),
                    e => Err(e),
                },
            }
        })
    }

    /// Completes a multipart upload of `len` bytes. A completion whose answer was lost (a
    /// timeout, a reset) and that is sent again gets "no such upload": the object it made is
    /// then there, whole, and counts as done.
    fn complete_upload(&self, key: &str, upload: &str, parts: &[CompletedPart], len: u64) -> Result<(), PackError> {
        match self.complete_once(key, upload, parts) {
            Ok(()) => {}
            Err(e) if e.kind == PackErrorKind::NotFound && self.object_len(key)? == Some(len) => {
                tracing::info!(key, "a multipart upload's completion was answered before; the object is whole");
            }
            Err(e) => return Err(e),
        }
        self.uploads.change(|open| open.retain(|(k, id)| !(k == key && id == upload)))
    }

    fn complete_once(&self, key: &str, upload: &str, parts: &[CompletedPart]) -> Result<(), PackError> {
        self.call("CompleteMultipartUpload", || async move {
            self.requests.put.fetch_add(1, Ordering::Relaxed);
            let done = CompletedMultipartUpload::builder().set_parts(Some(parts.to_vec())).build();
            self.client
                .complete_multipart_upload()
                .bucket(&self.cfg.bucket)
                .key(key)
                .upload_id(upload)
                .multipart_upload(done)
                .send()
                .await
                .map_err(|e| classify("CompleteMultipartUpload", &self.cfg.bucket, e))?;
            Ok(())
        })
    }

    fn abort_upload(&self, key: &str, id: &str) -> Result<(), PackError> {
        self.call("AbortMultipartUpload", || async {
            self.requests.delete.fetch_add(1, Ordering::Relaxed);
            match self.client.abort_multipart_upload().bucket(&self.cfg.bucket).key(key).upload_id(id).send().await {
                Ok(_) => Ok(()),
                Err(e) => match classify("AbortMultipartUpload", &self.cfg.bucket, e) {
                    e if e.kind == PackErrorKind::NotFound => Ok(()),
                    e => Err(e),
                },
            }
        })
    }

    /// Aborts the multipart uploads a run before started and never finished (a crash), as
    /// recorded in the upload log.
    fn abort_unfinished(&self) -> Result<usize, PackError> {
        let open = self.uploads.read()?;
        for (key, id) in &open {
            self.abort_upload(key, id)?;
        }
        self.uploads.write(&[])?;
        Ok(open.len())
    }
}

/// Multipart uploads in progress, in a local file (`s3-uploads` in the data directory), so the
/// parts of one a crash cut short are aborted at the next start on any S3 server (listing
/// multipart uploads is not implemented everywhere). Written and synced when an upload starts
/// and when it ends: twice per 64 MiB pack.
struct UploadLog {
    path: std::path::PathBuf,
    lock: std::sync::Mutex<()>,
}

impl UploadLog {
    fn read(&self) -> Result<Vec<(String, String)>, PackError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(text.lines().filter_map(|l| l.split_once(' ')).map(|(k, id)| (k.to_string(), id.to_string())).collect())
    }

    fn write(&self, open: &[(String, String)]) -> Result<(), PackError> {
        let text: String = open.iter().map(|(k, id)| format!("{k} {id}\n")).collect();
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn change(&self, f: impl FnOnce(&mut Vec<(String, String)>)) -> Result<(), PackError> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut open = self.read()?;
        f(&mut open);
        self.write(&open)
    }
}

impl S3Packs {
    /// Connects to the bucket: checks it exists and the credentials work (a permanent failure
    /// is an error naming what to fix), and aborts multipart uploads a crash left behind (as
    /// recorded in `state_dir`). Call it from a blocking thread; `rt` runs the requests.
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
        let uploads = UploadLog { path: state_dir.join("s3-uploads"), lock: Default::default() };
        let inner = Inner { client: Client::from_conf(conf.build()), cfg, rt, requests: Requests::default(), uploads };
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
        let aborted = inner.abort_unfinished()?;
        if aborted > 0 {
            tracing::warn!(uploads = aborted, "aborted multipart uploads left unfinished by a crash");
        }
        Ok(S3Packs { inner: Arc::new(inner) })
    }

    /// Requests made since start.
    pub fn requests(&self) -> &Requests {
        &self.inner.requests
    }
}

impl PackBackend for S3Packs {
    fn describe(&self) -> String {
        let cfg = &self.inner.cfg;
        format!("s3://{}/{}", cfg.bucket, cfg.prefix)
    }

    fn create(&self, pack: PackId) -> Result<Box<dyn PackWriter>, PackError> {
        Ok(Box::new(S3Writer {
            inner: self.inner.clone(),
            key: pack_key(&self.inner.cfg.prefix, pack),
            staged: Vec::new(),
            upload: None,
            parts: Vec::new(),
            len: 0,
        }))
    }

    fn read(&self, pack: PackId, offset: u64, len: usize) -> Result<Bytes, PackError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let inner = &self.inner;
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

    fn request_counts(&self) -> Vec<(&'static str, u64)> {
        let r = &self.inner.requests;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![("put", get(&r.put)), ("get", get(&r.get)), ("list", get(&r.list)), ("delete", get(&r.delete))]
    }
}

/// One pack on its way up.
struct S3Writer {
    inner: Arc<Inner>,
    key: String,
    /// Bytes appended and not yet uploaded as a part.
    staged: Vec<u8>,
    /// The multipart upload, once the pack outgrew one part, and its parts so far.
    upload: Option<String>,
    parts: Vec<CompletedPart>,
    /// Bytes appended so far.
    len: u64,
}

impl S3Writer {
    fn upload_staged_part(&mut self) -> Result<(), PackError> {
        let upload = match &self.upload {
            Some(u) => u.clone(),
            None => {
                let u = self.inner.create_upload(&self.key)?;
                self.upload = Some(u.clone());
                u
            }
        };
        let number = self.parts.len() as i32 + 1;
        let data = Bytes::from(std::mem::take(&mut self.staged));
        match self.inner.upload_part(&self.key, &upload, number, data.clone()) {
            Ok(part) => {
                self.parts.push(part);
                Ok(())
            }
            Err(e) => {
                self.staged = data.to_vec();
                Err(e)
            }
        }
    }
}

impl PackWriter for S3Writer {
    fn alignment(&self) -> usize {
        1
    }

    fn append(&mut self, mut data: &[u8]) -> Result<(), PackError> {
        while !data.is_empty() {
            let n = data.len().min(PART_BYTES - self.staged.len());
            self.staged.extend_from_slice(&data[..n]);
            self.len += n as u64;
            data = &data[n..];
            if self.staged.len() == PART_BYTES {
                self.upload_staged_part()?;
            }
        }
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
        let inner = self.inner.clone();
        let key = self.key.clone();
        let mut last = Some(Bytes::from(std::mem::take(&mut self.staged)));
        let upload = self.upload.take();
        let mut parts = std::mem::take(&mut self.parts);
        let len = self.len;
        Ok(Box::new(move || match &upload {
            None => inner.put_object(&key, last.clone().unwrap_or_default()),
            Some(upload) => {
                if let Some(data) = last.as_ref().filter(|d| !d.is_empty()) {
                    let part = inner.upload_part(&key, upload, parts.len() as i32 + 1, data.clone())?;
                    parts.push(part);
                }
                last = None;
                inner.complete_upload(&key, upload, &parts, len)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shoal_protocol::ChunkId;

    use super::*;
    use crate::chunks::{ChunkError, ChunkStore};
    use crate::store::Store;
    use crate::testing::S3TestServer;

    const BUCKET: &str = "shoal-packs";

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    fn chunks(n: usize, size: usize, seed: u8) -> Vec<(ChunkId, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let data: Vec<u8> = (0..size).map(|j| (j as u8).wrapping_mul(31) ^ (i as u8) ^ seed).collect();
                (ChunkId::of(&data), data)
            })
            .collect()
    }

    fn refs(c: &[(ChunkId, Vec<u8>)]) -> Vec<(ChunkId, &[u8])> {
        c.iter().map(|(id, d)| (*id, &d[..])).collect()
    }

    #[test]
    fn chunks_go_up_in_packs_and_come_back_verified_after_a_restart() {
        let rt = runtime();
        let s3 = S3TestServer::start(BUCKET);
        let dir = tempfile::tempdir().unwrap();
        let index = Store::open(&dir.path().join("meta")).unwrap();
        let backend = Arc::new(S3Packs::open(s3.config(BUCKET, "p/"), dir.path(), rt.handle().clone()).unwrap());
        let store = ChunkStore::open(backend.clone(), index.clone()).unwrap();
        // Small: one PUT at the sync. Large (20 MiB): parts as they fill, then completed.
        let small = chunks(3, 1000, 1);
        let large = chunks(320, 64 * 1024, 2);
        store.put_many(&refs(&small)).unwrap();
        assert!(backend.list().unwrap().is_empty(), "nothing is an object before it is durable");
        store.sync().unwrap();
        store.put_many(&refs(&large)).unwrap();
        assert!(backend.requests().put.load(Ordering::Relaxed) >= 3, "parts go up as they fill");
        // Reading a chunk of a pack still on its way up makes it durable first.
        assert_eq!(store.get(&large[5].0).unwrap(), large[5].1);
        assert!(!store.needs_sync());
        let packs = backend.list().unwrap();
        assert_eq!(packs.len(), 2, "{packs:?}");
        drop(store);
        let store = ChunkStore::open(backend.clone(), index).unwrap();
        for (id, data) in small.iter().chain(&large) {
            assert_eq!(&store.get(id).unwrap(), data);
        }
        let ids: Vec<ChunkId> = large.iter().map(|(id, _)| *id).collect();
        let frames = store.read_frames(&ids[100..140]);
        assert!(frames.error.is_none());
        assert_eq!(frames.chunk_bytes, 40 * 64 * 1024);
        let puts = backend.requests().put.load(Ordering::Relaxed);
        // 1 PUT + (create, 3 parts of 8 MiB... the last with the rest, complete).
        assert!(puts <= 1 + 1 + 3 + 1, "{puts} PUTs");
    }

    #[test]
    fn a_corrupted_object_is_never_served() {
        let rt = runtime();
        let s3 = S3TestServer::start(BUCKET);
        let dir = tempfile::tempdir().unwrap();
        let index = Store::open(&dir.path().join("meta")).unwrap();
        let backend = Arc::new(S3Packs::open(s3.config(BUCKET, ""), dir.path(), rt.handle().clone()).unwrap());
        let store = ChunkStore::open(backend, index.clone()).unwrap();
        let c = chunks(4, 5000, 3);
        store.put_many(&refs(&c)).unwrap();
        store.sync().unwrap();
        let loc = index.chunk_loc(&c[2].0).unwrap().unwrap();
        let path = s3.object_path(BUCKET, &pack_key("", loc.pack));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[loc.offset as usize + 10] ^= 0x55;
        std::fs::write(&path, bytes).unwrap();
        let frames = store.read_frames(&c.iter().map(|(id, _)| *id).collect::<Vec<_>>());
        assert_eq!(frames.chunk_bytes, 2 * 5000, "the frames before the bad one come back");
        assert!(matches!(frames.error, Some(ChunkError::Corrupt(id)) if id == c[2].0));
        assert_eq!(store.corrupt_count(), 1);
        assert!(!store.contains(&c[2].0).unwrap(), "quarantined: asked for again");
        // A correct upload stores it anew (in a new pack).
        store.put_many(&refs(&c[2..3])).unwrap();
        assert_eq!(store.get(&c[2].0).unwrap(), c[2].1);
    }

    #[test]
    fn a_wrong_key_or_a_missing_bucket_is_a_clear_permanent_error() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let s3 = S3TestServer::start(BUCKET);
        let mut cfg = s3.config(BUCKET, "");
        cfg.secret_access_key = "not-the-secret".into();
        let e = S3Packs::open(cfg, dir.path(), rt.handle().clone()).err().unwrap();
        assert_eq!(e.kind, PackErrorKind::Permanent, "{e}");
        assert!(e.message.contains("access key"), "{e}");
        let e = S3Packs::open(s3.config("no-such-bucket", ""), dir.path(), rt.handle().clone()).err().unwrap();
        assert_eq!(e.kind, PackErrorKind::Permanent, "{e}");
        assert!(e.message.contains("\"no-such-bucket\" does not exist"), "{e}");
        let e = S3Packs::open(s3.config(BUCKET, "no-slash"), dir.path(), rt.handle().clone()).err().unwrap();
        assert!(e.message.contains("must end with '/'"), "{e}");
    }

    #[test]
    fn an_outage_fails_the_sync_and_keeps_what_it_owes_until_it_succeeds() {
        let rt = runtime();
        let mut s3 = S3TestServer::start(BUCKET);
        let dir = tempfile::tempdir().unwrap();
        let index = Store::open(&dir.path().join("meta")).unwrap();
        let backend = Arc::new(S3Packs::open(s3.config(BUCKET, ""), dir.path(), rt.handle().clone()).unwrap());
        let store = ChunkStore::open(backend.clone(), index).unwrap();
        let c = chunks(5, 3000, 4);
        store.put_many(&refs(&c)).unwrap();
        s3.pause();
        let e = store.sync().unwrap_err();
        assert!(matches!(&e, ChunkError::Backend(p) if p.kind == PackErrorKind::Transient), "{e}");
        assert!(store.needs_sync(), "still owed");
        assert!(backend.requests().retries.load(Ordering::Relaxed) >= 1, "transient failures are retried");
        s3.resume();
        store.sync().unwrap();
        assert!(!store.needs_sync());
        for (id, data) in &c {
            assert_eq!(&store.get(id).unwrap(), data);
        }
    }

    #[test]
    fn a_multipart_upload_a_crash_left_behind_is_aborted_at_start() {
        let rt = runtime();
        let s3 = S3TestServer::start(BUCKET);
        let dir = tempfile::tempdir().unwrap();
        let backend = S3Packs::open(s3.config(BUCKET, ""), dir.path(), rt.handle().clone()).unwrap();
        let mut w = backend.create(7).unwrap();
        w.append(&vec![1u8; PART_BYTES + 10]).unwrap();
        drop(w);
        let open = backend.inner.uploads.read().unwrap();
        assert_eq!(open.len(), 1);
        let (key, id) = open[0].clone();
        // The part went up, under an upload that is still open: completing it would work.
        let again = S3Packs::open(s3.config(BUCKET, ""), dir.path(), rt.handle().clone()).unwrap();
        assert!(again.inner.uploads.read().unwrap().is_empty());
        let done = CompletedMultipartUpload::builder().parts(CompletedPart::builder().part_number(1).build()).build();
        let completed = rt.block_on(
            again
                .inner
                .client
                .complete_multipart_upload()
                .bucket(BUCKET)
                .key(&key)
                .upload_id(&id)
                .multipart_upload(done)
                .send(),
        );
        assert!(completed.is_err(), "the upload was aborted");
        assert!(again.list().unwrap().is_empty());
    }
}
