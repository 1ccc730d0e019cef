//! Memory policy for the binaries. While busy, freed buffers should be reused rather than handed
//! back to the OS: on the VMs this project runs on, touching fresh pages costs ~2.5 s of CPU per
//! GiB, which made copying chunk data into newly mapped buffers the largest cost of a transfer.
//! So `tune_allocator` keeps large buffers in the heap, and the coordinator gives free memory back
//! with `malloc_trim` once it goes idle.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
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
        let mut last = metrics.requests.load(Relaxed);
        let mut trims_left = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(IDLE) => {}
            }
            let now = metrics.requests.load(Relaxed);
            if now != last {
                last = now;
                trims_left = TRIMS_PER_BURST;
            } else if trims_left > 0 {
                trims_left -= 1;
                chunks.release_buffers();
                let _ = tokio::task::spawn_blocking(release_free_memory).await;
                tracing::debug!("idle: released free memory");
            }
        }
    })
}

/// Keeps buffers up to 32 MiB in the heap (glibc's largest mmap threshold), raises the trim
/// threshold so transfer buffers are reused warm, and caps the number of arenas. Call once at
/// startup.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called at startup before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        // One arena per core is plenty for these I/O-bound processes; more arenas only fragment.
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    }
}

#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers from us
    // and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
