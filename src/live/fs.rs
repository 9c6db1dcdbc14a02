//! Filesystem operations of a live restore: moving entries, a directory's own
//! attributes, making a staged tree durable, and removing trees without ever crossing
//! into another filesystem mounted inside them.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType};

use super::journal::RootAttrs;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::walk;

/// Renames every entry of `from` (except the paths in `skip`) into `to`, never
/// replacing anything, then makes both directories durable.
pub fn move_entries(from: &Path, to: &Path, skip: &[&PathBuf]) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(Error::io("read directory", from))?;
    for entry in entries {
        let path = entry.map_err(Error::io("read directory", from))?.path();
        if skip.contains(&&path) {
            continue;
        }
        let dest = to.join(path.file_name().expect("directory entries have names"));
        fsutil::rename_new(&path, &dest).map_err(Error::io("move into place", &dest))?;
    }
    fsutil::fsync_dir(from)?;
    fsutil::fsync_dir(to)
}

pub fn open_dir(path: &Path) -> Result<OwnedFd> {
    crate::walk::open_root(path).map_err(|e| Error::io("open", path)(e.into()))
}

/// A directory's own mode, owner, mtime and extended attributes.
pub fn read_root_attrs(path: &Path) -> Result<RootAttrs> {
    let fd = open_dir(path)?;
    let st = crate::walk::stat_fd(fd.as_fd()).map_err(|e| Error::io("stat", path)(e.into()))?;
    let xattrs = crate::walk::xattrs_fd(fd.as_fd())
        .map_err(|e| Error::io("read xattrs of", path)(e.into()))?;
    Ok(RootAttrs {
        mode: st.mode & 0o7777,
        uid: st.uid,
        gid: st.gid,
        mtime_ns: st.mtime_ns,
        xattrs,
    })
}

/// Gives a directory exactly `a`'s attributes (owner only as root).
pub fn apply_root_attrs(path: &Path, a: &RootAttrs) -> Result<()> {
    use rustix::fs::{Gid, Mode, Uid, XattrFlags};
    let fd = open_dir(path)?;
    let fail = |op: &'static str| move |e: rustix::io::Errno| Error::io(op, path)(e.into());
    if rustix::process::geteuid().is_root() {
        rustix::fs::fchown(&fd, Some(Uid::from_raw(a.uid)), Some(Gid::from_raw(a.gid)))
            .map_err(fail("change owner of"))?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(a.mode)).map_err(fail("change mode of"))?;
    for x in crate::walk::xattrs_fd(fd.as_fd()).map_err(fail("read xattrs of"))? {
        if !a.xattrs.iter().any(|y| y.name == x.name) {
            rustix::fs::fremovexattr(&fd, x.name.as_slice()).map_err(fail("remove xattr of"))?;
        }
    }
    for x in &a.xattrs {
        rustix::fs::fsetxattr(&fd, x.name.as_slice(), &x.value, XattrFlags::empty())
            .map_err(fail("set xattr of"))?;
    }
    rustix::fs::futimens(&fd, &crate::restore::timestamps(a.mtime_ns)).map_err(fail("set times of"))
}

/// Makes a staged tree durable: the whole filesystem's dirty data (one `syncfs`), then
/// the staging directory and its parent.
pub fn sync_tree(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(Error::io("open", dir))?;
    rustix::fs::syncfs(&f).map_err(|e| Error::io("syncfs", dir)(e.into()))?;
    fsutil::fsync_dir(dir)?;
    fsutil::fsync_dir(parent(dir))
}

pub fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

/// Removes the tree at `path` (nothing if absent). Refuses, removing nothing more, on
/// reaching a directory of another filesystem: something is mounted inside it, and
/// what is mounted is not this restore's to delete.
pub fn remove_tree(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", path)(e)),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path).map_err(Error::io("remove", path));
    }
    let fd = open_dir(path)?;
    let dev = walk::stat_fd(fd.as_fd())
        .map_err(|e| Error::io("stat", path)(e.into()))?
        .dev;
    remove_children(fd.as_fd(), dev, path)?;
    drop(fd);
    std::fs::remove_dir(path).map_err(Error::io("remove", path))?;
    fsutil::fsync_dir(parent(path))
}

fn remove_children(dir: BorrowedFd<'_>, dev: u64, path: &Path) -> Result<()> {
    let names = walk::list_dir(dir).map_err(|e| Error::io("read directory", path)(e.into()))?;
    for name in names {
        let here = path.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
        let st = walk::stat_at(dir, &name).map_err(|e| Error::io("stat", &here)(e.into()))?;
        if st.file_type == FileType::Directory {
            if st.dev != dev {
                return Err(Error::Refused(format!(
                    "{} is another filesystem mounted inside a tree volsnap is removing; \
                     unmount it and run `volsnap recover`",
                    here.display()
                )));
            }
            let sub =
                walk::open_dir_at(dir, &name).map_err(|e| Error::io("open", &here)(e.into()))?;
            remove_children(sub.as_fd(), dev, &here)?;
            unlink(dir, &name, AtFlags::REMOVEDIR, &here)?;
        } else {
            unlink(dir, &name, AtFlags::empty(), &here)?;
        }
    }
    Ok(())
}

fn unlink(dir: BorrowedFd<'_>, name: &CStr, flags: AtFlags, here: &Path) -> Result<()> {
    rustix::fs::unlinkat(dir, name, flags).map_err(|e| Error::io("remove", here)(e.into()))
}

/// Every mount point strictly below `dir`.
pub fn mounts_below(dir: &Path, mounts: &[PathBuf]) -> Vec<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.starts_with(dir) && m.as_path() != dir)
        .cloned()
        .collect()
}
