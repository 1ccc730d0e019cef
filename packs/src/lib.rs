//! Shoal's verified pack store. Chunks are kept as frames in numbered, append-only packs
//! ([`frames`]: the layout, and the check every chunk read passes before it is served), and
//! packs live in a backend: [`local::LocalPacks`], files on local disk written with direct I/O,
//! or [`s3::S3Packs`], objects in an S3-compatible bucket with a local cache of recent packs.
//! A backend knows nothing of chunks: it stores numbered byte sequences and reads ranges of
//! them back. What goes into a pack, and the index from chunk to pack, offset and length, belong
//! to the user of the crate (the coordinator's chunk store, a relay's cache).
//!
//! Backends are called from blocking threads, never from async tasks.

use std::fmt;

use bytes::Bytes;

pub mod frames;
pub mod local;
pub mod s3;
#[cfg(feature = "test-s3")]
pub mod testing;

pub use frames::ChunkLoc;

/// A pack's number. Numbers are reserved durably in the metadata store before a pack is
/// created, so one is never used twice, even after a crash lost the pack.
pub type PackId = u32;

/// Why a backend operation failed.
#[derive(Debug)]
pub struct PackError {
    pub kind: PackErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackErrorKind {
    /// The pack (or the range asked for) does not exist.
    NotFound,
    /// Worth trying again later: a timeout, a reset connection, a throttled or failing service.
    Transient,
    /// Trying again will not help: bad credentials, no such bucket, no permission, disk full.
    Permanent,
}

impl PackError {
    pub fn new(kind: PackErrorKind, message: impl Into<String>) -> Self {
        PackError { kind, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(PackErrorKind::NotFound, message)
    }
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PackError {}

impl From<std::io::Error> for PackError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::NotFound | K::UnexpectedEof => PackErrorKind::NotFound,
            K::Interrupted | K::TimedOut | K::WouldBlock => PackErrorKind::Transient,
            _ => PackErrorKind::Permanent,
        };
        PackError::new(kind, e.to_string())
    }
}

/// A stored pack and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackInfo {
    pub pack: PackId,
    pub len: u64,
}

/// A medium that holds packs.
pub trait PackBackend: Send + Sync + 'static {
    /// Where the packs are, for logs and errors: "local packs in DIR", "s3://BUCKET/PREFIX".
    fn describe(&self) -> String;

    /// Starts pack `pack`, which never existed before.
    fn create(&self, pack: PackId) -> Result<Box<dyn PackWriter>, PackError>;

    /// `len` bytes of `pack` from `offset`. Only what a writer has made readable (see
    /// [`PackWriter::readable_before_durable`]) or durable can be read.
    fn read(&self, pack: PackId, offset: u64, len: usize) -> Result<Bytes, PackError>;

    /// Every pack the backend holds, with its length.
    fn list(&self) -> Result<Vec<PackInfo>, PackError>;

    /// Removes `pack`; removing one that does not exist is not an error.
    fn delete(&self, pack: PackId) -> Result<(), PackError>;

    /// A pack is closed, and the next append starts a new one, once it is this long.
    fn pack_bytes(&self) -> u64;

    /// How many groups of chunks one fetch reads at once, in order: more than one where a read's
    /// latency, not its bytes, is what it waits for.
    fn read_ahead(&self) -> usize {
        1
    }

    /// Drops caches an idle server need not hold (they come back on the next use).
    fn release_memory(&self) {}

    /// Requests made to a remote store since start, by kind (`put`, `get`, `list`, `delete`);
    /// empty for local files.
    fn request_counts(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// Reads answered by a local cache of a remote store (`hit`) and not (`miss`); empty
    /// without one.
    fn cache_reads(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// Drops a local cache's copy of `pack` (its bytes failed a check); `true` if there was one,
    /// so reading again goes to the store itself.
    fn forget_cached(&self, _pack: PackId) -> bool {
        false
    }
}

/// Makes what a writer flushed durable; run without holding the writer, so appends (to the same
/// pack, or to the next one) go on meanwhile. After a failure it can be run again: it keeps what
/// it needs (for an object store, the pack's bytes) until it succeeds.
pub type MakeDurable = Box<dyn FnMut() -> Result<(), PackError> + Send>;

/// Appends to one new pack.
pub trait PackWriter: Send {
    /// Every [`flush`](Self::flush) must leave the pack's length a multiple of this (direct
    /// I/O needs whole blocks); the chunk store pads with a frame of zero id.
    fn alignment(&self) -> usize;

    /// Appends `data` (it may be staged in memory until [`flush`](Self::flush)).
    fn append(&mut self, data: &[u8]) -> Result<(), PackError>;

    /// Hands what was appended to the backend (written, or staged for upload).
    fn flush(&mut self) -> Result<(), PackError>;

    /// Drops buffers an idle writer holds (they come back on the next append).
    fn release_memory(&mut self) {}

    /// `true` if what [`flush`](Self::flush) handed over can be read back before it is durable.
    fn readable_before_durable(&self) -> bool;

    /// `true` if [`make_durable`](Self::make_durable) seals the pack: an object store writes a
    /// pack once, whole, and the writer takes no more appends after it.
    fn seals(&self) -> bool;

    /// What makes everything flushed so far durable. A pack counts as stored only once that has
    /// returned `Ok`.
    fn make_durable(&mut self) -> Result<MakeDurable, PackError>;
}
