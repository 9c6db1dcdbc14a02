//! The entry swap of a live restore: for a target that cannot be renamed (a mount
//! point, a filesystem without `RENAME_EXCHANGE`), its top-level entries move instead.
//! The staging directory and a holding directory for the old entries are inside the
//! target, so every move is a rename within one filesystem. Each phase is journaled
//! before it starts, and recovery moves everything of an unfinished swap back, however
//! much of a phase was done: the target ends wholly old or wholly new.

use super::fs::{self, apply_root_attrs, move_entries, read_root_attrs};
use super::journal::{self, EntryPhase, EntrySwap, Journal};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::repo::Repository;

/// Puts the staged tree of entry-swapped volume `n` in place: old entries into the
/// holding directory, staged entries into the target, the snapshot's attributes onto
/// the target, each phase journaled first.
pub fn swap(repo: &Repository, j: &mut Journal, n: usize) -> Result<()> {
    let (target, stage) = (j.volumes[n].target.clone(), j.volumes[n].stage.clone());
    let held = entry_swap(&j.volumes[n]).held.clone();
    let new_root = read_root_attrs(&stage)?;
    let e = j.volumes[n].entries.as_mut().expect("an entry swap");
    e.phase = EntryPhase::MovingOut;
    e.new_root = Some(new_root.clone());
    j.save(repo)?;
    // The target must still be the directory pre-flight checked.
    if journal::ino(&target)? != j.volumes[n].old {
        return Err(Error::Refused(format!(
            "{} was replaced while the restore was staging",
            target.display()
        )));
    }
    match std::fs::create_dir(&held) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("create", &held)(e)),
    }
    move_entries(&target, &held, &[&stage, &held])?;
    crate::crash::point("live moved old entries out");
    entry_swap_mut(&mut j.volumes[n]).phase = EntryPhase::MovingIn;
    j.save(repo)?;
    move_entries(&stage, &target, &[])?;
    apply_root_attrs(&target, &new_root)?;
    fsutil::fsync_dir(&target)?;
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

/// Puts an entry-swapped target back as it was and removes what the restore made in it.
pub fn roll_back(v: &journal::Volume, e: &EntrySwap) -> Result<()> {
    if e.phase >= EntryPhase::MovingIn {
        move_entries(&v.target, &v.stage, &[&v.stage, &e.held])?;
    }
    if e.phase >= EntryPhase::MovingOut && e.held.exists() {
        move_entries(&e.held, &v.target, &[])?;
        std::fs::remove_dir(&e.held).map_err(Error::io("remove", &e.held))?;
    }
    fs::remove_tree(&v.stage)?;
    apply_root_attrs(&v.target, &e.old_root)?;
    fsutil::fsync_dir(&v.target)
}

/// Removes the old entries of a finished entry swap and the empty staging directory.
pub fn clean(v: &journal::Volume, e: &EntrySwap) -> Result<()> {
    fs::remove_tree(&e.held)?;
    if v.stage.exists() {
        std::fs::remove_dir(&v.stage).map_err(Error::io("remove", &v.stage))?;
    }
    if let Some(attrs) = &e.new_root {
        apply_root_attrs(&v.target, attrs)?;
    }
    fsutil::fsync_dir(&v.target)
}
