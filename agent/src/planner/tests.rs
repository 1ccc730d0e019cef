//! Planner tests: table cases for each rule, and a property test that runs the planner against a
//! model of one device and the coordinator until they agree, checking that no version is lost.

use super::*;
use proptest::prelude::*;
use shoal_protocol::{DeviceId, Manifest};

fn p(s: &str) -> SyncPath {
    SyncPath::parse(s).unwrap()
}

fn h(n: u8) -> ChunkId {
    ChunkId::of(&[n])
}

fn entry(path: &str, node: Option<Node>, version: Seq) -> Entry {
    let manifest = node.and_then(|n| n.hash).map(|hash| Manifest { size: 1, hash, chunks: vec![] });
    Entry {
        path: p(path),
        kind: node.map_or(EntryKind::File, |n| n.kind),
        manifest,
        exec: node.is_some_and(|n| n.exec),
        mtime_ns: 0,
        deleted: node.is_none(),
        version,
        base: None,
        device: DeviceId([0; 16]),
        time_ms: 0,
    }
}

/// Plans for one path given (remote, local, synced) nodes.
fn check(r: Option<Node>, l: Option<Node>, s: Option<Node>) -> Vec<Op> {
    let mut remote = BTreeMap::new();
    let mut local = BTreeMap::new();
    let mut synced = BTreeMap::new();
    if r.is_some() || s.is_some() {
        remote.insert(p("f"), entry("f", r, 7));
    }
    if let Some(l) = l {
        local.insert(p("f"), l);
    }
    if let Some(s) = s {
        synced.insert(p("f"), entry("f", Some(s), 3));
    }
    plan(&Trees {
        remote: &remote,
        local: &local,
        synced: &synced,
        pending: &HashSet::new(),
        unavailable: &HashSet::new(),
    })
}

#[test]
fn rules() {
    let (a, b, c) = (Node::file(h(1), false), Node::file(h(2), false), Node::file(h(3), false));
    assert_eq!(check(Some(a), Some(a), Some(a)), vec![]);
    assert!(matches!(&check(Some(b), Some(a), Some(a))[..], [Op::Fetch(e)] if e.version == 7));
    assert!(matches!(&check(None, Some(a), Some(a))[..], [Op::Remove { expect, .. }] if *expect == a));
    assert!(
        matches!(&check(Some(a), Some(b), Some(a))[..], [Op::Upload { base: Some(7), local: Some(n), .. }] if *n == b)
    );
    assert!(matches!(&check(Some(a), None, Some(a))[..], [Op::Upload { local: None, .. }]));
    assert!(matches!(&check(Some(b), Some(b), Some(a))[..], [Op::Adopt(_)]));
    assert!(matches!(&check(None, None, Some(a))[..], [Op::Forget(_)]));
    assert!(matches!(&check(Some(b), Some(c), Some(a))[..], [Op::ConflictCopy { .. }]));
    // Edit beats delete, both ways.
    assert!(matches!(&check(None, Some(b), Some(a))[..], [Op::Upload { base: Some(7), local: Some(_), .. }]));
    assert!(matches!(&check(Some(b), None, Some(a))[..], [Op::Fetch(_)]));
    // First sync of identical content moves nothing; of different content keeps both.
    assert!(matches!(&check(Some(a), Some(a), None)[..], [Op::Adopt(_)]));
    assert!(matches!(&check(Some(a), Some(b), None)[..], [Op::ConflictCopy { .. }]));
    // An exec-bit change is a change.
    let ax = Node::file(h(1), true);
    assert!(matches!(&check(Some(a), Some(ax), Some(a))[..], [Op::Upload { .. }]));
}

/// Plans for one path whose remote version (7) cannot be had.
fn check_unavailable(r: Option<Node>, l: Option<Node>, s: Option<Node>) -> Vec<Op> {
    let remote = BTreeMap::from([(p("f"), entry("f", r, 7))]);
    let local: BTreeMap<SyncPath, Node> = l.map(|l| (p("f"), l)).into_iter().collect();
    let synced: BTreeMap<SyncPath, Entry> = s.map(|s| (p("f"), entry("f", Some(s), 3))).into_iter().collect();
    let unavailable = HashSet::from([p("f")]);
    plan(&Trees {
        remote: &remote,
        local: &local,
        synced: &synced,
        pending: &HashSet::new(),
        unavailable: &unavailable,
    })
}

