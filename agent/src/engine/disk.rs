//! The engine's writes to the folder: directories, installing verified temp files, removals,
//! and syncing the file system. Each checks that the target still looks as the scan saw it.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use shoal_protocol::SyncPath;

use crate::scan;
use crate::store::IndexRec;

/// Flushes the file system holding `root` (data of every file written so far, and renames).
pub(super) fn sync_fs(root: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(root)?;
    f.sync_all()?;
    crate::syncfs(&f)?;
    Ok(())
}

/// Creates the directories of `path` under `root`, refusing to pass through a symlink or a file.
pub(super) fn ensure_dir(root: &Path, path: &SyncPath) -> anyhow::Result<std::fs::Metadata> {
    let mut cur = root.to_path_buf();
    for comp in path.components() {
        cur.push(comp);
        match cur.symlink_metadata() {
            Ok(md) if md.is_dir() => {}
            Ok(_) => anyhow::bail!("{} exists and is not a directory", cur.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&cur).with_context(|| format!("creating {}", cur.display()))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(cur.symlink_metadata()?)
}

/// Renames a verified temp file over `path`, if the target still looks as it did when scanned
/// (`expected`, or absent). Never writes through a symlinked directory. `dirs` holds the
/// directories already checked (or made) for the installs of one batch: each is looked at once.
pub(super) fn install(
    root: &Path,
    path: &SyncPath,
    tmp: &Path,
    expected: Option<&IndexRec>,
    dirs: &mut HashSet<SyncPath>,
) -> anyhow::Result<std::fs::Metadata> {
    if let Some(parent) = path.parent()
        && !dirs.contains(&parent)
    {
        ensure_dir(root, &parent)?;
        dirs.insert(parent);
    }
    let target = path.to_local(root);
    match expected {
        // Nothing there when scanned: the rename must not replace a file created since.
        None => rename_noreplace(tmp, &target).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!("the local file appeared since the scan"),
            _ => anyhow::Error::new(e).context(format!("installing {}", target.display())),
        })?,
        Some(rec) => match target.symlink_metadata() {
            Ok(md) if md.is_file() && rec.same_stat(&scan::stat_rec(&md)) => std::fs::rename(tmp, &target)?,
            _ => anyhow::bail!("the local file changed since the scan"),
        },
    }
    Ok(target.symlink_metadata()?)
}

/// Renames `from` to `to` only if `to` does not exist (atomically: `RENAME_NOREPLACE`).
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(rustix::fs::CWD, from, rustix::fs::CWD, to, rustix::fs::RenameFlags::NOREPLACE)
        .map_err(std::io::Error::from)
}

/// What `remove_local` did.
pub(super) enum Removal {
    Done,
    /// A directory that still has entries: kept.
    NotEmpty,
    /// The file changed since the scan: kept, to be re-planned.
    Changed,
}

/// Removes the local `path` if it is unchanged since the scan. Directories go only when empty.
pub(super) fn remove_local(root: &Path, path: &SyncPath, scanned: Option<&IndexRec>) -> anyhow::Result<Removal> {
    let target = path.to_local(root);
    let md = match target.symlink_metadata() {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Removal::Done),
        Err(e) => return Err(e.into()),
    };
    if md.is_dir() {
        return match std::fs::remove_dir(&target) {
            Ok(()) => Ok(Removal::Done),
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                // Only OS metadata (.DS_Store and the like) left? It goes with the directory.
                let entries: Vec<_> = std::fs::read_dir(&target)?.collect::<Result<_, _>>()?;
                let junk_only = entries.iter().all(|e| {
                    e.file_type().is_ok_and(|t| t.is_file()) && e.file_name().to_str().is_some_and(scan::is_os_junk)
                });
                if !junk_only {
                    return Ok(Removal::NotEmpty);
                }
                for e in entries {
                    std::fs::remove_file(e.path())?;
                }
                std::fs::remove_dir(&target)?;
                Ok(Removal::Done)
            }
            Err(e) => Err(e.into()),
        };
    }
    if scanned.is_none_or(|r| !r.same_stat(&scan::stat_rec(&md))) {
        return Ok(Removal::Changed);
    }
    std::fs::remove_file(&target)?;
    Ok(Removal::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_never_replaces_a_file_that_appeared_since_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let tmp = dir.path().join("fetched.part");
        std::fs::write(&tmp, b"fetched").unwrap();
        let path = SyncPath::parse("d/f").unwrap();
        let mut dirs = HashSet::new();
        // Absent when scanned, and still absent: installed, its directory made.
        let md = install(&root, &path, &tmp, None, &mut dirs).unwrap();
        assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"fetched");
        assert_eq!(md.len(), 7);
        assert!(dirs.contains(&SyncPath::parse("d").unwrap()));
        // Absent when scanned, written by the user since: kept, and the temp file stays.
        std::fs::write(&tmp, b"fetched again").unwrap();
        let user = SyncPath::parse("d/g").unwrap();
        std::fs::write(root.join("d/g"), b"the user's").unwrap();
        let err = install(&root, &user, &tmp, None, &mut dirs).unwrap_err();
        assert!(err.to_string().contains("appeared since the scan"), "{err:#}");
        assert_eq!(std::fs::read(root.join("d/g")).unwrap(), b"the user's");
        assert!(tmp.exists());
        // Scanned with one stat, changed since: kept too.
        let rec = scan::stat_rec(&std::fs::symlink_metadata(root.join("d/f")).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(root.join("d/f"), b"edited").unwrap();
        assert!(install(&root, &path, &tmp, Some(&rec), &mut dirs).is_err());
        assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"edited");
    }

    #[test]
    fn ensure_dir_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        assert!(ensure_dir(dir.path(), &SyncPath::parse("link/x").unwrap()).is_err());
        assert!(ensure_dir(dir.path(), &SyncPath::parse("a/b").unwrap()).unwrap().is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
