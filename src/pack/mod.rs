//! Packs: immutable files holding many blobs, written once, read with verification.
//!
//! ```text
//! pack file = header (32 bytes; 16 in version 1) blob*
//! header:  0  8  magic "VSNPPACK"
//!          8  4  pack format version, u32 LE (2; version 1 packs are still read)
//!         12  1  kind of every blob inside: 0 data, 1 tree
//!         13  3  reserved, zero
//!         16 16  random nonce (version 2): no two packs ever have the same name
//! blob:    see `blob`
//! ```
//! A pack is named by the BLAKE3 of its whole contents: `packs/<2 hex>/<64 hex>.pack`.
//! Invariant 1: a pack is fsynced and renamed into place, and its directory fsynced,
//! before any index row refers to it.
//! Invariant 2: a pack's live blobs are never modified; only garbage collection deletes
//! or rewrites packs, or punches holes in runs of blobs no index row names (a scan
//! resumes at the first header after a hole, and tells a blob given back this way from
//! a damaged one; a punched pack's name no longer hashes its bytes).
//! Deliberately absent: mmap (a truncated pack must be an error, not a SIGBUS).

pub mod blob;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Commit, Location, PackRow, SyncedPack};
use crate::limits::{
    OPEN_PACKS_MAX, PACK_SIZE_TARGET, PACKS_PER_LOG, READ_AHEAD_PACKS, UPLOADS_IN_FLIGHT,
};
use crate::repo::Repository;
use blob::{BlobHeader, BlobKind, EncodedBlob, HEADER_LEN};

pub const PACK_MAGIC: &[u8; 8] = b"VSNPPACK";
pub const PACK_HEADER_LEN: usize = 32;
pub const PACK_FORMAT_VERSION: u32 = 2;
/// Version 1 packs had no nonce.
const PACK_HEADER_LEN_V1: usize = 16;

/// A new pack's header. The nonce makes every pack's bytes, and so its name, unique:
/// a pack file can never be re-created under a name gc has decided to delete.
fn pack_header(kind: BlobKind) -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[0..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_FORMAT_VERSION.to_le_bytes());
    h[12] = kind as u8;
    h[16..32].copy_from_slice(&nonce());
    h
}

/// 16 bytes never produced before: BLAKE3 of a per-process random seed (from the
/// kernel) and a counter.
fn nonce() -> [u8; 16] {
    static SEED: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = SEED.get_or_init(|| {
        let mut seed = [0u8; 32];
        let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
        if read.is_err() {
            // No /dev/urandom: the process id and the clock still separate processes.
            let mut h = blake3::Hasher::new();
            h.update(&std::process::id().to_le_bytes());
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            h.update(&now.to_le_bytes());
            seed = *h.finalize().as_bytes();
        }
        seed
    });
    let mut h = blake3::Hasher::new_keyed(seed);
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
}

/// Where the first blob of a pack starts, from its header; `None` if it is not a
/// pack header this build reads.
pub fn header_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < PACK_HEADER_LEN_V1 || &bytes[0..8] != PACK_MAGIC {
        return None;
    }
    match u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) {
        1 => Some(PACK_HEADER_LEN_V1),
        2 if bytes.len() >= PACK_HEADER_LEN => Some(PACK_HEADER_LEN),
        _ => None,
    }
}

/// A pack being filled in memory.
struct OpenPack {
    bytes: Vec<u8>,
    rows: Vec<(Id, Location)>,
}

