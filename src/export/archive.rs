//! The tar encoding of tree entries, and the compressors behind it.
//!
//! Headers are GNU tar headers: names and link targets too long for the header use GNU
//! long-name entries (raw bytes, so non-UTF-8 names survive); a POSIX pax extended
//! header in front of each entry carries what the header cannot: mtime with
//! nanoseconds (and before 1970) and extended attributes (`SCHILY.xattr.*`, as GNU tar
//! and bsdtar write them). Owners are numeric only. No field depends on the time or
//! machine of the export, so output is deterministic.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gzp::ZWriter;
use gzp::deflate::Gzip;
use gzp::par::compress::{ParCompress, ParCompressBuilder};
use tar::{EntryType, Header};

use super::{ChunkReader, Format};
use crate::error::{Error, Result};
use crate::tree::{Entry, Kind};

fn write_err(e: io::Error) -> Error {
    Error::io("write archive to", "output")(e)
}

/// The compressing writer: plain, parallel gzip (one gzip stream, pigz-style), or
/// multithreaded zstd.
pub struct Compressor<W: Write + Send + 'static> {
    kind: Stream<W>,
    /// A write or flush failed (the gzip writer thread is gone).
    failed: bool,
    /// Set when the export is abandoned: the output then refuses further bytes, so no
    /// trailer makes a truncated archive look complete.
    abandon: Arc<AtomicBool>,
}

enum Stream<W: Write + Send + 'static> {
    Plain(W),
    Gzip(Option<ParCompress<'static, Gzip, W>>),
    Zstd(Option<zstd::stream::write::Encoder<'static, W>>),
}

impl<W: Write + Send + 'static> Compressor<W> {
    /// `abandon` must be the flag the writer `out` checks before every write.
    pub fn new(
        out: W,
        format: Format,
        level: Option<u32>,
        threads: usize,
        abandon: Arc<AtomicBool>,
    ) -> Result<Self> {
        let kind = match format {
            Format::Tar => Stream::Plain(out),
            Format::TarGz => {
                let level = level.unwrap_or(6);
                if !(1..=9).contains(&level) {
                    return Err(Error::Usage(format!(
                        "gzip level {level} is not between 1 and 9"
                    )));
                }
                let z = ParCompressBuilder::<Gzip>::new()
                    .num_threads(threads.max(1))
                    .map_err(|e| Error::Usage(format!("compression threads: {e}")))?
                    .compression_level(flate2::Compression::new(level))
                    .from_writer(out);
                Stream::Gzip(Some(z))
            }
            Format::TarZst => {
                let level = level.unwrap_or(3);
                if !(1..=19).contains(&level) {
                    return Err(Error::Usage(format!(
                        "zstd level {level} is not between 1 and 19"
                    )));
                }
                let mut z =
                    zstd::stream::write::Encoder::new(out, level as i32).map_err(write_err)?;
                // Always the multithreaded format, even with one worker: its output does
                // not depend on the number of workers, so exports match on every machine.
                z.multithread(threads.max(1) as u32).map_err(write_err)?;
                Stream::Zstd(Some(z))
            }
        };
        Ok(Compressor {
            kind,
            failed: false,
            abandon,
        })
    }

    /// Completes the stream (trailers, checksums) and flushes it.
    pub fn finish(mut self) -> Result<()> {
        match &mut self.kind {
            Stream::Plain(w) => w.flush().map_err(write_err),
            Stream::Gzip(z) => {
                let mut w = z.take().expect("finished once").finish().map_err(gzp_err)?;
                w.flush().map_err(write_err)
            }
            Stream::Zstd(z) => {
                let mut w = z
                    .take()
                    .expect("finished once")
                    .finish()
                    .map_err(write_err)?;
                w.flush().map_err(write_err)
            }
        }
    }
}

fn gzp_err(e: gzp::GzpError) -> Error {
    match e {
        gzp::GzpError::Io(io) => write_err(io),
        other => write_err(io::Error::other(other.to_string())),
    }
}

