//! Progress the library reports while it works; the binary decides whether and how to
//! render it. Counters only: the library never prints.

use std::sync::atomic::{AtomicU64, Ordering};

/// Shared counters, updated by workers with relaxed atomics.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    /// Expected total bytes, when known (0 = unknown).
    pub bytes_total: AtomicU64,
}

impl Progress {
    pub fn add(&self, files: u64, bytes: u64) {
        self.files.fetch_add(files, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn set_total(&self, bytes: u64) {
        self.bytes_total.store(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.files.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.bytes_total.load(Ordering::Relaxed),
        )
    }
}
