//! The sync planner: a pure function of three trees — *remote* (journal heads), *local* (the
//! disk, as scanned) and *synced* (the last state both agreed on, the merge base) — that returns
//! the operations to run. It reads no clock and touches no disk, so property tests drive it
//! directly. Its rules:
//! - only remote changed → fetch (or remove) locally;
//! - only local changed → upload (or upload a deletion);
//! - both changed to the same thing → just record it as synced;
//! - both changed differently → the local version moves aside as a conflicted copy and the remote
//!   version takes the name; nothing is overwritten;
//! - edit vs delete → the edit wins, whichever side made it;
//! - a remote version that cannot be had (stuck: nobody supplies its chunks) is never fetched; a
//!   local edit goes on top of it instead of becoming a conflicted copy, a local deletion waits.

use std::collections::{BTreeMap, HashSet};

use shoal_protocol::{ChunkId, Entry, EntryKind, Seq, SyncPath};

/// What a path holds, for comparing versions: kind, content hash (files) and exec bit (files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Node {
    pub kind: EntryKind,
    pub hash: Option<ChunkId>,
    pub exec: bool,
}

impl Node {
    pub fn dir() -> Node {
        Node { kind: EntryKind::Dir, hash: None, exec: false }
    }

    pub fn file(hash: ChunkId, exec: bool) -> Node {
        Node { kind: EntryKind::File, hash: Some(hash), exec }
    }

    /// The node an entry describes, or `None` for a tombstone.
    pub fn of(e: &Entry) -> Option<Node> {
        if e.deleted {
            return None;
        }
        Some(match e.kind {
            EntryKind::File => Node { kind: EntryKind::File, hash: e.hash(), exec: e.exec },
            k => Node { kind: k, hash: None, exec: false },
        })
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write the remote version (file or directory) at its path.
    Fetch(Entry),
    /// Remove the local path, if it still holds `expect`.
    Remove { path: SyncPath, expect: Node },
    /// Commit the local state of `path` (`None`: a deletion) over `base`.
    Upload { path: SyncPath, local: Option<Node>, base: Option<Seq> },
    /// Local already equals the remote version: record it as synced.
    Adopt(Entry),
    /// Both sides deleted the path: drop it from the synced tree.
    Forget(SyncPath),
    /// Move the local version aside as a conflicted copy, then fetch the remote one.
    ConflictCopy { path: SyncPath, remote: Entry },
}

impl Op {
    pub fn path(&self) -> &SyncPath {
        match self {
            Op::Fetch(e) | Op::Adopt(e) | Op::ConflictCopy { remote: e, .. } => &e.path,
            Op::Remove { path, .. } | Op::Upload { path, .. } | Op::Forget(path) => path,
        }
    }
}

/// The planner's input.
pub struct Trees<'a> {
    /// Journal heads, tombstones included (their versions are the bases of re-creations).
    pub remote: &'a BTreeMap<SyncPath, Entry>,
    pub local: &'a BTreeMap<SyncPath, Node>,
    pub synced: &'a BTreeMap<SyncPath, Entry>,
    /// Paths with a commit still in the outbox: left alone until it is acknowledged.
    pub pending: &'a HashSet<SyncPath>,
    /// Paths whose remote version cannot be had (a pending version no device has supplied for a
    /// while, or one withdrawn): it is not fetched; a local edit is committed on top of it (it
    /// stays in history), and so is a local deletion of the version this device last synced;
    /// anything else waits for it.
    pub unavailable: &'a HashSet<SyncPath>,
}

/// Plans one reconciliation. Ops come in path order; the executor orders them by kind.
pub fn plan(t: &Trees<'_>) -> Vec<Op> {
    let mut paths: Vec<&SyncPath> = t.remote.keys().chain(t.local.keys()).chain(t.synced.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut ops = Vec::new();
    for path in paths {
        if t.pending.contains(path) {
            continue;
        }
        let r_entry = t.remote.get(path);
        let r = r_entry.and_then(Node::of);
        let l = t.local.get(path).copied();
        let s = t.synced.get(path).and_then(Node::of);
        let base = r_entry.map(|e| e.version);
        if t.unavailable.contains(path) {
            let synced_is_head = t.synced.get(path).zip(r_entry).is_some_and(|(se, e)| se.version == e.version);
            ops.extend(match (l, r_entry) {
                (Some(_), Some(e)) if l == r => Some(Op::Adopt(e.clone())),
                (Some(_), Some(_)) if l != s => Some(Op::Upload { path: path.clone(), local: l, base }),
                // Deleted here, and the version nobody can supply is the one this device last
                // synced (its own, withdrawn once the file was gone): no edit races the
                // deletion, so it is committed, and the version stays in history.
                (None, Some(e)) if synced_is_head && r.is_some() && !e.deleted => {
                    Some(Op::Upload { path: path.clone(), local: None, base })
                }
                _ => None,
            });
            continue;
        }
        let (r_changed, l_changed) = (r != s, l != s);
        let op = match (r_changed, l_changed) {
            (false, false) => None,
            (true, false) => match (r, r_entry) {
                (Some(_), Some(e)) => Some(Op::Fetch(e.clone())),
                _ => s.map(|expect| Op::Remove { path: path.clone(), expect }),
            },
            (false, true) => Some(Op::Upload { path: path.clone(), local: l, base }),
            (true, true) => match (l, r, r_entry) {
                (None, None, _) => Some(Op::Forget(path.clone())),
                (Some(_), Some(_), Some(e)) if l == r => Some(Op::Adopt(e.clone())),
                // Edit beats delete on either side.
                (Some(_), None, _) => Some(Op::Upload { path: path.clone(), local: l, base }),
                (None, Some(_), Some(e)) => Some(Op::Fetch(e.clone())),
                (Some(_), Some(_), Some(e)) => Some(Op::ConflictCopy { path: path.clone(), remote: e.clone() }),
                (_, Some(_), None) => None, // unreachable: a remote node comes from an entry
            },
        };
        ops.extend(op);
    }
    keep_dirs_with_new_children(&mut ops, t);
    ops
}

/// A directory removed remotely while new or changed files were added under it locally is kept:
/// its removal becomes an upload that re-creates it, so the edits inside are never lost.
fn keep_dirs_with_new_children(ops: &mut [Op], t: &Trees<'_>) {
    let uploads: Vec<SyncPath> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Upload { path, local: Some(_), .. } => Some(path.clone()),
            _ => None,
        })
        .collect();
    for op in ops.iter_mut() {
        if let Op::Remove { path, expect } = op
            && expect.kind == EntryKind::Dir
            && uploads.iter().any(|u| u != path && u.starts_with(path))
        {
            let base = t.remote.get(path).map(|e| e.version);
            *op = Op::Upload { path: path.clone(), local: t.local.get(path).copied(), base };
        }
    }
}

#[cfg(test)]
mod tests;
