//! Shared fixtures: a scratch repository that runs the real binary, tree
//! builders, and a tree comparison that works on paths longer than PATH_MAX.

// `Stat`'s field types differ between architectures; the casts are needed on some.
#![allow(clippy::unnecessary_cast)]

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, Stat, Timespec, Timestamps};
use serde_json::Value;

pub const NOBODY: u32 = 65534;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_volsnap")
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether `CI` is set to a true value: anything but empty, `0`, `false`, `no` and
/// `off` (any case), as CI services set it (`true`, `1`, `yes`).
pub fn in_ci(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !v.is_empty() && !["0", "false", "no", "off"].contains(&v.as_str())
    })
}

/// A component a test drives (the Docker engine, Garage) is missing, as `why` says:
/// in CI that fails the test, since CI must run it; elsewhere the caller skips the
/// test after this note.
#[track_caller]
pub fn missing_component(why: &str) {
    let ci = std::env::var("CI").ok();
    assert!(
        !in_ci(ci.as_deref()),
        "CI={ci:?} but {why}: these tests must run in CI"
    );
    eprintln!("{why}: skipping");
}

/// A scratch directory on the real disk holding a repository (`new`: made by
/// `volsnap init`; `uninit`: only a path) and any data directories.
pub struct Repo {
    pub tmp: tempfile::TempDir,
    pub path: PathBuf,
    /// When set, every command runs as this uid/gid through `setpriv`.
    pub run_as: Option<u32>,
    /// An object-store repository instead of `path`: its `s3://` location, the
    /// environment that reaches the store, and this "host"'s cache directory.
    pub remote: Option<Remote>,
}

/// Where an object-store repository is and how a command reaches it.
#[derive(Clone)]
pub struct Remote {
    pub url: String,
    pub env: Vec<(String, String)>,
    pub cache: PathBuf,
}

impl Repo {
    /// A scratch directory with an initialised repository at `path`.
    pub fn new() -> Repo {
        let repo = Repo::uninit();
        repo.ok(["init"]);
        repo
    }

    /// A scratch directory whose repository `path` does not exist yet.
    pub fn uninit() -> Repo {
        let tmp = tempfile::Builder::new()
            .prefix("volsnap-it-")
            .tempdir_in(std::env::temp_dir())
            .expect("create tempdir");
        let path = tmp.path().join("repo");
        Repo {
            tmp,
            path,
            run_as: None,
            remote: None,
        }
    }

    /// A repository at `url` (`s3://...`) reached with `env`, with a cache of its own
    /// in the scratch directory (one "host"), not initialised.
    pub fn remote(url: &str, env: Vec<(String, String)>) -> Repo {
        let mut repo = Repo::uninit();
        let cache = repo.scratch("cache");
        repo.remote = Some(Remote {
            url: url.to_owned(),
            env,
            cache,
        });
        repo
    }

    /// The local directory of the repository's derived state: the repository directory,
    /// or the cache of an object-store repository (index, locks, journals).
    pub fn local_dir(&self) -> PathBuf {
        match &self.remote {
            None => self.path.clone(),
            Some(r) => r.cache.clone(),
        }
    }

    /// Another "host" of the same object-store repository: its own scratch directory
    /// and cache.
    pub fn other_host(&self) -> Repo {
        let remote = self.remote.as_ref().expect("an object-store repository");
        Repo::remote(&remote.url, remote.env.clone())
    }

