//! Uploading chunk bytes: reading the chunks the coordinator lacks back out of local files
//! (checking they still hold what was hashed) and sending them in framed batches, a few requests
//! in flight.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use futures::StreamExt;
use shoal_protocol::{ChunkId, ChunkRef, Manifest};

use super::{RecentChunks, offsets};
use crate::client::{Client, ClientError};

/// Bytes per upload request: large enough to amortize a round trip, small enough to hold a few
/// in memory at once.
const UPLOAD_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Upload requests in flight at once.
const UPLOAD_PARALLEL: usize = 3;
/// Most chunks per upload request: what the coordinator accepts (it matters for tiny files,
/// thousands of which fit in `UPLOAD_BATCH_BYTES`).
const UPLOAD_BATCH_CHUNKS: usize = shoal_protocol::api::MAX_CHUNK_IDS;

/// Appends the frame of chunk `c`, read from `file` at `offset` straight into `body`; `false`
/// (and `body` unchanged) when the file no longer holds those bytes.
fn append_frame(body: &mut Vec<u8>, file: &std::fs::File, offset: u64, c: &ChunkRef) -> bool {
    let start = body.len();
    body.extend_from_slice(c.id.as_bytes());
    body.extend_from_slice(&c.len.to_be_bytes());
    let data_at = body.len();
    body.resize(data_at + c.len as usize, 0);
    if file.read_exact_at(&mut body[data_at..], offset).is_ok() && ChunkId::of(&body[data_at..]) == c.id {
        return true;
    }
    body.truncate(start);
    false
}

/// Why an upload stopped.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// A source file no longer holds the content its manifest names.
    #[error("{0} changed since it was scanned")]
    SourceChanged(PathBuf),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Uploads the chunks in `missing` that `files` (local path + manifest) hold, in framed batches
/// with a few requests in flight; those in `recent` are taken from there. Returns the bytes sent.
pub async fn upload_chunks(
    client: &Client,
    files: Vec<(PathBuf, Manifest)>,
    missing: HashSet<ChunkId>,
    recent: Option<&RecentChunks>,
    sent_counter: &AtomicU64,
) -> Result<u64, UploadError> {
    if missing.is_empty() {
        return Ok(0);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(UPLOAD_PARALLEL);
    let recent = recent.cloned();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), UploadError> {
        let mut wanted = missing;
        let mut body = Vec::with_capacity(UPLOAD_BATCH_BYTES + 300_000);
        let mut frames = 0usize;
        for (path, manifest) in &files {
            if !manifest.chunks.iter().any(|c| wanted.contains(&c.id)) {
                continue;
            }
            let mut file = None;
            for (off, c) in offsets(manifest) {
                if !wanted.remove(&c.id) {
                    continue;
                }
                if let Some(data) = recent.as_ref().and_then(|r| r.get(&c.id)) {
                    // Hashed into this id when remembered.
                    shoal_protocol::api::encode_frame(&mut body, &c.id, &data);
                } else {
                    if file.is_none() {
                        file = Some(std::fs::File::open(path).map_err(|_| UploadError::SourceChanged(path.clone()))?);
                    }
                    let f = file.as_ref().expect("opened above");
                    if !append_frame(&mut body, f, off, c) {
                        return Err(UploadError::SourceChanged(path.clone()));
                    }
                }
                frames += 1;
                if body.len() >= UPLOAD_BATCH_BYTES || frames == UPLOAD_BATCH_CHUNKS {
                    frames = 0;
                    let full = std::mem::replace(&mut body, Vec::with_capacity(UPLOAD_BATCH_BYTES + 300_000));
                    if tx.blocking_send(full).is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if !body.is_empty() {
            let _ = tx.blocking_send(body);
        }
        Ok(())
    });
    // Boxed so that dropping it on failure really drops the receiver and unblocks the reader.
    let mut uploads = Box::pin(
        tokio_stream_from(rx)
            .map(|body| async move {
                let n = body.len() as u64;
                client.upload_frames(body).await.map(|_| n)
            })
            .buffer_unordered(UPLOAD_PARALLEL),
    );
    let mut total = 0u64;
    let mut failure = None;
    while let Some(r) = uploads.next().await {
        match r {
            Ok(n) => {
                total += n;
                sent_counter.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(uploads);
    let read = reader.await.context("chunk reader panicked").map_err(|e| ClientError::Protocol(e.to_string()))?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    read?;
    Ok(total)
}

fn tokio_stream_from<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Uploads the chunk batches the scanner cuts from large files while it hashes them (two
/// requests in flight), sending only what the coordinator lacks. Best effort: failures are left
/// to the commit path, which uploads whatever is still missing. Returns the bytes sent.
pub async fn upload_early(
    client: Client,
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    counters: std::sync::Arc<crate::engine::Counters>,
) -> u64 {
    tokio_stream_from(rx)
        .map(|body| {
            let client = client.clone();
            async move { send_missing_frames(&client, body).await.unwrap_or(0) }
        })
        .buffer_unordered(2)
        .fold(0u64, |total, n| {
            counters.uploaded.fetch_add(n, Ordering::Relaxed);
            async move { total + n }
        })
        .await
}

/// Uploads the frames of `body` whose chunks the coordinator is missing.
async fn send_missing_frames(client: &Client, body: Vec<u8>) -> Result<u64, ClientError> {
    // (id, frame start, frame end) of each frame in `body`.
    let mut frames = Vec::new();
    let mut at = 0;
    while let Ok(Some((id, _, used))) = shoal_protocol::api::decode_frame(&body[at..], u32::MAX) {
        frames.push((id, at, at + used));
        at += used;
    }
    let ids: Vec<ChunkId> = frames.iter().map(|(id, _, _)| *id).collect();
    let missing: HashSet<ChunkId> = client.missing(&ids).await?.into_iter().collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let out = if missing.len() == frames.len() {
        body
    } else {
        let mut out = Vec::new();
        for (id, start, end) in frames {
            if missing.contains(&id) {
                out.extend_from_slice(&body[start..end]);
            }
        }
        out
    };
    let n = out.len() as u64;
    client.upload_frames(out).await?;
    Ok(n)
}
