//! The only module that renames (including the live restore's atomic exchange), fsyncs
//! directories or replaces files atomically.
//!
//! Assumptions about the media (see ARCHITECTURE.md): a rename within one filesystem is
//! atomic; an fsync of the directory makes a rename in it durable; an fsync error is
//! fatal for that write and never retried (after a failed fsync the page cache may
//! already have dropped the dirty pages).

use std::ffi::CStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Mode of every directory volsnap creates in a repository.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file volsnap creates in a repository.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` (and missing parents) with mode 0700.
pub fn create_dir_private(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(Error::io("create directory", path))
}

/// Creates one directory (mode 0700) whose parent must exist; one that exists already
/// is fine.
pub fn create_dir_private_here(path: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        r => r.map_err(Error::io("create directory", path)),
    }
}

/// Fsyncs a directory so that renames and creations in it are durable.
pub fn fsync_dir(path: &Path) -> Result<()> {
    let dir = File::open(path).map_err(Error::io("open directory", path))?;
    crate::crash::before_fsync(dir.as_fd())
        .and_then(|()| dir.sync_all())
        .map_err(Error::io("fsync directory", path))
}

/// Writes `bytes` to a new private temporary file in `tmp_dir` and fsyncs it.
pub fn write_temp_durable(tmp_dir: &Path, bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(FILE_MODE))
        .tempfile_in(tmp_dir)
        .map_err(Error::io("create temporary file in", tmp_dir))?;
    crate::crash::before_write(tmp.as_file().as_fd())
        .and_then(|()| tmp.write_all(bytes))
        .map_err(Error::io("write", tmp.path()))?;
    crate::crash::before_fsync(tmp.as_file().as_fd())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(Error::io("fsync", tmp.path()))?;
    Ok(tmp)
}

/// Renames a file from `write_temp_durable` to `path`, replacing any file there, and
/// fsyncs the directory. Readers see either the old file or the whole new one.
pub fn persist_durable(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    tmp.persist(path)
        .map_err(|e| Error::io("rename into place", path)(e.error))?;
    fsync_dir(path.parent().expect("repository files have a parent"))
}

/// Writes `bytes` durably to `path`, replacing it atomically.
pub fn atomic_write(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    persist_durable(write_temp_durable(tmp_dir, bytes)?, path)
}

/// Like `atomic_write`, but never replaces an existing `path`.
/// Returns false (writing nothing) when `path` already exists.
pub fn write_new_durable(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<bool> {
    match write_temp_durable(tmp_dir, bytes)?.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(Error::io("create", path)(e.error)),
    }
    fsync_dir(path.parent().expect("repository files have a parent"))?;
    Ok(true)
}

/// Creates `path` empty with mode 0600 if it does not exist (so that a file another
/// library then opens and fills, like the index, is private from the start).
pub fn ensure_private_file(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
        .map(drop)
        .map_err(Error::io("create", path))
}

/// Moves a fully written and fsynced file into place and fsyncs the target directory.
pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    #[allow(clippy::disallowed_methods)] // the one place a raw rename is allowed
    fs::rename(from, to).map_err(Error::io("rename into place", to))?;
    fsync_dir(to.parent().expect("repository files have a parent"))
}

/// Swaps two directory entries atomically (`renameat2(RENAME_EXCHANGE)`): at no
/// instant is either path missing. The caller fsyncs the parent(s).
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(std::io::Error::from)
}

/// Renames `from` to `to` unless `to` exists (`RENAME_NOREPLACE`). The caller fsyncs
/// the parent(s).
pub fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(std::io::Error::from)
}

/// `rename_new` between two open directories: `from_name` in `from` to `to_name` in
/// `to`, unless that exists. Neither directory is looked up by path, so one renamed or
/// replaced meanwhile cannot redirect the move. The caller fsyncs both.
pub fn rename_new_at(
    from: BorrowedFd<'_>,
    from_name: &CStr,
    to: BorrowedFd<'_>,
    to_name: &CStr,
) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        from,
        from_name,
        to,
        to_name,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(std::io::Error::from)
}

/// Opens (creating it if needed) a lock file in a repository with mode 0600; a lock
/// file an older volsnap left readable by others is made private on the way.
pub fn open_lock_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::PermissionsExt;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
        .map_err(Error::io("open lock file", path))?;
    let meta = file.metadata().map_err(Error::io("stat", path))?;
    if meta.permissions().mode() & 0o7777 != FILE_MODE {
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .map_err(Error::io("change mode of", path))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_whole_file_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        atomic_write(dir.path(), &path, b"one").unwrap();
        atomic_write(dir.path(), &path, b"two!").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two!");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