    /// A path inside the scratch directory (not created).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Creates and returns an empty directory inside the scratch directory.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.scratch(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// A `Command` for the binary with `--repo` set.
    pub fn command(&self) -> Command {
        let mut cmd = match self.run_as {
            None => Command::new(bin()),
            Some(id) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={id}"))
                    .arg(format!("--regid={id}"))
                    .arg("--clear-groups")
                    .arg(bin());
                c
            }
        };
        cmd.env_remove("VOLSNAP_REPO");
        cmd.env_remove("VOLSNAP_CACHE_DIR");
        match &self.remote {
            None => {
                cmd.arg("--repo").arg(&self.path);
            }
            Some(r) => {
                for (k, _) in std::env::vars_os() {
                    if k.to_string_lossy().starts_with("AWS_") {
                        cmd.env_remove(k);
                    }
                }
                cmd.envs(r.env.iter().map(|(k, v)| (k, v)));
                cmd.arg("--repo")
                    .arg(&r.url)
                    .arg("--cache-dir")
                    .arg(&r.cache);
            }
        }
        cmd
    }

    /// Runs `volsnap --repo R ARGS...` (human output).
    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command();
        cmd.args(args);
        Run::from_command(cmd)
    }

    /// Runs `volsnap --repo R --json ARGS...`.
    pub fn run_json<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command();
        cmd.arg("--json").args(args);
        Run::from_command(cmd)
    }

    /// Runs with `--json`, asserts exit 0 and returns the parsed document. A restore
    /// (to a directory or in place) must report no warnings: each is something it
    /// could not reproduce, and a test that expects one reads it with `run_json`.
    #[track_caller]
    pub fn ok<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let run = self.run_json(&args).code(0);
        let v = run.json();
        if args.first().is_some_and(|a| a == "restore") {
            let warnings = &v["warnings"];
            assert!(
                warnings.is_null() || warnings.as_array().is_some_and(|w| w.is_empty()),
                "the restore warned\n{}",
                run.describe()
            );
        }
        v
    }

    /// `snapshot DIRS... EXTRA...` with `--json`, expecting exit 0.
    pub fn snapshot(&self, dirs: &[&Path], extra: &[&str]) -> Value {
        let mut args: Vec<OsString> = vec!["snapshot".into()];
        args.extend(dirs.iter().map(|d| d.as_os_str().to_owned()));
        args.extend(extra.iter().map(OsString::from));
        let snap = self.ok(&args);
        assert_snapshot_shape(&snap);
        snap
    }

    /// `restore SNAP --to DIR` with `--json`, expecting exit 0.
    pub fn restore(&self, snap: &str, to: &Path) -> Value {
        let out = self.ok([
            OsStr::new("restore"),
            OsStr::new(snap),
            OsStr::new("--to"),
            to.as_os_str(),
        ]);
        assert!(
            out["files"].is_u64() && out["bytes"].is_u64(),
            "restore output lacks counts: {out}"
        );
        assert_eq!(
            out["target"].as_str(),
            to.to_str(),
            "restore output names another target: {out}"
        );
        out
    }

    pub fn list(&self, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["list"];
        args.extend_from_slice(extra);
        match self.ok(args) {
            Value::Array(a) => a,
            other => panic!("list did not print an array: {other}"),
        }
    }

    /// `ls SNAP[:path] [flags]` as a map from path to entry.
    pub fn ls(&self, target: &str, flags: &[&str]) -> BTreeMap<String, Value> {
        let mut args = vec!["ls", target];
        args.extend_from_slice(flags);
        let v = self.ok(args);
        let arr = v
            .as_array()
            .unwrap_or_else(|| panic!("ls did not print an array: {v}"));
        let mut m = BTreeMap::new();
        for e in arr {
            let p = e["path"]
                .as_str()
                .unwrap_or_else(|| panic!("ls entry without path: {e}"));
            assert!(
                m.insert(p.to_owned(), e.clone()).is_none(),
                "ls lists {p} twice"
            );
        }
        m
    }
}

/// The outcome of one run of the binary.
#[derive(Debug)]
pub struct Run {
    pub cmd: String,
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn from_command(mut cmd: Command) -> Run {
        let desc = format!("{cmd:?}");
        cmd.stdin(Stdio::null());
        let out: Output = cmd.output().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        Run::from_output(desc, out)
    }

    /// The outcome of a finished process; fails the test if the binary panicked.
    pub fn from_output(cmd: String, out: Output) -> Run {
        let run = Run {
            cmd,
            status: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(
            !run.stderr.contains("panicked"),
            "the binary panicked:\n{}",
            run.describe()
        );
        run
    }

    pub fn describe(&self) -> String {
        let stdout = String::from_utf8_lossy(&self.stdout);
        let stdout: String = stdout.chars().take(4000).collect();
        format!(
            "command: {}\nexit: {}\nstdout: {}\nstderr: {}",
            self.cmd, self.status, stdout, self.stderr
        )
    }

    #[track_caller]
    pub fn code(self, expected: i32) -> Run {
        assert_eq!(
            self.status,
            expected,
            "unexpected exit code\n{}",
            self.describe()
        );
        self
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stdout and stderr together, for "is it mentioned anywhere" checks.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout_str(), self.stderr)
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not one JSON document ({e})\n{}", self.describe())
        })
    }

    /// Asserts the failure was reported as one line on stderr starting with
    /// `error: `, and returns that line.
    #[track_caller]
    pub fn error_line(&self) -> String {
        assert_ne!(self.status, 0, "expected a failure\n{}", self.describe());
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            !lines.is_empty() && lines[0].starts_with("error: "),
            "stderr should start with an `error: ` line\n{}",
            self.describe()
        );
        assert_eq!(
            lines.len(),
            1,
            "the error should be one line\n{}",
            self.describe()
        );
        lines[0].to_owned()
    }
}

pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[track_caller]
pub fn assert_snapshot_shape(snap: &Value) {
    let id = snap["id"]
        .as_str()
        .unwrap_or_else(|| panic!("snapshot without id: {snap}"));
    assert!(is_hex(id, 64), "id is not 64 hex: {snap}");
    assert_eq!(
        snap["short_id"].as_str(),
        Some(&id[..8]),
        "short_id: {snap}"
    );
    assert!(snap["series"].is_string(), "series: {snap}");
    assert!(
        snap["version"].as_u64().is_some_and(|v| v >= 1),
        "version: {snap}"
    );
    assert!(
        snap["time_ns"].is_i64() || snap["time_ns"].is_u64(),
        "time_ns: {snap}"
    );
    assert!(snap["parent"].is_null() || snap["parent"].as_str().is_some_and(|p| is_hex(p, 64)));
    assert!(snap["tags"].is_array(), "tags: {snap}");
    assert!(
        snap["incomplete"].is_boolean() && snap["skipped"].is_boolean(),
        "{snap}"
    );
    let vols = snap["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("volumes: {snap}"));
    for v in vols {
        assert!(v["label"].is_string(), "volume label: {snap}");
        assert!(
            v["source"].as_str().is_some_and(|s| s.starts_with('/')),
            "volume source: {snap}"
        );
        assert!(
            v["tree"].as_str().is_some_and(|t| is_hex(t, 64)),
            "volume tree: {snap}"
        );
    }
    for k in [
        "files",
        "dirs",
        "bytes",
        "bytes_read",
        "new_bytes_stored",
        "new_chunks",
        "duration_ms",
    ] {
        assert!(snap["stats"][k].is_u64(), "stats.{k}: {snap}");
    }
    assert!(
        snap["unreadable"].is_array() && snap["notes"].is_array(),
        "{snap}"
    );
}

pub fn id(snap: &Value) -> String {
    snap["id"].as_str().unwrap().to_owned()
}

pub fn stat_u64(snap: &Value, key: &str) -> u64 {
    snap["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("stats.{key} missing: {snap}"))
}

// ---------------------------------------------------------------- builders

/// Deterministic incompressible bytes.
pub fn random_bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

pub fn write(path: impl AsRef<Path>, content: impl AsRef<[u8]>) {
    let path = path.as_ref();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    set_mtime_at(CWD, path.as_os_str(), sec, nsec);
}

pub fn set_mtime_at<Fd: AsFd>(dir: Fd, name: &OsStr, sec: i64, nsec: i64) {
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: sec,
            tv_nsec: nsec as _,
        },
        last_modification: Timespec {
            tv_sec: sec,
            tv_nsec: nsec as _,
        },
    };
    rustix::fs::utimensat(dir, name, &ts, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {name:?}: {e}"));
}

pub fn mtime_of(path: &Path) -> (i64, i64) {
    let st = rustix::fs::lstat(path).unwrap();
    (st.st_mtime as i64, st.st_mtime_nsec as i64)
}

pub const Y2020: i64 = 1_577_836_800;

/// Sets every entry's mtime below and including `root` to a distinct value
/// with a non-zero nanosecond part, children before their directory, so that
/// later creations do not disturb directory times. Works past PATH_MAX.
pub fn set_tree_mtimes(root: &Path, base_sec: i64) {
    let fd = open_dir_at(CWD, root.as_os_str());
    let mut counter = 0i64;
    set_mtimes_in(&fd, base_sec, &mut counter);
    counter += 1;
    set_mtime(
        root,
        base_sec + counter,
        (counter * 7_919_993) % 1_000_000_000,
    );
}

fn set_mtimes_in(dir: &OwnedFd, base: i64, counter: &mut i64) {
    for name in read_names(dir) {
        let name = OsStr::from_bytes(&name);
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        if FileType::from_raw_mode(st.st_mode as _) == FileType::Directory {
            let sub = open_dir_at(dir, name);
            set_mtimes_in(&sub, base, counter);
        }
        *counter += 1;
        set_mtime_at(
            dir,
            name,
            base + *counter,
            (*counter * 7_919_993) % 1_000_000_000 + 1,
        );
    }
}

/// The latest mtime or ctime of any entry below and including `root`, in ns.
pub fn latest_change_ns(root: &Path) -> i64 {
    fn ns(st: &Stat) -> i64 {
        let m = st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64;
        let c = st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64;
        m.max(c)
    }
    fn walk(dir: &OwnedFd, latest: &mut i64) {
        for name in read_names(dir) {
            let name = OsStr::from_bytes(&name);
            let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).unwrap();
            *latest = (*latest).max(ns(&st));
            if FileType::from_raw_mode(st.st_mode as _) == FileType::Directory {
                walk(&open_dir_at(dir, name), latest);
            }
        }
    }
    let fd = open_dir_at(CWD, root.as_os_str());
    let mut latest = ns(&rustix::fs::fstat(&fd).unwrap());
    walk(&fd, &mut latest);
    latest
}

