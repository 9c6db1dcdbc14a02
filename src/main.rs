//! The `volsnap` binary: parses arguments, calls one library function per command,
//! renders progress and results, and maps errors to exit codes. The only code that
//! prints or exits.

mod in_place;
mod render;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use volsnap::progress::Progress;
use volsnap::repo::{self, Config, Repository};
use volsnap::store::Location;
use volsnap::{Error, check, inspect, live, restore, snapshot};

/// Exit codes (stable; documented in README.md).
mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const INCOMPLETE: u8 = 3;
    pub const NO_REPOSITORY: u8 = 10;
    pub const BUSY: u8 = 11;
}

#[derive(Parser)]
#[command(
    name = "volsnap",
    version,
    about = "Fast, deduplicating, incremental snapshots of container data volumes"
)]
struct Cli {
    /// Repository: a directory, or s3://BUCKET[/PREFIX] (endpoint, region and credentials
    /// from the AWS_* variables or ~/.aws); it must have been made by `init`
    /// [default: $XDG_DATA_HOME/volsnap or ~/.local/share/volsnap, created by the first
    /// snapshot]
    #[arg(long, global = true, env = "VOLSNAP_REPO")]
    repo: Option<OsString>,
    /// Where this host keeps the derived state (index, files cache, journals) of an
    /// s3:// repository [default: $XDG_CACHE_HOME/volsnap/<repository id> or
    /// ~/.cache/volsnap/<repository id>]
    #[arg(long, global = true, env = "VOLSNAP_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Print one JSON document on stdout instead of text
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a repository (the directory, not its missing parents)
    Init {
        /// Average chunk size in bytes (fixed for the repository's life)
        #[arg(long)]
        chunk_size_avg: Option<u32>,
        /// zstd level for new chunks (1-22)
        #[arg(long)]
        zstd_level: Option<i32>,
    },
    /// Snapshot one or more directories (each becomes a volume of the snapshot), or the
    /// volumes of Docker containers (--container, --project, --label)
    #[command(group(clap::ArgGroup::new("what").required(true).args(["dirs", "container", "project", "label"])))]
    Snapshot {
        dirs: Vec<PathBuf>,
        /// Snapshot the volumes of this container (repeatable)
        #[arg(long, conflicts_with_all = ["dirs", "project", "label"])]
        container: Vec<String>,
        /// Snapshot the volumes of every container of this compose project
        #[arg(long, conflicts_with_all = ["dirs", "label"])]
        project: Option<String>,
        /// Snapshot the volumes of every container with this label (KEY or KEY=VALUE),
        /// one series per compose project or container
        #[arg(long, conflicts_with = "dirs")]
        label: Option<String>,
        /// How containers are kept still while their volumes are read (a container's
        /// volsnap.quiesce label overrides it)
        #[arg(long, default_value = "pause", value_parser = ["pause", "stop", "none"])]
        quiesce: String,
        /// Series name [default: derived from the paths]
        #[arg(long)]
        name: Option<String>,
        /// Tag the snapshot (repeatable)
        #[arg(long)]
        tag: Vec<String>,
        /// Record nothing when no volume changed since the series' latest snapshot
        #[arg(long)]
        skip_if_unchanged: bool,
        /// Leave out paths matching this glob (repeatable; matched against the path
        /// inside the volume and against the file name)
        #[arg(long)]
        exclude: Vec<String>,
        /// Descend into other filesystems mounted inside a volume
        #[arg(long)]
        cross_filesystems: bool,
    },
    /// List snapshots, oldest first
    List {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        tag: Option<String>,
    },
    /// Show one snapshot's record
    Show { snapshot: String },
    /// List the entries of a snapshot directory: SNAP[:path]
    Ls {
        target: OsString,
        /// Long listing: mode, owner, size, mtime
        #[arg(short = 'l')]
        long: bool,
        /// List everything below the path
        #[arg(short, long)]
        recursive: bool,
    },
    /// Show what changed between two snapshots
    Diff { old: String, new: String },
    /// Restore a snapshot, or SNAP:path, into a new or empty directory (--to), or over
    /// the live directories of its volumes, all or nothing (--in-place)
    #[command(group(clap::ArgGroup::new("how").required(true).multiple(true).args(["to", "in_place", "undo", "container", "project"])))]
    Restore {
        /// The snapshot (or SNAP:path with --to); with --undo, the live directory whose
        /// last in-place restore to undo
        #[arg(required_unless_present = "undo")]
        source: Option<OsString>,
        /// Target directory (created if absent)
        #[arg(long, conflicts_with_all = ["in_place", "undo"])]
        to: Option<PathBuf>,
        /// Restore into a non-empty directory
        #[arg(long, requires = "to")]
        force: bool,
        /// Restore only this volume of a multi-volume snapshot
        #[arg(long, requires = "to")]
        volume: Option<String>,
        /// Replace the live directories of the snapshot's volumes (the paths it recorded,
        /// or --map): staged beside them, swapped atomically, journaled, undoable
        #[arg(long, conflicts_with = "undo")]
        in_place: bool,
        /// Restore the pre-restore snapshot of the last in-place restore (of SOURCE, if
        /// given) the same way
        #[arg(long)]
        undo: bool,
        /// LABEL=DIR: restore volume LABEL onto DIR instead of its recorded path
        #[arg(long, value_name = "LABEL=DIR")]
        map: Vec<String>,
        /// Command run (sh -c) before anything changes, e.g. to stop the application;
        /// its failure aborts with nothing changed
        #[arg(long)]
        pre_cmd: Option<String>,
        /// Command run once the targets are settled, restored or rolled back, e.g. to
        /// start the application again
        #[arg(long)]
        post_cmd: Option<String>,
        /// Print what would be added, removed and modified in each volume, and stop
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
        /// Where a target cannot be swapped by rename (a mount point, a filesystem
        /// without RENAME_EXCHANGE), move its top-level entries instead (journaled, all
        /// or nothing)
        #[arg(long)]
        allow_in_place_copy: bool,
        /// Restore in place even though running containers mount a target (they go on
        /// using the replaced tree until restarted); refused without it
        #[arg(long, conflicts_with = "to")]
        ignore_running_containers: bool,
        /// Restore in place onto the volumes of this container as it is now (repeatable):
        /// every container mounting them is stopped, then started again
        #[arg(long, conflicts_with_all = ["to", "in_place", "project", "map", "pre_cmd", "post_cmd"])]
        container: Vec<String>,
        /// Like --container, for every container of this compose project
        #[arg(long, conflicts_with_all = ["to", "in_place", "map", "pre_cmd", "post_cmd"])]
        project: Option<String>,
        /// Seconds to wait for restarted containers to run (and be healthy, if they
        /// have a health check)
        #[arg(long, default_value_t = 60)]
        health_timeout: u64,
        /// When a restarted container does not come up in time, put the previous data
        /// back (the undo) and start it again
        #[arg(long)]
        rollback_on_unhealthy: bool,
    },
    /// Finish or roll back interrupted in-place restores (also done by every command)
    Recover,
    /// List the mounts of Docker containers and whether each can be snapshotted
    #[command(group(clap::ArgGroup::new("which").required(true).args(["containers", "project", "label"])))]
    Volumes {
        /// Containers, by name or id
        containers: Vec<String>,
        /// Every container of this compose project
        #[arg(long, conflicts_with = "containers")]
        project: Option<String>,
        /// Every container with this label (KEY or KEY=VALUE)
        #[arg(long, conflicts_with_all = ["containers", "project"])]
        label: Option<String>,
    },
    /// Write a snapshot, or SNAP:path, as an archive any tar reads
    Export {
        source: OsString,
        /// Output file, or - for standard output
        #[arg(short, long, default_value = "-")]
        output: PathBuf,
        /// Archive format: tar.gz, tar or tar.zst
        #[arg(long, default_value = "tar.gz")]
        format: String,
        /// Compression level (gzip 1-9, default 6; zstd 1-19, default 3)
        #[arg(long)]
        level: Option<u32>,
        /// Export only this volume of a multi-volume snapshot
        #[arg(long)]
        volume: Option<String>,
    },
    /// Copy snapshots into another repository (--to) or out of one (--from), sending
    /// only the blobs it lacks; a snapshot already there is not copied again
    #[command(group(clap::ArgGroup::new("other").required(true).args(["to", "from"])))]
    Copy {
        /// Snapshots to copy [default: every snapshot --name and --tag select]
        snapshots: Vec<String>,
        /// Only this series
        #[arg(long)]
        name: Option<String>,
        /// Only snapshots with this tag
        #[arg(long)]
        tag: Option<String>,
        /// The repository to copy into (--repo is copied from)
        #[arg(long, value_name = "REPO", conflicts_with = "from")]
        to: Option<String>,
        /// The repository to copy from (--repo is copied into)
        #[arg(long, value_name = "REPO")]
        from: Option<String>,
        /// Say what would be copied and sent, and write nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Forget snapshots by id or by retention policy (records only; gc frees the data)
    Forget {
        /// Snapshots to forget (instead of a policy)
        snapshots: Vec<String>,
        /// Only this series
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        keep_last: Option<usize>,
        #[arg(long)]
        keep_hourly: Option<usize>,
        #[arg(long)]
        keep_daily: Option<usize>,
        #[arg(long)]
        keep_weekly: Option<usize>,
        #[arg(long)]
        keep_monthly: Option<usize>,
        #[arg(long)]
        keep_yearly: Option<usize>,
        /// Keep everything within this long of the series' newest snapshot (e.g. 7d, 2w, 1y6m)
        #[arg(long)]
        keep_within: Option<String>,
        /// Keep every snapshot with this tag (repeatable)
        #[arg(long)]
        keep_tag: Vec<String>,
        /// Forget every snapshot (of --name's series); a policy that keeps nothing is
        /// refused without it
        #[arg(long, conflicts_with_all = ["snapshots", "keep_last", "keep_hourly", "keep_daily",
            "keep_weekly", "keep_monthly", "keep_yearly", "keep_within", "keep_tag"])]
        keep_none: bool,
        /// Show what would be kept and removed, and why, without removing anything
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete data no snapshot references; runs beside snapshots, restores and exports
    Gc {
        /// Report what would be reclaimed without changing anything
        #[arg(long)]
        dry_run: bool,
        /// Rewrite packs whose dead share, after punching holes where the filesystem
        /// allows, still exceeds this percentage (0: leave no dead byte)
        #[arg(long, default_value_t = 10.0)]
        max_unused: f64,
        /// Rewrite at most this many live bytes in one run
        #[arg(long)]
        max_repack: Option<u64>,
        /// Object stores: wait at most this long for another host's operation before
        /// stopping with nothing deleted (exit code 11) [env: VOLSNAP_GC_LEASE_WAIT; default 600]
        #[arg(long, value_name = "SECONDS")]
        lease_wait: Option<u64>,
        /// Object stores: declare the host with this id (as gc names it) gone for good
        /// and delete its leases, then collect
        #[arg(long, value_name = "HOSTID")]
        release_host: Option<String>,
    },
    /// Rebuild derived data
    Repair {
        #[command(subcommand)]
        what: RepairWhat,
    },
    /// Verify the repository; --read-data[=PERCENT] also reads and re-hashes blobs
    Check {
        #[arg(long, num_args = 0..=1, default_missing_value = "100", value_name = "PERCENT",
              value_parser = clap::value_parser!(u8).range(1..=100))]
        read_data: Option<u8>,
    },
}

