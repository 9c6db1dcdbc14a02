//! The CLI's in-place restores (plain and Docker) and container snapshots: the
//! orchestration around the library calls (confirmation, signals, progress, rollback
//! on an unhealthy container), kept out of the command dispatch in `main.rs`.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde_json::Value;

use volsnap::progress::Progress;
use volsnap::repo::Repository;
use volsnap::{Error, live, snapshot};

use crate::{emit, exit, open_for_snapshot, render, split_ref};

/// `snapshot --container/--project/--label`: one snapshot per group of containers.
pub fn container_snapshot(
    target: &crate::RepoArg,
    sel: &volsnap::docker::Selection,
    opts: &volsnap::docker::snapshot::Options,
    json: bool,
    show_progress: bool,
) -> anyhow::Result<u8> {
    use volsnap::docker::snapshot as dsnap;
    let engine = volsnap::docker::Engine::connect()?;
    let groups = dsnap::groups(engine.select(sel)?, opts.series.as_deref());
    let repo = open_for_snapshot(target)?;
    // A signal while containers are paused or stopped resumes them before exiting.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            dsnap::resume_on_signal();
            std::process::exit(130);
        }
    });
    let mut docs = Vec::new();
    let mut text = String::new();
    let mut code = exit::OK;
    let mut failed = Vec::new();
    for g in &groups {
        let progress = Progress::default();
        let report = match render::with_progress(show_progress, &progress, "snapshot", || {
            dsnap::snapshot_group(&engine, &repo, g, opts, &progress)
        }) {
            Ok(r) => r,
            // One group: its error is the command's.
            Err(e) if groups.len() == 1 => return Err(e.into()),
            Err(e) => {
                eprintln!("error: series {}: {e}", g.series);
                failed.push(g.series.clone());
                continue;
            }
        };
        for s in &report.skipped {
            eprintln!("note: not snapshotted: {s}");
        }
        for n in &report.notes {
            eprintln!("note: {n}");
        }
        match &report.outcome {
            Some(o) => {
                let snap = &o.listed.snapshot;
                for w in &o.warnings {
                    eprintln!("warning: {w}");
                }
                for u in &snap.unreadable {
                    eprintln!(
                        "warning: could not read {}: {}",
                        String::from_utf8_lossy(&u.path),
                        u.error
                    );
                }
                if snap.incomplete {
                    code = exit::INCOMPLETE;
                }
                docs.push(render::snapshot_json(&o.listed, o.skipped));
                text.push_str(&render::snapshot_text(&o.listed, o.skipped));
            }
            None => {
                eprintln!("note: series {}: nothing to snapshot", report.series);
            }
        }
    }
    emit(json, &Value::Array(docs), || text)?;
    if !failed.is_empty() {
        return Err(Error::Engine(format!(
            "no snapshot of series {} ({} of {} taken)",
            failed.join(", "),
            groups.len() - failed.len(),
            groups.len()
        ))
        .into());
    }
    Ok(code)
}

/// `LABEL=DIR` arguments.
pub fn parse_maps(maps: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    maps.iter()
        .map(|m| match m.split_once('=') {
            Some((l, d)) if !l.is_empty() && !d.is_empty() => Ok((l.to_string(), PathBuf::from(d))),
            _ => Err(Error::Usage(format!("--map {m:?}: expected LABEL=DIR")).into()),
        })
        .collect()
}

/// An in-place restore is all or nothing: SIGINT and SIGTERM do not interrupt it
/// half-way (it finishes or rolls back by itself); SIGKILL still does, and recovery
/// settles what it leaves.
fn hold_signals_during_restore() -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            eprintln!(
                "volsnap: an in-place restore is not interrupted half-way; it finishes or \
                 rolls back on its own"
            );
        }
    });
    Ok(())
}