impl<W: Write + Send + 'static> Drop for Compressor<W> {
    fn drop(&mut self) {
        // Reached with a stream still open only on an error path. The output refuses
        // further bytes from now on. gzp's own drop would finish the stream, and panic
        // if its writer failed: end it here instead, ignoring the (expected) error, unless
        // it already failed, in which case gzp has torn itself down.
        self.abandon.store(true, Ordering::SeqCst);
        if let Stream::Gzip(z) = &mut self.kind
            && let Some(mut z) = z.take()
        {
            if self.failed {
                std::mem::forget(z);
            } else {
                let _ = z.finish();
            }
        }
    }
}

impl<W: Write + Send + 'static> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = match &mut self.kind {
            Stream::Plain(w) => w.write(buf),
            Stream::Gzip(z) => z.as_mut().expect("not finished").write(buf),
            Stream::Zstd(z) => z.as_mut().expect("not finished").write(buf),
        };
        self.failed |= r.is_err();
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = match &mut self.kind {
            Stream::Plain(w) => w.flush(),
            Stream::Gzip(z) => z.as_mut().expect("not finished").flush(),
            Stream::Zstd(z) => z.as_mut().expect("not finished").flush(),
        };
        self.failed |= r.is_err();
        r
    }
}

/// Writes tar entries for tree entries.
pub struct TarWriter<'w> {
    builder: tar::Builder<&'w mut dyn Write>,
}

/// `Read` over a `ChunkReader`; a verification failure travels as an `io::Error`
/// holding the library error, unwrapped again by `TarWriter::file`.
struct ContentRead<'r, 'a> {
    inner: &'r mut ChunkReader<'a>,
}

impl Read for ContentRead<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let piece = self.inner.fill().map_err(io::Error::other)?;
        let n = piece.len().min(buf.len());
        buf[..n].copy_from_slice(&piece[..n]);
        self.inner.consume(n);
        Ok(n)
    }
}

fn path_of(bytes: &[u8]) -> &std::path::Path {
    std::path::Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(bytes))
}

impl<'w> TarWriter<'w> {
    pub fn new(out: &'w mut dyn Write) -> TarWriter<'w> {
        let mut builder = tar::Builder::new(out);
        builder.follow_symlinks(false);
        TarWriter { builder }
    }

    /// Writes a pax extended header ('x') from raw records: keys and values are bytes,
    /// so nothing is re-encoded.
    fn pax(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let mut data = Vec::new();
        for (k, v) in records {
            // "LEN KEY=VALUE\n", where LEN counts the whole record including itself.
            let rest = k.len() + v.len() + 3;
            let mut len = rest + rest.to_string().len();
            if len.to_string().len() + rest != len {
                len += 1;
            }
            data.extend_from_slice(len.to_string().as_bytes());
            data.push(b' ');
            data.extend_from_slice(k);
            data.push(b'=');
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::XHeader);
        h.set_path("././@PaxHeader").map_err(write_err)?;
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.builder.append(&h, &data[..]).map_err(write_err)
    }

    /// Header fields shared by every entry, after the pax header with what they cannot
    /// hold: the exact mtime (decimal seconds, negative before 1970) and xattrs.
    fn header(&mut self, entry: &Entry, kind: EntryType, size: u64) -> Result<Header> {
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let abs = entry.mtime_ns.unsigned_abs();
        let sign = if entry.mtime_ns < 0 { "-" } else { "" };
        let mtime = format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000);
        pax.push((b"mtime".to_vec(), mtime.into_bytes()));
        for x in &entry.xattrs {
            // GNU tar's escaping of the attribute name inside the keyword.
            let mut key = b"SCHILY.xattr.".to_vec();
            for &b in &x.name {
                match b {
                    b'%' => key.extend_from_slice(b"%25"),
                    b'=' => key.extend_from_slice(b"%3D"),
                    _ => key.push(b),
                }
            }
            pax.push((key, x.value.clone()));
        }
        self.pax(&pax)?;
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(entry.mode);
        h.set_uid(u64::from(entry.uid));
        h.set_gid(u64::from(entry.gid));
        h.set_mtime(entry.mtime_ns.div_euclid(1_000_000_000).max(0) as u64);
        h.set_size(size);
        Ok(h)
    }

