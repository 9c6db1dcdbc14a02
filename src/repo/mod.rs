//! A repository: layout, config and format version, opening and creating.
//!
//! Ground truth, in the store (`store`: a local directory or an object-store bucket):
//! ```text
//! config                      immutable after init: magic, format version, chunker settings, id
//! packs/<2 hex>/<id>.pack
//! snapshots/<id>              one immutable record per snapshot (the commit point)
//! series/<hex of the name>    the highest version `forget` removed in a series
//! ```
//! Derived state, in the cache (`Repository::cache`; for a local repository the
//! repository directory itself, for an object store `$XDG_CACHE_HOME/volsnap/<id>`):
//! ```text
//! index.redb                  the index (see `index`)
//! locks/ journals/ restores/  kernel locks, live-restore journals (this host's)
//! tmp/                        files being written
//! ```
//! config: magic "VSNPCONF" (8) | format version u32 LE | postcard `Config`
//! | (version 2) repository id, 16 bytes.
//! Compatibility policy: a build reads every format version up to its own and refuses
//! newer ones with a message; the version only changes with a migration. Version 1
//! had no id (a local repository needs none: its cache is itself).

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Absence, Error, Result};
use crate::fsutil;
use crate::id::Id;
use crate::index::Index;
use crate::limits::{self, FORMAT_VERSION};
use crate::pack::PackReader;
use crate::store::{Location, Store};

pub mod lease;
pub mod repair;
pub mod sync;
pub mod versions;

const CONFIG_MAGIC: &[u8; 8] = b"VSNPCONF";

/// Settings fixed when the repository is created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub chunk_size_min: u32,
    pub chunk_size_avg: u32,
    pub chunk_size_max: u32,
    pub zstd_level: i32,
}

impl Config {
    pub fn chunk_sizes(&self) -> crate::chunker::ChunkSizes {
        crate::chunker::ChunkSizes {
            min: self.chunk_size_min,
            avg: self.chunk_size_avg,
            max: self.chunk_size_max,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            chunk_size_min: limits::CHUNK_SIZE_MIN_DEFAULT,
            chunk_size_avg: limits::CHUNK_SIZE_AVG_DEFAULT,
            chunk_size_max: limits::CHUNK_SIZE_MAX_DEFAULT,
            zstd_level: limits::ZSTD_LEVEL_DEFAULT,
        }
    }
}