#[derive(Subcommand)]
enum RepairWhat {
    /// Rebuild the index from the packs and snapshot records (the old one is kept as index.redb.old)
    Index,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    volsnap::walk::raise_fd_limit();
    // Deep trees recurse once per directory level on the worker threads.
    // Deep trees recurse once per directory level: run everything on pool threads with
    // large stacks.
    let json = cli.json;
    let result = match rayon::ThreadPoolBuilder::new().stack_size(64 << 20).build() {
        Ok(pool) => pool.install(|| run(cli)),
        Err(e) => Err(anyhow::anyhow!("start worker threads: {e}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::from(exit::OK);
            }
            let code = match e.downcast_ref::<Error>() {
                Some(err) if err.is_no_repository() => exit::NO_REPOSITORY,
                Some(err) if err.is_busy() => exit::BUSY,
                _ => exit::ERROR,
            };
            if json {
                let doc = json!({"error": format!("{e:#}"), "exit_code": code});
                if STDOUT_IS_ARCHIVE.load(std::sync::atomic::Ordering::SeqCst) {
                    eprintln!("{doc}");
                } else {
                    let _ = writeln!(std::io::stdout(), "{doc}");
                }
            }
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Set while stdout carries an archive: then nothing else, not even an error document,
/// may be written to it.
static STDOUT_IS_ARCHIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    let broken = |io: &std::io::Error| io.kind() == std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(broken)
            || matches!(c.downcast_ref::<Error>(), Some(Error::Io { cause, .. }) if broken(cause))
    })
}

