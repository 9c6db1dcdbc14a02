//! Snapshots of container volumes: every snapshottable mount of the selected
//! containers, quiesced while it is read, with the containers' manifests recorded.
//!
//! Order per group (one snapshot per group): pre-snapshot exec hooks in the running
//! containers → the quiesce journal → pause (or stop) → snapshot → resume → remove the
//! journal → post-snapshot exec hooks. The containers are resumed on every path out of
//! the snapshot: success, error, a signal (the handler resumes them before exiting),
//! and a crash (`recover_quiesce`, run by every command, resumes what the journal lists).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Container, Engine, RunState};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::record::{ContainerManifest, MountManifest};
use crate::snapshot::{self, Outcome};

/// How a container is kept still while its volumes are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quiesce {
    /// The cgroup freezer: milliseconds for an incremental snapshot.
    Pause,
    /// Stop, and start again afterwards.
    Stop,
    /// Read while it runs.
    None,
}

impl Quiesce {
    pub fn parse(s: &str) -> Option<Quiesce> {
        match s {
            "pause" => Some(Quiesce::Pause),
            "stop" => Some(Quiesce::Stop),
            "none" => Some(Quiesce::None),
            _ => None,
        }
    }
}

/// Labels a container can carry.
pub const LABEL_QUIESCE: &str = "volsnap.quiesce";
pub const LABEL_PRE: &str = "volsnap.pre-snapshot";
pub const LABEL_POST: &str = "volsnap.post-snapshot";
/// docker-volume-backup's labels, honoured so its users can migrate.
pub const DVB_STOP: &str = "docker-volume-backup.stop-during-backup";
pub const DVB_PRE: &str = "docker-volume-backup.archive-pre";
pub const DVB_POST: &str = "docker-volume-backup.archive-post";

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// One series for everything selected, instead of one per project or container.
    pub series: Option<String>,
    pub tags: Vec<String>,
    pub quiesce: Quiesce,
    /// Seconds a stopped container gets before SIGKILL; `None`: its own setting.
    pub stop_timeout_s: Option<i32>,
}

/// Containers snapshotted together, into one series.
#[derive(Clone, Debug)]
pub struct Group {
    pub series: String,
    pub containers: Vec<Container>,
}

/// One snapshot per compose project, and per container outside any project (or one
/// for everything with `series`).
pub fn groups(containers: Vec<Container>, series: Option<&str>) -> Vec<Group> {
    let mut by: BTreeMap<String, Vec<Container>> = BTreeMap::new();
    for c in containers {
        let key = match series {
            Some(s) => s.to_string(),
            None => c.project().unwrap_or(&c.name).to_string(),
        };
        by.entry(key).or_default().push(c);
    }
    by.into_iter()
        .map(|(series, containers)| Group { series, containers })
        .collect()
}

/// The outcome for one group.
#[derive(Debug)]
pub struct GroupReport {
    pub series: String,
    /// `None`: nothing in the group could be snapshotted (`skipped` says why).
    pub outcome: Option<Outcome>,
    pub skipped: Vec<String>,
    /// Hook output and resume problems worth showing.
    pub notes: Vec<String>,
}

/// A container volsnap paused or stopped, recorded before it did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Quiesced {
    pub id: String,
    pub name: String,
    pub how: Quiesce,
}

