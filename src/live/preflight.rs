//! Pre-flight checks of a live restore: everything that can be known before anything
//! is touched. Each refusal says what is wrong and what to do; none changes anything
//! (the exchange probe removes its own two empty directories).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::human_bytes;

use super::{Target, journal};
use crate::repo::Repository;
use crate::snapshot::Listed;

/// Refuses when running (or paused) containers mount a target, a directory inside
/// one, or one holding it (`docker::restore::users_of`): they would go on writing into
/// the tree the swap replaces and then deletes. No engine socket: nothing can run.
/// An engine that does not answer: refused too, since its containers may still run.
pub fn no_running_containers(targets: &[Target], snap: &Listed) -> Result<()> {
    const OVERRIDE: &str = "pass --ignore-running-containers to restore anyway";
    let paths: Vec<PathBuf> = targets.iter().map(|t| t.path.clone()).collect();
    let users = match crate::docker::restore::users_of(&paths) {
        Ok(None) => return Ok(()),
        Ok(Some(users)) if users.is_empty() => return Ok(()),
        Ok(Some(users)) => users,
        Err(e) => {
            return Err(Error::Refused(format!(
                "cannot tell whether running containers use the targets ({e}); nothing was \
                 changed ({OVERRIDE})"
            )));
        }
    };
    let listed: Vec<String> = users
        .iter()
        .map(|u| format!("{} ({})", u.name, u.target.display()))
        .collect();
    // The --container/--project form maps volumes through the containers a snapshot
    // recorded; a snapshot of plain directories has none.
    let how = if snap.snapshot.containers.is_empty() {
        "stop them first (--pre-cmd and --post-cmd can stop and start them)".to_string()
    } else {
        let projects: std::collections::BTreeSet<Option<&str>> =
            users.iter().map(|u| u.project.as_deref()).collect();
        let form = match projects.into_iter().collect::<Vec<_>>()[..] {
            [Some(p)] => format!("--project {p}"),
            _ => users
                .iter()
                .map(|u| format!("--container {}", u.name))
                .collect::<Vec<_>>()
                .join(" "),
        };
        format!("add {form}, which stops and starts them around the swap")
    };
    Err(Error::Refused(format!(
        "running containers mount the targets: {}; nothing was changed: {how}, or {OVERRIDE}",
        listed.join(", ")
    )))
}

/// Space kept free beyond the staged copy: 2% of it plus this.
const HEADROOM_BYTES: u64 = 8 << 20;

/// Refuses, naming the target, when a staged copy would not fit where it is staged:
/// beside the target, or inside it for an entry swap (`inside[i]`).
pub fn space(targets: &[Target], inside: &[bool]) -> Result<()> {
    // Targets sharing a filesystem share its free space.
    let mut by_fs: HashMap<u64, (Vec<&Target>, &Path, u64, u64)> = HashMap::new();
    for (t, &inside) in targets.iter().zip(inside) {
        let at = if inside { &t.path } else { &t.parent };
        let dev = std::fs::metadata(at).map_err(Error::io("stat", at))?.dev();
        let e = by_fs.entry(dev).or_insert((Vec::new(), at, 0, 0));
        e.0.push(t);
        e.2 += t.bytes;
        e.3 += t.inodes;
    }
    for (ts, at, bytes, inodes) in by_fs.values() {
        let vfs = rustix::fs::statvfs(*at).map_err(|e| Error::io("statvfs", at)(e.into()))?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let headroom = bytes / 50 + HEADROOM_BYTES;
        let labels: Vec<&str> = ts.iter().map(|t| t.label.as_str()).collect();
        if free < bytes + headroom {
            return Err(Error::Refused(format!(
                "not enough space to stage {} beside {}: the staged copy needs {} plus {} \
                 headroom and the filesystem has {} free; nothing was changed (free space, or \
                 restore elsewhere with --to)",
                labels.join(", "),
                ts[0].path.display(),
                human_bytes(*bytes),
                human_bytes(headroom),
                human_bytes(free),
            )));
        }
        if vfs.f_files > 0 && vfs.f_favail < inodes + 64 {
            return Err(Error::Refused(format!(
                "not enough free inodes to stage {} beside {}: {} needed, {} free; nothing was \
                 changed",
                labels.join(", "),
                ts[0].path.display(),
                inodes,
                vfs.f_favail
            )));
        }
    }
    Ok(())
}

/// Whether target `t` needs an entry swap: it is a mount point, or its filesystem
/// cannot exchange directories. Refuses (changing nothing) unless `allow_copy`.
pub fn needs_entry_swap(t: &Target, restore_id: &str, allow_copy: bool) -> Result<bool> {
    match not_a_mount_point(t).and_then(|()| exchange_works(t, restore_id)) {
        Ok(()) => Ok(false),
        Err(Error::Refused(_)) if allow_copy && t.old.is_some() => Ok(true),
        Err(Error::Refused(why)) if t.old.is_some() => Err(Error::Refused(format!(
            "{why}; or pass --allow-in-place-copy to move the target's entries instead \
             (journaled, all or nothing)"
        ))),
        Err(e) => Err(e),
    }
}