#[test]
fn an_unavailable_remote_version_is_built_on_not_fetched() {
    let (a, b, c) = (Node::file(h(1), false), Node::file(h(2), false), Node::file(h(3), false));
    // Nothing changed here: nothing to do (no fetch that cannot succeed).
    assert_eq!(check_unavailable(Some(b), Some(a), Some(a)), vec![]);
    assert_eq!(check_unavailable(Some(b), None, None), vec![]);
    // Edited here: committed on top of it, never a conflicted copy.
    assert_eq!(
        check_unavailable(Some(b), Some(c), Some(a)),
        vec![Op::Upload { path: p("f"), local: Some(c), base: Some(7) }]
    );
    assert_eq!(
        check_unavailable(Some(b), Some(c), None),
        vec![Op::Upload { path: p("f"), local: Some(c), base: Some(7) }]
    );
    // Deleted here: the other version wins when it can be had (edit beats delete).
    assert_eq!(check_unavailable(Some(b), None, Some(a)), vec![]);
    // Deleted here, and the unavailable version is the one this device synced (its own, which
    // it withdrew once the file was gone): the deletion is committed on top of it.
    let remote = BTreeMap::from([(p("f"), entry("f", Some(b), 7))]);
    let synced = BTreeMap::from([(p("f"), entry("f", Some(b), 7))]);
    let ops = plan(&Trees {
        remote: &remote,
        local: &BTreeMap::new(),
        synced: &synced,
        pending: &HashSet::new(),
        unavailable: &HashSet::from([p("f")]),
    });
    assert_eq!(ops, vec![Op::Upload { path: p("f"), local: None, base: Some(7) }]);
    // Already holding the same content: adopted.
    assert!(matches!(&check_unavailable(Some(b), Some(b), Some(a))[..], [Op::Adopt(e)] if e.version == 7));
}

#[test]
fn pending_paths_wait() {
    let a = Node::file(h(1), false);
    let local = BTreeMap::from([(p("f"), a)]);
    let pending = HashSet::from([p("f")]);
    let ops = plan(&Trees {
        remote: &BTreeMap::new(),
        local: &local,
        synced: &BTreeMap::new(),
        pending: &pending,
        unavailable: &HashSet::new(),
    });
    assert_eq!(ops, vec![]);
}

#[test]
fn remote_dir_removal_keeps_new_local_children() {
    let d = Node::dir();
    let a = Node::file(h(1), false);
    let remote = BTreeMap::from([(p("d"), entry("d", None, 9)), (p("d/x"), entry("d/x", None, 10))]);
    let synced = BTreeMap::from([(p("d"), entry("d", Some(d), 1)), (p("d/x"), entry("d/x", Some(a), 2))]);
    let local = BTreeMap::from([(p("d"), d), (p("d/x"), a), (p("d/new"), Node::file(h(5), false))]);
    let ops = plan(&Trees {
        remote: &remote,
        local: &local,
        synced: &synced,
        pending: &HashSet::new(),
        unavailable: &HashSet::new(),
    });
    assert!(ops.contains(&Op::Upload { path: p("d"), local: Some(d), base: Some(9) }), "{ops:?}");
    assert!(ops.iter().any(|o| matches!(o, Op::Remove { path, .. } if path.as_str() == "d/x")));
    assert!(ops.iter().any(|o| matches!(o, Op::Upload { path, .. } if path.as_str() == "d/new")));
}

/// One device and the coordinator, as maps; ops applied the way the executor does.
#[derive(Debug, Clone, Default)]
struct Model {
    local: BTreeMap<SyncPath, Node>,
    remote: BTreeMap<SyncPath, Entry>,
    synced: BTreeMap<SyncPath, Entry>,
    seq: Seq,
}

impl Model {
    fn commit(&mut self, path: &SyncPath, node: Option<Node>) -> Entry {
        self.seq += 1;
        let e = entry(path.as_str(), node, self.seq);
        self.remote.insert(path.clone(), e.clone());
        e
    }

    fn round(&mut self) -> usize {
        let ops = plan(&Trees {
            remote: &self.remote,
            local: &self.local,
            synced: &self.synced,
            pending: &HashSet::new(),
            unavailable: &HashSet::new(),
        });
        for op in &ops {
            match op {
                Op::Fetch(e) => {
                    self.local.insert(e.path.clone(), Node::of(e).unwrap());
                    self.synced.insert(e.path.clone(), e.clone());
                }
                Op::Adopt(e) => {
                    self.synced.insert(e.path.clone(), e.clone());
                }
                Op::Remove { path, expect } => {
                    assert_eq!(self.local.get(path), Some(expect));
                    self.local.remove(path);
                    self.synced.remove(path);
                }
                Op::Forget(path) => {
                    self.synced.remove(path);
                }
                Op::ConflictCopy { path, remote } => {
                    let mine = self.local.remove(path).unwrap();
                    let copy = path.with_file_name(&format!("{} (conflicted copy)", path.file_name())).unwrap();
                    assert!(!self.local.contains_key(&copy));
                    self.local.insert(copy, mine);
                    self.local.insert(path.clone(), Node::of(remote).unwrap());
                    self.synced.insert(path.clone(), remote.clone());
                }
                Op::Upload { path, local, base } => {
                    assert_eq!(self.remote.get(path).map(|e| e.version), *base, "base is the head");
                    let e = self.commit(path, *local);
                    match local {
                        Some(_) => self.synced.insert(path.clone(), e),
                        None => self.synced.remove(path),
                    };
                }
            }
        }
        ops.len()
    }