/// Returns once every mtime and ctime below `root` lies more than the racily-clean
/// window (one second) in the past, so that the next snapshot trusts the files cache
/// for them. A ctime cannot be set, only waited out: this polls the clock until the
/// condition holds (file times never run ahead of the real-time clock).
pub fn wait_out_racy_window(root: &Path) {
    let latest = latest_change_ns(root);
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        if now - 1_000_000_000 > latest + 10_000_000 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn open_dir_at<Fd: AsFd>(dir: Fd, name: &OsStr) -> OwnedFd {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open directory {name:?}: {e}"))
}

pub fn read_names(dir: &OwnedFd) -> Vec<Vec<u8>> {
    let mut d = Dir::read_from(dir).unwrap();
    let mut names = Vec::new();
    while let Some(e) = d.read() {
        let e = e.unwrap();
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort();
    names
}

/// Builds a chain of directories whose names are `name_len` bytes long under
/// `root` until the total path below root exceeds `min_total` bytes, and puts
/// a file and a symlink at the bottom. Returns the relative path of the file.
pub fn make_deep_path(root: &Path, min_total: usize, name_len: usize) -> Vec<u8> {
    let mut fd = open_dir_at(CWD, root.as_os_str());
    let mut rel: Vec<u8> = Vec::new();
    let mut level = 0;
    while rel.len() <= min_total {
        let mut name = format!("deep{level:03}-").into_bytes();
        name.resize(name_len, b'x' + (level % 3) as u8);
        let name = OsStr::from_bytes(&name);
        rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755)).unwrap();
        fd = open_dir_at(&fd, name);
        rel.extend_from_slice(name.as_bytes());
        rel.push(b'/');
        level += 1;
    }
    let file = rustix::fs::openat(
        &fd,
        "leaf.txt",
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o640),
    )
    .unwrap();
    let mut file = File::from(file);
    std::io::Write::write_all(&mut file, b"at the bottom of a very long path\n").unwrap();
    rustix::fs::symlinkat("leaf.txt", &fd, "leaf-link").unwrap();
    rel.extend_from_slice(b"leaf.txt");
    rel
}