pub fn live_restore(
    target: &crate::RepoArg,
    source: Option<OsString>,
    undo: bool,
    opts: live::Options,
    yes: bool,
    json: bool,
    show_progress: bool,
) -> anyhow::Result<u8> {
    // A live restore must not start over an unsettled one: recovery errors stop it.
    let repo = target.open_raw()?;
    for r in live::recover(&repo)? {
        eprintln!("volsnap: {}", render::recovered_text(&r));
    }
    // Held from before the snapshot is resolved: gc keeps what it names.
    let _lease = repo.lease("restore")?;
    let snap = if undo {
        let (snap, notes) = live::undo_snapshot(&repo, source.as_ref().map(std::path::Path::new))?;
        for n in notes {
            eprintln!("note: {n}");
        }
        snap
    } else {
        let Some(source) = source else {
            return Err(Error::Usage("restore --in-place needs a snapshot".into()).into());
        };
        let (reference, sub) = split_ref(&source);
        if !sub.is_empty() {
            return Err(Error::Usage(
                "restore --in-place replaces whole volumes: give a snapshot, not SNAP:path".into(),
            )
            .into());
        }
        snapshot::resolve(&repo, &reference)?
    };
    let report = run_in_place(&repo, &snap, &opts, yes, show_progress)??;
    emit_in_place(json, &report, &plain_undo_command(&repo, &report, &opts))?;
    Ok(exit::OK)
}

/// An in-place restore as the CLI runs it: confirmed (unless `yes` or a dry run),
/// SIGINT/SIGTERM held, with a progress bar.
fn run_in_place(
    repo: &Repository,
    snap: &snapshot::Listed,
    opts: &live::Options,
    yes: bool,
    show_progress: bool,
) -> anyhow::Result<volsnap::Result<live::Report>> {
    if !yes && !opts.dry_run {
        confirm(snap, opts)?;
    }
    if !opts.dry_run {
        hold_signals_during_restore()?;
    }
    let progress = Progress::default();
    Ok(render::with_progress(
        show_progress,
        &progress,
        "restore",
        || live::restore_in_place(repo, snap, opts, &progress),
    ))
}

fn emit_in_place(json: bool, report: &live::Report, undo_command: &str) -> anyhow::Result<()> {
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    emit(json, &render::live_json(report, undo_command), || {
        render::live_text(report, undo_command)
    })
}

/// `volsnap [--repo PATH] restore --undo`: a repository other than the default one
/// must be named (it is never created implicitly).
fn undo_command_start(repo: &Repository) -> String {
    if repo.location == volsnap::store::Location::Local(volsnap::repo::default_path()) {
        "volsnap restore --undo".to_string()
    } else {
        format!(
            "volsnap --repo {} restore --undo",
            render::shell_word(&repo.location.to_string())
        )
    }
}

/// The undo of a plain in-place restore: by one of its targets, so a later restore of
/// other directories is not what gets undone, with the same hooks.
fn plain_undo_command(repo: &Repository, report: &live::Report, opts: &live::Options) -> String {
    let mut cmd = undo_command_start(repo);
    if let Some(v) = report.volumes.first() {
        cmd.push(' ');
        cmd.push_str(&render::shell_word(&v.target.to_string_lossy()));
    }
    for (flag, hook) in [("--pre-cmd", &opts.quiesce), ("--post-cmd", &opts.redeploy)] {
        if let Some(live::journal::Hook::Shell(c)) = hook {
            cmd.push_str(&format!(" {flag} {}", render::shell_word(c)));
        }
    }
    cmd
}

/// The undo of a container restore: through the same containers, so they are stopped
/// and started around it (a plain `--undo` refuses while they run).
fn container_undo_command(repo: &Repository, sel: &volsnap::docker::Selection) -> String {
    let mut cmd = undo_command_start(repo);
    match sel {
        volsnap::docker::Selection::Project(p) => {
            cmd.push_str(&format!(" --project {}", render::shell_word(p)));
        }
        volsnap::docker::Selection::Containers(names) => {
            for n in names {
                cmd.push_str(&format!(" --container {}", render::shell_word(n)));
            }
        }
        volsnap::docker::Selection::Label(_) => {
            unreachable!("restore selects containers by name or project")
        }
    }
    cmd
}

