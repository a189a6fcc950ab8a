//! Replacing a file so that a crash at any instant leaves the old contents
//! or the new: the one way every daemon and command of Meridian does it.
//!
//! The new contents go to a temporary file beside the old
//! ([`temporary`]), which is fsynced, renamed over the old name, and then
//! the directory is fsynced so that the rename itself survives a power
//! loss. Without the last step a file system may forget the rename and
//! bring back the old file after a crash that the writer thought it had
//! outlived.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A replacement that did not happen: the file that failed, and why. The
/// old contents are still in place.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct ReplaceError {
    /// The file (the temporary, the target or its directory) that failed.
    pub path: PathBuf,
    /// Why.
    pub source: io::Error,
}

/// How a file is replaced.
#[derive(Clone, Copy, Debug, Default)]
pub struct Replace<'a> {
    /// Readable by its owner only (mode 0600 on Unix): keys.
    pub private: bool,
    /// A [`meridian_sys::failpoint`] passed between the fsync and the rename.
    pub failpoint: Option<&'a str>,
}

/// The temporary name `path`'s new contents are written to: the same name
/// with `.tmp` appended, in the same directory (a rename is atomic only
/// within a file system).
pub fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `contents` (see the module docs).
pub fn replace(path: &Path, contents: &[u8], how: Replace<'_>) -> Result<(), ReplaceError> {
    let tmp = temporary(path);
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplaceError { path, source }
    };
    write_synced(&tmp, contents, how.private).map_err(at(&tmp))?;
    if let Some(failpoint) = how.failpoint {
        meridian_sys::failpoint::hit(failpoint);
    }
    commit(&tmp, path)
}

/// Renames `tmp`, written and fsynced, over `path` and fsyncs the directory.
pub fn commit(tmp: &Path, path: &Path) -> Result<(), ReplaceError> {
    std::fs::rename(tmp, path).map_err(|source| ReplaceError { path: path.to_path_buf(), source })?;
    sync_dir(path)
}

/// Fsyncs the directory holding `path`, so that a rename or a new file in it
/// survives a crash.
pub fn sync_dir(path: &Path) -> Result<(), ReplaceError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| ReplaceError { path: dir.to_path_buf(), source })
}

fn write_synced(tmp: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    // A temporary left by a crash may carry another mode, which opening
    // it again would keep.
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = options.open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_holds_the_new_contents_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head");
        replace(&path, b"old", Replace::default()).unwrap();
        replace(&path, b"new", Replace::default()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!temporary(&path).exists());
        assert_eq!(temporary(&path), dir.path().join("head.tmp"));
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        replace(&path, b"secret", Replace { private: true, ..Replace::default() }).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_failed_replacement_names_the_file_and_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("file");
        let err = replace(&path, b"x", Replace::default()).unwrap_err();
        assert!(err.to_string().contains("file.tmp"), "{err}");
    }
}