/// Refuses a target that is a mount point: renaming it fails (EBUSY), and swapping
/// what is mounted there is not something a rename can do.
fn not_a_mount_point(t: &Target) -> Result<()> {
    if t.old.is_none() {
        return Ok(());
    }
    let dev = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.dev());
    let on_other_fs = dev(&t.path).map_err(Error::io("stat", &t.path))?
        != dev(&t.parent).map_err(Error::io("stat", &t.parent))?;
    if on_other_fs || mount_points()?.iter().any(|m| m == &t.path) {
        return Err(Error::Refused(format!(
            "target {} of volume {} is a mount point: it cannot be swapped atomically; nothing \
             was changed (restore onto a directory inside it with --map {}=DIR, or with --to)",
            t.path.display(),
            t.label,
            t.label
        )));
    }
    Ok(())
}

/// Every mount point of this process's mount namespace.
fn mount_points() -> Result<Vec<PathBuf>> {
    let p = Path::new("/proc/self/mountinfo");
    let text = std::fs::read(p).map_err(Error::io("read", p))?;
    Ok(text
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|m| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(m))))
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Checks that the target's parent can exchange two directories atomically, on two
/// empty sibling directories made for the purpose.
fn exchange_works(t: &Target, restore_id: &str) -> Result<()> {
    let a = t.parent.join(format!(".volsnap-probe-{restore_id}-a"));
    let b = t.parent.join(format!(".volsnap-probe-{restore_id}-b"));
    let made = std::fs::create_dir(&a).and_then(|()| std::fs::create_dir(&b));
    let outcome = made
        .map_err(Error::io("create a probe directory in", &t.parent))
        .and_then(|()| match fsutil::exchange(&a, &b) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => Err(Error::Refused(format!(
                "the filesystem of {} cannot exchange directories atomically \
                 (renameat2 RENAME_EXCHANGE: {e}); nothing was changed (restore with --to \
                 instead)",
                t.parent.display()
            ))),
            Err(e) => Err(Error::io("exchange probe directories in", &t.parent)(e)),
        });
    let _ = std::fs::remove_dir(&a);
    let _ = std::fs::remove_dir(&b);
    outcome
}

fn is_unsupported(e: &std::io::Error) -> bool {
    [Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP, Errno::XDEV]
        .iter()
        .any(|n| e.raw_os_error() == Some(n.raw_os_error()))
}

/// Refuses while a journal of an interrupted restore names a target overlapping one
/// of `targets`: that restore must be settled (`volsnap recover`) first.
pub fn no_pending_journal(repo: &Repository, targets: &[Target]) -> Result<()> {
    for id in journal::list(repo)? {
        let Some(j) = journal::Journal::load(repo, &id)? else {
            continue;
        };
        for v in &j.volumes {
            if let Some(t) = targets
                .iter()
                .find(|t| t.path.starts_with(&v.target) || v.target.starts_with(&t.path))
            {
                return Err(Error::Busy(format!(
                    "restore {id} of {} has not been settled; nothing was changed (run \
                     `volsnap recover`, or wait for it if it is still running)",
                    t.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuses a target with another filesystem mounted somewhere inside it: the swap
/// would carry the mount along, and removing the old tree would reach into it.
pub fn nothing_mounted_inside(t: &Target) -> Result<()> {
    if t.old.is_none() {
        return Ok(());
    }
    if let Some(m) = super::fs::mounts_below(&t.path, &mount_points()?).first() {
        return Err(Error::Refused(format!(
            "{} is mounted inside target {} of volume {}; nothing was changed (unmount it, \
             or map the volume to a directory without mounts inside)",
            m.display(),
            t.path.display(),
            t.label
        )));
    }
    Ok(())
}

/// Locks the parent directory of every target (flock on the directory itself), so
/// two restores of the same target never run at once. Dropped with the returned
/// files, or by the kernel when the process dies.
pub fn lock_parents(targets: &[Target]) -> Result<Vec<File>> {
    let paths: Vec<PathBuf> = targets.iter().map(|t| t.path.clone()).collect();
    lock_paths(&paths)
}

/// `lock_parents` for target paths.
pub fn lock_paths(targets: &[PathBuf]) -> Result<Vec<File>> {
    let mut parents: Vec<&Path> = targets
        .iter()
        .map(|t| t.parent().unwrap_or(Path::new("/")))
        .collect();
    parents.sort();
    parents.dedup();
    let mut held = Vec::new();
    for p in parents {
        let f = File::open(p).map_err(Error::io("open", p))?;
        match f.try_lock() {
            Ok(()) => held.push(f),
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Busy(format!(
                    "another restore is in flight in {} (it holds the directory's lock); \
                     nothing was changed: wait for it to finish",
                    p.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", p)(e)),
        }
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_decode() {
        assert_eq!(unescape(br"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape(br"/x\\y"), br"/x\\y");
        assert_eq!(unescape(br"/end\04"), br"/end\04");
    }
}
