//! Rendering of results for humans and as JSON, and the progress bar.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use volsnap::check;
use volsnap::inspect::Diff;
use volsnap::progress::Progress;
use volsnap::snapshot::Listed;
use volsnap::tree::{Entry, Kind};

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `work` while a progress bar (bytes, rate, ETA when the total is known) is drawn
/// on stderr, if `enabled`.
pub fn with_progress<T>(
    enabled: bool,
    progress: &Progress,
    what: &str,
    work: impl FnOnce() -> T,
) -> T {
    if !enabled {
        return work();
    }
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let mut styled_total = 0;
            while !done.load(Ordering::Relaxed) {
                let (files, bytes, total) = progress.snapshot();
                if total != styled_total {
                    styled_total = total;
                    bar.set_length(total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                        )
                        .expect("valid template"),
                    );
                } else if total == 0 {
                    bar.set_style(
                        ProgressStyle::with_template("{prefix} {spinner} [{elapsed_precise}] {bytes} {binary_bytes_per_sec} {msg}")
                            .expect("valid template"),
                    );
                }
                bar.set_prefix(what.to_string());
                bar.set_position(bytes);
                bar.set_message(format!("{files} files"));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        let out = work();
        done.store(true, Ordering::Relaxed);
        out
    })
}

pub fn bytes(n: u64) -> String {
    volsnap::progress::human_bytes(n)
}

/// UTC time as RFC 3339 with seconds.
pub fn time(ns: i64) -> String {
    volsnap::calendar::rfc3339(ns)
}

