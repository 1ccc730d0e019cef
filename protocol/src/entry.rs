//! Manifests (what a file is made of), entries (one version of one path in the journal) and
//! changes (what a device proposes in a commit).

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkId, DeviceId, Seq};
use crate::path::SyncPath;

/// One chunk of a file: its id and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// The content of a file: its chunks in order, total size and whole-file BLAKE3.
/// An empty file has no chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub size: u64,
    pub hash: ChunkId,
    pub chunks: Vec<ChunkRef>,
}

impl Manifest {
    /// The manifest of the empty file.
    pub fn empty() -> Self {
        Manifest { size: 0, hash: ChunkId::of(b""), chunks: Vec::new() }
    }

    /// `true` if the chunk lengths add up to `size`, every chunk is within the chunker's bounds
    /// (no chunk empty or over the maximum; every chunk but the last at least the minimum, as
    /// FastCDC cuts them), there are at most [`MAX_MANIFEST_CHUNKS`], and an empty file has the
    /// empty hash. Checked on every manifest from the network.
    pub fn is_consistent(&self) -> bool {
        let params = crate::chunker::CHUNK_PARAMS;
        if self.chunks.len() > MAX_MANIFEST_CHUNKS {
            return false;
        }
        let mut total = 0u64;
        let last = self.chunks.len().saturating_sub(1);
        for (i, c) in self.chunks.iter().enumerate() {
            let len = c.len as usize;
            if len == 0 || len > params.max || (i < last && len < params.min) {
                return false;
            }
            total = total.saturating_add(u64::from(c.len));
        }
        total == self.size && (self.size > 0 || self.hash == ChunkId::of(b""))
    }
}

/// Most chunks in one manifest: its JSON (~92 bytes per chunk) stays under ~46 MiB, inside one
/// commit body (`api::MAX_JSON_BODY`), and it covers files of ~32 GiB at the chunker's 64 KiB
/// average (8 GiB if every cut fell at the 16 KiB minimum).
pub const MAX_MANIFEST_CHUNKS: usize = 1 << 19;

/// What kind of object a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// A proposed new version of one path, sent in a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub path: SyncPath,
    pub kind: EntryKind,
    /// `Some` for files, `None` for directories and deletions.
    #[serde(default)]
    pub manifest: Option<Manifest>,
    #[serde(default)]
    pub exec: bool,
    /// Modification time, nanoseconds since the Unix epoch.
    #[serde(default)]
    pub mtime_ns: i64,
    #[serde(default)]
    pub deleted: bool,
    /// The version this change replaces: the current head's `version`, or `None` when the path
    /// has never existed. The coordinator refuses the commit when this is not the head.
    pub base: Option<Seq>,
}

/// One committed version of one path: a row of the per-user journal.
///
/// Wire and stored types here never use `skip_serializing_if`: they are also stored with postcard,
/// which is not self-describing and needs every field present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: SyncPath,
    pub kind: EntryKind,
    #[serde(default)]
    pub manifest: Option<Manifest>,
    #[serde(default)]
    pub exec: bool,
    #[serde(default)]
    pub mtime_ns: i64,
    #[serde(default)]
    pub deleted: bool,
    /// The journal sequence number that created this version.
    pub version: Seq,
    /// The version this one replaced.
    pub base: Option<Seq>,
    pub device: DeviceId,
    /// Commit time, milliseconds since the Unix epoch (coordinator clock).
    pub time_ms: u64,
}

impl Entry {
    pub fn size(&self) -> u64 {
        self.manifest.as_ref().map_or(0, |m| m.size)
    }

    pub fn hash(&self) -> Option<ChunkId> {
        self.manifest.as_ref().map(|m| m.hash)
    }

    /// `true` when the two versions hold the same thing (ignoring who made them and when).
    pub fn same_content(&self, other: &Entry) -> bool {
        self.deleted == other.deleted
            && (self.deleted || (self.kind == other.kind && self.hash() == other.hash() && self.exec == other.exec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries are stored with postcard: every shape must round-trip, tombstones included.
    #[test]
    fn postcard_round_trip() {
        let e = Entry {
            path: SyncPath::parse("a/b").unwrap(),
            kind: EntryKind::Dir,
            manifest: None,
            exec: false,
            mtime_ns: -5,
            deleted: true,
            version: 9,
            base: Some(3),
            device: DeviceId([7; 16]),
            time_ms: 1,
        };
        let bin = postcard::to_stdvec(&e).unwrap();
        assert_eq!(postcard::from_bytes::<Entry>(&bin).unwrap(), e);
        let with = Entry { manifest: Some(Manifest::empty()), kind: EntryKind::File, deleted: false, ..e };
        let bin = postcard::to_stdvec(&with).unwrap();
        assert_eq!(postcard::from_bytes::<Entry>(&bin).unwrap(), with);
    }
}