    /// Appends an entry whose link name is written byte for byte (a GNU long-link entry
    /// carries names over 100 bytes).
    fn append_link_literal(&mut self, mut h: Header, path: &[u8], link: &[u8]) -> Result<()> {
        if link.len() > 100 {
            let mut long = Header::new_gnu();
            long.set_entry_type(EntryType::GNULongLink);
            long.set_path("././@LongLink").map_err(write_err)?;
            long.set_mode(0o644);
            long.set_size(link.len() as u64 + 1);
            long.set_cksum();
            let mut data = link.to_vec();
            data.push(0);
            self.builder.append(&long, &data[..]).map_err(write_err)?;
            h.set_link_name_literal(&link[..100]).map_err(write_err)?;
        } else {
            h.set_link_name_literal(link).map_err(write_err)?;
        }
        self.builder
            .append_data(&mut h, path_of(path), io::empty())
            .map_err(write_err)
    }

    pub fn dir(&mut self, path: &[u8], entry: &Entry) -> Result<()> {
        let mut h = self.header(entry, EntryType::Directory, 0)?;
        let mut name = path.to_vec();
        if name != b"." {
            name.push(b'/');
        } else {
            name = b"./".to_vec();
        }
        self.builder
            .append_data(&mut h, path_of(&name), io::empty())
            .map_err(write_err)
    }

    pub fn file(
        &mut self,
        path: &[u8],
        entry: &Entry,
        size: u64,
        content: &mut ChunkReader<'_>,
    ) -> Result<()> {
        let mut h = self.header(entry, EntryType::Regular, size)?;
        let mut read = ContentRead { inner: content };
        self.builder
            .append_data(&mut h, path_of(path), &mut read)
            .map_err(|e| {
                // A verification error from the content comes back wrapped; unwrap it.
                if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                    *e.into_inner()
                        .expect("checked")
                        .downcast::<Error>()
                        .expect("checked")
                } else {
                    write_err(e)
                }
            })?;
        // The reader must also agree that the content ended exactly at `size`.
        read.inner
            .fill()
            .map(|rest| assert!(rest.is_empty(), "tar copied fewer bytes than the header"))?;
        Ok(())
    }

    pub fn hardlink(&mut self, path: &[u8], entry: &Entry, first: &[u8]) -> Result<()> {
        let h = self.header(entry, EntryType::Link, 0)?;
        self.append_link_literal(h, path, first)
    }

    pub fn symlink(&mut self, path: &[u8], entry: &Entry, target: &[u8]) -> Result<()> {
        let h = self.header(entry, EntryType::Symlink, 0)?;
        self.append_link_literal(h, path, target)
    }

    pub fn node(&mut self, path: &[u8], entry: &Entry) -> Result<()> {
        let (kind, rdev) = match entry.kind {
            Kind::Fifo => (EntryType::Fifo, 0),
            Kind::CharDevice { rdev } => (EntryType::Char, rdev),
            Kind::BlockDevice { rdev } => (EntryType::Block, rdev),
            _ => unreachable!("node() is for fifos and devices"),
        };
        let mut h = self.header(entry, kind, 0)?;
        h.set_device_major(rustix::fs::major(rdev))
            .map_err(write_err)?;
        h.set_device_minor(rustix::fs::minor(rdev))
            .map_err(write_err)?;
        self.builder
            .append_data(&mut h, path_of(path), io::empty())
            .map_err(write_err)
    }

    /// Writes the end-of-archive blocks.
    pub fn finish(mut self) -> Result<()> {
        self.builder.finish().map_err(write_err)
    }
}