    fn live_remote(&self) -> BTreeMap<SyncPath, Node> {
        self.remote.iter().filter_map(|(p, e)| Node::of(e).map(|n| (p.clone(), n))).collect()
    }
}

/// An edit to one path: keep, delete, or set to content `n`.
fn edit() -> impl Strategy<Value = Option<Option<u8>>> {
    prop_oneof![Just(None), Just(Some(None)), (1u8..6).prop_map(|n| Some(Some(n)))]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn converges_without_losing_versions(
        start in proptest::collection::vec(proptest::option::of(1u8..6), 4),
        local_edits in proptest::collection::vec(edit(), 4),
        remote_edits in proptest::collection::vec(edit(), 4),
    ) {
        let names = ["a", "b", "c/d", "e"];
        let mut m = Model::default();
        for (name, s) in names.iter().zip(&start) {
            if let Some(n) = s {
                let node = Node::file(h(*n), false);
                let e = m.commit(&p(name), Some(node));
                m.synced.insert(p(name), e);
                m.local.insert(p(name), node);
            }
        }
        let mut must_survive = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let path = p(name);
            if let Some(edit) = local_edits[i] {
                match edit {
                    Some(n) => { m.local.insert(path.clone(), Node::file(h(n + 10), false)); must_survive.push(h(n + 10)); }
                    None => { m.local.remove(&path); }
                }
            }
            if let Some(edit) = remote_edits[i] {
                let exists = m.remote.get(&path).is_some_and(|e| !e.deleted);
                match edit {
                    Some(n) => { m.commit(&path, Some(Node::file(h(n + 20), false))); must_survive.push(h(n + 20)); }
                    None if exists => { m.commit(&path, None); }
                    None => {}
                }
            }
        }
        for _ in 0..3 {
            m.round();
        }
        prop_assert_eq!(m.round(), 0, "converged plans are empty");
        prop_assert_eq!(&m.local, &m.live_remote(), "device equals the coordinator");
        let present: HashSet<ChunkId> = m.local.values().filter_map(|n| n.hash).collect();
        for hash in must_survive {
            prop_assert!(present.contains(&hash), "an edited version was lost");
        }
    }
}

/// Paths of the incremental-planning test: two nested directories and files in and around them.
const UNIVERSE: [&str; 8] = ["a", "d", "d/x", "d/y", "d/e", "d/e/z", "d/new", "f"];
const DIRS: [&str; 2] = ["d", "d/e"];

/// A side's edit of one universe path: 0 keep, 1 delete (a directory: with everything below),
/// 2.. set a file's content (ignored for directories and for paths below a deleted directory).
fn side_edits() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => Just(1u8), 2 => 2u8..6], UNIVERSE.len())
}

/// The scope an incremental cycle looks at for `changed` paths, by the rule `scan::gather`
/// applies (its `reach`): each path with its parents; the whole subtree of a directory removed
/// from the disk (the index, the last scan, still has it) or removed remotely while still on
/// disk; and, for a directory new on the disk, its entries in *later* cycles (returned apart).
fn scope(
    changed: &HashSet<SyncPath>,
    index: &BTreeMap<SyncPath, Node>,
    t: &Trees<'_>,
) -> (HashSet<SyncPath>, HashSet<SyncPath>) {
    let mut s: HashSet<SyncPath> = HashSet::new();
    for c in changed {
        let mut cur = Some(c.clone());
        while let Some(x) = cur {
            cur = x.parent();
            s.insert(x);
        }
    }
    let is_dir = |e: Option<&Entry>| e.and_then(Node::of).is_some_and(|n| n.kind == EntryKind::Dir);
    let all: Vec<SyncPath> = t.remote.keys().chain(t.local.keys()).chain(t.synced.keys()).cloned().collect();
    let mut later = HashSet::new();
    for q in s.clone() {
        let disk = t.local.get(&q).is_some_and(|n| n.kind == EntryKind::Dir);
        let idx = index.get(&q).is_some_and(|n| n.kind == EntryKind::Dir);
        let (synced, remote) = (is_dir(t.synced.get(&q)), is_dir(t.remote.get(&q)));
        let below = all.iter().filter(|p| p.starts_with(&q)).cloned();
        if (!disk && (idx || synced)) || (disk && synced && !remote) {
            s.extend(below);
        } else if disk && !(idx && synced && remote) {
            later.extend(below);
        }
    }
    later.retain(|p| !s.contains(p));
    (s, later)
}