impl Config {
    /// Checks the settings against what the chunker and blob format accept, so a
    /// damaged config is an error rather than a panic deep in a snapshot.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let (min, avg, max) = (
            self.chunk_size_min as usize,
            self.chunk_size_avg as usize,
            self.chunk_size_max as usize,
        );
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && min < avg
            && avg < max
            && [min, avg, max].iter().all(|s| s % 2 == 0)
            && max <= limits::READ_BATCH_BYTES
            && max <= limits::BLOB_SIZE_MAX as usize;
        if !ok {
            return Err(format!("chunk sizes {min}/{avg}/{max} out of range"));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(format!("zstd level {} out of range", self.zstd_level));
        }
        Ok(())
    }

    pub(crate) fn encode(&self, id: &[u8; 16]) -> Vec<u8> {
        let mut out = CONFIG_MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&postcard::to_stdvec(self).expect("config encodes"));
        out.extend_from_slice(id);
        out
    }

    /// Decodes a config file: the settings and, from version 2 on, the repository id.
    pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<(Config, Option<[u8; 16]>)> {
        let corrupt = |detail: &str| Error::Corrupt {
            what: "config",
            path: path.to_path_buf(),
            detail: detail.into(),
        };
        if bytes.len() < 12 || &bytes[0..8] != CONFIG_MAGIC {
            return Err(corrupt("not a volsnap repository config"));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version > FORMAT_VERSION {
            return Err(Error::NewerFormat {
                path: path.parent().unwrap_or(path).to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let (config, rest): (Config, &[u8]) =
            postcard::take_from_bytes(&bytes[12..]).map_err(|e| corrupt(&e.to_string()))?;
        config.validate().map_err(|e| corrupt(&e))?;
        let id = match (version, rest.len()) {
            (1, 0) => None,
            (2.., 16) => Some(rest.try_into().expect("16 bytes")),
            _ => return Err(corrupt("trailing bytes after the settings")),
        };
        Ok((config, id))
    }
}

/// A new repository id: 16 bytes from the kernel's random source.
fn new_repository_id() -> Result<[u8; 16]> {
    new_random_id()
}

/// 16 bytes from the kernel's random source (repository, host and gc ids).
pub(crate) fn new_random_id() -> Result<[u8; 16]> {
    use std::io::Read;
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(Error::io("read", "/dev/urandom"))?;
    Ok(id)
}

/// An open repository.
pub struct Repository {
    /// Where its ground truth is, as the user named it.
    pub location: Location,
    /// The store holding the ground truth (config, packs, records, series files).
    pub store: Box<dyn Store>,
    /// The local directory of derived state: index, locks, journals, staging (`tmp`).
    /// For a local repository, the repository directory itself.
    pub cache: PathBuf,
    /// The repository's id (none for a format-1 repository).
    pub id: Option<[u8; 16]>,
    pub config: Config,
    pub index: Index,
    reader: PackReader,
    /// Trees built by dry-run snapshots in this process: `tree::load` reads them like
    /// stored ones; they are never written (see `Packer::dry`).
    pub(crate) unstored: std::sync::Mutex<std::collections::HashMap<Id, Vec<u8>>>,
    /// `locks/index.lock`, held shared while the repository is open (exclusively by
    /// `repair index`), so an index is never replaced under a process using it.
    _open_lock: File,
    /// Ids of the leases this process holds (see `lease_for`).
    pub(crate) held_leases: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Deferred pack logs (`apply_pending_logs`): 0 none, 1 a pending file may be
    /// there, 2 this process applied it.
    pub(crate) pending_logs: std::sync::Mutex<u8>,
}

/// Takes the repository's open lock (`locks/index.lock`): shared for every command,
/// exclusive for `repair index`. Kernel locks die with their process.
fn open_lock(root: &Path, exclusive: bool) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = root.join("locks");
    if !dir.exists() {
        fsutil::create_dir_private(&dir)?;
    }
    let path = dir.join("index.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        // A reader without write access (a read-only mount) still locks: flock works on
        // a descriptor opened for reading.
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                File::open(&path)
            }
            _ => Err(e),
        })
        .map_err(Error::io("open", &path))?;
    let taken = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match taken {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) if exclusive => Err(Error::Busy(format!(
            "another volsnap process has repository {} open; repair the index when it has finished",
            root.display()
        ))),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Busy(format!(
            "the index of repository {} is being rebuilt by `volsnap repair index`; run this again when it has finished",
            root.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path)(e)),
    }
}

/// Names a repository directory may hold; anything else means `root` is some other
/// directory, which init must not fill with repository files.
const LAYOUT: [&str; 10] = [
    "config",
    "index.redb",
    "index.redb.old",
    "journals",
    "locks",
    "packs",
    "restores",
    "series",
    "snapshots",
    "tmp",
];

fn refuse_foreign_directory(root: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotADirectory => return Err(not_a_directory(root)),
        Err(e) => return Err(Error::io("read directory", root)(e)),
    };
    for entry in entries {
        let name = entry
            .map_err(Error::io("read directory", root))?
            .file_name();
        if !LAYOUT.iter().any(|l| name == *l) {
            return Err(Error::Usage(format!(
                "{} is not empty and is not a volsnap repository; choose another --repo",
                root.display()
            )));
        }
    }
    Ok(())
}

/// Reads `root/config`; a path that holds no repository is `Error::NoRepository`
/// with the reason.
fn read_config(root: &Path) -> Result<Vec<u8>> {
    let config_path = root.join("config");
    std::fs::read(&config_path).map_err(|e| match absence(root) {
        Some(why) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            Error::NoRepository {
                path: root.to_path_buf(),
                why,
            }
        }
        _ => Error::io("read", &config_path)(e),
    })
}

