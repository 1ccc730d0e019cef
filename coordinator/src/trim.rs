//! The coordinator's side of the allocator policy (`shoal_sys::allocator`): while requests keep
//! coming, freed transfer buffers stay in the heap to be reused warm; once the server goes idle,
//! it drops the chunk store's spare buffers and gives free memory back to the OS.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::chunks::ChunkStore;
use crate::metrics::Metrics;

/// How long without requests counts as idle.
const IDLE: Duration = Duration::from_secs(2);

/// How many idle periods after a burst to keep trimming: memory held by connections that close
/// a little later (clients drop idle keep-alive connections after a few seconds) is returned too.
const TRIMS_PER_BURST: u32 = 5;

/// Trims after each burst of activity, at each of the first `TRIMS_PER_BURST` idle periods.
pub(crate) fn spawn(
    metrics: Arc<Metrics>,
    chunks: ChunkStore,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = metrics.requests.get();
        let mut trims_left = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(IDLE) => {}
            }
            let now = metrics.requests.get();
            if now != last {
                last = now;
                trims_left = TRIMS_PER_BURST;
            } else if trims_left > 0 {
                trims_left -= 1;
                chunks.release_buffers();
                let _ = tokio::task::spawn_blocking(shoal_sys::allocator::release_free_memory).await;
                tracing::debug!("idle: released free memory");
            }
        }
    })
}