/// Snapshots every snapshottable volume of `group`'s containers.
pub fn snapshot_group(
    engine: &Engine,
    repo: &Repository,
    group: &Group,
    opts: &Options,
    progress: &Progress,
) -> Result<GroupReport> {
    let mut report = GroupReport {
        series: group.series.clone(),
        outcome: None,
        skipped: Vec::new(),
        notes: Vec::new(),
    };
    // Volumes: every snapshottable mount, each host directory once.
    let mut dirs = Vec::new();
    let mut labels = Vec::new();
    let mut seen = HashSet::new();
    let mut manifests = Vec::new();
    for c in &group.containers {
        let mut mounts = Vec::new();
        for m in &c.mounts {
            let mut label = None;
            if let (None, Some(src)) = (&m.not_snapshottable, &m.source) {
                if seen.insert(src.clone()) {
                    let l = unique_label(&volume_label(&c.name, &m.destination), &labels);
                    labels.push(l.clone());
                    dirs.push(src.clone());
                    label = Some(l);
                } else {
                    label = labels
                        .iter()
                        .zip(&dirs)
                        .find(|(_, d)| *d == src)
                        .map(|(l, _)| l.clone());
                }
            } else if let Some(why) = &m.not_snapshottable {
                report
                    .skipped
                    .push(format!("{}:{}: {why}", c.name, m.destination));
            }
            mounts.push(MountManifest {
                destination: m.destination.clone(),
                kind: m.kind.clone(),
                source: m
                    .source
                    .as_ref()
                    .map(|s| s.as_os_str().as_encoded_bytes().to_vec()),
                volume: m.volume.clone(),
                read_write: m.read_write,
                label,
                skipped: m.not_snapshottable.clone(),
            });
        }
        manifests.push(ContainerManifest {
            name: c.name.clone(),
            id: c.id.clone(),
            image: c.image.clone(),
            image_id: c.image_id.clone(),
            repo_digests: c.repo_digests.clone(),
            project: c.project().map(str::to_string),
            service: c.service().map(str::to_string),
            labels: c
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            mounts,
        });
    }
    if dirs.is_empty() {
        return Ok(report);
    }
    // Pre hooks, in running containers, before anything is frozen.
    let mut hooked = Vec::new();
    let mut failed = None;
    for c in group
        .containers
        .iter()
        .filter(|c| c.state == RunState::Running)
    {
        if let Some(cmd) = hook(c, LABEL_PRE, DVB_PRE) {
            hooked.push(c);
            if let Err(e) = run_exec(engine, c, cmd, "pre-snapshot", &mut report.notes) {
                failed = Some(e);
                break;
            }
        }
    }
    // Containers outside the group that mount a directory being read are kept still
    // too (they are quiesced, not snapshotted or hooked).
    let mut still = group.containers.clone();
    for other in engine.all()? {
        let shares = other.mounts.iter().any(|m| {
            m.source
                .as_ref()
                .is_some_and(|s| dirs.iter().any(|d| s.starts_with(d) || d.starts_with(s)))
        });
        if shares && !still.iter().any(|c| c.id == other.id) {
            report.notes.push(format!(
                "container {} shares a volume with series {}: quiesced too",
                other.name, group.series
            ));
            still.push(other);
        }
    }
    let still = Group {
        series: group.series.clone(),
        containers: still,
    };
    let failed_pre = failed.is_some();
    let outcome = match failed {
        Some(e) => Err(e),
        None => quiesced(engine, repo, &still, opts, |repo| {
            let sopts = snapshot::Options {
                series: Some(group.series.clone()),
                tags: opts.tags.clone(),
                labels: Some(labels.clone()),
                containers: manifests.clone(),
                ..Default::default()
            };
            snapshot::create(repo, &dirs, &sopts, progress)
        }),
    };
    // Post hooks: after a failed pre hook only where a pre hook ran; otherwise in every
    // running container that has one, whatever the snapshot did.
    let post: Vec<&Container> = if failed_pre {
        hooked
    } else {
        group
            .containers
            .iter()
            .filter(|c| c.state == RunState::Running)
            .collect()
    };
    for c in post {
        if let Some(cmd) = hook(c, LABEL_POST, DVB_POST)
            && let Err(e) = run_exec(engine, c, cmd, "post-snapshot", &mut report.notes)
        {
            report.notes.push(e.to_string());
        }
    }
    report.outcome = Some(outcome?);
    Ok(report)
}

/// The hook command a container's labels give (volsnap's first, then
/// docker-volume-backup's).
fn hook<'c>(c: &'c Container, ours: &str, theirs: &str) -> Option<&'c str> {
    c.labels
        .get(ours)
        .or_else(|| c.labels.get(theirs))
        .map(String::as_str)
        .filter(|s| !s.trim().is_empty())
}

fn run_exec(
    engine: &Engine,
    c: &Container,
    cmd: &str,
    phase: &str,
    notes: &mut Vec<String>,
) -> Result<()> {
    let (code, output) = engine.exec(&c.id, cmd)?;
    let output = output.trim();
    if code != 0 {
        return Err(Error::Engine(format!(
            "{phase} command {cmd:?} in container {} exited with {code}: {output}",
            c.name
        )));
    }
    if !output.is_empty() {
        notes.push(format!("{phase} in {}: {output}", c.name));
    }
    Ok(())
}

/// How container `c` is quiesced: its label, else docker-volume-backup's stop label,
/// else the command's choice. Only running containers are quiesced.
fn quiesce_for(c: &Container, default: Quiesce) -> Result<Quiesce> {
    if c.state != RunState::Running {
        return Ok(Quiesce::None);
    }
    if let Some(l) = c.labels.get(LABEL_QUIESCE) {
        return Quiesce::parse(l).ok_or_else(|| {
            Error::Usage(format!(
                "container {}: label {LABEL_QUIESCE}={l:?} is not pause, stop or none",
                c.name
            ))
        });
    }
    if c.labels
        .get(DVB_STOP)
        .is_some_and(|v| matches!(v.as_str(), "true" | "1" | "yes"))
    {
        return Ok(Quiesce::Stop);
    }
    Ok(default)
}

