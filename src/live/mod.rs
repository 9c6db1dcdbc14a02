//! Live restore: replace the live directories of a snapshot's volumes with the
//! snapshot's contents, all or nothing, journaled, crash-safe, with undo.
//!
//! The protocol (see ARCHITECTURE.md "Live restore"):
//! 1. resolve every target now and run the pre-flight checks (target locks, pending
//!    journals, mounts, the exchange probe, space); nothing is touched if one fails;
//! 2. write the journal (`Prepared`), then (`Quiesced`) run the pre-cmd hook;
//! 3. stage every volume into a sibling `.volsnap-stage-<id>-<n>` directory, fsynced;
//! 4. take the undo snapshot of the live targets (incremental, same series, tagged
//!    `pre-restore`); journal `Staged`;
//! 5. journal `Swapping`, then exchange each target with its staging directory
//!    (`renameat2(RENAME_EXCHANGE)`), fsync the parent, record progress;
//! 6. journal `Committed`; record the restore (for `--undo`); run the post-cmd hook;
//!    journal `Redeployed`;
//! 7. delete the old trees (now at the staging names) and the journal.
//!
//! Recovery (`recover`, run at the start of every command that opens the repository)
//! rolls back a journal not yet committed: every swapped volume is swapped back (which
//! side a target is on is read from inode numbers, not from the progress record),
//! staging is removed, and the post-cmd hook runs if the pre-cmd hook may have. A
//! committed journal is finished. Either way the targets end all old or all new.
//! Hooks run at least once when due, so they must be idempotent (start an app that
//! runs: nothing happens); a hook dies with the volsnap process that runs it.

mod entries;
mod fs;
pub mod journal;
mod preflight;

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use fs::{parent, read_root_attrs, sync_tree};
use journal::{EntryPhase, EntrySwap, Hook, Ino, Journal, State};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::id::Id;
use crate::inspect::{self, Diff};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::{self, Listed};
use crate::tree::{self, Kind, Tree};

pub use crate::snapshot::UNDO_TAG;

/// What the user asked for.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Volume label → live directory, instead of the path the snapshot recorded.
    pub maps: Vec<(String, PathBuf)>,
    /// Run before anything changes (e.g. stop the application).
    pub quiesce: Option<Hook>,
    /// Run once the targets are settled, new or old (e.g. start the application).
    pub redeploy: Option<Hook>,
    /// Run the pre-flight checks, report what would change, and stop.
    pub dry_run: bool,
    /// Where a target cannot be swapped by rename (a mount point, a filesystem without
    /// `RENAME_EXCHANGE`), move its top-level entries instead, still journaled and all
    /// or nothing.
    pub allow_copy: bool,
    /// Swap even though running containers mount a target (checked after the pre-cmd
    /// hook, which may stop them): they would go on using the replaced tree.
    pub ignore_running_containers: bool,
}

/// A volume of a live restore and what the restore changes in it.
#[derive(Clone, Debug)]
pub struct VolumeReport {
    pub label: String,
    pub target: PathBuf,
    /// Paths relative to the volume root; "." is the root itself.
    pub changes: Diff,
}

/// What a live restore did (or, dry, would do).
#[derive(Clone, Debug)]
pub struct Report {
    pub restore_id: String,
    pub snapshot: Id,
    pub dry_run: bool,
    /// The pre-restore snapshot: `restore --undo` restores it.
    pub undo: Option<Id>,
    pub volumes: Vec<VolumeReport>,
    /// The post-cmd hook ran (and succeeded).
    pub redeployed: bool,
    /// Metadata that could not be applied, parts of a live target that could not be
    /// read for a dry run, changes that could not be listed.
    pub warnings: Vec<String>,
    pub duration_ms: u64,
}

/// A target as resolved now.
#[derive(Clone, Debug)]
pub struct Target {
    pub label: String,
    /// Absolute; its parent resolved through symlinks.
    pub path: PathBuf,
    pub parent: PathBuf,
    /// What is there now; `None`: nothing (the restore creates it).
    pub old: Option<Ino>,
    /// Disk space and inodes the staged copy needs (estimates from the snapshot).
    pub bytes: u64,
    pub inodes: u64,
}

