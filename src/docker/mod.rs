//! Docker: everything that talks to the engine, through bollard on a private tokio
//! runtime behind a blocking API. Nothing else in volsnap depends on an engine: the
//! store, snapshots, export and restore work without one.
//!
//! Every engine failure becomes one line that names what failed and, where it helps,
//! what to do (no engine, permission denied on the socket, a container that is gone,
//! an API version the engine does not speak).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptionsBuilder, StartContainerOptions,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod restore;
pub mod snapshot;

/// The compose labels that name a container's project and service.
pub const COMPOSE_PROJECT: &str = "com.docker.compose.project";
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// A connection to the local Docker engine.
pub struct Engine {
    rt: tokio::runtime::Runtime,
    docker: Docker,
}

/// What a container is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Paused,
    /// Created, exited, dead, restarting...: not running.
    Stopped,
}

/// A container as the engine describes it now (never environment variables: they
/// hold secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    /// Without the leading '/'.
    pub name: String,
    /// The image as the container was created from it (`name:tag`).
    pub image: String,
    /// The image's id (`sha256:...`): the digest of its configuration.
    pub image_id: String,
    /// The image's registry digests (`name@sha256:...`); none for an image that was
    /// built or imported locally.
    pub repo_digests: Vec<String>,
    pub state: RunState,
    /// Health status when the container has a health check ("healthy", "starting"...).
    pub health: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
}

impl Container {
    /// The compose project, if the container belongs to one.
    pub fn project(&self) -> Option<&str> {
        self.labels.get(COMPOSE_PROJECT).map(String::as_str)
    }

    /// The compose service, if the container belongs to one.
    pub fn service(&self) -> Option<&str> {
        self.labels.get(COMPOSE_SERVICE).map(String::as_str)
    }
}

/// One mount of a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// "bind", "volume", "tmpfs", or whatever else the engine reports.
    pub kind: String,
    /// Where the container sees it.
    pub destination: String,
    /// Where it is on this host (a bind's source, a named volume's mountpoint).
    pub source: Option<PathBuf>,
    /// A named volume's name.
    pub volume: Option<String>,
    /// A named volume's driver.
    pub driver: Option<String>,
    pub read_write: bool,
    /// Why it cannot be snapshotted; `None`: it can.
    pub not_snapshottable: Option<String>,
}

/// Which containers a command is about.
#[derive(Clone, Debug)]
pub enum Selection {
    /// By name or id.
    Containers(Vec<String>),
    /// Every container of a compose project.
    Project(String),
    /// Every container with this label (`KEY` or `KEY=VALUE`).
    Label(String),
}

/// The unix socket `Engine::connect` talks to, when it talks to one: `DOCKER_HOST`
/// when it names `unix://PATH`, the default socket when `DOCKER_HOST` is unset, `None`
/// for any other transport.
fn unix_socket() -> Option<PathBuf> {
    const DEFAULT: &str = "/var/run/docker.sock";
    match std::env::var("DOCKER_HOST") {
        Err(_) => Some(DEFAULT.into()),
        Ok(h) if h.is_empty() => Some(DEFAULT.into()),
        Ok(h) => h.strip_prefix("unix://").map(PathBuf::from),
    }
}

/// Whether no Docker engine can be running here: its unix socket does not exist.
/// Anything else (a socket nobody answers on, permission denied, another transport)
/// is not proof that no container runs.
pub fn socket_absent() -> bool {
    unix_socket().is_some_and(
        |p| matches!(std::fs::metadata(&p), Err(e) if e.kind() == std::io::ErrorKind::NotFound),
    )
}