impl OpenPack {
    fn new(kind: BlobKind) -> OpenPack {
        let mut bytes = Vec::with_capacity(PACK_SIZE_TARGET + PACK_SIZE_TARGET / 8);
        bytes.extend_from_slice(&pack_header(kind));
        OpenPack {
            bytes,
            rows: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Appends new blobs of one kind to packs, deduplicating against the index and against
/// everything this process wrote, and commits each full pack (file, then index rows).
pub struct Packer<'r> {
    repo: &'r Repository,
    kind: BlobKind,
    mode: Commit,
    open: Mutex<OpenPack>,
    /// Every id this packer has accepted, so a concurrent duplicate is stored once.
    seen: Mutex<HashSet<Id>>,
    new_blobs: AtomicU64,
    new_bytes_stored: AtomicU64,
    /// A dry run: blobs are hashed but never written; trees are kept in memory
    /// (`Repository::unstored`) so the snapshot can be compared with others.
    dry: bool,
    /// Full packs whose upload is under way, oldest first (`finish_uploads`).
    uploading: Mutex<VecDeque<(SyncedPack, crate::store::Upload)>>,
    /// Packs durable in the store, not yet logged and indexed.
    durable: Mutex<Vec<SyncedPack>>,
}

impl<'r> Packer<'r> {
    /// A packer that writes nothing (see `dry`).
    pub fn dry(repo: &'r Repository, kind: BlobKind) -> Packer<'r> {
        Packer {
            dry: true,
            ..Packer::new(repo, kind)
        }
    }

    pub fn new(repo: &'r Repository, kind: BlobKind) -> Packer<'r> {
        Packer::with_mode(repo, kind, Commit::Store)
    }

    /// A packer that moves the live blobs of pack `from` into new packs (gc repack).
    pub fn for_repack(repo: &'r Repository, kind: BlobKind, from: Id) -> Packer<'r> {
        Packer::with_mode(repo, kind, Commit::Repack { from })
    }

    fn with_mode(repo: &'r Repository, kind: BlobKind, mode: Commit) -> Packer<'r> {
        Packer {
            repo,
            kind,
            mode,
            open: Mutex::new(OpenPack::new(kind)),
            seen: Mutex::new(HashSet::new()),
            new_blobs: AtomicU64::new(0),
            new_bytes_stored: AtomicU64::new(0),
            dry: false,
            uploading: Mutex::new(VecDeque::new()),
            durable: Mutex::new(Vec::new()),
        }
    }

    /// Whether a blob with this id is already stored (and not condemned) or accepted.
    pub fn has(&self, id: &Id) -> Result<bool> {
        if self.seen.lock().expect("packer lock").contains(id) {
            return Ok(true);
        }
        if !matches!(self.mode, Commit::Store) {
            return Ok(false);
        }
        // Pack logs of other hosts a snapshot deferred may hold it.
        Ok(self.repo.index.is_stored(id)?
            || (self.repo.apply_pending_logs()? && self.repo.index.is_stored(id)?))
    }

    /// Stores `raw` under `id` unless it is already stored.
    /// Returns true when the blob was new.
    pub fn store(&self, id: Id, raw: &[u8]) -> Result<bool> {
        if self.has(&id)? {
            return Ok(false);
        }
        if self.dry {
            if self.kind == BlobKind::Tree {
                let mut unstored = self.repo.unstored.lock().expect("unstored lock");
                unstored.insert(id, raw.to_vec());
            }
            return Ok(self.seen.lock().expect("packer lock").insert(id));
        }
        let blob =
            blob::encode(self.kind, id, raw, self.repo.config.zstd_level).map_err(|detail| {
                Error::Corrupt {
                    what: "new blob",
                    path: self.repo.store.display(""),
                    detail,
                }
            })?;
        self.add(blob)
    }

    /// Appends an already encoded (and verified) blob, e.g. one moved by a repack.
    pub fn add_encoded(&self, blob: EncodedBlob) -> Result<bool> {
        self.add(blob)
    }

    fn add(&self, blob: EncodedBlob) -> Result<bool> {
        if !self
            .seen
            .lock()
            .expect("packer lock")
            .insert(blob.header.id)
        {
            return Ok(false);
        }
        let full = {
            let mut open = self.open.lock().expect("packer lock");
            let offset = open.bytes.len() as u64;
            open.bytes.extend_from_slice(&blob.header.encode());
            open.bytes.extend_from_slice(&blob.stored);
            open.rows.push((
                blob.header.id,
                Location {
                    pack: Id([0; 32]),
                    offset,
                    stored_len: blob.header.stored_len,
                    raw_len: blob.header.raw_len,
                },
            ));
            if open.bytes.len() >= PACK_SIZE_TARGET {
                Some(std::mem::replace(&mut *open, OpenPack::new(self.kind)))
            } else {
                None
            }
        };
        self.new_blobs.fetch_add(1, Ordering::Relaxed);
        self.new_bytes_stored
            .fetch_add((HEADER_LEN + blob.stored.len()) as u64, Ordering::Relaxed);
        if let Some(pack) = full {
            self.commit(pack)?;
        }
        Ok(true)
    }

    /// Writes the partly filled pack, if any, and waits until every pack this packer
    /// wrote is durable and indexed.
    pub fn flush(&self) -> Result<()> {
        let pack = std::mem::replace(
            &mut *self.open.lock().expect("packer lock"),
            OpenPack::new(self.kind),
        );
        if !pack.is_empty() {
            self.commit(pack)?;
        }
        self.finish_uploads(0)
    }

    pub fn new_blobs(&self) -> u64 {
        self.new_blobs.load(Ordering::Relaxed)
    }

    pub fn new_bytes_stored(&self) -> u64 {
        self.new_bytes_stored.load(Ordering::Relaxed)
    }

    /// Writes a full pack; it is indexed once durable. A local store writes and
    /// indexes it before returning. On an object store up to `UPLOADS_IN_FLIGHT`
    /// uploads go on while the workers fill the next packs, and durable packs are
    /// logged and indexed `PACKS_PER_LOG` at a time, by whichever thread commits or
    /// flushes next (`flush` runs when no other thread commits).
    fn commit(&self, mut pack: OpenPack) -> Result<()> {
        let pack_id = Id::of(&pack.bytes);
        for (_, loc) in &mut pack.rows {
            loc.pack = pack_id;
        }
        let row = PackRow {
            kind: self.kind as u8,
            size_bytes: pack.bytes.len() as u64,
            blobs: pack.rows.len() as u64,
        };
        let from = match self.mode {
            Commit::Repack { from } => Some(from),
            _ => None,
        };
        if self.repo.store.is_local() {
            // Written and indexed before returning, by this thread (no logs locally).
            self.repo.store.put(
                &self.repo.pack_key(&pack_id),
                &pack.bytes,
                Some("pack written"),
            )?;
            crate::crash::point("pack committed");
            self.repo
                .index
                .commit_pack(&pack_id, &row, &pack.rows, self.mode)?;
            crate::crash::point("pack indexed");
            return Ok(());
        }
        let upload = self.repo.store.put_started(
            &self.repo.pack_key(&pack_id),
            pack.bytes,
            Some("pack written"),
        )?;
        let synced = SyncedPack {
            pack: pack_id,
            row,
            blobs: pack.rows,
            from,
        };
        self.uploading
            .lock()
            .expect("packer lock")
            .push_back((synced, upload));
        self.finish_uploads(UPLOADS_IN_FLIGHT)
    }

    /// Waits for the oldest uploads until at most `keep` remain in flight, then logs
    /// and indexes the durable packs if there are `PACKS_PER_LOG` of them, or any when
    /// `keep` is 0. A pack is indexed only once durable in the store (invariant 1),
    /// and only after its log (object stores; see `repo::sync`).
    fn finish_uploads(&self, keep: usize) -> Result<()> {
        loop {
            let next = {
                let mut uploading = self.uploading.lock().expect("packer lock");
                if uploading.len() <= keep {
                    break;
                }
                uploading.pop_front().expect("more than `keep`")
            };
            let (pack, upload) = next;
            upload.wait()?;
            crate::crash::point("pack committed");
            self.durable.lock().expect("packer lock").push(pack);
        }
        let ready = {
            let mut durable = self.durable.lock().expect("packer lock");
            if durable.is_empty() || (keep > 0 && durable.len() < PACKS_PER_LOG) {
                return Ok(());
            }
            std::mem::take(&mut *durable)
        };
        crate::repo::sync::log_packs(self.repo, &ready)?;
        for p in &ready {
            self.repo
                .index
                .commit_pack(&p.pack, &p.row, &p.blobs, self.mode)?;
            // Mid-write with at least one pack stored and indexed: where a test
            // interrupts a snapshot.
            crate::crash::point("pack indexed");
        }
        Ok(())
    }
}

/// Reads blobs from packs by location, verifying every blob against its id.
///
/// Packs of an object store are downloaded whole, each once, into unnamed temporary
/// files; threads that need the same pack wait for the one download, and downloads of
/// different packs go on at once. Given the order in which a restore will need packs
/// (`plan`), `read_ahead` threads download them ahead of the writers.
#[derive(Default)]
pub struct PackReader {
    state: Mutex<Readers>,
    /// Signalled when a download ends, a writer moves on, or the read-ahead stops.
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct Readers {
    open: HashMap<Id, Arc<File>>,
    /// Packs being downloaded (or opened) now.
    loading: HashSet<Id>,
    /// The read-ahead plan: packs in the order they are first needed, and each
    /// pack's place in it.
    plan: Vec<Id>,
    rank: HashMap<Id, usize>,
    /// The next place in `plan` a read-ahead thread takes.
    next: usize,
    /// The furthest place in `plan` a reader has asked for.
    reached: usize,
}

impl Readers {
    fn reach(&mut self, pack: &Id) -> bool {
        match self.rank.get(pack) {
            Some(&r) if r > self.reached => {
                self.reached = r;
                true
            }
            _ => false,
        }
    }

    /// Keeps `file` open, making room first: packs the writers have passed go before
    /// packs read ahead for them.
    fn keep(&mut self, pack: Id, file: Arc<File>) {
        if self.open.len() >= OPEN_PACKS_MAX {
            let (rank, reached) = (&self.rank, self.reached);
            self.open
                .retain(|p, _| rank.get(p).is_some_and(|&r| r >= reached));
            if self.open.len() >= OPEN_PACKS_MAX {
                self.open.clear();
            }
        }
        self.open.insert(pack, file);
    }
}

impl PackReader {
    fn file(&self, repo: &Repository, pack: &Id) -> Result<Arc<File>> {
        let mut state = self.state.lock().expect("reader lock");
        if state.reach(pack) {
            self.changed.notify_all();
        }
        loop {
            if let Some(f) = state.open.get(pack) {
                return Ok(f.clone());
            }
            if !state.loading.contains(pack) {
                break;
            }
            state = self.changed.wait(state).expect("reader lock");
        }
        state.loading.insert(*pack);
        drop(state);
        let loading = Loading(self, *pack);
        let opened = repo.open_pack(pack);
        let mut state = self.state.lock().expect("reader lock");
        loading.done(&mut state);
        let file = Arc::new(opened?.ok_or_else(|| {
            // The pack is gone, or a damaged index row names a pack that never was.
            Error::Corrupt {
                what: "repository: missing pack",
                path: repo.pack_path(pack),
                detail: "run `volsnap check`, then `volsnap repair index`".into(),
            }
        })?);
        state.keep(*pack, file.clone());
        Ok(file)
    }

    /// Sets the order in which packs will be needed (each once, first use first),
    /// for `read_ahead`.
    pub fn plan(&self, packs: Vec<Id>) {
        let mut state = self.state.lock().expect("reader lock");
        state.rank = packs.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        state.plan = packs;
        state.next = 0;
        state.reached = 0;
        self.changed.notify_all();
    }

    /// Ends the read-ahead: `read_ahead` threads return once their download ends.
    pub fn stop_reading_ahead(&self) {
        let mut state = self.state.lock().expect("reader lock");
        state.plan.clear();
        state.rank.clear();
        state.next = 0;
        state.reached = 0;
        self.changed.notify_all();
    }

    /// Downloads the planned packs in order, at most `READ_AHEAD_PACKS` beyond the
    /// furthest one a reader has reached, until the plan is done or
    /// `stop_reading_ahead`. A failed download is left for the reader that needs
    /// the pack to retry and report.
    pub fn read_ahead(&self, repo: &Repository) {
        loop {
            let pack = {
                let mut state = self.state.lock().expect("reader lock");
                loop {
                    if state.next >= state.plan.len() {
                        return;
                    }
                    if state.next > state.reached + READ_AHEAD_PACKS {
                        state = self.changed.wait(state).expect("reader lock");
                        continue;
                    }
                    let pack = state.plan[state.next];
                    state.next += 1;
                    if !state.open.contains_key(&pack) && !state.loading.contains(&pack) {
                        state.loading.insert(pack);
                        break pack;
                    }
                }
            };
            let loading = Loading(self, pack);
            let opened = repo.open_pack(&pack);
            let mut state = self.state.lock().expect("reader lock");
            loading.done(&mut state);
            if let Ok(Some(file)) = opened {
                state.keep(pack, Arc::new(file));
            }
        }
    }

    /// Reads, decompresses and verifies the blob `id` at `loc`.
    pub fn read(&self, repo: &Repository, id: &Id, loc: &Location) -> Result<Vec<u8>> {
        Ok(self.read_verified(repo, id, loc)?.2)
    }

    /// Reads the blob `id` at `loc` as stored (header and stored bytes), after
    /// decompressing and verifying it: what `Packer::add_encoded` appends to another
    /// repository's pack without compressing it again.
    pub fn read_encoded(&self, repo: &Repository, id: &Id, loc: &Location) -> Result<EncodedBlob> {
        let (header, mut bytes, _) = self.read_verified(repo, id, loc)?;
        bytes.drain(..HEADER_LEN);
        Ok(EncodedBlob {
            header,
            stored: bytes,
        })
    }

    /// The blob `id` at `loc`: its header, its bytes in the pack (header included) and
    /// its content; `Err` unless the content verifies.
    fn read_verified(
        &self,
        repo: &Repository,
        id: &Id,
        loc: &Location,
    ) -> Result<(BlobHeader, Vec<u8>, Vec<u8>)> {
        let file = self.file(repo, &loc.pack)?;
        let mut buf = vec![0u8; HEADER_LEN + loc.stored_len as usize];
        let bad = |detail: String| Error::BadBlob {
            id: *id,
            pack: loc.pack,
            detail,
        };
        file.read_exact_at(&mut buf, loc.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("pack is truncated".into())
            } else {
                Error::io("read pack", repo.pack_path(&loc.pack))(e)
            }
        })?;
        let header = BlobHeader::decode(&buf[..HEADER_LEN]).map_err(bad)?;
        if header.id != *id || header.stored_len != loc.stored_len || header.raw_len != loc.raw_len
        {
            return Err(bad("blob header does not match the index".into()));
        }
        let raw = blob::decode_verified(&header, &buf[HEADER_LEN..]).map_err(bad)?;
        Ok((header, buf, raw))
    }
}

/// A pack marked `loading` by the thread downloading it. `done` clears the mark with
/// the reader's state locked (the caller then keeps the file before unlocking, so a
/// woken waiter finds it open); dropped without `done` (a panic), it clears the mark
/// and wakes the waiters all the same, so none waits for ever.
struct Loading<'a>(&'a PackReader, Id);

impl Loading<'_> {
    fn done(self, state: &mut Readers) {
        state.loading.remove(&self.1);
        self.0.changed.notify_all();
        std::mem::forget(self);
    }
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        state.loading.remove(&self.1);
        self.0.changed.notify_all();
    }
}

/// A byte range `[start, end)` of a pack file.
pub type Span = (u64, u64);

/// One blob found by scanning a pack's bytes.
#[derive(Debug)]
pub struct ScannedBlob {
    pub offset: u64,
    pub header: BlobHeader,
    /// `Err` names why the blob's bytes do not verify.
    pub verified: std::result::Result<(), String>,
    /// The body does not verify because part of it is a hole: gc gave back the space
    /// of this blob when nothing referenced it. Damage only if an index row names it.
    pub collected: bool,
}

/// Decodes the blob headers of a pack without verifying the bodies: (offset, header)
/// pairs in offset order, and why the walk stopped early if it did. `holes` are the
/// byte ranges the file holds no data for (see `read_pack`).
///
/// Where a header lies in a hole gc punched, the walk resumes after the hole. The bytes
/// there may come from anywhere (a dead blob's body can hold another repository's
/// blobs, with genuine headers), so a header found after a hole is believed only if
/// its body verifies, and every such candidate within `RESYNC_WINDOW_BYTES` of the
/// hole's end is followed: a candidate that swallows the true next header cannot hide
/// it, because the true one is followed too. Candidates that are not the true chain
/// are whole verified blobs (their content is what their id says). The pack is called
/// damaged only if no walk reaches its end.
pub fn headers(bytes: &[u8], holes: &[(u64, u64)]) -> Headers {
    let Some(start) = header_len(bytes) else {
        return (Vec::new(), Some("bad pack header".into()));
    };
    let mut found = std::collections::BTreeMap::new();
    let mut starts = vec![start];
    // Offsets some walk has been at: a walk that joins another one stops there.
    let mut visited = HashSet::new();
    let mut reached_end = false;
    let mut first_error = None;
    // Where candidates after holes have been looked for, and those found: whether a
    // position starts a verified blob does not depend on the hole that led there, so
    // each byte is searched and each candidate verified once (many holes within one
    // window otherwise cost holes x window).
    let mut searched = Searched::default();
    let mut candidates = std::collections::BTreeSet::new();
    while let Some(from) = starts.pop() {
        if !visited.insert(from) {
            continue;
        }
        let mut at = from;
        loop {
            if at >= bytes.len() {
                reached_end = true;
                break;
            }
            match header_at(bytes, at) {
                Ok(header) => {
                    found.insert(at as u64, header);
                    at += HEADER_LEN + header.stored_len as usize;
                    if at < bytes.len() && !visited.insert(at) {
                        break;
                    }
                }
                Err(why) => {
                    let span = (at as u64, (at + HEADER_LEN) as u64);
                    let Some(&(_, hole_end)) = holes.iter().find(|h| h.0 < span.1 && span.0 < h.1)
                    else {
                        first_error.get_or_insert(format!("at offset {at}: {why}"));
                        break;
                    };
                    let from = hole_end as usize;
                    let last = bytes
                        .len()
                        .saturating_sub(HEADER_LEN - 1)
                        .min(from.saturating_add(crate::limits::RESYNC_WINDOW_BYTES));
                    // Only the part of the window no earlier hole's search covered:
                    // candidates found there are queued already.
                    for (a, b) in searched.claim(from, last) {
                        for p in (a..b).filter(|&p| bytes[p..p + 4] == *blob::BLOB_MAGIC) {
                            let sound = header_at(bytes, p).is_ok_and(|h| {
                                let body = p + HEADER_LEN..p + HEADER_LEN + h.stored_len as usize;
                                blob::decode_verified(&h, &bytes[body]).is_ok()
                            });
                            if sound {
                                candidates.insert(p);
                                starts.push(p);
                            }
                        }
                    }
                    // Nothing verifiable after the hole: the dead run reaches the end.
                    if from >= last || candidates.range(from..last).next().is_none() {
                        reached_end = true;
                    }
                    break;
                }
            }
        }
    }
    let stopped = if reached_end { None } else { first_error };
    (found.into_iter().collect(), stopped)
}

/// Disjoint byte ranges, start to end.
#[derive(Default)]
struct Searched(std::collections::BTreeMap<usize, usize>);

impl Searched {
    /// The parts of `[from, to)` not in the set, which joins the set.
    fn claim(&mut self, from: usize, to: usize) -> Vec<(usize, usize)> {
        if from >= to {
            return Vec::new();
        }
        // Ranges that overlap or touch [from, to): the last one starting at or before
        // `from`, and every one starting inside.
        let before = self
            .0
            .range(..=from)
            .next_back()
            .filter(|&(_, &end)| end >= from)
            .map(|(&s, &e)| (s, e));
        let inside: Vec<(usize, usize)> =
            self.0.range(from + 1..=to).map(|(&s, &e)| (s, e)).collect();
        let mut gaps = Vec::new();
        let mut at = from;
        for (s, e) in before.into_iter().chain(inside.iter().copied()) {
            if s > at {
                gaps.push((at, s.min(to)));
            }
            at = at.max(e);
        }
        if at < to {
            gaps.push((at, to));
        }
        let (mut start, mut end) = (from, to);
        for (s, e) in before.into_iter().chain(inside) {
            self.0.remove(&s);
            (start, end) = (start.min(s), end.max(e));
        }
        self.0.insert(start, end);
        gaps
    }
}

/// The blob header at `at`, if it decodes and its body fits in the pack.
fn header_at(bytes: &[u8], at: usize) -> std::result::Result<BlobHeader, String> {
    let header = BlobHeader::decode(&bytes[at..])?;
    if at + HEADER_LEN + header.stored_len as usize > bytes.len() {
        return Err("blob runs past the end of the pack (truncated)".into());
    }
    Ok(header)
}

/// Scans a whole pack, decoding and verifying every blob. `holes` are the byte ranges
/// the file holds no data for (see `read_pack`). Returns the blobs found and, if the
/// pack is damaged past some point, the reason the scan stopped.
pub fn scan(bytes: &[u8], holes: &[(u64, u64)]) -> (Vec<ScannedBlob>, Option<String>) {
    let (headers, stopped) = headers(bytes, holes);
    let blobs = headers
        .into_iter()
        .map(|(offset, header)| {
            let at = offset as usize + HEADER_LEN;
            let verified =
                blob::decode_verified(&header, &bytes[at..at + header.stored_len as usize])
                    .map(|_| ());
            let (start, end) = (at as u64, at as u64 + u64::from(header.stored_len));
            let collected =
                verified.is_err() && holes.iter().any(|&(h0, h1)| h0 < end && start < h1);
            ScannedBlob {
                offset,
                header,
                verified,
                collected,
            }
        })
        .collect();
    (blobs, stopped)
}

/// Blob headers by offset, and why a walk stopped early if it did.
pub type Headers = (Vec<(u64, BlobHeader)>, Option<String>);

/// The blob headers of the pack at `path`, as `headers` finds them, reading only the
/// headers (one small read each) when the file has no holes.
pub fn read_headers(file: &File) -> std::io::Result<Headers> {
    let len = file.metadata()?.len();
    let hole = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(0)).unwrap_or(0);
    if hole < len {
        let (bytes, holes) = read_pack(file)?;
        return Ok(headers(&bytes, &holes));
    }
    let mut head = [0u8; PACK_HEADER_LEN];
    let n = file.read_at(&mut head, 0)?;
    let Some(mut at) = header_len(&head[..n]).map(|l| l as u64) else {
        return Ok((Vec::new(), Some("bad pack header".into())));
    };
    let mut out = Vec::new();
    let mut buf = [0u8; HEADER_LEN];
    while at < len {
        if at + HEADER_LEN as u64 > len {
            return Ok((out, Some(format!("at offset {at}: truncated header"))));
        }
        file.read_exact_at(&mut buf, at)?;
        let header = match BlobHeader::decode(&buf) {
            Ok(h) => h,
            Err(why) => return Ok((out, Some(format!("at offset {at}: {why}")))),
        };
        let end = at + HEADER_LEN as u64 + u64::from(header.stored_len);
        if end > len {
            return Ok((
                out,
                Some(format!(
                    "at offset {at}: blob runs past the end of the pack (truncated)"
                )),
            ));
        }
        out.push((at, header));
        at = end;
    }
    Ok((out, None))
}

/// Reads and verifies the blob whose header is at `offset` of the pack `file`.
pub fn read_verified_at(file: &File, offset: u64, header: &BlobHeader) -> std::io::Result<bool> {
    let mut stored = vec![0u8; header.stored_len as usize];
    match file.read_exact_at(&mut stored, offset + HEADER_LEN as u64) {
        Ok(()) => Ok(blob::decode_verified(header, &stored).is_ok()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the index row `loc` of blob `id` names a header that is that blob's (one
/// small read; the body is not verified).
pub fn row_is_sound(repo: &Repository, id: &Id, loc: &Location) -> bool {
    let key = repo.pack_key(&loc.pack);
    let range = loc.offset..loc.offset + HEADER_LEN as u64;
    match repo.store.get_range(&key, range) {
        Ok(Some(buf)) if buf.len() == HEADER_LEN => BlobHeader::decode(&buf).is_ok_and(|h| {
            h.id == *id && h.stored_len == loc.stored_len && h.raw_len == loc.raw_len
        }),
        _ => false,
    }
}

/// Whether the pack `file` holds the header of blob `id` at `loc` (one small read).
pub fn header_matches(file: &File, id: &Id, loc: &Location) -> bool {
    let mut buf = [0u8; HEADER_LEN];
    if file.read_exact_at(&mut buf, loc.offset).is_err() {
        return false;
    }
    BlobHeader::decode(&buf)
        .is_ok_and(|h| h.id == *id && h.stored_len == loc.stored_len && h.raw_len == loc.raw_len)
}

/// Reads a whole pack file, and the byte ranges of it that are holes (space gc gave
/// back). A filesystem that cannot report holes reports none.
pub fn read_pack(file: &File) -> std::io::Result<(Vec<u8>, Vec<Span>)> {
    let mut bytes = Vec::new();
    let mut reader = file;
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0))?;
    reader.read_to_end(&mut bytes)?;
    let len = bytes.len() as u64;
    let mut holes = Vec::new();
    let mut at = 0;
    while at < len {
        let Ok(hole) = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(at)) else {
            break;
        };
        if hole >= len {
            break;
        }
        let data = rustix::fs::seek(file, rustix::fs::SeekFrom::Data(hole)).unwrap_or(len);
        holes.push((hole, data.min(len)));
        at = data;
    }
    Ok((bytes, holes))
}

/// Merges dead blobs (`(offset, stored_len)`, any order) into the byte ranges of runs
/// of consecutive dead blobs, headers included.
pub fn dead_runs(mut dead: Vec<(u64, u32)>) -> Vec<(u64, u64)> {
    dead.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (offset, stored_len) in dead {
        let end = offset + HEADER_LEN as u64 + u64::from(stored_len);
        match runs.last_mut() {
            Some(last) if last.1 == offset => last.1 = end,
            _ => runs.push((offset, end)),
        }
    }
    runs
}

/// The part of a run of dead blobs that punching can give back: the whole `block`s
/// inside it, so live neighbours are never touched.
pub fn punchable((start, end): (u64, u64), block: u64) -> Option<(u64, u64)> {
    let (start, end) = (start.div_ceil(block) * block, end / block * block);
    (end > start).then_some((start, end))
}

/// Gives back the disk space of runs of dead blobs (see `dead_runs`) in the pack at
/// `path` by punching holes in them. Returns the bytes the file's allocation shrank
/// by, or `None` when the filesystem cannot punch holes.
pub fn punch(path: &Path, runs: &[(u64, u64)]) -> std::io::Result<Option<u64>> {
    use rustix::fs::FallocateFlags;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let meta = file.metadata()?;
    let block = meta.blksize().max(512);
    if block > crate::limits::RESYNC_WINDOW_BYTES as u64 {
        return Ok(None); // a scan could not find the header after such a hole
    }
    let before = meta.blocks() * 512;
    for &run in runs {
        let Some((start, end)) = punchable(run, block) else {
            continue;
        };
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&file, flags, start, end - start) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let after = file.metadata()?.blocks() * 512;
    Ok(Some(before.saturating_sub(after)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pack's bytes built by hand: header and two blobs.
    fn sample_pack() -> Vec<u8> {
        let mut bytes = pack_header(BlobKind::Data).to_vec();
        for raw in [vec![1u8; 4000], b"hello".to_vec()] {
            let blob = blob::encode(BlobKind::Data, Id::of(&raw), &raw, 3).unwrap();
            bytes.extend_from_slice(&blob.header.encode());
            bytes.extend_from_slice(&blob.stored);
        }
        bytes
    }

    #[test]
    fn scan_finds_every_blob_of_a_sound_pack() {
        let (blobs, stopped) = scan(&sample_pack(), &[]);
        assert_eq!(stopped, None);
        assert_eq!(blobs.len(), 2);
        assert!(blobs.iter().all(|b| b.verified.is_ok()));
    }

    #[test]
    fn every_flipped_bit_after_the_header_is_detected_or_harmless() {
        let pack = sample_pack();
        let (sound, _) = scan(&pack, &[]);
        let mut harmless = Vec::new();
        for at in PACK_HEADER_LEN..pack.len() {
            for bit in 0..8 {
                let mut bytes = pack.clone();
                bytes[at] ^= 1 << bit;
                let (blobs, stopped) = scan(&bytes, &[]);
                let damaged = stopped.is_some() || blobs.iter().any(|b| b.verified.is_err());
                if !damaged {
                    // Unnoticed only if every blob is still there, whole: same headers
                    // (so the same ids) and bodies that decode to what the ids say.
                    let same = blobs.len() == sound.len()
                        && blobs
                            .iter()
                            .zip(&sound)
                            .all(|(b, s)| (b.offset, b.header) == (s.offset, s.header));
                    assert!(same, "flip of bit {bit} at {at} went unnoticed");
                    harmless.push((at, bit));
                }
            }
        }
        // The one such bit: the unused bit of the first zstd frame's header descriptor
        // (decoders must ignore it), in the only compressed blob.
        let frame = PACK_HEADER_LEN + HEADER_LEN;
        assert_eq!(harmless, vec![(frame + 4, 4)]);
    }

    #[test]
    fn truncated_packs_never_panic() {
        let pack = sample_pack();
        for len in 0..pack.len() {
            let (blobs, _) = scan(&pack[..len], &[]);
            assert!(blobs.len() <= 2);
        }
    }

    #[test]
    fn punching_dead_runs_gives_space_back_and_every_live_blob_still_scans() {
        // Five incompressible blobs; 1 and 2 (consecutive) and 4 (the last) die.
        let mut bytes = pack_header(BlobKind::Data).to_vec();
        let mut at = Vec::new();
        for n in 0..5u32 {
            let mut raw = vec![0u8; 30_000 + n as usize * 7_001];
            blake3::Hasher::new()
                .update(&n.to_le_bytes())
                .finalize_xof()
                .fill(&mut raw);
            let blob = blob::encode(BlobKind::Data, Id::of(&raw), &raw, 3).unwrap();
            at.push((bytes.len() as u64, blob.header.stored_len));
            bytes.extend_from_slice(&blob.header.encode());
            bytes.extend_from_slice(&blob.stored);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pack");
        #[allow(clippy::disallowed_methods)] // a test fixture, not repository data
        std::fs::write(&path, &bytes).unwrap();
        let runs = dead_runs(vec![at[4], at[1], at[2]]);
        assert_eq!(runs.len(), 2, "blobs 1 and 2 make one run");
        let freed = punch(&path, &runs)
            .unwrap()
            .expect("this filesystem punches holes");
        let want: u64 = runs
            .iter()
            .filter_map(|&r| punchable(r, 4096))
            .map(|(a, b)| b - a)
            .sum();
        assert!(
            freed >= want && want > 60_000,
            "freed {freed}, punchable {want}"
        );
        let (read, holes) = read_pack(&File::open(&path).unwrap()).unwrap();
        assert_eq!(read.len(), bytes.len(), "punching changed the file's size");
        assert!(!holes.is_empty());
        let (blobs, stopped) = scan(&read, &holes);
        assert_eq!(stopped, None, "{blobs:?}");
        for live in [0, 3] {
            let b = blobs
                .iter()
                .find(|b| b.offset == at[live].0)
                .expect("live blob found");
            assert!(b.verified.is_ok());
        }
        assert!(
            blobs
                .iter()
                .filter(|b| b.verified.is_err())
                .all(|b| b.collected)
        );
        // Bytes outside the punched ranges are untouched.
        let mut expect = bytes.clone();
        for (a, b) in runs.iter().filter_map(|&r| punchable(r, 4096)) {
            expect[a as usize..b as usize].fill(0);
        }
        assert!(read == expect);
    }

    #[test]
    fn searched_ranges_hand_out_each_byte_once() {
        let mut s = Searched::default();
        assert_eq!(s.claim(10, 20), vec![(10, 20)]);
        assert_eq!(s.claim(15, 30), vec![(20, 30)]);
        assert_eq!(s.claim(0, 40), vec![(0, 10), (30, 40)]);
        assert_eq!(s.claim(5, 35), vec![]);
        assert_eq!(s.claim(50, 60), vec![(50, 60)]);
        assert_eq!(s.claim(45, 55), vec![(45, 50)]);
        assert_eq!(s.claim(40, 45), vec![(40, 45)]);
        assert_eq!(s.claim(0, 61), vec![(60, 61)]);
        assert_eq!(s.claim(7, 7), vec![]);
        assert_eq!(s.0.len(), 1);
    }

    /// `headers` as it was before each byte was searched once: every hole searches
    /// its whole window again.
    fn headers_searching_every_window(bytes: &[u8], holes: &[(u64, u64)]) -> Headers {
        let Some(start) = header_len(bytes) else {
            return (Vec::new(), Some("bad pack header".into()));
        };
        let mut found = std::collections::BTreeMap::new();
        let mut starts = vec![start];
        let mut visited = HashSet::new();
        let mut reached_end = false;
        let mut first_error = None;
        while let Some(from) = starts.pop() {
            if !visited.insert(from) {
                continue;
            }
            let mut at = from;
            loop {
                if at >= bytes.len() {
                    reached_end = true;
                    break;
                }
                match header_at(bytes, at) {
                    Ok(header) => {
                        found.insert(at as u64, header);
                        at += HEADER_LEN + header.stored_len as usize;
                        if at < bytes.len() && !visited.insert(at) {
                            break;
                        }
                    }
                    Err(why) => {
                        let span = (at as u64, (at + HEADER_LEN) as u64);
                        let Some(&(_, hole_end)) =
                            holes.iter().find(|h| h.0 < span.1 && span.0 < h.1)
                        else {
                            first_error.get_or_insert(format!("at offset {at}: {why}"));
                            break;
                        };
                        let from = hole_end as usize;
                        let last = bytes
                            .len()
                            .saturating_sub(HEADER_LEN - 1)
                            .min(from.saturating_add(crate::limits::RESYNC_WINDOW_BYTES));
                        let candidates: Vec<usize> = (from..last)
                            .filter(|&p| bytes[p..p + 4] == *blob::BLOB_MAGIC)
                            .filter(|&p| {
                                header_at(bytes, p).is_ok_and(|h| {
                                    let body =
                                        p + HEADER_LEN..p + HEADER_LEN + h.stored_len as usize;
                                    blob::decode_verified(&h, &bytes[body]).is_ok()
                                })
                            })
                            .collect();
                        if candidates.is_empty() {
                            reached_end = true;
                        }
                        starts.extend(candidates);
                        break;
                    }
                }
            }
        }
        let stopped = if reached_end { None } else { first_error };
        (found.into_iter().collect(), stopped)
    }

    #[test]
    fn scans_after_many_holes_find_what_searching_every_window_finds() {
        // Packs of small blobs with runs of zeros (holes) between some of them, and
        // holes over damaged headers: the same blobs, and the same verdict, as the
        // search of every window.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut with_holes, mut reaching_the_end) = (0, 0);
        for round in 0..300u64 {
            let mut bytes = pack_header(BlobKind::Data).to_vec();
            let mut holes = Vec::new();
            for n in 0..(next() % 40) {
                match next() % 4 {
                    0 => {
                        let len = 64 + (next() % 300) as usize;
                        holes.push((bytes.len() as u64, (bytes.len() + len) as u64));
                        bytes.resize(bytes.len() + len, 0);
                    }
                    1 => {
                        // A damaged header, sometimes under a hole.
                        let at = bytes.len();
                        let raw = [n as u8; 7];
                        let blob = blob::encode(BlobKind::Data, Id::of(&raw), &raw, 3).unwrap();
                        bytes.extend_from_slice(&blob.header.encode());
                        bytes.extend_from_slice(&blob.stored);
                        bytes[at + 20] ^= 1;
                        if next() % 2 == 0 {
                            holes.push((at as u64 - 1, at as u64 + 10));
                        }
                    }
                    _ => {
                        let raw = vec![(round + n) as u8; (next() % 100) as usize];
                        let blob = blob::encode(BlobKind::Data, Id::of(&raw), &raw, 3).unwrap();
                        bytes.extend_from_slice(&blob.header.encode());
                        bytes.extend_from_slice(&blob.stored);
                    }
                }
            }
            let (found, stopped) = headers(&bytes, &holes);
            let (expect, expect_stopped) = headers_searching_every_window(&bytes, &holes);
            assert_eq!(found, expect, "round {round}");
            assert_eq!(stopped.is_some(), expect_stopped.is_some(), "round {round}");
            with_holes += usize::from(holes.len() > 1);
            reaching_the_end += usize::from(stopped.is_none() && holes.len() > 1);
        }
        // Both verdicts were reached through holes.
        assert!(with_holes > 100 && reaching_the_end > 20 && reaching_the_end < with_holes);
    }

    #[test]
    fn damage_outside_a_hole_is_never_called_collected() {
        let mut bytes = sample_pack();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let (blobs, _) = scan(&bytes, &[(0, 8)]);
        assert!(blobs[1].verified.is_err() && !blobs[1].collected);
    }
}