/// The quiesce in flight in this process, shared with the signal thread: a container
/// is added (and journaled) before it is paused or stopped, under this lock, and the
/// signal thread takes the same lock, so it never misses one.
struct InFlight {
    plan: Vec<Quiesced>,
    journal: Option<QuiesceJournal>,
    /// Set by the signal thread: quiesce nothing more.
    stopping: bool,
}

static IN_FLIGHT: Mutex<InFlight> = Mutex::new(InFlight {
    plan: Vec::new(),
    journal: None,
    stopping: false,
});

fn in_flight() -> std::sync::MutexGuard<'static, InFlight> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work` with the group's containers quiesced, and resumes them however it ends.
fn quiesced<T>(
    engine: &Engine,
    repo: &Repository,
    group: &Group,
    opts: &Options,
    work: impl FnOnce(&Repository) -> Result<T>,
) -> Result<T> {
    let mut wanted = Vec::new();
    for c in &group.containers {
        let how = quiesce_for(c, opts.quiesce)?;
        if how != Quiesce::None {
            wanted.push((c, how));
        }
    }
    if wanted.is_empty() {
        return work(repo);
    }
    let mut result = Ok(());
    for (c, how) in wanted {
        let mut f = in_flight();
        if f.stopping {
            break;
        }
        // As it is now: a container paused or stopped since it was selected (by its
        // user, or by its own exit) is not ours to touch.
        match engine.inspect(&c.id) {
            Ok(now) if now.state == RunState::Running => {}
            Ok(_) => continue,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        let q = Quiesced {
            id: c.id.clone(),
            name: c.name.clone(),
            how,
        };
        f.plan.push(q);
        // Journaled before it is acted on.
        let written = match f.journal.take() {
            Some(j) => j.rewrite(repo, &f.plan),
            None => QuiesceJournal::write(repo, &f.plan),
        };
        match written {
            Ok(j) => f.journal = Some(j),
            Err(e) => {
                f.plan.pop();
                result = Err(e);
                break;
            }
        }
        crate::crash::point("docker quiesce journaled");
        let r = match how {
            Quiesce::Pause => engine.pause(&c.id),
            Quiesce::Stop => engine.stop(&c.id, opts.stop_timeout_s),
            Quiesce::None => Ok(()),
        };
        drop(f);
        if let Err(e) = r {
            result = Err(e);
            break;
        }
        crate::crash::point("docker quiesced a container");
    }
    let out = result
        .and_then(|()| {
            crate::crash::pause("docker quiesced");
            crate::crash::fail_point("docker quiesced")
        })
        .and_then(|()| work(repo));
    let resumed = settle(engine);
    let out = out?;
    resumed?;
    Ok(out)
}

/// Resumes every container of the quiesce in flight and, once all are back, removes
/// its journal (a failure leaves it for the next command to retry).
fn settle(engine: &Engine) -> Result<()> {
    let mut f = in_flight();
    let resumed = resume(engine, &f.plan);
    if resumed.is_ok() {
        if let Some(j) = f.journal.take() {
            j.remove()?;
        }
        f.plan.clear();
    }
    resumed
}

/// Brings back every container of `plan` that is paused or stopped now. A container
/// that no longer exists has nothing to resume. Tries them all; reports the first
/// failure.
fn resume(engine: &Engine, plan: &[Quiesced]) -> Result<()> {
    let mut first = None;
    for q in plan {
        let r = match engine.inspect(&q.id) {
            Ok(c) => match (q.how, c.state) {
                (Quiesce::Pause, RunState::Paused) => engine.unpause(&q.id),
                (Quiesce::Stop, RunState::Stopped) => engine.start(&q.id),
                _ => Ok(()),
            },
            Err(Error::Engine(why)) if why.contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            first.get_or_insert(Error::Engine(format!(
                "container {} could not be resumed: {e}",
                q.name
            )));
        }
    }
    first.map_or(Ok(()), Err)
}

/// For a signal handler about to exit: stops any further quiesce, waits for the one
/// in progress, resumes every container quiesced so far and removes the journal.
pub fn resume_on_signal() {
    let mut f = in_flight();
    f.stopping = true;
    if f.plan.is_empty() {
        return;
    }
    if let Ok(engine) = Engine::connect()
        && resume(&engine, &f.plan).is_ok()
        && let Some(j) = f.journal.take()
    {
        let _ = j.remove();
        f.plan.clear();
    }
}

/// The journal of a quiesce in flight: `<repo>/journals/quiesce-<id>.journal`, with a
/// lock file held by the process, rewritten (atomically, fsynced) before each container
/// is paused or stopped.
struct QuiesceJournal {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: std::fs::File,
}

const QUIESCE_MAGIC: &[u8; 8] = b"VSNPQSCE";

pub(crate) fn encode_plan(plan: &[Quiesced]) -> Vec<u8> {
    let mut bytes = QUIESCE_MAGIC.to_vec();
    postcard::to_io(plan, &mut bytes).expect("quiesce journals encode");
    bytes
}

impl QuiesceJournal {
    fn write(repo: &Repository, plan: &[Quiesced]) -> Result<QuiesceJournal> {
        let dir = crate::live::journal::dir(repo);
        let id = format!(
            "quiesce-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        // The restore journals' lock files, for the same purpose: held while in flight.
        let lock = crate::live::journal::lock(repo, &id)?
            .ok_or_else(|| Error::Busy(format!("quiesce journal {id} is taken")))?;
        let lock_path = dir.join(format!("{id}.lock"));
        let path = dir.join(format!("{id}.journal"));
        fsutil::atomic_write(&repo.tmp_dir(), &path, &encode_plan(plan))?;
        Ok(QuiesceJournal {
            path,
            lock_path,
            _lock: lock,
        })
    }

    fn rewrite(self, repo: &Repository, plan: &[Quiesced]) -> Result<QuiesceJournal> {
        fsutil::atomic_write(&repo.tmp_dir(), &self.path, &encode_plan(plan))?;
        Ok(self)
    }

    fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path).map_err(Error::io("remove", &self.path))?;
        fsutil::fsync_dir(self.path.parent().expect("journals have a parent"))?;
        let _ = std::fs::remove_file(&self.lock_path);
        Ok(())
    }
}