impl Engine {
    /// Connects to the local engine (`DOCKER_HOST` if it names a unix socket, else
    /// `/var/run/docker.sock`) and agrees on an API version with it.
    pub fn connect() -> Result<Engine> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Engine(format!("start the Docker client: {e}")))?;
        let docker = Docker::connect_with_local_defaults().map_err(|e| engine_error(e, None))?;
        let docker = rt
            .block_on(docker.negotiate_version())
            .map_err(|e| engine_error(e, None))?;
        Ok(Engine { rt, docker })
    }

    /// The container named `name` (or with id `name`) as it is now.
    pub fn inspect(&self, name: &str) -> Result<Container> {
        let c = self
            .rt
            .block_on(
                self.docker
                    .inspect_container(name, None::<InspectContainerOptions>),
            )
            .map_err(|e| engine_error(e, Some(name)))?;
        let config = c.config.unwrap_or_default();
        let state = c.state.unwrap_or_default();
        let run_state = if state.paused == Some(true) {
            RunState::Paused
        } else if state.running == Some(true) {
            RunState::Running
        } else {
            RunState::Stopped
        };
        // `--tmpfs` mounts are listed only in the host config.
        let tmpfs: Vec<String> = c
            .host_config
            .as_ref()
            .and_then(|h| h.tmpfs.as_ref())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let mut mounts: Vec<Mount> = c
            .mounts
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let kind = m.typ.unwrap_or_default();
                let source = m.source.filter(|s| !s.is_empty()).map(PathBuf::from);
                let driver = m.driver.filter(|d| !d.is_empty());
                let not_snapshottable =
                    why_not_snapshottable(&kind, source.as_ref(), driver.as_deref());
                Mount {
                    kind,
                    destination: m.destination.unwrap_or_default(),
                    source,
                    volume: m.name.filter(|n| !n.is_empty()),
                    driver,
                    read_write: m.rw.unwrap_or(false),
                    not_snapshottable,
                }
            })
            .collect();
        for destination in tmpfs {
            if !mounts.iter().any(|m| m.destination == destination) {
                mounts.push(Mount {
                    kind: "tmpfs".into(),
                    destination,
                    source: None,
                    volume: None,
                    driver: None,
                    read_write: true,
                    not_snapshottable: why_not_snapshottable("tmpfs", None, None),
                });
            }
        }
        mounts.sort_by(|a, b| a.destination.cmp(&b.destination));
        let image_id = c.image.unwrap_or_default();
        let repo_digests = if image_id.is_empty() {
            Vec::new()
        } else {
            self.rt
                .block_on(self.docker.inspect_image(&image_id))
                .ok()
                .and_then(|i| i.repo_digests)
                .unwrap_or_default()
        };
        Ok(Container {
            id: c.id.unwrap_or_default(),
            name: c
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            image: config.image.unwrap_or_default(),
            image_id,
            repo_digests,
            state: run_state,
            health: state
                .health
                .and_then(|h| h.status)
                .map(|s| s.to_string())
                .filter(|s| !s.is_empty() && s != "none"),
            labels: config.labels.unwrap_or_default().into_iter().collect(),
            mounts,
        })
    }

    /// The containers `sel` names, each as it is now, in a stable order (by name).
    pub fn select(&self, sel: &Selection) -> Result<Vec<Container>> {
        let names: Vec<String> = match sel {
            Selection::Containers(names) => names.clone(),
            Selection::Project(p) => self.list_by_label(&format!("{COMPOSE_PROJECT}={p}"))?,
            Selection::Label(l) => self.list_by_label(l)?,
        };
        if names.is_empty() {
            return Err(Error::Engine(match sel {
                Selection::Containers(_) => "no container named".into(),
                Selection::Project(p) => format!("no container belongs to compose project {p:?}"),
                Selection::Label(l) => format!("no container has the label {l:?}"),
            }));
        }
        let mut out = names
            .iter()
            .map(|n| self.inspect(n))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.id == b.id);
        Ok(out)
    }

    /// Every container of the engine, running or not, each as it is now.
    pub fn all(&self) -> Result<Vec<Container>> {
        let opts = ListContainersOptionsBuilder::new().all(true).build();
        let list = self
            .rt
            .block_on(self.docker.list_containers(Some(opts)))
            .map_err(|e| engine_error(e, None))?;
        let mut out = Vec::new();
        for id in list.into_iter().filter_map(|c| c.id) {
            match self.inspect(&id) {
                Ok(c) => out.push(c),
                // Removed since it was listed.
                Err(Error::Engine(why)) if why.contains("does not exist") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn list_by_label(&self, label: &str) -> Result<Vec<String>> {
        let filters = HashMap::from([("label", vec![label])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .rt
            .block_on(self.docker.list_containers(Some(opts)))
            .map_err(|e| engine_error(e, None))?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Freezes every process of the container (the cgroup freezer).
    pub fn pause(&self, id: &str) -> Result<()> {
        self.rt
            .block_on(self.docker.pause_container(id))
            .map_err(|e| engine_error(e, Some(id)))
    }

    pub fn unpause(&self, id: &str) -> Result<()> {
        self.rt
            .block_on(self.docker.unpause_container(id))
            .map_err(|e| engine_error(e, Some(id)))
    }

    /// Stops the container, giving it `timeout_s` seconds before SIGKILL (`None`: its
    /// own stop timeout, e.g. compose's `stop_grace_period`).
    pub fn stop(&self, id: &str, timeout_s: Option<i32>) -> Result<()> {
        let mut opts = StopContainerOptionsBuilder::new();
        if let Some(t) = timeout_s {
            opts = opts.t(t);
        }
        let opts = opts.build();
        self.rt
            .block_on(self.docker.stop_container(id, Some(opts)))
            .map_err(|e| engine_error(e, Some(id)))
    }

    pub fn start(&self, id: &str) -> Result<()> {
        self.rt
            .block_on(
                self.docker
                    .start_container(id, None::<StartContainerOptions>),
            )
            .map_err(|e| engine_error(e, Some(id)))
    }

    /// Runs `sh -c command` inside the container; returns its exit code and output.
    pub fn exec(&self, id: &str, command: &str) -> Result<(i64, String)> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        let failed = |e| engine_error(e, Some(id));
        self.rt.block_on(async {
            let exec = self
                .docker
                .create_exec(
                    id,
                    CreateExecOptions {
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        cmd: Some(vec!["sh", "-c", command]),
                        ..Default::default()
                    },
                )
                .await
                .map_err(failed)?;
            let mut output = String::new();
            if let StartExecResults::Attached {
                output: mut out, ..
            } = self
                .docker
                .start_exec(&exec.id, None)
                .await
                .map_err(failed)?
            {
                while let Some(chunk) = out.next().await {
                    output.push_str(&chunk.map_err(failed)?.to_string());
                }
            }
            let done = self.docker.inspect_exec(&exec.id).await.map_err(failed)?;
            Ok((done.exit_code.unwrap_or(-1), output))
        })
    }
}

/// Why a mount cannot be snapshotted, or `None`.
fn why_not_snapshottable(
    kind: &str,
    source: Option<&PathBuf>,
    driver: Option<&str>,
) -> Option<String> {
    match kind {
        "tmpfs" => return Some("tmpfs holds nothing persistent".into()),
        "bind" | "volume" => {}
        other => return Some(format!("a {other} mount is not a directory on this host")),
    }
    if let Some(d) = driver.filter(|d| *d != "local") {
        return Some(format!(
            "volume driver {d:?} may keep its data off this host"
        ));
    }
    let Some(source) = source else {
        return Some("the engine reports no host path for it".into());
    };
    match std::fs::metadata(source) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(format!(
            "{} is a file, not a directory (volsnap snapshots directories)",
            source.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "{} does not exist (yet) on this host",
            source.display()
        )),
        Err(e) => Some(format!("{} cannot be read: {e}", source.display())),
    }
}

/// One line for an engine failure, with a hint where one helps.
fn engine_error(e: EngineError, container: Option<&str>) -> Error {
    let socket = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "/var/run/docker.sock".into());
    // A connection failure hides its cause a few sources down.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    return Error::Engine(format!(
                        "permission denied on the Docker socket {socket}: run as root or as a \
                         member of the docker group"
                    ));
                }
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    return Error::Engine(format!(
                        "no Docker engine at {socket}: is it running? (DOCKER_HOST names \
                         another socket)"
                    ));
                }
                _ => {}
            }
        }
        cause = c.source();
    }
    Error::Engine(match &e {
        EngineError::SocketNotFoundError(path) => {
            format!("no Docker engine at {path}: is it running? (DOCKER_HOST names another socket)")
        }
        EngineError::DockerResponseServerError {
            status_code: 404,
            message,
        } => match container {
            Some(c) => format!("container {c:?} does not exist (any more): {message}"),
            None => format!("the engine says: {message}"),
        },
        EngineError::DockerResponseServerError {
            status_code,
            message,
        } if message.contains("client version") || message.contains("API version") => format!(
            "the Docker engine does not speak the API version volsnap asked for \
             ({status_code}: {message}); upgrade the engine"
        ),
        EngineError::DockerResponseServerError { message, .. } => match container {
            Some(c) => format!("container {c:?}: {message}"),
            None => format!("the engine says: {message}"),
        },
        EngineError::IOError { err } if err.kind() == std::io::ErrorKind::PermissionDenied => {
            format!(
                "permission denied on the Docker socket {socket}: run as root or as a member \
                 of the docker group"
            )
        }
        EngineError::IOError { err } if err.kind() == std::io::ErrorKind::NotFound => {
            format!("no Docker engine at {socket}: is it running?")
        }
        _ => {
            let text = e.to_string();
            if text.contains("Permission denied") {
                format!(
                    "permission denied on the Docker socket {socket}: run as root or as a \
                     member of the docker group"
                )
            } else if text.contains("No such file") || text.contains("Connection refused") {
                format!("no Docker engine at {socket}: is it running? ({text})")
            } else {
                format!("Docker engine at {socket}: {text}")
            }
        }
    })
}