/// The repository the command names (`--repo`, `VOLSNAP_REPO`), or the default one.
pub(crate) struct RepoArg {
    pub location: Location,
    /// Named by the user (else the default, created on first use).
    pub named: bool,
    pub opts: repo::OpenOptions,
}

impl RepoArg {
    /// Opens it as it is (no recovery).
    pub fn open_raw(&self) -> anyhow::Result<Repository> {
        Ok(Repository::open_at(&self.location, &self.opts)?)
    }
}

fn repo_arg(cli: &Cli) -> anyhow::Result<RepoArg> {
    let location = match &cli.repo {
        Some(arg) => Location::parse(arg).map_err(|e| Error::Usage(format!("--repo: {e}")))?,
        None => Location::Local(repo::default_path()),
    };
    Ok(RepoArg {
        location,
        named: cli.repo.is_some(),
        opts: repo::OpenOptions {
            cache_dir: cli.cache_dir.clone(),
            ..Default::default()
        },
    })
}

/// Prints `value` as JSON, or `text` for humans.
fn emit(json: bool, value: &Value, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{value}")?;
    } else {
        write!(out, "{}", text())?;
    }
    out.flush()?;
    Ok(())
}

fn split_ref(arg: &OsString) -> (String, Vec<u8>) {
    let bytes = arg.as_bytes();
    match bytes.iter().position(|&b| b == b':') {
        Some(i) => (
            String::from_utf8_lossy(&bytes[..i]).into_owned(),
            bytes[i + 1..].to_vec(),
        ),
        None => (String::from_utf8_lossy(bytes).into_owned(), Vec::new()),
    }
}

/// The repository a snapshot writes to: the default one is created on first use (said
/// once, on stderr); one named by `--repo` or `VOLSNAP_REPO` must exist already, so a
/// mistyped path or an unmounted disk is an error rather than a new repository.
fn open_for_snapshot(target: &RepoArg) -> anyhow::Result<Repository> {
    let repo = if target.named {
        // Other hosts' new packs are indexed only if this snapshot stores new data.
        let opts = repo::OpenOptions {
            defer_pack_logs: true,
            ..target.opts.clone()
        };
        Repository::open_at(&target.location, &opts)?
    } else {
        let (repo, created) = Repository::init_default(Config::default())?;
        if created {
            eprintln!("volsnap: created repository {}", repo.location);
        }
        repo
    };
    recover_quietly(&repo);
    Ok(repo)
}