pub struct ContainerRestore {
    /// Restore the pre-restore snapshot of the last in-place restore instead.
    pub undo: bool,
    pub allow_copy: bool,
    pub ignore_running_containers: bool,
    pub health_timeout: u64,
    pub rollback: bool,
    pub dry_run: bool,
    pub yes: bool,
}

/// `restore SNAP --container/--project`: the live restore, with targets resolved from
/// the containers now, the containers mounting them stopped and started around it.
pub fn container_restore(
    target: &crate::RepoArg,
    source: Option<&OsString>,
    sel: &volsnap::docker::Selection,
    how: &ContainerRestore,
    json: bool,
    show_progress: bool,
) -> anyhow::Result<u8> {
    let repo = target.open_raw()?;
    for r in live::recover(&repo)? {
        eprintln!("volsnap: {}", render::recovered_text(&r));
    }
    // Held from before the snapshot is resolved: gc keeps what it names.
    let _lease = repo.lease("restore")?;
    let snap = match (how.undo, source) {
        (true, _) => {
            // The last restore of these containers' volumes.
            let engine = volsnap::docker::Engine::connect()?;
            let dir = engine
                .select(sel)?
                .into_iter()
                .flat_map(|c| c.mounts)
                .find(|m| m.not_snapshottable.is_none())
                .and_then(|m| m.source)
                .ok_or_else(|| Error::Usage("the containers have no volume to undo".into()))?;
            live::undo_snapshot(&repo, Some(&dir))?.0
        }
        (false, Some(s)) => snapshot::resolve(&repo, &String::from_utf8_lossy(s.as_bytes()))?,
        (false, None) => {
            return Err(
                Error::Usage("restore --container/--project needs a snapshot".into()).into(),
            );
        }
    };
    let engine = volsnap::docker::Engine::connect()?;
    let (maps, redeploy) = volsnap::docker::restore::plan(&engine, &snap, sel, how.health_timeout)?;
    drop(engine);
    let hook =
        (!redeploy.containers.is_empty()).then_some(live::journal::Hook::Containers(redeploy));
    let opts = live::Options {
        maps: maps.clone(),
        quiesce: hook.clone(),
        redeploy: hook,
        dry_run: how.dry_run,
        allow_copy: how.allow_copy,
        ignore_running_containers: how.ignore_running_containers,
    };
    let (report, code) = match run_in_place(&repo, &snap, &opts, how.yes, show_progress)? {
        Ok(r) => (r, exit::OK),
        Err(Error::Redeploy(why)) if how.rollback => {
            eprintln!("volsnap: {why}; putting the previous data back");
            let (undo, _) = live::undo_snapshot(&repo, Some(&maps[0].1))?;
            let back = live::Options {
                maps: Vec::new(),
                ..opts.clone()
            };
            let report = live::restore_in_place(&repo, &undo, &back, &Progress::default())?;
            eprintln!("volsnap: rolled back to snapshot {}", undo.id.short());
            (report, exit::ERROR)
        }
        Err(e) => return Err(e.into()),
    };
    emit_in_place(json, &report, &container_undo_command(&repo, sel))?;
    Ok(code)
}

/// Asks before replacing live data; without a terminal, `--yes` is required.
fn confirm(snap: &snapshot::Listed, opts: &live::Options) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage(
            "an in-place restore replaces live data: pass --yes to confirm (or --dry-run to see \
             what would change)"
                .into(),
        )
        .into());
    }
    eprintln!(
        "Replace these live directories with snapshot {}?",
        snap.id.short()
    );
    for v in &snap.snapshot.volumes {
        let target = opts
            .maps
            .iter()
            .rev()
            .find(|(l, _)| l == &v.label)
            .map(|(_, p)| p.display().to_string())
            .unwrap_or_else(|| String::from_utf8_lossy(&v.source).into_owned());
        eprintln!("  {} -> {target}", v.label);
    }
    eprint!("[y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        return Err(Error::Refused("not confirmed; nothing was changed".into()).into());
    }
    Ok(())
}