/// Why `root` holds no repository, or `None` when it has a config (or cannot be told).
fn absence(root: &Path) -> Option<Absence> {
    match std::fs::metadata(root) {
        Ok(m) if !m.is_dir() => Some(Absence::NotADirectory),
        Ok(_) => match std::fs::symlink_metadata(root.join("config")) {
            Err(e) if e.kind() == ErrorKind::NotFound => Some(Absence::NoConfig),
            _ => None,
        },
        Err(e) if e.kind() == ErrorKind::NotADirectory => Some(Absence::NotADirectory),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let parent = root.parent().filter(|p| !p.as_os_str().is_empty());
            match parent.map(std::fs::metadata) {
                Some(Err(e)) if e.kind() == ErrorKind::NotFound => Some(Absence::ParentMissing {
                    parent: parent.expect("matched Some").to_path_buf(),
                }),
                _ => Some(Absence::Missing),
            }
        }
        Err(_) => None,
    }
}

fn not_a_directory(root: &Path) -> Error {
    Error::Usage(format!(
        "{} is not a directory; choose another --repo",
        root.display()
    ))
}

/// The repository used when neither `--repo` nor `VOLSNAP_REPO` is given:
/// `$XDG_DATA_HOME/volsnap`, else `$HOME/.local/share/volsnap`.
pub fn default_path() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("volsnap");
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/share/volsnap")
}

/// A store, its settings and id, and its cache directory.
type Located = (Box<dyn Store>, Config, Option<[u8; 16]>, PathBuf);

/// Where the derived state of an object-store repository goes: `--cache-dir` if given.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub cache_dir: Option<PathBuf>,
    /// Object stores: index the packs other hosts logged since the last sync only
    /// when a lookup first misses (`Repository::apply_pending_logs`), not at open;
    /// removals are applied at open all the same. For snapshots, which need those rows
    /// only to deduplicate new data (a no-change snapshot never does).
    pub defer_pack_logs: bool,
}

impl Repository {
    /// Creates a repository at `root` if none is there. Returns it and whether it was created.
    ///
    /// Only `root` itself is created, never a missing parent: a repository path whose
    /// parent is missing is a mistyped path or a disk that is not mounted, and filling
    /// the root filesystem instead is the failure this refuses (see `init_default`
    /// for the one path whose parents are created).
    pub fn init(root: &Path, config: Config) -> Result<(Repository, bool)> {
        Repository::init_at(
            &Location::Local(root.to_path_buf()),
            config,
            &OpenOptions::default(),
        )
    }

    /// Creates a repository at `location` if none is there (`init`). An object-store
    /// repository needs its bucket to exist; only objects under its prefix are written.
    pub fn init_at(
        location: &Location,
        config: Config,
        opts: &OpenOptions,
    ) -> Result<(Repository, bool)> {
        let Location::Local(root) = location else {
            let store = location.open_store()?;
            if store.get("config")?.is_some() {
                return Ok((Repository::open_at(location, opts)?, false));
            }
            if !store.list("")?.is_empty() {
                return Err(Error::Usage(format!(
                    "{location} holds objects but no volsnap config: choose another prefix"
                )));
            }
            let id = new_repository_id()?;
            // Two inits racing on a store without conditional writes may both write;
            // each then opens whichever config is there (the same settings, so only the
            // id, and with it the cache directory, differ).
            let created = store.put_new("config", &config.encode(&id))?;
            return Ok((Repository::open_at(location, opts)?, created));
        };
        let root = root.as_path();
        let config_path = root.join("config");
        if config_path.exists() {
            return Ok((Repository::open(root)?, false));
        }
        refuse_foreign_directory(root)?;
        if let Err(e) = fsutil::create_dir_private_here(root) {
            return Err(match absence(root) {
                Some(Absence::ParentMissing { parent }) => Error::Usage(format!(
                    "cannot create repository {}: {} does not exist (a disk not mounted, or a \
                     mistyped path?); create it first",
                    root.display(),
                    parent.display()
                )),
                Some(Absence::NotADirectory) => not_a_directory(root),
                _ => e,
            });
        }
        for dir in ["packs", "snapshots", "tmp", "locks"] {
            fsutil::create_dir_private(&root.join(dir))?;
        }
        Index::open(&root.join("index.redb"), true)?;
        fsutil::fsync_dir(root)?;
        // The config is the last thing written: a repository without it does not exist.
        // Two concurrent inits race here; the loser keeps the winner's config.
        let id = new_repository_id()?;
        let created =
            fsutil::write_new_durable(&root.join("tmp"), &config_path, &config.encode(&id))?;
        Ok((Repository::open(root)?, created))
    }