pub fn snapshot_json(l: &Listed, skipped: bool) -> Value {
    let s = &l.snapshot;
    json!({
        "id": l.id.hex(),
        "short_id": l.id.short(),
        "series": s.series,
        "version": s.version,
        "time": time(s.time_ns),
        "time_ns": s.time_ns,
        "hostname": s.hostname,
        "parent": s.parent.map(|p| p.hex()),
        "tags": s.tags,
        "incomplete": s.incomplete,
        "skipped": skipped,
        "volumes": s.volumes.iter().map(|v| json!({
            "label": v.label,
            "source": lossy(&v.source),
            "tree": v.tree.hex(),
        })).collect::<Vec<_>>(),
        "stats": {
            "files": s.stats.files,
            "dirs": s.stats.dirs,
            "bytes": s.stats.bytes,
            "bytes_read": s.stats.bytes_read,
            "new_bytes_stored": s.stats.new_bytes_stored,
            "new_chunks": s.stats.new_chunks,
            "duration_ms": s.stats.duration_ms,
        },
        "unreadable": s.unreadable.iter().map(|u| json!({"path": lossy(&u.path), "error": u.error})).collect::<Vec<_>>(),
        "notes": s.notes,
        "containers": s.containers.iter().map(|c| json!({
            "name": c.name,
            "id": c.id,
            "image": c.image,
            "image_id": c.image_id,
            "repo_digests": c.repo_digests,
            "project": c.project,
            "service": c.service,
            "labels": c.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "mounts": c.mounts.iter().map(|m| json!({
                "destination": m.destination,
                "type": m.kind,
                "source": m.source.as_deref().map(lossy),
                "volume": m.volume,
                "read_write": m.read_write,
                "label": m.label,
                "skipped": m.skipped,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub fn snapshot_text(l: &Listed, skipped: bool) -> String {
    let s = &l.snapshot;
    if skipped {
        return format!(
            "nothing changed since snapshot {} ({}@{}); no snapshot recorded\n",
            l.id.short(),
            s.series,
            s.version
        );
    }
    let mut out = format!(
        "snapshot {} saved as {}@{}{}\n  {} files, {} dirs, {}; read {}, stored {} new, in {:.2}s\n",
        l.id.short(),
        s.series,
        s.version,
        if s.incomplete { " (INCOMPLETE)" } else { "" },
        s.stats.files,
        s.stats.dirs,
        bytes(s.stats.bytes),
        bytes(s.stats.bytes_read),
        bytes(s.stats.new_bytes_stored),
        s.stats.duration_ms as f64 / 1000.0
    );
    if s.incomplete {
        let _ = writeln!(
            out,
            "  {} paths could not be read (listed above)",
            s.unreadable.len()
        );
    }
    out
}

pub fn list_text(all: &[Listed]) -> String {
    let mut out = format!(
        "{:<8}  {:<28}  {:<20}  {:>9}  {:>10}  tags\n",
        "id", "series@version", "time (UTC)", "files", "size"
    );
    for l in all {
        let s = &l.snapshot;
        let _ = writeln!(
            out,
            "{:<8}  {:<28}  {:<20}  {:>9}  {:>10}  {}{}",
            l.id.short(),
            format!("{}@{}", s.series, s.version),
            time(s.time_ns),
            s.stats.files,
            bytes(s.stats.bytes),
            s.tags.join(","),
            if s.incomplete { " (incomplete)" } else { "" }
        );
    }
    let _ = writeln!(out, "{} snapshots", all.len());
    out
}

pub fn show_text(l: &Listed) -> String {
    let s = &l.snapshot;
    let mut out = String::new();
    let _ = writeln!(out, "id:        {}", l.id);
    let _ = writeln!(out, "series:    {}@{}", s.series, s.version);
    let _ = writeln!(out, "time:      {}", time(s.time_ns));
    let _ = writeln!(out, "host:      {}", s.hostname);
    let _ = writeln!(
        out,
        "parent:    {}",
        s.parent.map_or("none".into(), |p| p.short())
    );
    let _ = writeln!(out, "tags:      {}", s.tags.join(", "));
    for v in &s.volumes {
        let _ = writeln!(
            out,
            "volume:    {} <- {} (tree {})",
            v.label,
            lossy(&v.source),
            v.tree.short()
        );
    }
    let st = &s.stats;
    let _ = writeln!(
        out,
        "contents:  {} files, {} dirs, {}",
        st.files,
        st.dirs,
        bytes(st.bytes)
    );
    let _ = writeln!(
        out,
        "work:      read {}, stored {} new in {} chunks, {:.2}s",
        bytes(st.bytes_read),
        bytes(st.new_bytes_stored),
        st.new_chunks,
        st.duration_ms as f64 / 1000.0
    );
    let _ = writeln!(
        out,
        "complete:  {}",
        if s.incomplete { "no" } else { "yes" }
    );
    for u in &s.unreadable {
        let _ = writeln!(out, "unreadable: {}: {}", lossy(&u.path), u.error);
    }
    for n in &s.notes {
        let _ = writeln!(out, "note:      {n}");
    }
    out
}

/// One element of `ls --json`.
pub fn entry_json(path: &[u8], e: &Entry) -> Value {
    let target = match &e.kind {
        Kind::Symlink { target } | Kind::Hardlink { target } => Some(lossy(target)),
        _ => None,
    };
    json!({
        "path": lossy(path),
        "name": lossy(&e.name),
        "kind": e.kind.label(),
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "size": e.size(),
        "mtime_ns": e.mtime_ns,
        "target": target,
    })
}

/// One line of `ls`, with its newline.
pub fn ls_line(path: &[u8], e: &Entry, long: bool) -> String {
    let mut line = lossy(path);
    if let Kind::Symlink { target } | Kind::Hardlink { target } = &e.kind {
        let arrow = if matches!(e.kind, Kind::Symlink { .. }) {
            "->"
        } else {
            "=>"
        };
        line = format!("{line} {arrow} {}", lossy(target));
    }
    if long {
        format!(
            "{:<8} {:04o} {:>6} {:>6} {:>12} {} {line}\n",
            e.kind.label(),
            e.mode,
            e.uid,
            e.gid,
            e.size(),
            time(e.mtime_ns)
        )
    } else {
        format!("{line}\n")
    }
}

pub fn diff_json(d: &Diff) -> Value {
    json!({
        "added": d.added.iter().map(|p| lossy(p)).collect::<Vec<_>>(),
        "removed": d.removed.iter().map(|p| lossy(p)).collect::<Vec<_>>(),
        "modified": d.modified.iter().map(|(p, c)| json!({"path": lossy(p), "changes": c})).collect::<Vec<_>>(),
    })
}

pub fn diff_text(d: &Diff) -> String {
    let mut out = String::new();
    for p in &d.added {
        let _ = writeln!(out, "+ {}", lossy(p));
    }
    for p in &d.removed {
        let _ = writeln!(out, "- {}", lossy(p));
    }
    for (p, c) in &d.modified {
        let _ = writeln!(out, "M {} ({})", lossy(p), c.join(", "));
    }
    let _ = writeln!(
        out,
        "{} added, {} removed, {} modified",
        d.added.len(),
        d.removed.len(),
        d.modified.len()
    );
    out
}

pub fn check_json(r: &check::Report) -> Value {
    json!({
        "ok": r.ok(),
        "snapshots": r.snapshots,
        "packs": r.packs,
        "packs_read": r.packs_read,
        "blobs_read": r.blobs_read,
        "errors": r.problems.iter().map(|p| json!({
            "snapshot": p.snapshot.map(|s| s.hex()),
            "path": p.path.as_deref().map(lossy),
            "pack": p.pack.map(|s| s.hex()),
            "message": p.message,
        })).collect::<Vec<_>>(),
    })
}

pub fn check_text(r: &check::Report) -> String {
    let mut out = String::new();
    for p in &r.problems {
        let mut line = String::new();
        if let Some(s) = p.snapshot {
            let _ = write!(line, "snapshot {} ", s.short());
        }
        if let Some(path) = &p.path {
            let _ = write!(line, "path {:?} ", lossy(path));
        }
        let _ = writeln!(out, "{line}{}", p.message);
    }
    let _ = writeln!(
        out,
        "checked {} snapshots, {} packs ({} read, {} blobs verified): {}",
        r.snapshots,
        r.packs,
        r.packs_read,
        r.blobs_read,
        if r.ok() {
            "no problems found".to_string()
        } else {
            format!("{} problems", r.problems.len())
        }
    );
    out
}

/// `undo_command` is the command that puts the previous contents back.
pub fn live_json(r: &volsnap::live::Report, undo_command: &str) -> Value {
    json!({
        "restore_id": r.restore_id,
        "snapshot": r.snapshot.hex(),
        "dry_run": r.dry_run,
        "undo": r.undo.map(|u| u.hex()),
        "undo_command": r.undo.map(|_| undo_command),
        "redeployed": r.redeployed,
        "warnings": r.warnings,
        "duration_ms": r.duration_ms,
        "volumes": r.volumes.iter().map(|v| {
            let mut d = diff_json(&v.changes);
            d["label"] = json!(v.label);
            d["target"] = json!(v.target);
            d
        }).collect::<Vec<_>>(),
    })
}

pub fn live_text(r: &volsnap::live::Report, undo_command: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} snapshot {} onto {} volume{}{}",
        if r.dry_run {
            "would restore"
        } else {
            "restored"
        },
        r.snapshot.short(),
        r.volumes.len(),
        if r.volumes.len() == 1 { "" } else { "s" },
        if r.dry_run {
            String::new()
        } else {
            format!(" in {:.1}s", r.duration_ms as f64 / 1000.0)
        }
    );
    for v in &r.volumes {
        let _ = writeln!(out, "volume {} -> {}:", v.label, v.target.display());
        for line in diff_text(&v.changes).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if let Some(u) = r.undo {
        let _ = writeln!(
            out,
            "the previous contents are snapshot {}: `{undo_command}` brings them back",
            u.short()
        );
    }
    out
}

/// `arg` as one shell word.
pub fn shell_word(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:@,".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

pub fn recovered_json(r: &volsnap::live::Recovered) -> Value {
    json!({
        "restore_id": r.restore_id,
        "outcome": r.outcome,
        "redeployed": r.redeployed,
        "hook_error": r.hook_error,
        "targets": r.targets,
    })
}

pub fn recovered_text(r: &volsnap::live::Recovered) -> String {
    let targets: Vec<String> = r.targets.iter().map(|t| t.display().to_string()).collect();
    let mut s = format!(
        "interrupted in-place restore {} {} ({})",
        r.restore_id,
        r.outcome,
        targets.join(", ")
    );
    if r.redeployed {
        s.push_str("; post-cmd run");
    }
    if let Some(e) = &r.hook_error {
        s.push_str(&format!("; {e}"));
    }
    s
}

pub fn volumes_json(cs: &[volsnap::docker::Container]) -> Value {
    json!(
        cs.iter()
            .map(|c| json!({
                "name": c.name,
                "id": c.id,
                "image": c.image,
                "state": format!("{:?}", c.state).to_lowercase(),
                "project": c.project(),
                "service": c.service(),
                "mounts": c.mounts.iter().map(|m| json!({
                    "destination": m.destination,
                    "type": m.kind,
                    "source": m.source,
                    "volume": m.volume,
                    "driver": m.driver,
                    "read_write": m.read_write,
                    "snapshottable": m.not_snapshottable.is_none(),
                    "reason": m.not_snapshottable,
                })).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    )
}

pub fn volumes_text(cs: &[volsnap::docker::Container]) -> String {
    let mut out = String::new();
    for c in cs {
        let _ = writeln!(
            out,
            "{} ({}, image {})",
            c.name,
            format!("{:?}", c.state).to_lowercase(),
            c.image
        );
        for m in &c.mounts {
            let source = m
                .source
                .as_ref()
                .map_or_else(|| "-".to_string(), |s| s.display().to_string());
            let verdict = match &m.not_snapshottable {
                None => "snapshottable".to_string(),
                Some(why) => format!("not snapshottable: {why}"),
            };
            let _ = writeln!(
                out,
                "  {} {} {} {}: {verdict}",
                m.destination,
                m.kind,
                source,
                if m.read_write { "rw" } else { "ro" }
            );
        }
    }
    out
}

fn copy_entry(c: &volsnap::copy::Copied) -> Value {
    let s = &c.source.snapshot;
    json!({
        "source": c.source.id.hex(),
        "series": s.series,
        "version": s.version,
        "time": time(s.time_ns),
        "dest": c.dest.as_ref().map(|d| d.id.hex()),
        "dest_version": c.dest.as_ref().map(|d| d.snapshot.version),
    })
}

pub fn copy_json(r: &volsnap::copy::Report, from: &str, to: &str) -> Value {
    json!({
        "dry_run": r.dry_run,
        "from": from,
        "to": to,
        "copied_count": r.copied.len(),
        "skipped_count": r.skipped.len(),
        "failed_count": r.failed.len(),
        "copied": r.copied.iter().map(copy_entry).collect::<Vec<_>>(),
        "skipped": r.skipped.iter().map(copy_entry).collect::<Vec<_>>(),
        "failed": r.failed.iter().map(|f| json!({
            "source": f.source.id.hex(),
            "series": f.source.snapshot.series,
            "version": f.source.snapshot.version,
            "error": f.error,
        })).collect::<Vec<_>>(),
        "blobs_sent": r.data_blobs + r.tree_blobs,
        "data_blobs_sent": r.data_blobs,
        "tree_blobs_sent": r.tree_blobs,
        "bytes_sent": r.bytes_sent,
        "entries_walked": r.entries_walked,
        "problems": r.problems.iter().map(|(p, why)| json!({"path": p, "error": why})).collect::<Vec<_>>(),
        "duration_ms": r.duration_ms,
    })
}

pub fn copy_text(r: &volsnap::copy::Report) -> String {
    let mut out = String::new();
    let name = |l: &Listed| {
        format!(
            "{} {}@{}",
            l.id.short(),
            l.snapshot.series,
            l.snapshot.version
        )
    };
    for c in &r.copied {
        match &c.dest {
            Some(d) => writeln!(out, "copied {} as {}", name(&c.source), name(d)),
            None => writeln!(out, "would copy {}", name(&c.source)),
        }
        .expect("write to string");
    }
    // Snapshots already there are only counted: a nightly copy of everything would
    // otherwise list the whole history every night (`--json` lists them).
    for f in &r.failed {
        writeln!(out, "not copied {}: {}", name(&f.source), f.error).expect("write to string");
    }
    writeln!(
        out,
        "{} {} snapshot(s), {} already there{}; {} {} blobs ({}) in {:.1}s",
        if r.dry_run { "would copy" } else { "copied" },
        r.copied.len(),
        r.skipped.len(),
        if r.failed.is_empty() {
            String::new()
        } else {
            format!(", {} could not be copied", r.failed.len())
        },
        if r.dry_run { "would send" } else { "sent" },
        r.data_blobs + r.tree_blobs,
        bytes(r.bytes_sent),
        r.duration_ms as f64 / 1000.0
    )
    .expect("write to string");
    out
}