/// Restores `snap` over the live directories of its volumes.
pub fn restore_in_place(
    repo: &Repository,
    snap: &Listed,
    opts: &Options,
    progress: &Progress,
) -> Result<Report> {
    let started = Instant::now();
    // Held throughout: gc keeps every blob this restore reads.
    let _lease = repo.lease_for("restore", snap)?;
    let targets = resolve_targets(repo, snap, &opts.maps)?;
    let id = new_restore_id();
    // Pre-flight, for a dry run too: it refuses exactly what the real run would.
    let _target_locks = preflight::lock_parents(&targets)?;
    preflight::no_pending_journal(repo, &targets)?;
    let mut by_entries = Vec::new();
    for t in &targets {
        preflight::nothing_mounted_inside(t)?;
        by_entries.push(preflight::needs_entry_swap(t, &id, opts.allow_copy)?);
    }
    preflight::space(&targets, &by_entries)?;
    let mut warnings = Vec::new();
    if opts.dry_run {
        if !opts.ignore_running_containers {
            // The real run checks after its pre-cmd, which may stop them.
            match (
                preflight::no_running_containers(&targets, snap),
                &opts.quiesce,
            ) {
                (Err(e), None) => return Err(e),
                (Err(e), Some(_)) => warnings.push(format!("{e} (unless the pre-cmd stops them)")),
                (Ok(()), _) => {}
            }
        }
        let mut volumes = Vec::new();
        for t in &targets {
            let live = live_view(repo, snap, t, &mut warnings)?;
            volumes.push(VolumeReport {
                label: t.label.clone(),
                target: t.path.clone(),
                changes: volume_diff(repo, live.as_ref(), snap, &t.label)?,
            });
        }
        return Ok(Report {
            restore_id: id,
            snapshot: snap.id,
            dry_run: true,
            undo: None,
            volumes,
            redeployed: false,
            warnings,
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    let mut volumes = Vec::new();
    for (n, (t, &entries)) in targets.iter().zip(&by_entries).enumerate() {
        let at = if entries { &t.path } else { &t.parent };
        volumes.push(journal::Volume {
            label: t.label.clone(),
            target: t.path.clone(),
            stage: at.join(format!(".volsnap-stage-{id}-{n}")),
            old: t.old,
            new: None,
            swapped: false,
            entries: if entries {
                Some(EntrySwap {
                    phase: EntryPhase::Staged,
                    held: t.path.join(format!(".volsnap-old-{id}-{n}")),
                    held_ino: None,
                    old_root: read_root_attrs(fs::open_dir(&t.path)?.as_fd(), &t.path)?,
                    new_root: None,
                })
            } else {
                None
            },
        });
    }
    let mut j = Journal {
        id: id.clone(),
        snapshot: snap.id,
        pid: std::process::id(),
        started_ns: now_ns(),
        state: State::Prepared,
        quiesce: opts.quiesce.clone(),
        redeploy: opts.redeploy.clone(),
        undo: None,
        volumes,
    };
    let _journal_lock = journal::lock(repo, &id)?
        .ok_or_else(|| Error::Busy(format!("restore id {id} is taken; try again")))?;
    j.save(repo)?;
    crate::crash::point("live journal written");
    let check_containers = (!opts.ignore_running_containers).then_some(targets.as_slice());
    if let Err(e) = swap_in(
        repo,
        snap,
        &mut j,
        check_containers,
        progress,
        &mut warnings,
    ) {
        // Not committed: put everything back as it was.
        return Err(match roll_back(&j) {
            Ok((_, None)) => {
                j.remove(repo)?;
                e
            }
            Ok((_, Some(hook))) => {
                j.remove(repo)?;
                Error::Refused(format!("{e}; the targets are unchanged, but the {hook}"))
            }
            Err(again) => Error::Refused(format!(
                "{e}; rolling back failed too ({again}): fix that and run `volsnap recover`"
            )),
        });
    }
    let (redeployed, hook_failed) = finish(&mut j, repo)?;
    let volumes = changes(repo, snap, &j).unwrap_or_else(|e| {
        warnings.push(format!("the changes could not be listed: {e}"));
        Vec::new()
    });
    cleanup(&j)?;
    j.remove(repo)?;
    if let Some(h) = hook_failed {
        return Err(Error::Redeploy(format!(
            "snapshot {} is restored onto the targets, but {h}",
            snap.id.short()
        )));
    }
    Ok(Report {
        restore_id: id,
        snapshot: snap.id,
        dry_run: false,
        undo: j.undo,
        volumes,
        redeployed,
        warnings,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// What `restore --undo` restores: the pre-restore snapshot of the last in-place
/// restore (of `target`, if given), and notes on targets that restore created (they
/// did not exist before, are not in the undo snapshot, and stay).
pub fn undo_snapshot(repo: &Repository, target: Option<&Path>) -> Result<(Listed, Vec<String>)> {
    let wanted = target.map(resolve_path).transpose()?.map(|(_, p)| p);
    let done = journal::restores(repo)?
        .into_iter()
        .filter(|r| {
            wanted
                .as_ref()
                .is_none_or(|w| r.targets.iter().any(|t| &t.path == w))
        })
        .max_by_key(|r| r.committed_ns)
        .ok_or_else(|| {
            Error::Usage(match &wanted {
                Some(p) => format!("no in-place restore of {} to undo", p.display()),
                None => "no in-place restore to undo".into(),
            })
        })?;
    let notes = done
        .targets
        .iter()
        .filter(|t| !t.existed)
        .map(|t| {
            format!(
                "{} did not exist before restore {}; it is left as it is",
                t.path.display(),
                done.id
            )
        })
        .collect();
    let Some(undo) = done.undo else {
        return Err(Error::Usage(format!(
            "restore {} only created directories that did not exist before; there is \
             nothing to put back",
            done.id
        )));
    };
    Ok((snapshot::resolve(repo, &undo.hex())?, notes))
}

/// What keeps undo snapshots alive under retention policies (`gc::forget::Undos`): the
/// undo snapshots of the `UNDO_RESTORES_KEPT` latest committed restores of each target,
/// and every one while a restore journal exists.
///
/// Call it after listing the snapshots to plan over: a restore writes its journal
/// before it takes its undo snapshot and removes it only after the restore record is
/// written, so an undo snapshot in that list is either in a record read here or
/// belongs to a journal seen here.
pub fn undo_lifetime(repo: &Repository) -> Result<crate::gc::forget::Undos> {
    let restore_in_flight = !journal::list(repo)?.is_empty();
    let mut by_target: std::collections::BTreeMap<PathBuf, Vec<&journal::Restore>> =
        Default::default();
    let restores = journal::restores(repo)?;
    for r in &restores {
        for t in r.targets.iter().filter(|t| t.existed) {
            by_target.entry(t.path.clone()).or_default().push(r);
        }
    }
    let mut kept = std::collections::HashMap::new();
    for (path, mut rs) in by_target {
        rs.sort_by_key(|r| std::cmp::Reverse(r.committed_ns));
        for (i, r) in rs
            .iter()
            .take(crate::limits::UNDO_RESTORES_KEPT)
            .enumerate()
        {
            let Some(undo) = r.undo else { continue };
            let why = if i == 0 {
                format!("undo of the latest in-place restore of {}", path.display())
            } else {
                format!(
                    "undo of one of the {} latest in-place restores of {}",
                    crate::limits::UNDO_RESTORES_KEPT,
                    path.display()
                )
            };
            // The first reason found is kept: "latest" sorts before "one of".
            kept.entry(undo)
                .and_modify(|w: &mut String| {
                    if i == 0 && !w.contains("the latest") {
                        *w = why.clone();
                    }
                })
                .or_insert(why);
        }
    }
    Ok(crate::gc::forget::Undos {
        kept,
        restore_in_flight,
    })
}

/// What `recover` did with one interrupted restore.
#[derive(Clone, Debug)]
pub struct Recovered {
    pub restore_id: String,
    /// "rolled back" or "finished".
    pub outcome: &'static str,
    /// The post-cmd hook ran (successfully) during recovery.
    pub redeployed: bool,
    /// Why the post-cmd hook failed, if it did.
    pub hook_error: Option<String>,
    pub targets: Vec<PathBuf>,
}

/// Rolls back or finishes every interrupted live restore whose process is gone. A
/// journal that cannot be settled is left for the next attempt and reported after the
/// others are done.
pub fn recover(repo: &Repository) -> Result<Vec<Recovered>> {
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for id in journal::list(repo)? {
        match recover_one(repo, &id) {
            Ok(Some(r)) => out.push(r),
            Ok(None) => {}
            Err(e) => failed.push(format!("restore {id}: {e}")),
        }
    }
    if !failed.is_empty() {
        return Err(Error::Refused(format!(
            "interrupted restores could not be settled: {}",
            failed.join("; ")
        )));
    }
    Ok(out)
}

fn recover_one(repo: &Repository, id: &str) -> Result<Option<Recovered>> {
    let Some(_lock) = journal::lock(repo, id)? else {
        return Ok(None); // in flight
    };
    let Some(mut j) = Journal::load(repo, id)? else {
        journal::remove_lock(repo, id);
        return Ok(None);
    };
    let targets: Vec<PathBuf> = j.volumes.iter().map(|v| v.target.clone()).collect();
    // Nobody else may start on these targets while they are being settled.
    let _target_locks = preflight::lock_paths(&targets)?;
    let (outcome, (redeployed, hook_error)) = if j.state < State::Committed {
        ("rolled back", roll_back(&j)?)
    } else {
        let done = finish(&mut j, repo)?;
        cleanup(&j)?;
        ("finished", done)
    };
    j.remove(repo)?;
    Ok(Some(Recovered {
        restore_id: id.to_string(),
        outcome,
        redeployed,
        hook_error: hook_error.map(|e| e.to_string()),
        targets,
    }))
}

/// Records `state` in the journal; only once it is durable does `j` say so.
fn advance(repo: &Repository, j: &mut Journal, state: State) -> Result<()> {
    let mut next = j.clone();
    next.state = state;
    next.save(repo)?;
    *j = next;
    Ok(())
}

/// Steps 2 to 5 of the protocol: quiesce, stage, undo snapshot, swap, commit.
fn swap_in(
    repo: &Repository,
    snap: &Listed,
    j: &mut Journal,
    check_containers: Option<&[Target]>,
    progress: &Progress,
    warnings: &mut Vec<String>,
) -> Result<()> {
    if let Some(hook) = j.quiesce.clone() {
        advance(repo, j, State::Quiesced)?;
        run_hook(&hook, Phase::Quiesce, &j.id, None)?;
        crate::crash::point("live quiesced");
    }
    // After the pre-cmd (or the containers hook) had its chance to stop them.
    if let Some(targets) = check_containers {
        preflight::no_running_containers(targets, snap)?;
    }
    for n in 0..j.volumes.len() {
        let v = &j.volumes[n];
        let opts = crate::restore::Options {
            force: false,
            volume: Some(v.label.clone()),
        };
        // Beside the target, or inside it for an entry swap: made exclusively and
        // restored into through its descriptor, so nothing planted at its name is used.
        let at = fs::open_dir(parent(&v.stage))?;
        let (stage, staged) = fs::make_dir(at.as_fd(), &fs::name_of(&v.stage), &v.stage)?;
        let report = crate::restore::restore_into(
            repo,
            snap,
            b"/",
            stage.as_fd(),
            &v.stage,
            &opts,
            progress,
        )?;
        warnings.extend(report.warnings);
        sync_tree(stage.as_fd(), at.as_fd(), &v.stage)?;
        if let Some(e) = &v.entries {
            // Staging inside the target changed its mtime: the undo snapshot must see
            // the target as it was (`at` is the target).
            fs::apply_root_attrs(at.as_fd(), &v.target, &e.old_root)?;
        }
        j.volumes[n].new = Some(staged);
        crate::crash::point("live staged a volume");
    }
    let live: Vec<&journal::Volume> = j.volumes.iter().filter(|v| v.old.is_some()).collect();
    if !live.is_empty() {
        let dirs: Vec<PathBuf> = live.iter().map(|v| v.target.clone()).collect();
        let opts = snapshot::Options {
            series: Some(snap.snapshot.series.clone()),
            tags: vec![UNDO_TAG.to_string()],
            labels: Some(live.iter().map(|v| v.label.clone()).collect()),
            // Staging inside a target (entry swaps) is not part of it.
            excludes: vec![format!(".volsnap-stage-{}-*", j.id)],
            // Same labels, same containers: a container restore can be undone as one.
            containers: snap.snapshot.containers.clone(),
            ..Default::default()
        };
        let outcome = snapshot::create(repo, &dirs, &opts, &Progress::default())?;
        warnings.extend(outcome.warnings.iter().cloned());
        let undo = &outcome.listed;
        if undo.snapshot.incomplete || !undo.snapshot.notes.is_empty() {
            return Err(Error::Refused(format!(
                "the undo snapshot {} could not capture everything in the live targets \
                 ({}); nothing was changed",
                undo.id.short(),
                undo.snapshot
                    .unreadable
                    .iter()
                    .map(|u| format!("{}: {}", String::from_utf8_lossy(&u.path), u.error))
                    .chain(undo.snapshot.notes.iter().cloned())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        j.undo = Some(undo.id);
        crate::crash::point("live undo snapshot taken");
    }
    advance(repo, j, State::Staged)?;
    crate::crash::point("live staged");
    advance(repo, j, State::Swapping)?;
    for n in 0..j.volumes.len() {
        if j.volumes[n].entries.is_some() {
            entries::swap(repo, j, n)?;
        } else {
            swap(&j.volumes[n])?;
        }
        j.volumes[n].swapped = true;
        j.save(repo)?;
        crate::crash::point("live swapped a volume");
    }
    advance(repo, j, State::Committed)?;
    crate::crash::point("live committed");
    Ok(())
}

/// Puts the staged tree of `v` in place of its target.
fn swap(v: &journal::Volume) -> Result<()> {
    // The target must still be the directory pre-flight checked (or still absent).
    if journal::ino(&v.target)? != v.old {
        return Err(Error::Refused(format!(
            "{} was replaced while the restore was staging",
            v.target.display()
        )));
    }
    let done = if v.old.is_some() {
        fsutil::exchange(&v.target, &v.stage)
    } else {
        fsutil::rename_new(&v.stage, &v.target)
    };
    done.map_err(|e| match e.raw_os_error() {
        Some(libc_ebusy) if libc_ebusy == rustix::io::Errno::BUSY.raw_os_error() => {
            Error::Refused(format!(
                "{} cannot be renamed (it is a mount point or in use); pass \
                 --allow-in-place-copy to move its entries instead",
                v.target.display()
            ))
        }
        _ => Error::io("swap in", &v.target)(e),
    })?;
    fsutil::fsync_dir(parent(&v.target))
}

/// Which tree a target holds now.
#[derive(Debug, PartialEq, Eq)]
enum Side {
    Old,
    New,
}

fn side(v: &journal::Volume) -> Result<Side> {
    let now = journal::ino(&v.target)?;
    if now.is_some() && now == v.new {
        Ok(Side::New)
    } else if now == v.old || v.old.is_none() {
        // An absent target that something else created meanwhile is not ours either.
        Ok(Side::Old)
    } else {
        Err(Error::Refused(format!(
            "{} holds neither the tree it held before the restore nor the staged one; \
             left as it is",
            v.target.display()
        )))
    }
}

/// Puts every target of `j` back as it was and removes the staging, then runs the
/// post-cmd hook if the pre-cmd hook may have run. Every volume is settled even if
/// one fails. Returns whether the hook ran, and its failure.
fn roll_back(j: &Journal) -> Result<(bool, Option<Error>)> {
    let mut failed = Vec::new();
    for v in j.volumes.iter().rev() {
        let settled = match &v.entries {
            Some(e) => entries::roll_back(v, e),
            None => roll_back_volume(v),
        };
        if let Err(e) = settled {
            failed.push(e.to_string());
        }
    }
    let hook = match (&j.redeploy, j.state >= State::Quiesced) {
        (Some(hook), true) => match run_hook(hook, Phase::Redeploy, &j.id, Some("rolled-back")) {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e)),
        },
        _ => (false, None),
    };
    if !failed.is_empty() {
        return Err(Error::Refused(failed.join("; ")));
    }
    Ok(hook)
}

fn roll_back_volume(v: &journal::Volume) -> Result<()> {
    if side(v)? == Side::New {
        let back = if v.old.is_some() {
            fsutil::exchange(&v.target, &v.stage)
        } else {
            fsutil::rename_new(&v.target, &v.stage)
        };
        back.map_err(Error::io("swap back", &v.target))?;
        fsutil::fsync_dir(parent(&v.target))?;
        crate::crash::point("live swapped a volume back");
    }
    remove_stage(v, false)
}

/// After the commit: records the restore (for `--undo`), then runs the post-cmd hook
/// unless it ran. Returns whether it ran now, and its failure.
fn finish(j: &mut Journal, repo: &Repository) -> Result<(bool, Option<Error>)> {
    for v in &j.volumes {
        let done = match &v.entries {
            Some(e) => e.phase == EntryPhase::Done,
            None => side(v)? == Side::New,
        };
        if !done {
            return Err(Error::Refused(format!(
                "restore {} is committed but {} does not hold the restored tree; left as it is",
                j.id,
                v.target.display()
            )));
        }
    }
    journal::record_restore(repo, j)?;
    if j.state >= State::Redeployed {
        return Ok((false, None));
    }
    let ran = match &j.redeploy {
        Some(hook) => match run_hook(hook, Phase::Redeploy, &j.id, Some("restored")) {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e)),
        },
        None => (false, None),
    };
    advance(repo, j, State::Redeployed)?;
    crate::crash::point("live redeployed");
    Ok(ran)
}

/// Deletes the old trees of a committed restore.
fn cleanup(j: &Journal) -> Result<()> {
    for v in &j.volumes {
        match &v.entries {
            Some(e) => entries::clean(v, e)?,
            None => remove_stage(v, true)?,
        }
        crate::crash::point("live removed an old tree");
    }
    Ok(())
}

/// Removes the staging directory of `v`: the staged tree before a commit (`old_tree`
/// false), the old tree after it. Refuses to delete anything else.
fn remove_stage(v: &journal::Volume, old_tree: bool) -> Result<()> {
    let at = fs::open_dir(parent(&v.stage))?;
    let name = fs::name_of(&v.stage);
    let Some(now) = fs::ino_at(at.as_fd(), &name, &v.stage)? else {
        return Ok(());
    };
    let expected = if old_tree {
        v.old == Some(now)
    } else {
        v.old != Some(now)
    };
    if !expected {
        return Err(Error::Refused(format!(
            "{} is not the tree volsnap expected there; left as it is",
            v.stage.display()
        )));
    }
    fs::remove_tree(at.as_fd(), &name, now, &v.stage)
}

/// Which end of the protocol a hook is run for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Quiesce,
    Redeploy,
}

/// Runs a hook. A shell hook (`sh -c`) writes to stderr (stdout may carry --json);
/// where util-linux `setpriv` exists it runs with a parent-death signal, so it never
/// outlives the volsnap process that ran it (recovery may run the post-cmd). A
/// containers hook stops them, or starts them and waits until they are up.
fn run_hook(hook: &Hook, phase: Phase, id: &str, outcome: Option<&str>) -> Result<()> {
    let command = match hook {
        Hook::Shell(command) => command,
        Hook::Containers(redeploy) => {
            let what = match phase {
                Phase::Quiesce => "stopping the containers",
                Phase::Redeploy => "starting the containers",
            };
            let failed = |e: Error| Error::Hook {
                phase: what,
                detail: e.to_string(),
            };
            let engine = crate::docker::Engine::connect().map_err(failed)?;
            return match phase {
                Phase::Quiesce => redeploy.stop(&engine),
                Phase::Redeploy => redeploy.start(&engine),
            }
            .map_err(failed);
        }
    };
    let name = match phase {
        Phase::Quiesce => "pre-cmd",
        Phase::Redeploy => "post-cmd",
    };
    let failed = |detail: String| Error::Hook {
        phase: name,
        detail,
    };
    let build = |guarded: bool| -> Result<Command> {
        use std::os::fd::AsFd;
        let stderr = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| failed(e.to_string()))?;
        let mut cmd = if guarded {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--", "sh"]);
            c
        } else {
            Command::new("sh")
        };
        cmd.arg("-c")
            .arg(command)
            .env("VOLSNAP_RESTORE_ID", id)
            .env("VOLSNAP_RESTORE_PHASE", name)
            .stdin(Stdio::null())
            .stdout(stderr);
        if let Some(o) = outcome {
            cmd.env("VOLSNAP_RESTORE_OUTCOME", o);
        }
        Ok(cmd)
    };
    let status = match build(true)?.status() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => build(false)?.status(),
        other => other,
    }
    .map_err(|e| failed(format!("{command:?}: {e}")))?;
    if !status.success() {
        return Err(failed(format!("{command:?} exited with {status}")));
    }
    Ok(())
}

/// Resolves every volume's target now: the `--map` directory, else the path the
/// snapshot recorded. Refuses anything a swap must not touch.
fn resolve_targets(
    repo: &Repository,
    snap: &Listed,
    maps: &[(String, PathBuf)],
) -> Result<Vec<Target>> {
    let vols = &snap.snapshot.volumes;
    for (label, _) in maps {
        if !vols.iter().any(|v| &v.label == label) {
            let known: Vec<&str> = vols.iter().map(|v| v.label.as_str()).collect();
            return Err(Error::Usage(format!(
                "--map {label}=...: snapshot {} has no volume {label:?} (it has {})",
                snap.id.short(),
                known.join(", ")
            )));
        }
    }
    // The repository's local directory (the cache of an object-store repository).
    let repo_root =
        std::fs::canonicalize(&repo.cache).map_err(Error::io("resolve", &repo.cache))?;
    let mut out: Vec<Target> = Vec::new();
    for v in vols {
        let raw = maps
            .iter()
            .rev()
            .find(|(l, _)| l == &v.label)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| PathBuf::from(std::ffi::OsStr::from_bytes(&v.source)));
        let (parent, path) = resolve_path(&raw)?;
        let old = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => journal::ino(&path)?,
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::Refused(format!(
                    "target {} of volume {} is a symlink; name the directory it points to with \
                     --map {}=DIR",
                    path.display(),
                    v.label,
                    v.label
                )));
            }
            Ok(_) => {
                return Err(Error::Refused(format!(
                    "target {} of volume {} exists and is not a directory",
                    path.display(),
                    v.label
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("stat", &path)(e)),
        };
        if path.starts_with(&repo_root) || repo_root.starts_with(&path) {
            return Err(Error::Refused(format!(
                "target {} of volume {} overlaps the repository {}",
                path.display(),
                v.label,
                repo_root.display()
            )));
        }
        if let Some(other) = out
            .iter()
            .find(|o| o.path.starts_with(&path) || path.starts_with(&o.path))
        {
            return Err(Error::Refused(format!(
                "targets of volumes {} and {} overlap ({} and {}); use --map to separate them",
                other.label,
                v.label,
                other.path.display(),
                path.display()
            )));
        }
        let (bytes, inodes) = tree_size(repo, &v.tree)?;
        out.push(Target {
            label: v.label.clone(),
            path,
            parent,
            old,
            bytes,
            inodes,
        });
    }
    Ok(out)
}

/// `(parent, path)` of a target path: absolute, the parent resolved through symlinks
/// (it must exist), the last component kept as given.
fn resolve_path(raw: &Path) -> Result<(PathBuf, PathBuf)> {
    let abs = if raw.is_absolute() {
        raw.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(Error::io("resolve", raw))?
            .join(raw)
    };
    let name = match abs.file_name() {
        Some(n) if n != ".." => n.to_owned(),
        _ => {
            return Err(Error::Usage(format!(
                "cannot restore in place onto {}: name a directory below /",
                raw.display()
            )));
        }
    };
    let parent_raw = abs.parent().unwrap_or(Path::new("/"));
    let parent = std::fs::canonicalize(parent_raw).map_err(|e| {
        Error::Refused(format!(
            "the directory {} that would hold {} cannot be resolved: {e}",
            parent_raw.display(),
            abs.display()
        ))
    })?;
    let path = parent.join(name);
    Ok((parent, path))
}

/// Disk space (whole blocks) and inodes a tree needs. Runs of the zero chunk (holes,
/// long stretches of zeros) are restored as holes and need no space.
fn tree_size(repo: &Repository, id: &Id) -> Result<(u64, u64)> {
    const BLOCK: u64 = 4096;
    let zero_len = crate::chunker::zero_chunk_len(repo.config.chunk_sizes());
    let zero_chunk = Id::of(&vec![0u8; zero_len]);
    let (mut bytes, mut inodes) = (BLOCK, 1);
    let mut stack = vec![*id];
    while let Some(t) = stack.pop() {
        // One part of a split directory in memory at a time.
        let mut entries = tree::DirEntries::open(repo, &t)?;
        while let Some(e) = entries.next(repo)? {
            inodes += 1;
            match e.kind {
                Kind::File { size, chunks } => {
                    let holes = chunks
                        .iter()
                        .filter(|r| r.id == zero_chunk)
                        .fold(0u64, |n, r| {
                            n.saturating_add(r.count.saturating_mul(zero_len as u64))
                        });
                    bytes += size.saturating_sub(holes).div_ceil(BLOCK) * BLOCK;
                }
                Kind::Dir { tree } => {
                    bytes += BLOCK;
                    stack.push(tree);
                }
                _ => {}
            }
        }
    }
    Ok((bytes, inodes))
}

/// The live target as an unsaved snapshot (read and hashed, nothing stored), or
/// `None` when there is nothing there. What it could not read goes to `warnings`.
fn live_view(
    repo: &Repository,
    snap: &Listed,
    t: &Target,
    warnings: &mut Vec<String>,
) -> Result<Option<Listed>> {
    if t.old.is_none() {
        return Ok(None);
    }
    let opts = snapshot::Options {
        series: Some(snap.snapshot.series.clone()),
        labels: Some(vec![t.label.clone()]),
        dry_run: true,
        ..Default::default()
    };
    let outcome = snapshot::create(
        repo,
        std::slice::from_ref(&t.path),
        &opts,
        &Progress::default(),
    )?;
    let live = outcome.listed;
    for u in &live.snapshot.unreadable {
        warnings.push(format!(
            "{}: {} (the real run refuses: its undo snapshot must capture everything)",
            String::from_utf8_lossy(&u.path),
            u.error
        ));
    }
    warnings.extend(live.snapshot.notes.iter().cloned());
    Ok(Some(live))
}

/// What restoring volume `label` of `new` changes in a directory holding volume
/// `label` of `old` (`None`: an absent directory).
fn volume_diff(repo: &Repository, old: Option<&Listed>, new: &Listed, label: &str) -> Result<Diff> {
    let new_v = one_volume(new, label)?;
    let old_v = match old {
        Some(o) => one_volume(o, label)?,
        None => {
            // An empty directory: everything is added.
            let bytes = Tree::default().encode();
            let id = Id::of(&bytes);
            repo.unstored
                .lock()
                .expect("unstored lock")
                .insert(id, bytes);
            let mut empty = new_v.clone();
            empty.snapshot.volumes[0].tree = id;
            empty
        }
    };
    let mut diff = inspect::diff(repo, &old_v, &new_v)?;
    let (a, b) = (
        &old_v.snapshot.volumes[0].root,
        &new_v.snapshot.volumes[0].root,
    );
    let mut root = Vec::new();
    if old.is_none() {
        root.push("kind");
    } else {
        if a.mode != b.mode {
            root.push("mode");
        }
        if (a.uid, a.gid) != (b.uid, b.gid) {
            root.push("owner");
        }
        if a.mtime_ns != b.mtime_ns {
            root.push("mtime");
        }
        if a.xattrs != b.xattrs {
            root.push("xattrs");
        }
    }
    if !root.is_empty() {
        diff.modified.insert(0, (b".".to_vec(), root));
    }
    Ok(diff)
}

fn one_volume(s: &Listed, label: &str) -> Result<Listed> {
    let mut one = s.clone();
    one.snapshot.volumes.retain(|v| v.label == label);
    if one.snapshot.volumes.len() != 1 {
        return Err(Error::Usage(format!(
            "snapshot {} has no volume {label:?}",
            s.id.short()
        )));
    }
    Ok(one)
}

/// What the committed restore `j` changed: its undo snapshot against `snap`.
fn changes(repo: &Repository, snap: &Listed, j: &Journal) -> Result<Vec<VolumeReport>> {
    let undo = match j.undo {
        Some(id) => Some(snapshot::resolve(repo, &id.hex())?),
        None => None,
    };
    j.volumes
        .iter()
        .map(|v| {
            let before = undo.as_ref().filter(|_| v.old.is_some());
            Ok(VolumeReport {
                label: v.label.clone(),
                target: v.target.clone(),
                changes: volume_diff(repo, before, snap, &v.label)?,
            })
        })
        .collect()
}

fn new_restore_id() -> String {
    let mut h = blake3::Hasher::new();
    h.update(&now_ns().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.finalize().to_hex()[..16].to_string()
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
