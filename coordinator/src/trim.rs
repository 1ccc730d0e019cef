//! The coordinator's side of the allocator policy (`shoal_sys::allocator`): while requests keep
//! coming, freed transfer buffers stay in the heap to be reused warm; once the server goes idle
//! or nearly so after a busy spell, it drops the chunk store's spare buffers and gives free memory
//! back to the OS. "Nearly" counts: devices in sync still send a request now and then (cursor
//! reports, pending-version checks, a small edit), and waiting for a silence they never leave
//! kept a large sync's peak heap resident.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::chunks::ChunkStore;
use crate::metrics::Metrics;

/// The period whose requests and bytes tell whether the server is busy or quiet.
const PERIOD: Duration = Duration::from_secs(2);

/// How many quiet periods after a burst to keep trimming: memory held by connections that close
/// a little later (clients drop idle keep-alive connections after a few seconds) is returned too.
const TRIMS_PER_BURST: u32 = 5;

/// A period with at most this many requests and chunk bytes in and out is quiet.
const QUIET_REQUESTS: u64 = 100;
const QUIET_BYTES: u64 = 4 * 1024 * 1024;

/// Trims after each burst of activity, at each of the first `TRIMS_PER_BURST` quiet periods.
pub(crate) fn spawn(
    metrics: Arc<Metrics>,
    chunks: ChunkStore,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let load = || (metrics.requests.get(), metrics.bytes_in.get() + metrics.bytes_out.get());
        let mut last = load();
        let mut trims_left = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PERIOD) => {}
            }
            let now = load();
            let busy = now.0 - last.0 > QUIET_REQUESTS || now.1 - last.1 > QUIET_BYTES;
            last = now;
            if busy {
                trims_left = TRIMS_PER_BURST;
            } else if trims_left > 0 {
                trims_left -= 1;
                // Off the async workers: it waits for the chunk store's writer, which may be in
                // the middle of a write to storage (a part upload to S3, driven by these workers).
                let chunks = chunks.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    chunks.release_buffers();
                    shoal_sys::allocator::release_free_memory();
                })
                .await;
                tracing::debug!("idle: released free memory");
            }
        }
    })
}