/// Reads a file at a path relative to `root` that may exceed PATH_MAX.
pub fn read_deep(root: &Path, rel: &[u8]) -> Vec<u8> {
    let mut fd = open_dir_at(CWD, root.as_os_str());
    let comps: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
    for c in &comps[..comps.len() - 1] {
        fd = open_dir_at(&fd, OsStr::from_bytes(c));
    }
    let f = rustix::fs::openat(
        &fd,
        OsStr::from_bytes(comps[comps.len() - 1]),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    let mut out = Vec::new();
    File::from(f).read_to_end(&mut out).unwrap();
    out
}

/// Recursively chowns a tree (without following symlinks).
pub fn chown_tree(root: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(root, Some(uid), Some(gid)).unwrap();
    let meta = std::fs::symlink_metadata(root).unwrap();
    if meta.is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

// ------------------------------------------------------------ comparison

#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    /// Directories' sizes depend on their history and are not compared.
    pub size: Option<u64>,
    pub content: Option<blake3::Hash>,
    pub target: Option<Vec<u8>>,
    pub rdev: Option<u64>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub entries: BTreeMap<Vec<u8>, Meta>,
    /// Non-directory path → the smallest path sharing its inode in this tree.
    pub link_group: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Regular file path → its holes (start, end), as `SEEK_DATA`/`SEEK_HOLE` report
    /// them; files without holes are not listed.
    pub holes: BTreeMap<Vec<u8>, Vec<(u64, u64)>>,
}

/// The holes of an open regular file of `size` bytes, as `SEEK_DATA`/`SEEK_HOLE`
/// report them (none where the filesystem does not tell).
pub fn holes_of(fd: BorrowedFd<'_>, size: u64) -> Vec<(u64, u64)> {
    use rustix::fs::SeekFrom;
    let mut holes = Vec::new();
    let mut pos = 0;
    while pos < size {
        match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(start) => {
                if start > pos {
                    holes.push((pos, start));
                }
                pos = rustix::fs::seek(fd, SeekFrom::Hole(start)).unwrap();
            }
            Err(rustix::io::Errno::NXIO) => {
                holes.push((pos, size));
                break;
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOTSUP) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        }
    }
    rustix::fs::seek(fd, SeekFrom::Start(0)).unwrap();
    holes
}

fn kind_of(st: &Stat) -> &'static str {
    match FileType::from_raw_mode(st.st_mode as _) {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "chardev",
        FileType::BlockDevice => "blockdev",
        FileType::Unknown => "unknown",
    }
}

