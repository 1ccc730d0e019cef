//! Commands that talk to the coordinator directly, without a running sync folder: `ls`,
//! `history`, `get`, `put`, `restore`, `devices`. They need only the device's config, so they
//! work alongside a running `shoal run` on the same home.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use shoal_protocol::api::{CommitRequest, ErrorCode};
use shoal_protocol::{Change, ChunkId, CommitId, Entry, EntryKind, Seq, SyncPath};

use crate::client::{Client, ClientError};
use crate::progress::{self, Progress};
use crate::transfer::{self, AssembleOpts, Fetcher};

/// An entry as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct EntryJson {
    pub path: String,
    pub kind: EntryKind,
    pub version: Seq,
    pub base: Option<Seq>,
    pub size: u64,
    pub hash: Option<String>,
    pub exec: bool,
    pub deleted: bool,
    pub device: String,
    /// Commit time, milliseconds since the Unix epoch.
    pub time: u64,
    pub mtime_ns: i64,
    /// `durable` (the origin has every chunk), `pending` (not yet: only devices hold it),
    /// `withdrawn` (pending, and its author can no longer supply it) or `expired` (past the
    /// coordinator's retention: no longer restorable).
    pub state: &'static str,
}

/// What the coordinator says of a version's chunks: `durable`, `pending`, `stuck`, `withdrawn`
/// or `expired`.
pub fn version_state(version: Seq, pending: &[shoal_protocol::api::PendingVersion], expired: &[Seq]) -> &'static str {
    if expired.contains(&version) {
        return "expired";
    }
    match pending.iter().find(|p| p.version == version) {
        None => "durable",
        Some(p) if p.withdrawn => "withdrawn",
        Some(p) if p.stuck => "stuck",
        Some(_) => "pending",
    }
}

impl From<&Entry> for EntryJson {
    fn from(e: &Entry) -> Self {
        EntryJson {
            path: e.path.to_string(),
            kind: e.kind,
            version: e.version,
            base: e.base,
            size: e.size(),
            hash: e.hash().map(|h| h.to_string()),
            exec: e.exec,
            deleted: e.deleted,
            device: e.device.to_string(),
            time: e.time_ms,
            mtime_ns: e.mtime_ns,
            state: "durable",
        }
    }
}

pub fn parse_remote(s: &str) -> anyhow::Result<SyncPath> {
    SyncPath::parse(s.trim_start_matches('/')).with_context(|| format!("invalid remote path {s:?}"))
}

/// The live tree (at `at`, default head), limited to `prefix` and what lies under it.
pub async fn ls(client: &Client, prefix: Option<&SyncPath>, at: Option<Seq>) -> anyhow::Result<Vec<Entry>> {
    let (_, entries) = client.tree(at).await?;
    Ok(entries.into_iter().filter(|e| prefix.is_none_or(|p| e.path.starts_with(p))).collect())
}

/// The version of `path` to read: `version`, or the head.
async fn pick(client: &Client, path: &SyncPath, version: Option<Seq>) -> anyhow::Result<(Entry, Option<Entry>)> {
    let (history, expired) = client.history_with_expired(path).await?;
    let head = history.last().cloned();
    let entry = match version {
        Some(v) if expired.contains(&v) => anyhow::bail!(
            "version {v} of {path} has expired: it was replaced longer ago than the coordinator keeps versions, \
             so it can no longer be restored (see `shoal history`)"
        ),
        Some(v) => {
            history.into_iter().find(|e| e.version == v).with_context(|| format!("{path} has no version {v}"))?
        }
        None => head.clone().with_context(|| format!("{path} does not exist on the coordinator"))?,
    };
    Ok((entry, head))
}

