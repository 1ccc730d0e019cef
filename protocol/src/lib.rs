//! Shoal's shared vocabulary: identifiers, sync paths, chunking, manifests, entries and the
//! coordinator API's wire types. This crate does no I/O beyond reading a caller-supplied
//! `std::io::Read` in the chunker, and has no async runtime.

pub mod api;
pub mod chunker;
pub mod entry;
pub mod ids;
pub mod path;
pub mod peer;
pub mod size;
pub mod status;
pub mod testdata;
pub mod ticket;

pub use chunker::{CHUNK_PARAMS, ChunkParams, Chunker, ChunkerError};
pub use entry::{Change, ChunkRef, Entry, EntryKind, Manifest};
pub use ids::{ChunkId, CommitId, DeviceId, HexError, Seq};
pub use path::{PathError, SyncPath};