    /// Opens the default repository (`default_path`), creating it and its missing
    /// parents on first use. Returns it and whether it was created.
    pub fn init_default(config: Config) -> Result<(Repository, bool)> {
        let root = default_path();
        if let Some(parent) = root.parent() {
            fsutil::create_dir_private(parent)?;
        }
        Repository::init(&root, config)
    }

    /// Reads and decodes the config at `location`, and finds the cache directory.
    fn locate(location: &Location, opts: &OpenOptions) -> Result<Located> {
        let store = location.open_store()?;
        match location {
            Location::Local(root) => {
                let bytes = read_config(root)?;
                let (config, id) = Config::decode(&root.join("config"), &bytes)?;
                Ok((store, config, id, root.clone()))
            }
            Location::S3 { .. } => {
                let shown = PathBuf::from(location.to_string());
                let bytes = store.get("config")?.ok_or_else(|| Error::NoRepository {
                    path: shown.clone(),
                    why: Absence::NoConfig,
                })?;
                let (config, id) = Config::decode(&store.display("config"), &bytes)?;
                let Some(id) = id else {
                    return Err(Error::Corrupt {
                        what: "config",
                        path: store.display("config"),
                        detail: "an object-store repository's config has no id".into(),
                    });
                };
                let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
                let cache = crate::store::cache_dir(&hex, opts.cache_dir.as_deref());
                fsutil::create_dir_private(&cache)?;
                for dir in ["tmp", "locks"] {
                    fsutil::create_dir_private(&cache.join(dir))?;
                }
                Ok((store, config, Some(id), cache))
            }
        }
    }