type Restricted = (BTreeMap<SyncPath, Entry>, BTreeMap<SyncPath, Node>, BTreeMap<SyncPath, Entry>);

/// The model's three trees, keeping only the paths in `keep`.
fn restrict(m: &Model, keep: &HashSet<SyncPath>) -> Restricted {
    (
        m.remote.iter().filter(|(q, _)| keep.contains(*q)).map(|(q, e)| (q.clone(), e.clone())).collect(),
        m.local.iter().filter(|(q, _)| keep.contains(*q)).map(|(q, n)| (q.clone(), *n)).collect(),
        m.synced.iter().filter(|(q, _)| keep.contains(*q)).map(|(q, e)| (q.clone(), e.clone())).collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Planning only the paths that changed (with parents, and the subtrees of directories that
    /// appeared or vanished on a side) gives exactly the plan of the whole folder.
    #[test]
    fn incremental_plan_equals_full_plan(
        start in proptest::collection::vec(proptest::option::of(1u8..6), UNIVERSE.len()),
        local_edits in side_edits(),
        remote_edits in side_edits(),
    ) {
        // A folder in sync: the same nodes locally, remotely and as the merge base.
        let mut m = Model::default();
        for (name, s) in UNIVERSE.iter().zip(&start) {
            let node = if DIRS.contains(name) { Some(Node::dir()) } else { s.map(|n| Node::file(h(n), false)) };
            if let Some(node) = node {
                let e = m.commit(&p(name), Some(node));
                m.synced.insert(p(name), e);
                m.local.insert(p(name), node);
            }
        }
        // What an incremental cycle hears of: the watcher reports a removed directory by its own
        // path only (as for `rm -r` or a move out of the folder); the journal lists every path.
        let mut reported: HashSet<SyncPath> = HashSet::new();
        // The agent's index: the disk as last scanned, before the local edits.
        let index = m.local.clone();
        for (i, name) in UNIVERSE.iter().enumerate() {
            let path = p(name);
            match local_edits[i] {
                0 => {}
                1 => {
                    if m.local.contains_key(&path) {
                        reported.insert(path.clone());
                    }
                    m.local.retain(|q, _| !q.starts_with(&path));
                }
                n if !DIRS.contains(name) && path.parent().is_none_or(|d| m.local.contains_key(&d)) => {
                    m.local.insert(path.clone(), Node::file(h(n + 10), false));
                    reported.insert(path);
                }
                _ => {}
            }
        }
        let seq_before = m.seq;
        for (i, name) in UNIVERSE.iter().enumerate() {
            let path = p(name);
            let live = |m: &Model, q: &SyncPath| m.remote.get(q).is_some_and(|e| !e.deleted);
            match remote_edits[i] {
                0 => {}
                1 => {
                    // Children first, as agents commit a directory's removal.
                    let mut gone: Vec<SyncPath> = m.remote.keys().filter(|q| q.starts_with(&path)).cloned().collect();
                    gone.retain(|q| live(&m, q));
                    gone.sort_by_key(|q| std::cmp::Reverse(q.depth()));
                    for q in gone {
                        m.commit(&q, None);
                    }
                }
                n if !DIRS.contains(name) && path.parent().is_none_or(|d| live(&m, &d)) => {
                    m.commit(&path, Some(Node::file(h(n + 20), false)));
                }
                _ => {}
            }
        }
        reported.extend(m.remote.values().filter(|e| e.version > seq_before).map(|e| e.path.clone()));
        let changed = reported;
        let pending = HashSet::new();
        let full = Trees { remote: &m.remote, local: &m.local, synced: &m.synced, pending: &pending, unavailable: &HashSet::new() };
        let full_plan = plan(&full);
        let (now, later) = scope(&changed, &index, &full);
        // This cycle: exactly the full plan's operations on the paths it looks at.
        let (remote, local, synced) = restrict(&m, &now);
        let part = Trees { remote: &remote, local: &local, synced: &synced, pending: &pending, unavailable: &HashSet::new() };
        let want: Vec<Op> = full_plan.iter().filter(|op| now.contains(op.path())).cloned().collect();
        prop_assert_eq!(plan(&part), want, "scope {:?}", now);
        // With the entries of new directories (later cycles), nothing in the full plan is missed.
        let all: HashSet<SyncPath> = now.union(&later).cloned().collect();
        let (remote, local, synced) = restrict(&m, &all);
        let part = Trees { remote: &remote, local: &local, synced: &synced, pending: &pending, unavailable: &HashSet::new() };
        prop_assert_eq!(plan(&part), full_plan.clone(), "scope {:?} then {:?}", now, later);
        // And an unchanged folder plans nothing at all.
        if changed.is_empty() {
            prop_assert!(plan(&full).is_empty());
        }
    }
}
