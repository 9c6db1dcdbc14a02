//! Live restore of container volumes: the live-restore protocol (`live`), with the
//! targets re-resolved from the containers as they are now, quiesce = stop every
//! container that mounts a target, and redeploy = start them again (compose
//! dependency order) and wait until each runs and, where it has a health check, is
//! healthy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Container, Engine, RunState, Selection};

/// Compose's replica number of a service's container.
const COMPOSE_NUMBER: &str = "com.docker.compose.container-number";
use crate::error::{Error, Result};
use crate::snapshot::Listed;

/// The containers a live restore stops and starts, in start order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redeploy {
    /// (id, name), in the order they are started (stopped in reverse).
    pub containers: Vec<(String, String)>,
    pub health_timeout_s: u64,
}

/// Where each volume of `snap` lives now (label → host directory), and the containers
/// to stop and start around the swap.
pub fn plan(
    engine: &Engine,
    snap: &Listed,
    sel: &Selection,
    health_timeout_s: u64,
) -> Result<(Vec<(String, PathBuf)>, Redeploy)> {
    let selected = engine.select(sel)?;
    let mut maps = Vec::new();
    for v in &snap.snapshot.volumes {
        // Every container that mounted the directory this volume was read from.
        let recorded: Vec<_> = snap
            .snapshot
            .containers
            .iter()
            .flat_map(|c| c.mounts.iter().map(move |m| (c, m)))
            .filter(|(_, m)| m.label.as_deref() == Some(v.label.as_str()))
            .collect();
        if recorded.is_empty() {
            return Err(Error::Usage(format!(
                "volume {} of snapshot {} did not come from a container; restore it with \
                 --in-place --map {}=DIR",
                v.label,
                snap.id.short(),
                v.label
            )));
        }
        // The same container now: by name, else by compose project, service and
        // replica number (a container compose recreated under another name).
        let found = recorded.iter().find_map(|(was, mount)| {
            let label = |l: &[(String, String)], k: &str| {
                l.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
            };
            let was_number = label(&was.labels, COMPOSE_NUMBER);
            selected
                .iter()
                .find(|c| c.name == was.name)
                .or_else(|| {
                    selected.iter().find(|c| {
                        was.service.is_some()
                            && c.service() == was.service.as_deref()
                            && c.project() == was.project.as_deref()
                            && c.labels.get(COMPOSE_NUMBER) == was_number.as_ref()
                    })
                })
                .map(|now| (now, *mount))
        });
        let Some((now, mount)) = found else {
            let names: Vec<&str> = recorded.iter().map(|(c, _)| c.name.as_str()).collect();
            return Err(Error::Usage(format!(
                "volume {} belonged to container {}, which is not among the selected \
                 containers now (select it with --container or --project)",
                v.label,
                names.join(", ")
            )));
        };
        let m = now
            .mounts
            .iter()
            .find(|m| m.destination == mount.destination)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "container {} no longer mounts anything at {}",
                    now.name, mount.destination
                ))
            })?;
        if let Some(why) = &m.not_snapshottable {
            return Err(Error::Usage(format!(
                "container {}'s mount at {} cannot be restored: {why}",
                now.name, m.destination
            )));
        }
        let source = m
            .source
            .clone()
            .expect("snapshottable mounts have a host path");
        maps.push((v.label.clone(), source));
    }
    // Every container mounting a target, selected or not, running now.
    let targets: Vec<&PathBuf> = maps.iter().map(|(_, p)| p).collect();
    let mut users: Vec<Container> = engine
        .all()?
        .into_iter()
        .filter(|c| c.state != RunState::Stopped)
        .filter(|c| {
            c.mounts.iter().any(|m| {
                m.source
                    .as_ref()
                    .is_some_and(|s| targets.iter().any(|t| s.starts_with(t) || t.starts_with(s)))
            })
        })
        .collect();
    users.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((
        maps,
        Redeploy {
            containers: start_order(&users)
                .into_iter()
                .map(|c| (c.id.clone(), c.name.clone()))
                .collect(),
            health_timeout_s,
        },
    ))
}

/// A container, running or paused, whose mounts reach a live-restore target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub project: Option<String>,
    /// The target its mount reaches.
    pub target: PathBuf,
}