/// Downloads `path` (at `version`) to `local`, through a temp file in the same directory.
pub async fn get(
    client: &Client,
    path: &SyncPath,
    version: Option<Seq>,
    local: &Path,
    quiet: bool,
) -> anyhow::Result<Entry> {
    let (entry, _) = pick(client, path, version).await?;
    if entry.deleted {
        anyhow::bail!(
            "{path} was deleted in version {}; pass --version with an older version (see `shoal history`)",
            entry.version
        );
    }
    let manifest = entry.manifest.as_ref().with_context(|| format!("{path} is a directory"))?;
    let dir = match local.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = local.file_name().context("the local path needs a file name")?.to_string_lossy().into_owned();
    let tmp = dir.join(format!(".{name}.shoal-{}.part", shoal_sys::random::hex(4)));
    let (progress, counter) = progress::track(manifest.size, "downloading", quiet);
    let mut fetcher = Fetcher::new(client.clone(), Default::default(), None, None, Default::default());
    // An existing file keeps its permission bits, as in a synced folder.
    let existing = std::fs::metadata(local).ok().filter(|m| m.is_file()).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode()
    });
    let mode = transfer::file_mode(existing, entry.exec, transfer::process_umask());
    let opts = AssembleOpts { mode, mtime_ns: entry.mtime_ns, fsync: true, progress: Some(&counter), resume: false };
    let result = transfer::assemble(&mut fetcher, manifest, &tmp, opts).await;
    progress.finish();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::fs::rename(&tmp, local).with_context(|| format!("writing {}", local.display()))?;
    Ok(entry)
}

/// Uploads `local` as the new head of `path`.
pub async fn put(client: &Client, local: &Path, path: &SyncPath, quiet: bool) -> anyhow::Result<Entry> {
    let md = std::fs::metadata(local).with_context(|| format!("reading {}", local.display()))?;
    if !md.is_file() {
        anyhow::bail!("{} is not a regular file", local.display());
    }
    let progress = Progress::spinner("hashing", quiet);
    let src = local.to_path_buf();
    let manifest = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let f = std::fs::File::open(&src)?;
        Ok(shoal_protocol::Chunker::default().manifest(f)?)
    })
    .await??;
    progress.finish();
    let ids: Vec<ChunkId> = manifest.chunks.iter().map(|c| c.id).collect();
    let missing: HashSet<ChunkId> = client.missing(&ids).await?.into_iter().collect();
    let (progress, sent) = progress::track(manifest.size, "uploading", quiet);
    transfer::upload_chunks(client, vec![(local.to_path_buf(), manifest.clone())], missing, None, &sent).await?;
    progress.finish();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let change = |base| Change {
        path: path.clone(),
        kind: EntryKind::File,
        manifest: Some(manifest.clone()),
        exec: md.permissions().mode() & 0o111 != 0,
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        deleted: false,
        base,
    };
    commit_over_head(client, path, change).await
}

/// Commits version `version` of `path` as its new head. Nothing is rewritten: history grows.
pub async fn restore(client: &Client, path: &SyncPath, version: Seq) -> anyhow::Result<Entry> {
    let (old, _) = pick(client, path, Some(version)).await?;
    if old.deleted {
        anyhow::bail!("version {version} of {path} is a deletion; pick a version that has content");
    }
    let change = |base| Change {
        path: path.clone(),
        kind: old.kind,
        manifest: old.manifest.clone(),
        exec: old.exec,
        mtime_ns: old.mtime_ns,
        deleted: false,
        base,
    };
    commit_over_head(client, path, change).await
}

/// Commits `make(head)` and retries a few times if another device moves the head meanwhile.
async fn commit_over_head(
    client: &Client,
    path: &SyncPath,
    make: impl Fn(Option<Seq>) -> Change,
) -> anyhow::Result<Entry> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)?;
    for _ in 0..5 {
        let head = client.history(path).await?.last().map(|e| e.version);
        let req = CommitRequest { commit_id: CommitId(id), changes: vec![make(head)], pending_ok: false };
        match client.commit(&req).await {
            Ok(mut r) => return r.entries.pop().context("empty commit response"),
            Err(ClientError::Api(b)) if b.code == ErrorCode::StaleBase => {
                id[0] = id[0].wrapping_add(1);
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("{path} keeps changing on the coordinator; try again")
}