/// Whether interrupted quiesces are waiting to be undone (no engine needed to ask).
pub fn quiesce_pending(repo: &Repository) -> bool {
    std::fs::read_dir(crate::live::journal::dir(repo)).is_ok_and(|d| {
        d.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("quiesce-") && n.ends_with(".journal")
        })
    })
}

/// A quiesce journal's plan; `None` if the bytes are not one.
pub(crate) fn decode_plan(bytes: &[u8]) -> Option<Vec<Quiesced>> {
    bytes
        .strip_prefix(&QUIESCE_MAGIC[..])
        .and_then(|b| postcard::from_bytes(b).ok())
}

/// Resumes the containers of every quiesce whose process is gone. Returns their names.
/// Each journal is settled on its own; failures are reported after all were tried.
pub fn recover_quiesce(repo: &Repository) -> Result<Vec<String>> {
    let dir = crate::live::journal::dir(repo);
    let mut resumed = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(resumed);
    };
    let mut engine = None;
    let mut failed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_suffix(".journal")
            .filter(|n| n.starts_with("quiesce-"))
        else {
            continue;
        };
        match recover_one(repo, id, &e.path(), &mut engine) {
            Ok(names) => resumed.extend(names),
            Err(err) => failed.push(err.to_string()),
        }
    }
    if !failed.is_empty() {
        return Err(Error::Engine(failed.join("; ")));
    }
    Ok(resumed)
}

fn recover_one(
    repo: &Repository,
    id: &str,
    path: &std::path::Path,
    engine: &mut Option<Engine>,
) -> Result<Vec<String>> {
    let Some(_lock) = crate::live::journal::lock(repo, id)? else {
        return Ok(Vec::new()); // in flight
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        // Settled by its own process meanwhile.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::live::journal::remove_lock(repo, id);
            return Ok(Vec::new());
        }
        Err(e) => return Err(Error::io("read", path)(e)),
    };
    let plan = decode_plan(&bytes).ok_or_else(|| Error::Corrupt {
        what: "quiesce journal",
        path: path.to_path_buf(),
        detail: "does not decode".into(),
    })?;
    if engine.is_none() {
        *engine = Some(Engine::connect()?);
    }
    resume(engine.as_ref().expect("connected"), &plan)?;
    std::fs::remove_file(path).map_err(Error::io("remove", path))?;
    fsutil::fsync_dir(&crate::live::journal::dir(repo))?;
    crate::live::journal::remove_lock(repo, id);
    Ok(plan.into_iter().map(|q| q.name).collect())
}

/// A volume label from a container name and a mount destination:
/// `web` + `/var/lib/data` → `web-var-lib-data`.
fn volume_label(container: &str, destination: &str) -> String {
    let path: Vec<&str> = destination.split('/').filter(|c| !c.is_empty()).collect();
    let label = if path.is_empty() {
        format!("{container}-root")
    } else {
        format!("{container}-{}", path.join("-"))
    };
    label.replace(['\0', '/'], "_")
}

fn unique_label(base: &str, taken: &[String]) -> String {
    let mut label = base.to_string();
    let mut n = 2;
    while taken.contains(&label) {
        label = format!("{base}-{n}");
        n += 1;
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_container_and_the_mount() {
        assert_eq!(volume_label("web", "/var/lib/data"), "web-var-lib-data");
        assert_eq!(volume_label("web", "/"), "web-root");
        assert_eq!(
            unique_label("a-b", &["a-b".into(), "a-b-2".into()]),
            "a-b-3"
        );
    }
}
