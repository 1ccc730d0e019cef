//! Memory policy for the binaries. While busy, freed buffers should be reused rather than handed
//! back to the OS: on the VMs this project runs on, touching fresh pages costs ~2.5 s of CPU per
//! GiB, which made copying chunk data into newly mapped buffers the largest cost of a transfer.
//! So `tune` keeps large buffers in the heap, and a process that goes idle gives free memory back
//! with `release_free_memory` (the coordinator does, from its idle trimmer).

/// Keeps buffers up to 32 MiB in the heap (glibc's largest mmap threshold), raises the trim
/// threshold so transfer buffers are reused warm, and caps the number of arenas at `arenas`.
/// Call once at startup, before any other thread exists: a thread's first allocation picks its
/// arena, so threads started earlier may each have made one past the cap.
#[allow(unsafe_code)]
pub fn tune(arenas: i32) {
    // SAFETY: mallopt only sets allocator parameters; called at startup before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        // Each arena beyond the first holds its own free memory (up to 64 MiB each) that the
        // others cannot reuse.
        libc::mallopt(libc::M_ARENA_MAX, arenas);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    }
}

/// Caps the number of allocator arenas at `arenas`, leaving the other parameters to glibc: for a
/// process whose memory bound matters more than warm buffers (a relay). Call once at startup,
/// before any other thread exists.
#[allow(unsafe_code)]
pub fn limit_arenas(arenas: i32) {
    // SAFETY: mallopt only sets an allocator parameter; called at startup.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// Returns the allocator's free memory to the OS (`malloc_trim`). Walks the heap: call it from a
/// blocking thread, when idle.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers from us
    // and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// This process's resident memory in MiB (`VmRSS`), 0 where `/proc` does not say.
pub fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kib.unwrap_or(0) / 1024
}
