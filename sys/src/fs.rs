//! Replacing a whole small file atomically (configs, keys, certificates, `server.json`,
//! `status.json`): readers see the old contents or the new, never a torn or empty file, whatever
//! happens midway. The new contents go to a temp file in the same directory (a rename only
//! replaces atomically within one file system), which is then renamed over the target.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Mode of every file `write_atomic` makes: they hold keys, tokens or private state.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Whether `write_atomic` waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The file is synced before the rename and its directory after it: once the call returns,
    /// the new contents survive a crash.
    Synced,
    /// Still atomic for readers, but a crash may bring back the old contents: for files
    /// rewritten all the time whose loss costs nothing (`status.json`, every sync cycle).
    Unsynced,
}

/// Replaces `path` with `data`, mode 0600 whatever the umask (an existing file's wider mode is
/// not kept). A failure leaves the old file as it was and no temp file behind.
pub fn write_atomic(path: &Path, data: &[u8], durability: Durability) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))
        .tempfile_in(dir)?;
    // The umask can only narrow the mode asked for above; set it exactly all the same.
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    tmp.write_all(data)?;
    if durability == Durability::Synced {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    if durability == Durability::Synced {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(durability: Durability) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, b"old contents, longer than the new").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new", durability).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, PRIVATE_FILE_MODE);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["config.toml"], "no temp file is left behind");
    }

    #[test]
    fn replaces_the_whole_file_privately() {
        check(Durability::Synced);
        check(Durability::Unsynced);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        assert!(write_atomic(&path, b"new", Durability::Synced).is_err(), "a non-empty directory is not replaced");
        assert_eq!(std::fs::read(path.join("inside")).unwrap(), b"x");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file is left behind");
        assert!(write_atomic(Path::new("/"), b"new", Durability::Synced).is_err());
    }
}
