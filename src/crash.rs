//! Test-only crash points: `VOLSNAP_CRASH_AT=N` aborts the process at the N-th point
//! reached, and `VOLSNAP_CRASH_AT=NAME` at the first point of that name, so tests can
//! kill a write path after every step and check recovery.
//! Without the variables a point costs two initialised-`OnceLock` reads. Pause points
//! (`VOLSNAP_PAUSE_AT`) hold the process at a named step instead; every crash point is
//! also a pause point, so a test can hold a process at any step it can abort at.

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

/// Test-only failure: when `VOLSNAP_FAIL_AT` names this point, returns an error here,
/// so tests can check what an ordinary failure at an exact step leaves behind.
pub fn fail_point(name: &str) -> crate::error::Result<()> {
    if std::env::var("VOLSNAP_FAIL_AT").ok().as_deref() == Some(name) {
        return Err(crate::error::Error::Injected(name.to_string()));
    }
    Ok(())
}
