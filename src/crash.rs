//! Test-only crash points: `VOLSNAP_CRASH_AT=N` aborts the process at the N-th point
//! reached, and `VOLSNAP_CRASH_AT=NAME` at the first point of that name, so tests can
//! kill a write path after every step and check recovery.
//! Without the variables a point costs two initialised-`OnceLock` reads. Pause points
//! (`VOLSNAP_PAUSE_AT`) hold the process at a named step instead; every crash point is
//! also a pause point, so a test can hold a process at any step it can abort at.
//! `VOLSNAP_FAIL_AT` makes a named step, or the N-th write or fsync, fail.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);
static TARGET: OnceLock<Option<Target>> = OnceLock::new();

enum Target {
    Nth(u64),
    Named(String),
}

/// Marks a step after which a crash must leave the repository recoverable. Every
/// crash point is a pause point of the same name too.
pub fn point(name: &str) {
    pause(name);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var("VOLSNAP_CRASH_AT").ok()?;
        Some(v.parse().map_or(Target::Named(v), Target::Nth))
    });
    let Some(target) = target else {
        return;
    };
    let n = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
    let hit = match target {
        Target::Nth(t) => n == *t,
        Target::Named(t) => t == name,
    };
    if hit {
        eprintln!("volsnap: crash point {n} ({name}) reached, aborting");
        std::process::abort();
    }
}

/// The pause point named by `VOLSNAP_PAUSE_AT` and the file `VOLSNAP_PAUSE_FILE`,
/// read once: some pause points are reached once per file or per pack.
static PAUSE: OnceLock<Option<(String, std::path::PathBuf)>> = OnceLock::new();

/// Test-only pause: when `VOLSNAP_PAUSE_AT` names this point, creates
/// `$VOLSNAP_PAUSE_FILE.reached` and waits until `$VOLSNAP_PAUSE_FILE` is removed, so a
/// test can interleave another process at an exact step (or signal this one there).
/// Without the variable a pause costs one initialised-`OnceLock` read.
pub fn pause(name: &str) {
    let pause = PAUSE.get_or_init(|| {
        let at = std::env::var("VOLSNAP_PAUSE_AT").ok()?;
        let file = std::env::var_os("VOLSNAP_PAUSE_FILE")?;
        Some((at, file.into()))
    });
    let Some((at, file)) = pause else {
        return;
    };
    if at != name {
        return;
    }
    let mut reached = file.clone().into_os_string();
    reached.push(".reached");
    #[allow(clippy::disallowed_methods)] // a test marker, not repository data
    let _ = std::fs::write(&reached, name);
    while file.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What `VOLSNAP_FAIL_AT` asks for, read once.
enum Fail {
    /// Fail at the `fail_point` of this name.
    Named(String),
    /// Fail the N-th write (`write:N`) or the N-th fsync (`fsync:N`) with EIO.
    Write(u64),
    Fsync(u64),
}

static FAIL: OnceLock<Option<Fail>> = OnceLock::new();
static WRITES: AtomicU64 = AtomicU64::new(0);
static FSYNCS: AtomicU64 = AtomicU64::new(0);
/// (device, inode) of every file whose fsync was made to fail.
static FAILED_FSYNCS: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());

fn fail() -> Option<&'static Fail> {
    FAIL.get_or_init(|| {
        let v = std::env::var("VOLSNAP_FAIL_AT").ok()?;
        let n = |s: &str| s.parse::<u64>().ok();
        Some(match v.split_once(':') {
            Some(("write", k)) if n(k).is_some() => Fail::Write(n(k)?),
            Some(("fsync", k)) if n(k).is_some() => Fail::Fsync(n(k)?),
            _ => Fail::Named(v),
        })
    })
    .as_ref()
}

/// Test-only failure: when `VOLSNAP_FAIL_AT` names this point, returns an error here,
/// so tests can check what an ordinary failure at an exact step leaves behind.
pub fn fail_point(name: &str) -> crate::error::Result<()> {
    match fail() {
        Some(Fail::Named(n)) if n == name => Err(crate::error::Error::Injected(name.to_string())),
        _ => Ok(()),
    }
}

/// Whether `VOLSNAP_FAIL_AT` asks for I/O errors (`write:N` or `fsync:N`).
pub fn io_faults() -> bool {
    matches!(fail(), Some(Fail::Write(_) | Fail::Fsync(_)))
}

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error())
}

/// Test-only I/O error layer, called before every write of repository data (packs,
/// records, journals, the index), of a restored file and of an export:
/// `VOLSNAP_FAIL_AT=write:N` makes the N-th such write of the process fail with EIO
/// (said on stderr as `volsnap: injected EIO at write N (PATH)`). Without the variable
/// it costs one initialised-`OnceLock` read.
pub fn before_write(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let Some(fail) = fail() else {
        return Ok(());
    };
    let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
    if matches!(fail, Fail::Write(k) if *k == n) {
        eprintln!("volsnap: injected EIO at write {n} ({})", path_of(fd));
        return Err(eio());
    }
    Ok(())
}

/// Like `before_write`, before every `fsync`, `fdatasync` and `syncfs` (`fsync:N`). An
/// fsync error is never retried: a later fsync of a file whose fsync failed is said on
/// stderr (`volsnap: fsync retried`), which the tests forbid. A directory whose fsync
/// failed may be fsynced again by a rollback, for its own changes, before the command
/// fails (`volsnap: directory fsynced again`), which the tests allow only in a failed run.
pub fn before_fsync(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let Some(fail) = fail() else {
        return Ok(());
    };
    let st = rustix::fs::fstat(fd).ok();
    #[allow(clippy::unnecessary_cast)] // the field types differ between architectures
    let id = st.as_ref().map(|st| (st.st_dev as u64, st.st_ino as u64));
    let mut failed = FAILED_FSYNCS.lock().expect("fault lock");
    if let Some(id) = id
        && failed.contains(&id)
    {
        let dir = st.is_some_and(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        });
        if dir {
            eprintln!(
                "volsnap: directory fsynced again after its fsync failed: {}",
                path_of(fd)
            );
        } else {
            eprintln!("volsnap: fsync retried on {} after it failed", path_of(fd));
        }
    }
    let n = FSYNCS.fetch_add(1, Ordering::SeqCst) + 1;
    if matches!(fail, Fail::Fsync(k) if *k == n) {
        failed.extend(id);
        eprintln!("volsnap: injected EIO at fsync {n} ({})", path_of(fd));
        return Err(eio());
    }
    Ok(())
}

/// What a descriptor names, for the fault layer's notes.
fn path_of(fd: BorrowedFd<'_>) -> String {
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    std::fs::read_link(link).map_or_else(|_| "?".into(), |p| p.display().to_string())
}

/// A file whose every `write` passes `before_write` first (exports).
pub struct Faulty(pub std::fs::File);

impl std::io::Write for Faulty {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        before_write(self.0.as_fd())?;
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