/// The containers running or paused now that mount one of `targets`, a directory
/// inside one, or (read-write) a directory holding one: they would go on using the tree
/// an in-place restore replaces and then deletes. `None` when no engine can be running
/// (its socket does not exist); an engine that does not answer is an error, since its
/// containers may still run.
pub fn users_of(targets: &[PathBuf]) -> Result<Option<Vec<User>>> {
    if super::socket_absent() {
        return Ok(None);
    }
    let engine = Engine::connect()?;
    // Mount sources as the engine reports them may go through symlinks; the targets
    // are resolved up to their parent.
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let targets: Vec<(PathBuf, &PathBuf)> = targets.iter().map(|t| (real(t), t)).collect();
    let mut users = Vec::new();
    for c in engine.all()? {
        if c.state == RunState::Stopped {
            continue;
        }
        // A read-only mount of a directory above a target (a monitoring agent's view
        // of `/`) cannot write into it; one of the target or inside it still serves
        // the replaced tree to the application.
        let reached = c
            .mounts
            .iter()
            .filter_map(|m| Some((real(m.source.as_deref()?), m.read_write)))
            .find_map(|(s, rw)| {
                targets
                    .iter()
                    .find(|(t, _)| s.starts_with(t) || (rw && t.starts_with(&s)))
            });
        if let Some((_, target)) = reached {
            users.push(User {
                name: c.name.clone(),
                project: c.project().map(str::to_string),
                target: (*target).clone(),
            });
        }
    }
    users.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Some(users))
}

/// Compose dependency order (`com.docker.compose.depends_on`: `service:condition[:restart],...`):
/// a container starts after the services it depends on; otherwise by name.
fn start_order(cs: &[Container]) -> Vec<&Container> {
    let deps: BTreeMap<&str, BTreeSet<&str>> = cs
        .iter()
        .map(|c| {
            let d = c
                .labels
                .get("com.docker.compose.depends_on")
                .map(|l| {
                    l.split(',')
                        .filter_map(|e| e.split(':').next())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            (c.name.as_str(), d)
        })
        .collect();
    let mut out: Vec<&Container> = Vec::new();
    let mut left: Vec<&Container> = cs.iter().collect();
    while !left.is_empty() {
        let started: BTreeSet<&str> = out.iter().filter_map(|c| c.service()).collect();
        let present: BTreeSet<&str> = left.iter().filter_map(|c| c.service()).collect();
        // Ready: every dependency that is among these containers has started.
        let ready = left.iter().position(|c| {
            deps[c.name.as_str()]
                .iter()
                .all(|d| started.contains(d) || !present.contains(d))
        });
        // A cycle: start the rest by name.
        out.push(left.remove(ready.unwrap_or(0)));
    }
    out
}

impl Redeploy {
    /// Stops the containers (last started first).
    pub fn stop(&self, engine: &Engine) -> Result<()> {
        for (id, _) in self.containers.iter().rev() {
            let c = engine.inspect(id)?;
            match c.state {
                RunState::Stopped => {}
                RunState::Paused => {
                    engine.unpause(id)?;
                    engine.stop(id, None)?;
                }
                RunState::Running => engine.stop(id, None)?,
            }
        }
        Ok(())
    }

    /// Starts the containers in order and waits until each runs and, where it has a
    /// health check, is healthy. One that still runs is stopped first: a stop this
    /// restore asked for may still be in flight in the engine (volsnap killed while it
    /// waited), and only a stop of our own waits for it to finish.
    pub fn start(&self, engine: &Engine) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(self.health_timeout_s);
        // One at a time, each up (and healthy) before the next: a dependent starts only
        // once what it depends on is ready.
        for (id, name) in &self.containers {
            match engine.inspect(id)?.state {
                RunState::Stopped => {}
                RunState::Paused => {
                    engine.unpause(id)?;
                    engine.stop(id, None)?;
                }
                RunState::Running => engine.stop(id, None)?,
            }
            engine.start(id)?;
            loop {
                let c = engine.inspect(id)?;
                let ok = c.state == RunState::Running
                    && c.health.as_deref().is_none_or(|h| h == "healthy");
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Error::Engine(format!(
                        "container {name} is not {} after {} s (state {:?}, health {})",
                        if c.health.is_some() {
                            "healthy"
                        } else {
                            "running"
                        },
                        self.health_timeout_s,
                        c.state,
                        c.health.as_deref().unwrap_or("none")
                    )));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }
}
