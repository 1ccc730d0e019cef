//! Moving chunk bytes. The download pipeline reads top to bottom: `source` finds each chunk (local
//! files through the chunk map, then remote sources, every chunk verified in one place) and
//! counts where bytes came from; `assemble` writes a file's chunks in order into a temp file
//! through `writer` and checks the whole-file hash; the engine's `download` module applies
//! verified temp files to the folder. `upload` sends the chunks the coordinator lacks. `recent`
//! keeps small files' chunks just hashed in memory, for peers and uploads.

use shoal_protocol::{ChunkRef, Manifest};

mod assemble;
mod assign;
mod partial;
mod recent;
mod source;
mod upload;
mod writer;

pub use assemble::{AssembleError, AssembleOpts, Assembled, assemble};
pub use partial::{PartialGuard, Partials};
pub use recent::{RECENT_FILE_MAX, RecentChunks};
pub use source::{
    BytesBySource, ChunkSource, FetchError, Fetcher, LocalChunk, Remote, Source, SourceCounts, SourceFailed, verify,
};
pub use upload::{UploadError, upload_chunks, upload_early};

/// Chunk offsets of a manifest, in order.
pub fn offsets(m: &Manifest) -> impl Iterator<Item = (u64, &ChunkRef)> {
    m.chunks.iter().scan(0u64, |off, c| {
        let at = *off;
        *off += u64::from(c.len);
        Some((at, c))
    })
}

/// The permission bits of a downloaded file. Only the exec bit syncs: replacing a file keeps its
/// `existing` permission bits (so a local `chmod 600` survives updates) with the exec bits set
/// where it is readable, or cleared; a new file gets the process umask's defaults, 0666 (0777
/// when `exec`) without the `umask` bits. Never wider than the existing file, or the umask, allows.
pub fn file_mode(existing: Option<u32>, exec: bool, umask: u32) -> u32 {
    match existing {
        Some(m) => {
            let rw = m & 0o666;
            if exec { rw | (rw & 0o444) >> 2 } else { rw }
        }
        None => (if exec { 0o777 } else { 0o666 }) & !umask,
    }
}

/// The umask of this process, read once from `/proc/self/status` (setting it to read it back
/// would race with threads creating files).
pub fn process_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok()))
            })
            // Linux older than 4.7 does not show it: assume the common default, which never
            // opens a file to writes by others.
            .unwrap_or(0o022)
    })
}

pub fn system_time(ns: i64) -> std::time::SystemTime {
    let d = std::time::Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 { std::time::UNIX_EPOCH + d } else { std::time::UNIX_EPOCH - d }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let check = |existing, exec, umask, want: u32| {
            let got = file_mode(existing, exec, umask);
            assert_eq!(got, want, "{existing:?} exec={exec} umask={umask:o}: got {got:o}, want {want:o}");
        };
        check(None, false, 0o022, 0o644);
        check(None, true, 0o022, 0o755);
        check(None, false, 0o077, 0o600);
        check(None, true, 0o077, 0o700);
        check(None, true, 0o000, 0o777);
        check(Some(0o600), false, 0o022, 0o600);
        check(Some(0o600), true, 0o022, 0o700);
        check(Some(0o755), false, 0o000, 0o644);
        check(Some(0o640), true, 0o000, 0o750);
        check(Some(0o4755), true, 0o022, 0o755);
        assert_eq!(process_umask() & !0o777, 0);
    }
}
