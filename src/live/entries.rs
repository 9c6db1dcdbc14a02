//! The entry swap of a live restore: for a target that cannot be renamed (a mount
//! point, a filesystem without `RENAME_EXCHANGE`), its top-level entries move instead.
//! The staging directory and a holding directory for the old entries are inside the
//! target, so every move is a rename within one filesystem. Each phase is journaled
//! before it starts, and recovery moves everything of an unfinished swap back, however
//! much of a phase was done: the target ends wholly old or wholly new.
//!
//! Both directories sit where the target's untrusted writer can reach them: the
//! holding directory is created exclusively (a planted entry of that name fails the
//! swap) and its identity journaled before anything moves into it; every later use of
//! either reopens it without following symlinks and checks it is the recorded inode.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::AtFlags;

use super::fs::{self, apply_root_attrs, move_entries, read_root_attrs};
use super::journal::{self, EntryPhase, EntrySwap, Journal};
use crate::error::{Error, Result};
use crate::repo::Repository;

/// Puts the staged tree of entry-swapped volume `n` in place: old entries into the
/// holding directory, staged entries into the target, the snapshot's attributes onto
/// the target, each phase journaled first.
pub fn swap(repo: &Repository, j: &mut Journal, n: usize) -> Result<()> {
    let v = j.volumes[n].clone();
    let held = entry_swap(&v).held.clone();
    let (stage_name, held_name) = (fs::name_of(&v.stage), fs::name_of(&held));
    // The target must still be the directory pre-flight checked.
    let target = open_target(&v)?;
    let stage = open_stage(target.as_fd(), &v, &stage_name)?;
    let new_root = read_root_attrs(stage.as_fd(), &v.stage)?;
    crate::crash::pause("live entry swap");
    let (held_fd, held_ino) = fs::make_dir(target.as_fd(), &held_name, &held)?;
    let e = entry_swap_mut(&mut j.volumes[n]);
    e.phase = EntryPhase::MovingOut;
    e.new_root = Some(new_root.clone());
    e.held_ino = Some(held_ino);
    j.save(repo)?;
    move_entries(
        target.as_fd(),
        &v.target,
        held_fd.as_fd(),
        &held,
        &[&stage_name, &held_name],
    )?;
    crate::crash::point("live moved old entries out");
    entry_swap_mut(&mut j.volumes[n]).phase = EntryPhase::MovingIn;
    j.save(repo)?;
    move_entries(stage.as_fd(), &v.stage, target.as_fd(), &v.target, &[])?;
    apply_root_attrs(target.as_fd(), &v.target, &new_root)?;
    fs::fsync(target.as_fd(), &v.target)?;
    crate::crash::point("live moved new entries in");
    entry_swap_mut(&mut j.volumes[n]).phase = EntryPhase::Done;
    Ok(())
}

fn entry_swap(v: &journal::Volume) -> &EntrySwap {
    v.entries.as_ref().expect("an entry swap")
}

fn entry_swap_mut(v: &mut journal::Volume) -> &mut EntrySwap {
    v.entries.as_mut().expect("an entry swap")
}

/// Opens the target, which must still be the directory the restore began with.
fn open_target(v: &journal::Volume) -> Result<OwnedFd> {
    let fd = fs::open_dir(&v.target)?;
    if Some(fs::ino_fd(fd.as_fd(), &v.target)?) != v.old {
        return Err(Error::Refused(format!(
            "{} is not the directory the restore began with; left as it is",
            v.target.display()
        )));
    }
    Ok(fd)
}

/// Opens the staging directory inside the target, which must be the staged tree.
fn open_stage(target: BorrowedFd<'_>, v: &journal::Volume, name: &CStr) -> Result<OwnedFd> {
    let missing = || {
        Error::Refused(format!(
            "the staged tree {} is gone; left as it is",
            v.stage.display()
        ))
    };
    let staged = v.new.ok_or_else(missing)?;
    fs::open_child(target, name, staged, &v.stage)?.ok_or_else(missing)
}

/// Puts an entry-swapped target back as it was and removes what the restore made in it.
pub fn roll_back(v: &journal::Volume, e: &EntrySwap) -> Result<()> {
    let target = open_target(v)?;
    let (stage_name, held_name) = (fs::name_of(&v.stage), fs::name_of(&e.held));
    if e.phase >= EntryPhase::MovingIn {
        let stage = open_stage(target.as_fd(), v, &stage_name)?;
        move_entries(
            target.as_fd(),
            &v.target,
            stage.as_fd(),
            &v.stage,
            &[&stage_name, &held_name],
        )?;
    }
    if e.phase >= EntryPhase::MovingOut {
        let Some(held_ino) = e.held_ino else {
            return Err(Error::Refused(format!(
                "the journal does not record which directory {} is; left as it is",
                e.held.display()
            )));
        };
        // Absent: a recovery that was interrupted already put the old entries back.
        if let Some(held) = fs::open_child(target.as_fd(), &held_name, held_ino, &e.held)? {
            move_entries(held.as_fd(), &e.held, target.as_fd(), &v.target, &[])?;
            drop(held);
            rustix::fs::unlinkat(target.as_fd(), &held_name, AtFlags::REMOVEDIR)
                .map_err(|err| Error::io("remove", &e.held)(err.into()))?;
        }
    } else {
        // Made just before the journal said so, then interrupted: only an empty
        // directory is removed (a symlink or anything holding entries is left).
        let _ = rustix::fs::unlinkat(target.as_fd(), &held_name, AtFlags::REMOVEDIR);
    }
    // Before the staged tree is complete the journal has no identity for it; whatever
    // directory is at its name inside the target then is the partial stage.
    if let Some(now) = fs::ino_at(target.as_fd(), &stage_name, &v.stage)? {
        if v.new.is_some_and(|staged| staged != now) {
            return Err(Error::Refused(format!(
                "{} is not the staged tree volsnap made; left as it is",
                v.stage.display()
            )));
        }
        fs::remove_tree(target.as_fd(), &stage_name, now, &v.stage)?;
    }
    apply_root_attrs(target.as_fd(), &v.target, &e.old_root)?;
    fs::fsync(target.as_fd(), &v.target)
}

/// Removes the old entries of a finished entry swap and the empty staging directory.
pub fn clean(v: &journal::Volume, e: &EntrySwap) -> Result<()> {
    let target = open_target(v)?;
    let Some(held_ino) = e.held_ino else {
        return Err(Error::Refused(format!(
            "the journal does not record which directory {} is; left as it is",
            e.held.display()
        )));
    };
    fs::remove_tree(target.as_fd(), &fs::name_of(&e.held), held_ino, &e.held)?;
    let stage_name = fs::name_of(&v.stage);
    if let Some(staged) = v.new {
        // Empty by now: everything in it moved into the target.
        fs::remove_tree(target.as_fd(), &stage_name, staged, &v.stage)?;
    }
    if let Some(attrs) = &e.new_root {
        apply_root_attrs(target.as_fd(), &v.target, attrs)?;
    }
    fs::fsync(target.as_fd(), &v.target)
}