/// Opens the repository and first recovers any interrupted in-place restore.
fn open(target: &RepoArg) -> anyhow::Result<Repository> {
    let repo = target.open_raw()?;
    recover_quietly(&repo);
    Ok(repo)
}

/// Opens the repository named by `copy --to` or `--from`, as `--repo` is opened: the
/// one place that turns that argument into a repository. `this` is `--repo`'s path: a
/// copy within one repository is refused before it is opened twice.
fn open_other_repo(arg: &str, this: &RepoArg) -> anyhow::Result<Repository> {
    let location = Location::parse(std::ffi::OsStr::new(arg))
        .map_err(|e| Error::Usage(format!("{arg}: {e}")))?;
    if location == this.location {
        return Err(Error::Usage(format!(
            "{arg} is the repository --repo names: copy between two repositories"
        ))
        .into());
    }
    // Its own cache: --cache-dir names the cache of --repo only.
    open(&RepoArg {
        location,
        named: true,
        opts: repo::OpenOptions::default(),
    })
}

/// Recovers interrupted in-place restores and quiesces, saying so on stderr.
fn recover_quietly(repo: &Repository) {
    if volsnap::docker::snapshot::quiesce_pending(repo) {
        match volsnap::docker::snapshot::recover_quiesce(repo) {
            Ok(names) if !names.is_empty() => eprintln!(
                "volsnap: resumed containers an interrupted snapshot had quiesced: {}",
                names.join(", ")
            ),
            Ok(_) => {}
            Err(e) => eprintln!(
                "warning: containers an interrupted snapshot quiesced could not be resumed: \
                 {e:#} (run `volsnap recover`)"
            ),
        }
    }
    match live::recover(repo) {
        Ok(done) => {
            for r in done {
                eprintln!("volsnap: {}", render::recovered_text(&r));
            }
        }
        Err(e) => eprintln!(
            "warning: an interrupted in-place restore could not be recovered: {e:#} \
             (run `volsnap recover`)"
        ),
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let repo_at = repo_arg(&cli)?;
    let named = repo_at.named;
    let json = cli.json;
    let show_progress = !json && std::io::stderr().is_terminal();
    match cli.command {
        Command::Init {
            chunk_size_avg,
            zstd_level,
        } => {
            let mut config = Config::default();
            if let Some(avg) = chunk_size_avg {
                // Minimum a quarter and maximum four times the average, as the defaults.
                (
                    config.chunk_size_min,
                    config.chunk_size_avg,
                    config.chunk_size_max,
                ) = (avg / 4, avg, avg.saturating_mul(4));
            }
            if let Some(level) = zstd_level {
                config.zstd_level = level;
            }
            config
                .validate()
                .map_err(|e| Error::Usage(format!("init: {e}")))?;
            let (repo, created) = if named {
                Repository::init_at(&repo_at.location, config, &repo_at.opts)?
            } else {
                Repository::init_default(config)?
            };
            let value = json!({"repo": repo.location.to_string(), "format_version": volsnap::limits::FORMAT_VERSION, "created": created});
            emit(json, &value, || {
                if created {
                    format!("created repository {}\n", repo.location)
                } else {
                    format!("repository {} already exists\n", repo.location)
                }
            })?;
        }
        Command::Snapshot {
            dirs,
            container,
            project,
            label,
            quiesce,
            name,
            tag,
            skip_if_unchanged,
            exclude,
            cross_filesystems,
        } => {
            if tag.iter().any(|t| t == snapshot::UNDO_TAG) {
                return Err(Error::Usage(format!(
                    "the tag {:?} is reserved for the undo snapshots of in-place restores",
                    snapshot::UNDO_TAG
                ))
                .into());
            }
            if dirs.is_empty() {
                let sel = match (project, label) {
                    (Some(p), _) => volsnap::docker::Selection::Project(p),
                    (_, Some(l)) => volsnap::docker::Selection::Label(l),
                    _ => volsnap::docker::Selection::Containers(container),
                };
                let opts = volsnap::docker::snapshot::Options {
                    series: name,
                    tags: tag,
                    quiesce: volsnap::docker::snapshot::Quiesce::parse(&quiesce)
                        .expect("clap checked the value"),
                    stop_timeout_s: None,
                };
                return in_place::container_snapshot(&repo_at, &sel, &opts, json, show_progress);
            }
            // Refuse bad sources before creating a repository for them.
            for d in &dirs {
                std::fs::metadata(d).map_err(Error::io("snapshot source", d))?;
            }
            let repo = open_for_snapshot(&repo_at)?;
            let opts = snapshot::Options {
                series: name,
                tags: tag,
                skip_if_unchanged,
                excludes: exclude,
                cross_filesystems,
                ..Default::default()
            };
            let progress = Progress::default();
            let outcome = render::with_progress(show_progress, &progress, "snapshot", || {
                snapshot::create(&repo, &dirs, &opts, &progress)
            })?;
            let value = render::snapshot_json(&outcome.listed, outcome.skipped);
            let snap = &outcome.listed.snapshot;
            for w in &outcome.warnings {
                eprintln!("warning: {w}");
            }
            for u in &snap.unreadable {
                eprintln!(
                    "warning: could not read {}: {}",
                    String::from_utf8_lossy(&u.path),
                    u.error
                );
            }
            for n in &snap.notes {
                eprintln!("note: {n}");
            }
            emit(json, &value, || {
                render::snapshot_text(&outcome.listed, outcome.skipped)
            })?;
            if snap.incomplete && !outcome.skipped {
                return Ok(exit::INCOMPLETE);
            }
        }
        Command::List { name, tag } => {
            let repo = open(&repo_at)?;
            let scan = snapshot::record::scan(&repo)?;
            let all: Vec<_> = scan
                .snapshots
                .into_iter()
                .filter(|l| name.as_ref().is_none_or(|n| &l.snapshot.series == n))
                .filter(|l| tag.as_ref().is_none_or(|t| l.snapshot.tags.contains(t)))
                .collect();
            let value = Value::Array(
                all.iter()
                    .map(|l| render::snapshot_json(l, false))
                    .collect(),
            );
            if scan.problems.is_empty() {
                emit(json, &value, || render::list_text(&all))?;
            } else {
                // Snapshots that cannot be listed are never silently missing.
                for (path, why) in &scan.problems {
                    if path.ends_with("index.redb") {
                        eprintln!("error: {why}");
                    } else {
                        eprintln!(
                            "error: snapshot record {} cannot be read: {why} (run `volsnap check`, then `volsnap repair index` or restore the file)",
                            path.display()
                        );
                    }
                }
                let problems: Vec<Value> = scan
                    .problems
                    .iter()
                    .map(|(path, why)| json!({"path": path, "error": why}))
                    .collect();
                let value = json!({"snapshots": value, "problems": problems});
                emit(json, &value, || render::list_text(&all))?;
                return Ok(exit::ERROR);
            }
        }
        Command::Show {
            snapshot: reference,
        } => {
            let repo = open(&repo_at)?;
            let listed = snapshot::resolve(&repo, &reference)?;
            emit(json, &render::snapshot_json(&listed, false), || {
                render::show_text(&listed)
            })?;
        }
        Command::Ls {
            target,
            long,
            recursive,
        } => {
            let repo = open(&repo_at)?;
            let (reference, sub) = split_ref(&target);
            let listed = snapshot::resolve(&repo, &reference)?;
            // Streamed: a listing of millions of entries is never held whole.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut first = true;
            let listed_all =
                inspect::ls_each(&repo, &listed, &sub, recursive, &mut |path, entry| {
                    let io = |e: std::io::Error| volsnap::error::Error::io("write", "stdout")(e);
                    if json {
                        let sep = if first { "[" } else { "," };
                        write!(out, "{sep}{}", render::entry_json(path, entry)).map_err(io)?;
                    } else {
                        out.write_all(render::ls_line(path, entry, long).as_bytes())
                            .map_err(io)?;
                    }
                    first = false;
                    Ok(())
                });
            if let Err(e) = listed_all {
                // Stopped part way (a damaged tree): what was listed stays one
                // complete document, and the error follows on its own line.
                if json && !first {
                    writeln!(out, "]")?;
                }
                out.flush()?;
                return Err(e.into());
            }
            if json {
                writeln!(out, "{}]", if first { "[" } else { "" })?;
            }
            out.flush()?;
        }
        Command::Diff { old, new } => {
            let repo = open(&repo_at)?;
            let a = snapshot::resolve(&repo, &old)?;
            let b = snapshot::resolve(&repo, &new)?;
            let d = inspect::diff(&repo, &a, &b)?;
            emit(json, &render::diff_json(&d), || render::diff_text(&d))?;
        }
        Command::Restore {
            source,
            to,
            force,
            volume,
            in_place,
            undo,
            map,
            pre_cmd,
            post_cmd,
            dry_run,
            yes,
            allow_in_place_copy,
            ignore_running_containers,
            container,
            project,
            health_timeout,
            rollback_on_unhealthy,
        } => {
            if !container.is_empty() || project.is_some() {
                let sel = match project {
                    Some(p) => volsnap::docker::Selection::Project(p),
                    None => volsnap::docker::Selection::Containers(container),
                };
                let how = in_place::ContainerRestore {
                    undo,
                    allow_copy: allow_in_place_copy,
                    ignore_running_containers,
                    health_timeout,
                    rollback: rollback_on_unhealthy,
                    dry_run,
                    yes,
                };
                return in_place::container_restore(
                    &repo_at,
                    source.as_ref(),
                    &sel,
                    &how,
                    json,
                    show_progress,
                );
            }
            if in_place || undo {
                let opts = live::Options {
                    maps: in_place::parse_maps(&map)?,
                    quiesce: pre_cmd.map(live::journal::Hook::Shell),
                    redeploy: post_cmd.map(live::journal::Hook::Shell),
                    dry_run,
                    allow_copy: allow_in_place_copy,
                    ignore_running_containers,
                };
                return in_place::live_restore(
                    &repo_at,
                    source,
                    undo,
                    opts,
                    yes,
                    json,
                    show_progress,
                );
            }
            if !map.is_empty()
                || pre_cmd.is_some()
                || post_cmd.is_some()
                || dry_run
                || yes
                || allow_in_place_copy
                || ignore_running_containers
            {
                return Err(Error::Usage(
                    "--map, --pre-cmd, --post-cmd, --dry-run, --yes, --allow-in-place-copy and \
                     --ignore-running-containers go with --in-place or --undo"
                        .into(),
                )
                .into());
            }
            let (Some(source), Some(to)) = (source, to) else {
                return Err(Error::Usage(
                    "restore needs a snapshot and --to DIR, --in-place or --undo".into(),
                )
                .into());
            };
            let repo = open(&repo_at)?;
            // Held from before the snapshot is resolved: gc keeps what it names.
            let _lease = repo.lease("restore")?;
            let (reference, sub) = split_ref(&source);
            let listed = snapshot::resolve(&repo, &reference)?;
            let opts = restore::Options { force, volume };
            let progress = Progress::default();
            let report = render::with_progress(show_progress, &progress, "restore", || {
                restore::restore(&repo, &listed, &sub, &to, &opts, &progress)
            })?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            let value = json!({
                "snapshot": listed.id.hex(),
                "target": to,
                "files": report.files,
                "dirs": report.dirs,
                "bytes": report.bytes,
                "duration_ms": report.duration_ms,
                "warnings": report.warnings,
            });
            emit(json, &value, || {
                format!(
                    "restored {} files, {} directories, {} from snapshot {} to {} in {:.1}s\n",
                    report.files,
                    report.dirs,
                    render::bytes(report.bytes),
                    listed.id.short(),
                    to.display(),
                    report.duration_ms as f64 / 1000.0
                )
            })?;
        }
        Command::Export {
            source,
            output,
            format,
            level,
            volume,
        } => {
            let format = volsnap::export::Format::parse(&format).ok_or_else(|| {
                Error::Usage(format!(
                    "unknown format {format:?}: use tar.gz, tar or tar.zst"
                ))
            })?;
            let to_stdout = output.as_os_str() == "-";
            STDOUT_IS_ARCHIVE.store(to_stdout, std::sync::atomic::Ordering::SeqCst);
            if to_stdout && std::io::stdout().is_terminal() {
                return Err(Error::Usage(
                    "refusing to write an archive to a terminal: use -o FILE or a pipe".into(),
                )
                .into());
            }
            let repo = open(&repo_at)?;
            // Held from before the snapshot is resolved: gc keeps what it names.
            let _lease = repo.lease("export")?;
            let (reference, sub) = split_ref(&source);
            let listed = snapshot::resolve(&repo, &reference)?;
            let opts = volsnap::export::Options {
                format,
                level,
                volume,
                threads: None,
            };
            let progress = Progress::default();
            let report = render::with_progress(show_progress, &progress, "export", || {
                if to_stdout {
                    volsnap::export::export(
                        &repo,
                        &listed,
                        &sub,
                        std::io::stdout(),
                        &opts,
                        &progress,
                    )
                } else {
                    volsnap::export::export_to_file(&repo, &listed, &sub, &output, &opts, &progress)
                }
            })?;
            let value = json!({
                "snapshot": listed.id.hex(),
                "format": format.name(),
                "output": if to_stdout { "-".into() } else { output.display().to_string() },
                "entries": report.entries,
                "bytes_in": report.bytes_in,
                "bytes_out": report.bytes_out,
                "duration_ms": report.duration_ms,
            });
            let text = format!(
                "exported {} entries, {} of content, as {} of {} in {:.1}s\n",
                report.entries,
                render::bytes(report.bytes_in),
                render::bytes(report.bytes_out),
                format.name(),
                report.duration_ms as f64 / 1000.0
            );
            // With -o -, stdout carries the archive and nothing else.
            if to_stdout {
                if json {
                    eprintln!("{value}");
                } else {
                    eprint!("{text}");
                }
            } else {
                emit(json, &value, || text)?;
            }
        }
        Command::Forget {
            snapshots: refs,
            name,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            keep_within,
            keep_tag,
            keep_none,
            dry_run,
        } => {
            use volsnap::gc::forget;
            let repo = open(&repo_at)?;
            let within_ns = match &keep_within {
                Some(d) => Some(forget::parse_duration(d).ok_or_else(|| {
                    Error::Usage(format!(
                        "--keep-within {d:?}: expected a duration like 7d, 2w, 36h, 1y6m"
                    ))
                })?),
                None => None,
            };
            let policy = forget::Policy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
                within_ns,
                tags: keep_tag,
                keep_none,
            };
            let decisions = if refs.is_empty() {
                // Listed before the undo lifetime is read (see `live::undo_lifetime`).
                let all = snapshot::record::list_complete(&repo, "forget")?;
                let undos = live::undo_lifetime(&repo)?;
                forget::plan(&all, &policy, name.as_deref(), &undos)?
            } else {
                if !policy.is_empty() || name.is_some() {
                    return Err(Error::Usage(
                        "give snapshots to forget, or a policy, not both".into(),
                    )
                    .into());
                }
                let mut out = Vec::new();
                for r in &refs {
                    let listed = snapshot::resolve(&repo, r)?;
                    out.push(forget::Decision {
                        listed,
                        keep: false,
                        reasons: vec!["asked for".into()],
                    });
                }
                out
            };
            let removed: Vec<volsnap::Id> = decisions
                .iter()
                .filter(|d| !d.keep)
                .map(|d| d.listed.id)
                .collect();
            if !dry_run {
                forget::remove(&repo, &removed)?;
            }
            let entry = |d: &forget::Decision| {
                json!({
                    "id": d.listed.id.hex(),
                    "series": d.listed.snapshot.series,
                    "version": d.listed.snapshot.version,
                    "time": render::time(d.listed.snapshot.time_ns),
                    "reasons": d.reasons,
                })
            };
            let value = json!({
                "dry_run": dry_run,
                "kept": decisions.iter().filter(|d| d.keep).map(entry).collect::<Vec<_>>(),
                "removed": decisions.iter().filter(|d| !d.keep).map(entry).collect::<Vec<_>>(),
            });
            emit(json, &value, || {
                let mut out = String::new();
                for d in &decisions {
                    out.push_str(&format!(
                        "{} {} {}@{} {} ({})\n",
                        if d.keep {
                            "keep  "
                        } else if dry_run {
                            "would remove"
                        } else {
                            "remove"
                        },
                        d.listed.id.short(),
                        d.listed.snapshot.series,
                        d.listed.snapshot.version,
                        render::time(d.listed.snapshot.time_ns),
                        d.reasons.join(", ")
                    ));
                }
                out.push_str(&format!(
                    "{} kept, {} {}; run `volsnap gc` to free their data\n",
                    decisions.iter().filter(|d| d.keep).count(),
                    removed.len(),
                    if dry_run {
                        "would be removed"
                    } else {
                        "removed"
                    }
                ));
                out
            })?;
        }
        Command::Copy {
            snapshots,
            name,
            tag,
            to,
            from,
            dry_run,
        } => {
            let every = snapshots.is_empty();
            let selection = volsnap::copy::Selection {
                refs: snapshots,
                series: name,
                tag,
            };
            // With --from, --repo is written to like a snapshot's repository (the default
            // one is made on first use, so a new host can be seeded from a copy).
            let (source, dest) = match (&to, &from) {
                (Some(to), _) => {
                    let source = open(&repo_at)?;
                    let dest = open_other_repo(to, &repo_at)?;
                    (source, dest)
                }
                (None, Some(from)) => {
                    let source = open_other_repo(from, &repo_at)?;
                    let dest = open_for_snapshot(&repo_at)?;
                    (source, dest)
                }
                (None, None) => unreachable!("clap requires --to or --from"),
            };
            let opts = volsnap::copy::Options { dry_run };
            let progress = Progress::default();
            let report = render::with_progress(show_progress, &progress, "copy", || {
                volsnap::copy::copy(&source, &dest, &selection, &opts, &progress)
            })?;
            let value = render::copy_json(
                &report,
                &source.location.to_string(),
                &dest.location.to_string(),
            );
            emit(json, &value, || render::copy_text(&report))?;
            let unreadable = if every { report.problems.len() } else { 0 };
            if let Some(f) = report.failed.first() {
                eprintln!(
                    "error: {} snapshot(s) of {} could not be copied (nothing of them was committed in {}); the first, {} ({}@{}): {}",
                    report.failed.len(),
                    source.location,
                    dest.location,
                    f.source.id.short(),
                    f.source.snapshot.series,
                    f.source.snapshot.version,
                    f.error
                );
                return Ok(exit::ERROR);
            }
            if let Some((path, why)) = report.problems.first().filter(|_| unreadable > 0) {
                eprintln!(
                    "error: {unreadable} snapshot record(s) of {} cannot be read and were not copied; the first, {}: {why} (run `volsnap check`)",
                    source.location,
                    path.display()
                );
                return Ok(exit::ERROR);
            }
        }
        Command::Gc {
            dry_run,
            max_unused,
            max_repack,
            lease_wait,
            release_host,
        } => {
            let repo = open(&repo_at)?;
            let lease_wait = match lease_wait {
                Some(s) => std::time::Duration::from_secs(s),
                None => match std::env::var("VOLSNAP_GC_LEASE_WAIT") {
                    Ok(v) => std::time::Duration::from_secs(v.trim().parse().map_err(|_| {
                        volsnap::error::Error::Usage(format!(
                            "VOLSNAP_GC_LEASE_WAIT={v:?} is not a number of seconds"
                        ))
                    })?),
                    Err(_) => volsnap::gc::DEFAULT_LEASE_WAIT,
                },
            };
            if let Some(host) = release_host {
                let n = volsnap::gc::release_host(&repo, &host)?;
                if !json {
                    eprintln!("gc: released host {host}: {n} lease object(s) deleted");
                }
            }
            let opts = volsnap::gc::Options {
                dry_run,
                max_unused_percent: max_unused,
                max_repack_bytes: max_repack,
                lease_wait,
            };
            let progress = Progress::default();
            let on_wait = |older: &[(u64, volsnap::repo::lease::LeaseRow)]| {
                if !json {
                    let who: Vec<String> = older
                        .iter()
                        .map(|(_, r)| format!("{} (pid {})", r.kind, r.pid))
                        .collect();
                    eprintln!(
                        "gc: waiting for {} operation(s) started before it to finish: {}",
                        older.len(),
                        who.join(", ")
                    );
                }
            };
            let report = volsnap::gc::gc(&repo, &opts, &progress, &on_wait)?;
            let value = json!({
                "dry_run": report.dry_run,
                "snapshots": report.snapshots,
                "blobs": report.blobs,
                "unreachable_blobs": report.unreachable_blobs,
                "unreachable_bytes": report.unreachable_bytes,
                "packs_deleted": report.packs_deleted,
                "packs_punched": report.packs_punched,
                "packs_repacked": report.packs_repacked,
                "bytes_reclaimed": report.bytes_reclaimed,
                "stale_files_removed": report.stale_files_removed,
                "packs_kept": report.packs_kept,
                "blobs_reindexed": report.blobs_reindexed,
                "index_compaction": report.index_compaction,
            });
            if let Some(why) = report
                .index_compaction
                .as_deref()
                .and_then(|c| c.strip_prefix("failed: "))
            {
                eprintln!("warning: the index could not be compacted: {why}");
            }
            if report.blobs_reindexed > 0 {
                eprintln!(
                    "warning: gc found {} referenced blob(s) the index did not name in {} pack(s) and indexed them again (run `volsnap check`)",
                    report.blobs_reindexed, report.packs_kept
                );
            }
            emit(json, &value, || {
                format!(
                    "{} {} unreferenced blobs ({}); {} packs deleted, {} punched, {} repacked; {} {}\n",
                    if report.dry_run {
                        "would delete"
                    } else {
                        "deleted"
                    },
                    report.unreachable_blobs,
                    render::bytes(report.unreachable_bytes),
                    report.packs_deleted,
                    report.packs_punched,
                    report.packs_repacked,
                    render::bytes(report.bytes_reclaimed),
                    if report.dry_run {
                        "reclaimable"
                    } else {
                        "reclaimed"
                    }
                )
            })?;
        }
        Command::Volumes {
            containers,
            project,
            label,
        } => {
            let sel = match (project, label) {
                (Some(p), _) => volsnap::docker::Selection::Project(p),
                (_, Some(l)) => volsnap::docker::Selection::Label(l),
                _ => volsnap::docker::Selection::Containers(containers),
            };
            let engine = volsnap::docker::Engine::connect()?;
            let found = engine.select(&sel)?;
            emit(json, &render::volumes_json(&found), || {
                render::volumes_text(&found)
            })?;
        }
        Command::Recover => {
            let repo = repo_at.open_raw()?;
            let resumed = if volsnap::docker::snapshot::quiesce_pending(&repo) {
                volsnap::docker::snapshot::recover_quiesce(&repo)?
            } else {
                Vec::new()
            };
            for name in &resumed {
                eprintln!("volsnap: resumed container {name}");
            }
            let done = live::recover(&repo)?;
            let value = json!({
                "recovered": done.iter().map(render::recovered_json).collect::<Vec<_>>(),
                "resumed_containers": resumed,
            });
            emit(json, &value, || {
                if done.is_empty() {
                    "nothing to recover\n".to_string()
                } else {
                    done.iter()
                        .map(|r| format!("{}\n", render::recovered_text(r)))
                        .collect()
                }
            })?;
        }
        Command::Repair {
            what: RepairWhat::Index,
        } => {
            let progress = Progress::default();
            let report = render::with_progress(show_progress, &progress, "repair", || {
                volsnap::repo::repair::rebuild_index(&repo_at.location, &repo_at.opts, &progress)
            })?;
            for p in &report.problems {
                eprintln!("warning: {p}");
            }
            let value = json!({
                "packs": report.packs,
                "blobs": report.blobs,
                "damaged_blobs": report.damaged_blobs,
                "snapshots": report.snapshots,
                "logs": report.logs,
                "packs_scanned": report.packs_scanned,
                "problems": report.problems,
            });
            emit(json, &value, || {
                format!(
                    "index rebuilt: {} packs, {} blobs, {} snapshots; {} damaged blobs left out\n",
                    report.packs, report.blobs, report.snapshots, report.damaged_blobs
                )
            })?;
        }
        Command::Check { read_data } => {
            let repo = open(&repo_at)?;
            let progress = Progress::default();
            let opts = check::Options {
                read_data_percent: read_data,
            };
            let report = render::with_progress(show_progress, &progress, "check", || {
                check::check(&repo, opts, &progress)
            })?;
            emit(json, &render::check_json(&report), || {
                render::check_text(&report)
            })?;
            if !report.ok() {
                return Ok(exit::ERROR);
            }
        }
    }
    Ok(exit::OK)
}
