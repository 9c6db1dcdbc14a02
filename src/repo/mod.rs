//! A repository on disk: layout, config and format version, opening and creating.
//!
//! ```text
//! <repo>/config               immutable after init: magic, format version, chunker settings
//! <repo>/index.redb           the index (derived; see `index`)
//! <repo>/packs/<2 hex>/<id>.pack
//! <repo>/snapshots/<id>       one immutable record per snapshot (the commit point)
//! <repo>/tmp/                 packs and records being written
//! ```
//! config file: magic "VSNPCONF" (8) | format version u32 LE | postcard `Config`.
//! Compatibility policy: a build reads every format version up to its own and refuses
//! newer ones with a message; the version only changes with a migration.

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

pub mod lease;
pub mod repair;

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

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = CONFIG_MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&postcard::to_stdvec(self).expect("config encodes"));
        out
    }

    pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Config> {
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
        let config: Config =
            postcard::from_bytes(&bytes[12..]).map_err(|e| corrupt(&e.to_string()))?;
        config.validate().map_err(|e| corrupt(&e))?;
        Ok(config)
    }
}

/// An open repository.
pub struct Repository {
    pub root: PathBuf,
    pub config: Config,
    pub index: Index,
    reader: PackReader,
    /// Pack shards this process has made durable (see `ensure_shard`).
    shards: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    /// Trees built by dry-run snapshots in this process: `tree::load` reads them like
    /// stored ones; they are never written (see `Packer::dry`).
    pub(crate) unstored: std::sync::Mutex<std::collections::HashMap<Id, Vec<u8>>>,
    /// `locks/index.lock`, held shared while the repository is open (exclusively by
    /// `repair index`), so an index is never replaced under a process using it.
    _open_lock: File,
    /// Ids of the leases this process holds (see `lease_for`).
    pub(crate) held_leases: std::sync::Mutex<std::collections::BTreeSet<u64>>,
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

impl Repository {
    /// Creates a repository at `root` if none is there. Returns it and whether it was created.
    ///
    /// Only `root` itself is created, never a missing parent: a repository path whose
    /// parent is missing is a mistyped path or a disk that is not mounted, and filling
    /// the root filesystem instead is the failure this refuses (see `init_default`
    /// for the one path whose parents are created).
    pub fn init(root: &Path, config: Config) -> Result<(Repository, bool)> {
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
        let created = fsutil::write_new_durable(&root.join("tmp"), &config_path, &config.encode())?;
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

    /// Opens an existing repository, for `repair index` only, with a new, empty index
    /// at `index` (a temporary file that `install_index` later renames into place),
    /// holding the repository's open lock exclusively: no other process has the
    /// repository open while the index is rebuilt, and none opens it until the rebuild
    /// is over (they exit with code 11).
    pub fn open_for_rebuild(root: &Path, index: &Path) -> Result<Repository> {
        let config_path = root.join("config");
        let bytes = read_config(root)?;
        let config = Config::decode(&config_path, &bytes)?;
        let lock = open_lock(root, true)?;
        // Left by an interrupted rebuild: start from nothing.
        match std::fs::remove_file(index) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", index)(e)),
        }
        let index = Index::open(index, true)?;
        Ok(Repository::assemble(root, config, index, lock))
    }

    /// Puts the rebuilt index at `new` in place of `index.redb` in one rename (the old
    /// file, if any, is kept as `index.redb.old`): at every instant `index.redb` is
    /// either the old index or the whole new one.
    pub fn install_index(&self, new: &Path) -> Result<()> {
        let path = self.root.join("index.redb");
        let old = self.root.join("index.redb.old");
        if path.exists() {
            match std::fs::remove_file(&old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &old)(e)),
            }
            std::fs::hard_link(&path, &old).map_err(Error::io("keep the old index as", &old))?;
        }
        fsutil::rename_durable(new, &path)
    }

    fn assemble(root: &Path, config: Config, index: Index, open_lock: File) -> Repository {
        Repository {
            root: root.to_path_buf(),
            config,
            index,
            reader: PackReader::default(),
            shards: Default::default(),
            unstored: Default::default(),
            _open_lock: open_lock,
            held_leases: Default::default(),
        }
    }

    /// Opens an existing repository.
    pub fn open(root: &Path) -> Result<Repository> {
        let config_path = root.join("config");
        let bytes = read_config(root)?;
        let config = Config::decode(&config_path, &bytes)?;
        let lock = open_lock(root, false)?;
        let index = Index::open(&root.join("index.redb"), false)?;
        Ok(Repository::assemble(root, config, index, lock))
    }

    pub fn pack_path(&self, id: &Id) -> PathBuf {
        let hex = id.hex();
        self.root
            .join("packs")
            .join(&hex[..2])
            .join(format!("{hex}.pack"))
    }

    /// Makes sure the shard directory `dir` of `packs/` exists durably before a pack is
    /// renamed into it. Shards are created on first use; every process fsyncs `packs/`
    /// the first time it uses a shard, whoever created it, so no committed pack depends
    /// on another (possibly killed) process having made the shard's entry durable.
    pub fn ensure_shard(&self, dir: &Path) -> Result<()> {
        let mut known = self.shards.lock().expect("shard lock");
        if known.contains(dir) {
            return Ok(());
        }
        fsutil::create_dir_private(dir)?;
        fsutil::fsync_dir(dir.parent().expect("shards live in packs/"))?;
        known.insert(dir.to_path_buf());
        Ok(())
    }

    /// Every pack file on disk (indexed or not), by the id in its name.
    pub fn pack_files(&self) -> Result<Vec<(Id, PathBuf)>> {
        let dir = self.root.join("packs");
        let mut out = Vec::new();
        for shard in std::fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
            let shard = shard.map_err(Error::io("read directory", &dir))?.path();
            if !shard.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&shard).map_err(Error::io("read directory", &shard))? {
                let f = f.map_err(Error::io("read directory", &shard))?.path();
                let name = f.file_name().and_then(|n| n.to_str());
                if let Some(id) = name
                    .and_then(|n| n.strip_suffix(".pack"))
                    .and_then(Id::from_hex)
                {
                    out.push((id, f));
                }
            }
        }
        Ok(out)
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Reads and verifies the blob `id`.
    pub fn read_blob(&self, id: &Id) -> Result<Vec<u8>> {
        let loc = self
            .index
            .lookup(id)?
            .ok_or(Error::MissingChunk { id: *id })?;
        self.reader.read(self, id, &loc)
    }

    /// Reads the blob `id` as stored, after decompressing and re-hashing it (`copy`
    /// appends it to another repository as it is).
    pub fn read_blob_encoded(&self, id: &Id) -> Result<crate::pack::blob::EncodedBlob> {
        let loc = self
            .index
            .lookup(id)?
            .ok_or(Error::MissingChunk { id: *id })?;
        self.reader.read_encoded(self, id, &loc)
    }
}
