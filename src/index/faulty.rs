//! Test-only: the index file seen through the I/O error layer of `crate::crash`
//! (`VOLSNAP_FAIL_AT=write:N` or `fsync:N`), so fault tests reach redb's writes and
//! syncs too. Used only when that variable is set; otherwise redb opens the file itself.

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::os::fd::AsFd;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// redb's own file backend, each write and sync passing the fault layer first.
#[derive(Debug)]
pub(super) struct Faulty {
    inner: FileBackend,
    /// A duplicate descriptor of the file, to tell it apart in the fsync bookkeeping.
    file: File,
}

impl Faulty {
    pub(super) fn new(file: File) -> Result<Faulty, redb::DatabaseError> {
        let dup = file.try_clone()?;
        Ok(Faulty {
            inner: FileBackend::new(file)?,
            file: dup,
        })
    }
}

impl StorageBackend for Faulty {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        crate::crash::before_fsync(self.file.as_fd())?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        crate::crash::before_write(self.file.as_fd())?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