    /// Opens an existing repository, for `repair index` only, with a new, empty index
    /// at `index` (a temporary file that `install_index` later renames into place),
    /// holding the repository's open lock exclusively: no other process has the
    /// repository open while the index is rebuilt, and none opens it until the rebuild
    /// is over (they exit with code 11).
    pub fn open_for_rebuild(location: &Location, opts: &OpenOptions) -> Result<Repository> {
        let (store, config, id, cache) = Repository::locate(location, opts)?;
        let lock = open_lock(&cache, true)?;
        let index = rebuild_path(&cache);
        // Left by an interrupted rebuild: start from nothing.
        match std::fs::remove_file(&index) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &index)(e)),
        }
        let index = Index::open(&index, true)?;
        Ok(Repository::assemble(
            location, store, cache, id, config, index, lock,
        ))
    }

    /// Puts the rebuilt index (`open_for_rebuild`) in place of `index.redb` in one
    /// rename (the old file, if any, is kept as `index.redb.old`): at every instant
    /// `index.redb` is either the old index or the whole new one.
    pub fn install_index(&self) -> Result<()> {
        let new = rebuild_path(&self.cache);
        let path = self.cache.join("index.redb");
        let old = self.cache.join("index.redb.old");
        if path.exists() {
            match std::fs::remove_file(&old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &old)(e)),
            }
            std::fs::hard_link(&path, &old).map_err(Error::io("keep the old index as", &old))?;
        }
        fsutil::rename_durable(&new, &path)
    }

    fn assemble(
        location: &Location,
        store: Box<dyn Store>,
        cache: PathBuf,
        id: Option<[u8; 16]>,
        config: Config,
        index: Index,
        open_lock: File,
    ) -> Repository {
        Repository {
            location: location.clone(),
            store,
            cache,
            id,
            config,
            index,
            reader: PackReader::default(),
            unstored: Default::default(),
            _open_lock: open_lock,
            held_leases: Default::default(),
            pending_logs: Default::default(),
        }
    }

    /// Opens an existing local repository.
    pub fn open(root: &Path) -> Result<Repository> {
        Repository::open_at(
            &Location::Local(root.to_path_buf()),
            &OpenOptions::default(),
        )
    }

    /// Opens an existing repository at `location`. A new cache (a host that has not
    /// used this object-store repository before) starts with an empty index, which
    /// `sync` fills from the store.
    pub fn open_at(location: &Location, opts: &OpenOptions) -> Result<Repository> {
        let (store, config, id, cache) = Repository::locate(location, opts)?;
        let lock = open_lock(&cache, false)?;
        // A cache whose index is new (lost, deleted, or a new host) must also apply
        // this host's own logs: they describe packs the old index had.
        let fresh = !cache.join("index.redb").exists();
        let index = Index::open(&cache.join("index.redb"), !location.is_local())?;
        let repo = Repository::assemble(location, store, cache, id, config, index, lock);
        if !location.is_local() {
            crate::repo::sync::sync_deferring(&repo, fresh, opts.defer_pack_logs)?;
            // Lease objects this host's killed processes left (one LIST of its prefix).
            repo.clean_dead_bucket_leases()?;
        }
        Ok(repo)
    }

    /// The key of pack `id` in the store.
    pub fn pack_key(&self, id: &Id) -> String {
        let hex = id.hex();
        format!("packs/{}/{hex}.pack", &hex[..2])
    }

    /// How messages name pack `id` (its path, or its URL in an object store).
    pub fn pack_path(&self, id: &Id) -> PathBuf {
        self.store.display(&self.pack_key(id))
    }

    /// A local file with the bytes of pack `id`, or `None` if the store has no such pack.
    pub fn open_pack(&self, id: &Id) -> Result<Option<File>> {
        self.store.open(&self.pack_key(id), &self.tmp_dir())
    }

    /// Every pack in the store (indexed or not), by the id in its name, with its size.
    pub fn pack_files(&self) -> Result<Vec<(Id, u64)>> {
        let mut out = Vec::new();
        for object in self.store.list("packs/")? {
            let name = object.key.rsplit('/').next().unwrap_or("");
            if let Some(id) = name.strip_suffix(".pack").and_then(Id::from_hex)
                && object.key == self.pack_key(&id)
            {
                out.push((id, object.size));
            }
        }
        Ok(out)
    }

    /// The local directory for files being written (in the cache).
    pub fn tmp_dir(&self) -> PathBuf {
        self.cache.join("tmp")
    }

    /// Reads and verifies the blob `id`.
    pub fn read_blob(&self, id: &Id) -> Result<Vec<u8>> {
        let loc = self.locate_blob(id)?;
        self.reader.read(self, id, &loc)
    }

    /// The index row of blob `id`, indexing deferred pack logs first if it has none.
    fn locate_blob(&self, id: &Id) -> Result<crate::index::Location> {
        match self.index.lookup(id)? {
            Some(loc) => Ok(loc),
            None if self.apply_pending_logs()? => self
                .index
                .lookup(id)?
                .ok_or(Error::MissingChunk { id: *id }),
            None => Err(Error::MissingChunk { id: *id }),
        }
    }

    /// Indexes the pack logs deferring syncs left (`OpenOptions::defer_pack_logs`,
    /// `<cache>/pending-logs`). Returns whether there were any (indexed now, or by
    /// another thread or process before this returned): a lookup that missed is worth
    /// repeating then.
    pub fn apply_pending_logs(&self) -> Result<bool> {
        let mut state = self.pending_logs.lock().expect("pending logs lock");
        if *state == 1 {
            crate::repo::sync::apply_pending(self)?;
            self.index.refresh();
            *state = 2;
        }
        Ok(*state == 2)
    }

    /// Tells the pack reader the order in which packs will be needed (see
    /// `PackReader::plan`); `read_ahead` threads then download them ahead of the readers
    /// until `stop_reading_ahead`.
    pub fn plan_reads(&self, packs: Vec<Id>) {
        self.reader.plan(packs);
    }

    /// Downloads planned packs ahead of the readers; returns when the plan is done or
    /// stopped. Run on threads of its own.
    pub fn read_ahead(&self) {
        self.reader.read_ahead(self);
    }

    pub fn stop_reading_ahead(&self) {
        self.reader.stop_reading_ahead();
    }

    /// Reads the blob `id` as stored, after decompressing and re-hashing it (`copy`
    /// appends it to another repository as it is).
    pub fn read_blob_encoded(&self, id: &Id) -> Result<crate::pack::blob::EncodedBlob> {
        let loc = self.locate_blob(id)?;
        self.reader.read_encoded(self, id, &loc)
    }
}

/// Where `repair index` builds the new index.
fn rebuild_path(cache: &Path) -> PathBuf {
    cache
        .join("tmp")
        .join(format!("index-rebuild-{}.redb", std::process::id()))
}
