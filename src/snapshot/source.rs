//! A file's content as a chunker `Source`: data extents read with `pread`, holes
//! announced as zeros without being read.
//!
//! Extents come from `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`, asked once per extent.
//! A filesystem without them (`EINVAL`/`EOPNOTSUPP`... ) simply has its files read
//! whole. What is reported as a hole may be a real hole or an unwritten (preallocated)
//! extent; both read as zeros, which is what the chunker is told. Reads never go past
//! the extent the filesystem reported, so a hole's bytes are never copied, hashed or
//! compressed one by one.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::chunker::{Next, Source};

#[derive(Debug)]
pub struct FileSource<'a> {
    file: &'a File,
    /// The next offset to read.
    pos: u64,
    /// The end of the data extent `pos` is in (reads stop there).
    data_end: u64,
    /// False once the filesystem said it cannot tell holes from data.
    seek: bool,
    /// Bytes actually read (holes excluded).
    pub bytes_read: u64,
}

impl FileSource<'_> {
    pub fn new(file: &File) -> FileSource<'_> {
        FileSource {
            file,
            pos: 0,
            data_end: 0,
            seek: true,
            bytes_read: 0,
        }
    }

    /// Where the data at or after `pos` starts and ends, or `None` past the last data.
    fn next_extent(&mut self) -> io::Result<Option<(u64, u64)>> {
        let fd = self.file.as_fd();
        let start = match rustix::fs::seek(fd, SeekFrom::Data(self.pos)) {
            Ok(d) => d,
            // No data at or after `pos`: the rest of the file, if any, is a hole.
            Err(Errno::NXIO) => return Ok(None),
            Err(_) => {
                self.seek = false;
                return Ok(Some((self.pos, u64::MAX)));
            }
        };
        let end = match rustix::fs::seek(fd, SeekFrom::Hole(start)) {
            Ok(e) if e > start => e,
            // Truncated in between, or a filesystem that answers oddly: read on.
            Ok(_) => u64::MAX,
            Err(e) => return Err(e.into()),
        };
        Ok(Some((start, end)))
    }
}

impl Source for FileSource<'_> {
    fn next(&mut self, buf: &mut [u8]) -> io::Result<Next> {
        if self.pos >= self.data_end {
            if !self.seek {
                self.data_end = u64::MAX;
            } else {
                match self.next_extent()? {
                    Some((start, end)) => {
                        self.data_end = end;
                        if start > self.pos {
                            let hole = start - self.pos;
                            self.pos = start;
                            return Ok(Next::Zeros(hole));
                        }
                    }
                    None => {
                        // A hole up to the end of the file as it is now.
                        let size = self.file.metadata()?.len();
                        if size <= self.pos {
                            return Ok(Next::End);
                        }
                        let hole = size - self.pos;
                        self.pos = size;
                        self.data_end = size;
                        return Ok(Next::Zeros(hole));
                    }
                }
            }
        }
        let want = (buf.len() as u64).min(self.data_end - self.pos) as usize;
        loop {
            match self.file.read_at(&mut buf[..want], self.pos) {
                Ok(0) => return Ok(Next::End),
                Ok(n) => {
                    self.pos += n as u64;
                    self.bytes_read += n as u64;
                    return Ok(Next::Data(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
