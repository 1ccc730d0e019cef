//! The durability protocol of commits and uploads, free of HTTP: the handlers call these.
//!
//! Nothing is acknowledged before it is durable, in this order: the chunks a commit may name are
//! made durable ([`ChunkStore::make_durable`], the one place that does), then the metadata that
//! names them is written and flushed, then the head is published. Each user's commits and
//! pending-version completions run one at a time under the user's lock, in a task of their own
//! that owns it, so a client that goes away mid-commit never releases the lock while the commit
//! is still being applied or flushed.

use std::sync::Arc;

use shoal_protocol::api::CommitRequest;
use shoal_protocol::{ChunkId, DeviceId};
use shoal_sys::clock::now_ms;

use crate::App;
use crate::error::{ApiError, ApiResult};
use crate::store::{CommitOutcome, UserId};

/// Runs `f` on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::from(std::io::Error::other(e.to_string())))?
}

/// Runs `f` in a task of its own (so a caller that goes away cannot cut it short) and waits.
async fn detached<T: Send + 'static>(f: impl Future<Output = ApiResult<T>> + Send + 'static) -> ApiResult<T> {
    tokio::spawn(f).await.map_err(|e| ApiError::from(std::io::Error::other(e.to_string())))?
}

/// Applies a commit ([`crate::commit::validate`]d already) from `device`: its chunks durable,
/// then its entries appended and flushed under the user's lock, then the head published. One
/// commit at a time per user, held until the append is durable: nobody reads an entry its writer
/// has not been acknowledged (reads stop at the durable head this lock guards).
pub async fn commit(app: &Arc<App>, user: UserId, device: DeviceId, req: CommitRequest) -> ApiResult<CommitOutcome> {
    // Most of the chunks' durability outside the lock, so other commits of the user do not wait
    // for it; what arrives meanwhile is made durable under the lock, in `apply`.
    let chunks = app.chunks.clone();
    blocking(move || Ok(chunks.make_durable()?)).await?;
    let app = app.clone();
    detached(async move {
        let _guard = app.user_lock(user).lock_owned().await;
        let heads = app.head_sender(user)?;
        let (store, chunks) = (app.store.clone(), app.chunks.clone());
        let outcome = blocking(move || crate::commit::apply(&store, &chunks, user, device, req, now_ms())).await?;
        if !matches!(outcome, CommitOutcome::Stale(_)) {
            // A replay is flushed too: the original may have failed to flush. Whatever is stored
            // is durable from here on, so the durable head is the stored head.
            app.store.flush().await?;
            heads.send_replace(app.store.head_seq(user)?);
        }
        Ok(outcome)
    })
    .await
}

/// Records chunks just stored (verified, appended) as the user's and counts them off the user's
/// pending versions, in one atomic batch, so a chunk the origin holds is never still awaited by a
/// pending version (which no device would then upload again). A version with nothing left to
/// wait for becomes durable — only after the chunks are durable, under the user's commit lock (so
/// no commit records a wait for a chunk that is arriving) and flushed before the upload is
/// answered.
///
/// Without pending versions, uploads are provisional: the commit that first references a chunk
/// checks it is stored and makes the store durable before anything is acknowledged as committed.
pub async fn chunks_stored(app: &Arc<App>, user: UserId, ids: Vec<ChunkId>) -> ApiResult<()> {
    let app = app.clone();
    detached(async move {
        let _guard = app.user_lock(user).lock_owned().await;
        let (store, chunks) = (app.store.clone(), app.chunks.clone());
        let durable = blocking(move || {
            if store.has_pending(user)? {
                chunks.make_durable()?;
            }
            // An upload of a condemned chunk revives it (again: the handler did before storing).
            store.revive(&ids)?;
            // Only what the store still holds becomes the user's.
            let ids: Vec<ChunkId> = ids.into_iter().filter(|id| store.chunk_loc(id).ok().flatten().is_some()).collect();
            Ok(store.chunks_stored(user, &ids)?)
        })
        .await?;
        if !durable.is_empty() {
            app.store.flush().await?;
            tracing::info!(user, versions = ?durable, "pending versions are durable");
        }
        Ok(())
    })
    .await
}