fn xattrs_at(dir: BorrowedFd<'_>, name: Option<&[u8]>) -> BTreeMap<Vec<u8>, Vec<u8>> {
    // Through /proc/self/fd so that the path stays short however deep we are;
    // the l-variants do not follow a final symlink.
    let mut path = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if let Some(n) = name {
        path.push(b'/');
        path.extend_from_slice(n);
    } else {
        path.extend_from_slice(b"/.");
    }
    let path = OsString::from_vec(path);
    let mut buf = vec![0u8; 1 << 16];
    let n = match rustix::fs::llistxattr(&path, &mut buf[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => 0,
        Err(e) => panic!("llistxattr {path:?}: {e}"),
    };
    let mut out = BTreeMap::new();
    // Every attribute this process can read (as root: trusted.*, security.*, POSIX
    // ACLs in system.*, user.*).
    for key in buf[..n].split(|b| *b == 0).filter(|k| !k.is_empty()) {
        let mut val = vec![0u8; 1 << 16];
        let len = rustix::fs::lgetxattr(&path, OsStr::from_bytes(key), &mut val[..])
            .unwrap_or_else(|e| panic!("lgetxattr {path:?} {key:?}: {e}"));
        val.truncate(len);
        out.insert(key.to_vec(), val);
    }
    out
}

fn meta_from(st: &Stat, dir: BorrowedFd<'_>, name: Option<&[u8]>) -> Meta {
    let kind = kind_of(st);
    let mut m = Meta {
        kind,
        mode: st.st_mode as u32 & 0o7777,
        uid: st.st_uid as u32,
        gid: st.st_gid as u32,
        mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
        size: if kind == "dir" {
            None
        } else {
            Some(st.st_size as u64)
        },
        content: None,
        target: None,
        rdev: if kind == "chardev" || kind == "blockdev" {
            Some(st.st_rdev as u64)
        } else {
            None
        },
        xattrs: BTreeMap::new(),
    };
    m.xattrs = xattrs_at(dir, name);
    m
}

/// Walks a tree relative to directory fds (no absolute paths past the root).
pub fn scan_tree(root: &Path) -> Scan {
    let fd = open_dir_at(CWD, root.as_os_str());
    let st = rustix::fs::fstat(&fd).unwrap();
    let mut scan = Scan::default();
    scan.entries
        .insert(Vec::new(), meta_from(&st, fd.as_fd(), None));
    let mut inodes: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    scan_dir(&fd, &[], &mut scan, &mut inodes);
    for paths in inodes.values() {
        let rep = paths.iter().min().unwrap();
        for p in paths {
            scan.link_group.insert(p.clone(), rep.clone());
        }
    }
    scan
}

fn scan_dir(
    dir: &OwnedFd,
    prefix: &[u8],
    scan: &mut Scan,
    inodes: &mut BTreeMap<(u64, u64), Vec<Vec<u8>>>,
) {
    for name in read_names(dir) {
        let os = OsStr::from_bytes(&name);
        let mut rel = prefix.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let st = rustix::fs::statat(dir, os, AtFlags::SYMLINK_NOFOLLOW)
            .unwrap_or_else(|e| panic!("stat {:?}: {e}", String::from_utf8_lossy(&rel)));
        let mut m = meta_from(&st, dir.as_fd(), Some(&name));
        match m.kind {
            "dir" => {
                let sub = open_dir_at(dir, os);
                scan_dir(&sub, &rel, scan, inodes);
            }
            "file" => {
                let f = rustix::fs::openat(
                    dir,
                    os,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .unwrap_or_else(|e| panic!("open {:?}: {e}", String::from_utf8_lossy(&rel)));
                let holes = holes_of(f.as_fd(), st.st_size as u64);
                if !holes.is_empty() {
                    scan.holes.insert(rel.clone(), holes);
                }
                let mut h = blake3::Hasher::new();
                std::io::copy(&mut File::from(f), &mut h).unwrap();
                m.content = Some(h.finalize());
            }
            "symlink" => {
                m.target = Some(
                    rustix::fs::readlinkat(dir, os, Vec::new())
                        .unwrap()
                        .into_bytes(),
                );
            }
            _ => {}
        }
        if m.kind != "dir" {
            inodes
                .entry((st.st_dev as u64, st.st_ino as u64))
                .or_default()
                .push(rel.clone());
        }
        scan.entries.insert(rel, m);
    }
}

pub fn show(p: &[u8]) -> String {
    if p.is_empty() {
        "<root>".into()
    } else {
        format!("{:?}", String::from_utf8_lossy(p))
    }
}

/// Asserts that two trees are identical in content and metadata (see `Meta`: every
/// extended attribute included), in hardlink structure, and that every hole of a file
/// of `expected` is a hole in `actual` (restore may leave zeros written out in the
/// source as holes too, never the reverse).
#[track_caller]
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    assert_same_tree_except(expected, actual, &[]);
}

/// `assert_same_tree` without the holes: for trees a tool wrote densely (GNU tar).
#[track_caller]
pub fn assert_same_tree_dense(expected: &Path, actual: &Path) {
    report_differences(expected, actual, &differences(expected, actual, &[], false));
}

/// Like `assert_same_tree`, but paths in `absent` (relative to the root)
/// must exist in `expected` and must be missing from `actual`.
#[track_caller]
pub fn assert_same_tree_except(expected: &Path, actual: &Path, absent: &[&[u8]]) {
    report_differences(
        expected,
        actual,
        &tree_differences(expected, actual, absent),
    );
}

#[track_caller]
fn report_differences(expected: &Path, actual: &Path, diffs: &str) {
    if !diffs.is_empty() {
        let lines: Vec<&str> = diffs.lines().take(60).collect();
        panic!(
            "trees differ: {} vs {} ({} differences)\n{}",
            expected.display(),
            actual.display(),
            diffs.lines().count(),
            lines.join("\n")
        );
    }
}

/// The differences `assert_same_tree_except` reports, one per line (empty: none).
pub fn tree_differences(expected: &Path, actual: &Path, absent: &[&[u8]]) -> String {
    differences(expected, actual, absent, true)
}

fn differences(expected: &Path, actual: &Path, absent: &[&[u8]], holes: bool) -> String {
    let mut a = scan_tree(expected);
    let b = scan_tree(actual);
    let mut diffs = String::new();
    for p in absent {
        assert!(
            a.entries.remove(*p).is_some(),
            "{} is not in the source tree",
            show(p)
        );
        a.link_group.remove(*p);
        if b.entries.contains_key(*p) {
            writeln!(diffs, "{} should not have been restored", show(p)).unwrap();
        }
    }
    for (p, ma) in &a.entries {
        match b.entries.get(p) {
            None => writeln!(diffs, "{} missing ({})", show(p), ma.kind).unwrap(),
            Some(mb) if mb != ma => {
                let mut fields = Vec::new();
                macro_rules! cmp {
                    ($f:ident) => {
                        if ma.$f != mb.$f {
                            fields.push(format!("{}: {:?} != {:?}", stringify!($f), ma.$f, mb.$f));
                        }
                    };
                }
                cmp!(kind);
                if ma.mode != mb.mode {
                    fields.push(format!("mode: {:o} != {:o}", ma.mode, mb.mode));
                }
                cmp!(uid);
                cmp!(gid);
                cmp!(mtime);
                cmp!(size);
                cmp!(content);
                cmp!(target);
                cmp!(rdev);
                if ma.xattrs != mb.xattrs {
                    let show_x = |x: &BTreeMap<Vec<u8>, Vec<u8>>| {
                        x.iter()
                            .map(|(k, v)| {
                                format!(
                                    "{}={:?}",
                                    String::from_utf8_lossy(k),
                                    String::from_utf8_lossy(v)
                                )
                            })
                            .collect::<Vec<_>>()
                    };
                    fields.push(format!(
                        "xattrs: {:?} != {:?}",
                        show_x(&ma.xattrs),
                        show_x(&mb.xattrs)
                    ));
                }
                writeln!(diffs, "{}: {}", show(p), fields.join("; ")).unwrap();
            }
            Some(_) => {}
        }
    }
    for p in b.entries.keys() {
        if !a.entries.contains_key(p) {
            writeln!(diffs, "{} unexpected in restored tree", show(p)).unwrap();
        }
    }
    // Paths sharing an inode in `expected` must share one in `actual`, and
    // no others: compare the groups as sets of paths.
    let groups = |s: &Scan| {
        let mut g: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
        for (p, rep) in &s.link_group {
            g.entry(rep.clone()).or_default().push(p.clone());
        }
        g
    };
    if holes {
        for (p, want) in &a.holes {
            let have = b.holes.get(p).map(Vec::as_slice).unwrap_or(&[]);
            let filled: Vec<&(u64, u64)> = want
                .iter()
                .filter(|(s, e)| !have.iter().any(|(hs, he)| hs <= s && e <= he))
                .collect();
            if b.entries.get(p).is_some_and(|m| m.kind == "file") && !filled.is_empty() {
                writeln!(
                    diffs,
                    "{}: holes {filled:?} of {want:?} are not holes (holes: {have:?})",
                    show(p)
                )
                .unwrap();
            }
        }
    }
    let (ga, gb) = (groups(&a), groups(&b));
    for (rep, members) in &ga {
        let Some(rb) = b.link_group.get(rep) else {
            continue;
        };
        let mb = &gb[rb];
        if members != mb {
            writeln!(
                diffs,
                "hardlink group of {} differs: {:?} vs {:?}",
                show(rep),
                members.iter().map(|q| show(q)).collect::<Vec<_>>(),
                mb.iter().map(|q| show(q)).collect::<Vec<_>>()
            )
            .unwrap();
        }
    }
    diffs
}

impl Repo {
    /// Runs `volsnap --json ARGS...` set to abort at its `n`-th crash point. Returns
    /// whether it aborted there (any other failure fails the test).
    /// Runs volsnap with `args`, aborting at its `at`-th crash point (a number) or its
    /// first crash point named `at`. Returns the name of the point it aborted at, or
    /// `None` when the run finished first.
    pub fn run_crashing_at(&self, at: impl ToString, args: &[&str]) -> Option<String> {
        self.run_crashing_at_env(at, args, &[])
    }

    /// `run_crashing_at` with extra environment variables.
    pub fn run_crashing_at_env(
        &self,
        at: impl ToString,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Option<String> {
        let mut cmd = self.command();
        cmd.envs(env.iter().copied())
            .env("VOLSNAP_CRASH_AT", at.to_string())
            .arg("--json")
            .args(args);
        let run = Run::from_command(cmd);
        if run.status == 0 {
            return None;
        }
        let out = run.all_output();
        let point = out
            .split_once("crash point ")
            .and_then(|(_, rest)| rest.split_once('(')?.1.split_once(')'))
            .map(|(name, _)| name.to_string());
        assert!(
            point.is_some(),
            "not a crash point abort\n{}",
            run.describe()
        );
        point
    }
}

/// A tmpfs mounted for one test, unmounted when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs (these tests run as root)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A volsnap process held at a named pause point (`VOLSNAP_PAUSE_AT`), so a test can
/// act at exactly that step, then let it go on.
pub struct Paused {
    child: Child,
    flag: PathBuf,
    cmd: String,
}

impl Repo {
    /// Starts `volsnap --json ARGS...` and returns once it waits at pause point `at`
    /// (it has created `<flag>.reached` and waits for `<flag>` to be removed).
    pub fn spawn_paused(&self, at: &str, args: &[&str]) -> Paused {
        self.spawn_paused_as(at, args, true, &[])
    }

    /// `spawn_paused` with extra environment variables.
    pub fn spawn_paused_env(&self, at: &str, args: &[&str], env: &[(&str, &str)]) -> Paused {
        self.spawn_paused_as(at, args, true, env)
    }

    /// `spawn_paused` without `--json`: for the progress lines of the human output
    /// (see `Paused::go_until_stderr`).
    pub fn spawn_paused_human(&self, at: &str, args: &[&str]) -> Paused {
        self.spawn_paused_as(at, args, false, &[])
    }

    fn spawn_paused_as(&self, at: &str, args: &[&str], json: bool, env: &[(&str, &str)]) -> Paused {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let flag = self.scratch(&format!("pause-{}-{n}", at.replace(' ', "-")));
        write(&flag, "hold");
        let reached = PathBuf::from(format!("{}.reached", flag.display()));
        let _ = std::fs::remove_file(&reached);
        let mut cmd = self.command();
        cmd.envs(env.iter().copied())
            .env("VOLSNAP_PAUSE_AT", at)
            .env("VOLSNAP_PAUSE_FILE", &flag);
        if json {
            cmd.arg("--json");
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let desc = format!("{cmd:?}");
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        let start = Instant::now();
        while !reached.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "{desc} ended ({status}) before pause point {at:?}\nstderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{desc} never reached pause point {at:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Paused {
            child,
            flag,
            cmd: desc,
        }
    }
}

impl Paused {
    /// Sends `signal` to the process while it is held at the pause point, and waits for
    /// it to end.
    pub fn signal(self, signal: rustix::process::Signal) -> Output {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).unwrap();
        self.child.wait_with_output().unwrap()
    }

    /// Whether the process is still running (held at its pause point, or past it).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `signal` to the process held at the pause point, and leaves it there.
    pub fn kill(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Lets the process go on without waiting for it (see `finish`).
    pub fn release(&self) {
        let _ = std::fs::remove_file(&self.flag);
    }

    /// Lets the process go on and waits for it to end.
    pub fn finish(self) -> Run {
        self.release();
        let out = self.child.wait_with_output().unwrap();
        Run::from_output(self.cmd, out)
    }

    /// Lets the process go on and returns once it prints a line holding `needle` on
    /// stderr (`Ok`: it is still running), or its outcome if it ends first (`Err`).
    pub fn go_until_stderr(self, needle: &str) -> Result<Going, Run> {
        self.read_until(needle, true)
    }

    /// Returns once the process, still held at the pause point, prints a line holding
    /// `needle` on stderr (its signal handlers run while it is held); `Going::finish`
    /// lets it go on.
    pub fn held_until_stderr(self, needle: &str) -> Going {
        self.read_until(needle, false).unwrap_or_else(|run| {
            panic!(
                "ended while held, before printing {needle:?}\n{}",
                run.describe()
            )
        })
    }

    fn read_until(mut self, needle: &str, release: bool) -> Result<Going, Run> {
        use std::io::BufRead;
        let stderr = self.child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        if release {
            std::fs::remove_file(&self.flag).unwrap();
        }
        let mut seen = String::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if line.contains(needle) {
                        return Ok(Going {
                            flag: (!release).then_some(self.flag),
                            child: self.child,
                            cmd: self.cmd,
                            seen,
                            lines: rx,
                            reader,
                        });
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    reader.join().unwrap();
                    let mut out = self.child.wait_with_output().unwrap();
                    out.stderr = seen.into_bytes();
                    return Err(Run::from_output(self.cmd, out));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("{} printed neither {needle:?} nor ended: {seen}", self.cmd);
                }
            }
        }
    }
}

/// A process let go by `Paused::go_until_stderr`, still running.
pub struct Going {
    /// The pause flag, when the process is still held.
    flag: Option<PathBuf>,
    child: Child,
    cmd: String,
    seen: String,
    lines: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
}

impl Going {
    /// Waits for the process to end.
    pub fn finish(self) -> Run {
        if let Some(flag) = &self.flag {
            std::fs::remove_file(flag).unwrap();
        }
        let mut out = self.child.wait_with_output().unwrap();
        self.reader.join().unwrap();
        let mut stderr = self.seen;
        for line in self.lines.try_iter() {
            stderr.push_str(&line);
            stderr.push('\n');
        }
        out.stderr = stderr.into_bytes();
        Run::from_output(self.cmd, out)
    }
}
