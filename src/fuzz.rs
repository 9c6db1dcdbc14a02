//! Every decoder of bytes volsnap reads back from disk, as a fuzz target: the one list
//! that the stable harness (`tests/fuzz.rs`, part of `cargo test`) and the cargo-fuzz
//! target (`fuzz/`) both run. Not part of the API.
//!
//! A target decodes arbitrary bytes and checks what a successful decode promises (the
//! invariants the rest of volsnap relies on, and that re-encoding reads back the same).
//! An error is a correct answer; a panic is a bug. Memory is the harness's to measure.
//! `seeds` are valid encodings of realistic values, for the harness to mutate.

use std::path::{Path, PathBuf};

use crate::id::Id;
use crate::limits::BLOB_SIZE_MAX;
use crate::pack::blob::{self, BlobHeader, BlobKind, HEADER_LEN};
use crate::pack::{self, PACK_HEADER_LEN};
use crate::tree::{self, Entry, Kind, Run, Tree, Xattr};

/// One decoder.
#[derive(Debug)]
pub struct Target {
    pub name: &'static str,
    /// Decodes the bytes: whether they decoded (an error is a correct answer too).
    /// Panics only on a bug.
    pub run: fn(&[u8]) -> bool,
    /// Valid encodings of realistic values.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target, one per byte format read back.
pub const TARGETS: &[Target] = &[
    Target {
        name: "blob",
        run: blob_target,
        seeds: blob_seeds,
    },
    Target {
        name: "pack",
        run: pack_target,
        seeds: pack_seeds,
    },
    Target {
        name: "pack_file",
        run: pack_file_target,
        seeds: pack_file_seeds,
    },
    Target {
        name: "tree",
        run: tree_target,
        seeds: tree_seeds,
    },
    Target {
        name: "record",
        run: record_target,
        seeds: record_seeds,
    },
    Target {
        name: "journal",
        run: journal_target,
        seeds: journal_seeds,
    },
    Target {
        name: "restore_record",
        run: restore_record_target,
        seeds: restore_record_seeds,
    },
    Target {
        name: "config",
        run: config_target,
        seeds: config_seeds,
    },
    Target {
        name: "quiesce",
        run: quiesce_target,
        seeds: quiesce_seeds,
    },
    Target {
        name: "cache",
        run: cache_target,
        seeds: cache_seeds,
    },
    Target {
        name: "lease",
        run: lease_target,
        seeds: lease_seeds,
    },
    Target {
        name: "index_row",
        run: index_row_target,
        seeds: index_row_seeds,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// For a fuzzer with one entry point (cargo-fuzz): the first byte picks the target,
/// the rest is its input.
pub fn any(data: &[u8]) -> bool {
    data.split_first()
        .is_some_and(|(&pick, rest)| (TARGETS[pick as usize % TARGETS.len()].run)(rest))
}

/// Deterministic filler bytes that do not compress.
fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Makes the header checksum of the blob header at `at` right. The checksum tells
/// damage from data; a crafted file gets it right, so every field must be safe to
/// decode whatever the checksum says.
fn fix_blob_check(bytes: &mut [u8], at: usize) {
    if at + HEADER_LEN <= bytes.len() {
        let check = blake3::hash(&bytes[at..at + 48]);
        bytes[at + 48..at + HEADER_LEN].copy_from_slice(&check.as_bytes()[0..4]);
    }
}

/// Runs `f` on `data`, then again with the checksum of every blob header (found by its
/// magic) made right, when that changes anything: whether either decoded.
fn with_checks_fixed(data: &[u8], f: impl Fn(&[u8]) -> bool) -> bool {
    let decoded = f(data);
    let mut fixed = data.to_vec();
    let mut at = 0;
    while let Some(p) = fixed[at..]
        .windows(4)
        .position(|w| w == blob::BLOB_MAGIC)
        .map(|p| p + at)
    {
        fix_blob_check(&mut fixed, p);
        at = p + 1;
    }
    (fixed != data && f(&fixed)) || decoded
}

// ---- blob -------------------------------------------------------------------------

fn blob_target(data: &[u8]) -> bool {
    with_checks_fixed(data, check_blob)
}

fn check_blob(data: &[u8]) -> bool {
    let Ok(header) = BlobHeader::decode(data) else {
        return false;
    };
    assert!(header.raw_len <= BLOB_SIZE_MAX && header.stored_len <= BLOB_SIZE_MAX);
    assert_eq!(BlobHeader::decode(&header.encode()), Ok(header));
    let body = &data[HEADER_LEN..];
    let body = &body[..body.len().min(header.stored_len as usize)];
    let Ok(raw) = blob::decode_verified(&header, body) else {
        return false;
    };
    assert_eq!(raw.len(), header.raw_len as usize);
    assert_eq!(Id::of(&raw), header.id);
    true
}

fn encoded_blob(kind: BlobKind, raw: &[u8]) -> Vec<u8> {
    let blob = blob::encode(kind, Id::of(raw), raw, 3).expect("seed blobs encode");
    let mut out = blob.header.encode().to_vec();
    out.extend_from_slice(&blob.stored);
    out
}

fn blob_seeds() -> Vec<Vec<u8>> {
    let text: Vec<u8> = (0..2000u32)
        .flat_map(|n| format!("line {n} of a log file\n").into_bytes())
        .collect();
    vec![
        encoded_blob(BlobKind::Data, b""),
        encoded_blob(BlobKind::Data, b"hello"),
        encoded_blob(BlobKind::Data, &noise("blob", 200)),
        encoded_blob(BlobKind::Data, &[7u8; 100_000]),
        encoded_blob(BlobKind::Data, &text),
        encoded_blob(BlobKind::Tree, &sample_tree().encode()),
    ]
}

// ---- pack -------------------------------------------------------------------------

fn pack_target(data: &[u8]) -> bool {
    with_checks_fixed(data, |bytes| {
        let whole = check_scan(bytes, &[]);
        // A hole reads as zeros: treat every run of zeros as one, so the scan resumes
        // after it as it does after a hole gc punched.
        let holes = zero_runs(bytes, 64);
        (!holes.is_empty() && check_scan(bytes, &holes)) || whole
    })
}

/// Byte ranges of at least `min` zeros.
fn zero_runs(bytes: &[u8], min: usize) -> Vec<pack::Span> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] != 0 {
            at += 1;
            continue;
        }
        let end = bytes[at..]
            .iter()
            .position(|&b| b != 0)
            .map_or(bytes.len(), |n| at + n);
        if end - at >= min {
            out.push((at as u64, end as u64));
        }
        at = end;
    }
    out
}

/// Scans; whether the scan reached the end of the pack.
fn check_scan(bytes: &[u8], holes: &[pack::Span]) -> bool {
    let (headers, stopped) = pack::headers(bytes, holes);
    let (blobs, scan_stopped) = pack::scan(bytes, holes);
    assert_eq!(stopped, scan_stopped);
    assert_eq!(blobs.len(), headers.len());
    let start = pack::header_len(bytes);
    assert!(start.is_some() || blobs.is_empty());
    let mut previous_end = 0;
    for (b, (offset, header)) in blobs.iter().zip(&headers) {
        assert_eq!((b.offset, b.header), (*offset, *header));
        let end = b.offset + (HEADER_LEN as u64) + u64::from(b.header.stored_len);
        assert!(b.offset >= start.unwrap_or(0) as u64 && end <= bytes.len() as u64);
        assert!(!b.collected || b.verified.is_err());
        // Without holes there is one chain: blobs follow each other.
        if holes.is_empty() {
            assert!(b.offset >= previous_end);
        }
        previous_end = end;
    }
    stopped.is_none()
}

fn sample_pack(blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = pack::PACK_MAGIC.to_vec();
    bytes.extend_from_slice(&pack::PACK_FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&noise("nonce", 16));
    assert_eq!(bytes.len(), PACK_HEADER_LEN);
    for raw in blobs {
        bytes.extend_from_slice(&encoded_blob(BlobKind::Data, raw));
    }
    bytes
}

fn pack_seeds() -> Vec<Vec<u8>> {
    let mut v1 = sample_pack(&[b"one".to_vec()]);
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    v1.drain(16..32);
    // A dead blob gc punched: its bytes read as zeros, the next header follows.
    let mut punched = sample_pack(&[noise("dead", 300), b"live".to_vec()]);
    punched[PACK_HEADER_LEN..PACK_HEADER_LEN + HEADER_LEN + 300].fill(0);
    vec![
        sample_pack(&[]),
        sample_pack(&[vec![1u8; 4000], b"hello".to_vec(), noise("pack", 100)]),
        v1,
        punched,
    ]
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<tempfile::TempDir>> =
        const { std::cell::RefCell::new(None) };
}

/// A scratch directory of this thread, for targets that read files.
fn scratch_path(name: &str) -> PathBuf {
    SCRATCH.with(|s| {
        s.borrow_mut()
            .get_or_insert_with(|| tempfile::tempdir().expect("a scratch directory"))
            .path()
            .join(name)
    })
}

/// The pack readers that take a file: the input is written to one (with holes punched
/// where it has block-aligned zeros) and read back.
fn pack_file_target(data: &[u8]) -> bool {
    // A new file each time: truncating one that has just been written makes ext4 flush
    // it (milliseconds), unlinking it costs nothing.
    let path = scratch_path("fuzz.pack");
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::File::create_new(&path).expect("scratch file");
    std::io::Write::write_all(&mut file, data).expect("scratch file");
    drop(file);
    let zeros = zero_runs(data, 4096);
    if !zeros.is_empty() {
        // Holes only where the file reads as zeros anyway (a filesystem that cannot
        // punch leaves the zeros as data).
        pack::punch(&path, &zeros).expect("punch holes in a scratch file");
    }
    let file = std::fs::File::open(&path).expect("open a scratch file");
    let (bytes, holes) = pack::read_pack(&file).expect("read a scratch file");
    assert!(bytes == data, "a pack reads back as it was written");
    for &(start, end) in &holes {
        assert!(start < end && end <= data.len() as u64);
        assert!(data[start as usize..end as usize].iter().all(|&b| b == 0));
    }
    let (found, stopped) = pack::read_headers(&file).expect("read a scratch file");
    let (expect, expect_stopped) = pack::headers(data, &holes);
    assert_eq!(
        found, expect,
        "reading headers from the file agrees with the bytes"
    );
    assert_eq!(stopped.is_some(), expect_stopped.is_some());
    for (offset, header) in found.iter().take(8) {
        let sound = pack::read_verified_at(&file, *offset, header).expect("read");
        let at = *offset as usize + HEADER_LEN;
        let body = &data[at..at + header.stored_len as usize];
        assert_eq!(sound, blob::decode_verified(header, body).is_ok());
    }
    stopped.is_none()
}

fn pack_file_seeds() -> Vec<Vec<u8>> {
    vec![sample_pack(&[vec![1u8; 4000], b"hello".to_vec()])]
}

// ---- tree -------------------------------------------------------------------------

/// Any tree blob: a directory's entries (versions 1 and 2) or the root of a split one
/// (version 3), through `tree::decode_stored`, the entry every reader uses.
fn tree_target(data: &[u8]) -> bool {
    let Ok(stored) = tree::decode_stored(data) else {
        return false;
    };
    match stored {
        tree::Stored::Tree(tree) => {
            check_tree(&tree);
            let bytes = tree.encode();
            assert_eq!(Tree::decode(&bytes).as_ref(), Ok(&tree));
            // The snapshot's encoder writes the same blob for the same entries (a
            // decoded entry is never over `ENTRY_BYTES_MAX`: it came from the input).
            let dir = tree::encode_dir(&tree.entries).expect("decoded entries encode");
            if dir.parts.is_empty() {
                assert!(dir.root == bytes, "encode_dir and Tree::encode disagree");
            } else {
                assert_eq!(tree::decode_stored(&dir.root).map(|_| ()), Ok(()));
            }
        }
        tree::Stored::Split(parts) => {
            assert!(parts.len() >= 2);
            let mut again = vec![data[0]];
            postcard::to_io(&parts, &mut again).expect("ids encode");
            assert_eq!(tree::decode_stored(&again), Ok(tree::Stored::Split(parts)));
        }
    }
    true
}

/// What every decoded tree promises restore and export.
fn check_tree(tree: &Tree) {
    use crate::limits::{NAME_BYTES_MAX, SYMLINK_TARGET_BYTES_MAX};
    for e in &tree.entries {
        assert!(tree::valid_name(&e.name) && e.name.len() <= NAME_BYTES_MAX);
        match &e.kind {
            Kind::Hardlink { target } => assert!(tree::valid_relative_path(target)),
            Kind::Symlink { target } => assert!(target.len() <= SYMLINK_TARGET_BYTES_MAX),
            Kind::File { chunks, .. } => {
                assert!(chunks.iter().all(|r| r.count > 0));
                assert!(chunks.windows(2).all(|w| w[0].id != w[1].id));
            }
            _ => {}
        }
    }
    assert!(tree.entries.windows(2).all(|w| w[0].name < w[1].name));
}

fn entry(name: &str, kind: Kind) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime_ns: 1_700_000_000_123_456_789,
        xattrs: Vec::new(),
    }
}

fn sample_tree() -> Tree {
    let (a, z) = (Id::of(b"a"), Id::of(&[0u8; 16]));
    let mut file = entry(
        "data.bin",
        Kind::File {
            size: 70_000,
            chunks: vec![Run { id: a, count: 1 }, Run { id: z, count: 1 }],
        },
    );
    file.xattrs = vec![Xattr {
        name: b"user.checksum".to_vec(),
        value: b"sha256:00".to_vec(),
    }];
    let mut dir = entry("etc", Kind::Dir { tree: Id::of(b"d") });
    dir.mode = 0o1777;
    Tree {
        entries: vec![
            entry("blk", Kind::BlockDevice { rdev: 0x0801 }),
            entry("chr", Kind::CharDevice { rdev: 0x0103 }),
            file,
            dir,
            entry("fifo", Kind::Fifo),
            entry(
                "link",
                Kind::Hardlink {
                    target: b"etc/passwd".to_vec(),
                },
            ),
            entry(
                "sym",
                Kind::Symlink {
                    target: b"../data.bin".to_vec(),
                },
            ),
        ],
    }
}

fn tree_seeds() -> Vec<Vec<u8>> {
    let sparse = Tree {
        entries: vec![entry(
            "disk.img",
            Kind::File {
                size: 1 << 38,
                chunks: vec![
                    Run {
                        id: Id::of(b"head"),
                        count: 1,
                    },
                    Run {
                        id: Id::of(&[0u8; 16]),
                        count: 1 << 20,
                    },
                ],
            },
        )],
    };
    vec![
        Tree::default().encode(),
        sample_tree().encode(),
        sparse.encode(),
        split_root(),
    ]
}

/// The root blob of a directory too large for one blob (version 3: its parts' ids), as
/// the snapshot's encoder writes it.
fn split_root() -> Vec<u8> {
    let long = "n".repeat(230);
    let entries: Vec<Entry> = (0..20_000)
        .map(|n| entry(&format!("{long}{n:06}"), Kind::Fifo))
        .collect();
    let dir = tree::encode_dir(&entries).expect("a large directory encodes");
    assert!(dir.parts.len() >= 2, "the seed directory is split");
    dir.root
}

// ---- snapshot record --------------------------------------------------------------

fn record_target(data: &[u8]) -> bool {
    use crate::snapshot::Snapshot;
    let Ok(snapshot) = Snapshot::decode(data) else {
        return false;
    };
    assert!(!snapshot.volumes.is_empty());
    let mut labels = std::collections::HashSet::new();
    for v in &snapshot.volumes {
        assert!(tree::valid_name(v.label.as_bytes()) && labels.insert(&v.label));
    }
    assert_eq!(Snapshot::decode(&snapshot.encode()).as_ref(), Ok(&snapshot));
    true
}

fn sample_snapshot() -> crate::snapshot::Snapshot {
    use crate::snapshot::record::{ContainerManifest, MountManifest, RootMeta, Volume};
    crate::snapshot::Snapshot {
        series: "app".into(),
        version: 7,
        time_ns: 1_700_000_000_000_000_000,
        hostname: "host".into(),
        volumes: vec![Volume {
            label: "app-data".into(),
            source: b"/var/lib/docker/volumes/data/_data".to_vec(),
            tree: Id::of(b"root"),
            root: RootMeta {
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime_ns: 1,
                xattrs: Vec::new(),
            },
        }],
        tags: vec!["nightly".into()],
        parent: Some(Id::of(b"parent")),
        stats: crate::snapshot::Stats {
            files: 10,
            dirs: 2,
            bytes: 1 << 20,
            ..Default::default()
        },
        incomplete: true,
        unreadable: vec![crate::snapshot::Unreadable {
            path: b"secret".to_vec(),
            error: "permission denied".into(),
        }],
        notes: vec!["1 socket not included".into()],
        containers: vec![ContainerManifest {
            name: "web".into(),
            id: "0".repeat(64),
            image: "nginx:1".into(),
            image_id: "sha256:00".into(),
            repo_digests: Vec::new(),
            project: Some("shop".into()),
            service: Some("web".into()),
            labels: vec![("k".into(), "v".into())],
            mounts: vec![MountManifest {
                destination: "/data".into(),
                kind: "volume".into(),
                source: Some(b"/var/lib/docker/volumes/data/_data".to_vec()),
                volume: Some("data".into()),
                read_write: true,
                label: Some("app-data".into()),
                skipped: None,
            }],
        }],
    }
}

fn record_seeds() -> Vec<Vec<u8>> {
    let v2 = sample_snapshot().encode();
    // Version 1: the same fields without `containers` (its trailing empty list).
    let mut plain = sample_snapshot();
    plain.containers.clear();
    let mut v1 = plain.encode();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(v1.pop(), Some(0));
    vec![v2, v1]
}

// ---- live-restore journal and restore records -------------------------------------

const RESTORE_ID: &str = "0123456789abcdef";

fn journal_target(data: &[u8]) -> bool {
    use crate::live::journal::Journal;
    let Ok(journal) = Journal::decode(data, RESTORE_ID) else {
        return false;
    };
    for (n, v) in journal.volumes.iter().enumerate() {
        assert!(v.target.is_absolute());
        let stage = format!(".volsnap-stage-{RESTORE_ID}-{n}");
        assert_eq!(v.stage.file_name(), Some(stage.as_ref()));
    }
    let bytes = journal.encode();
    let again = Journal::decode(&bytes, RESTORE_ID).expect("a decoded journal re-encodes");
    assert!(again.encode() == bytes);
    true
}

fn journal_seeds() -> Vec<Vec<u8>> {
    use crate::live::journal::{EntryPhase, EntrySwap, Hook, Journal, RootAttrs, State, Volume};
    let root = RootAttrs {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: 5,
        xattrs: vec![Xattr {
            name: b"user.a".to_vec(),
            value: b"b".to_vec(),
        }],
    };
    let journal = Journal {
        id: RESTORE_ID.into(),
        snapshot: Id::of(b"snap"),
        pid: 4242,
        started_ns: 1_700_000_000_000_000_000,
        state: State::Swapping,
        quiesce: Some(Hook::Shell("systemctl stop app".into())),
        redeploy: Some(Hook::Containers(crate::docker::restore::Redeploy {
            containers: vec![("0".repeat(64), "web".into())],
            health_timeout_s: 60,
        })),
        undo: Some(Id::of(b"undo")),
        volumes: vec![
            Volume {
                label: "data".into(),
                target: PathBuf::from("/srv/app/data"),
                stage: PathBuf::from(format!("/srv/app/.volsnap-stage-{RESTORE_ID}-0")),
                old: Some((2049, 131_074)),
                new: Some((2049, 131_075)),
                swapped: true,
                entries: None,
            },
            Volume {
                label: "db".into(),
                target: PathBuf::from("/mnt/db"),
                stage: PathBuf::from(format!("/mnt/db/.volsnap-stage-{RESTORE_ID}-1")),
                old: Some((2050, 2)),
                new: None,
                swapped: false,
                entries: Some(EntrySwap {
                    phase: EntryPhase::MovingOut,
                    held: PathBuf::from(format!("/mnt/db/.volsnap-old-{RESTORE_ID}-1")),
                    held_ino: Some((2050, 99)),
                    old_root: root.clone(),
                    new_root: Some(root),
                }),
            },
        ],
    };
    vec![journal.encode()]
}

fn restore_record_target(data: &[u8]) -> bool {
    use crate::live::journal::Restore;
    let Ok(record) = Restore::decode(data) else {
        return false;
    };
    let bytes = record.encode();
    let again = Restore::decode(&bytes).expect("a decoded record re-encodes");
    assert!(again.encode() == bytes);
    true
}

fn restore_record_seeds() -> Vec<Vec<u8>> {
    use crate::live::journal::{Restore, RestoreTarget};
    let record = Restore {
        id: RESTORE_ID.into(),
        committed_ns: 1_700_000_000_000_000_000,
        snapshot: Id::of(b"snap"),
        undo: Some(Id::of(b"undo")),
        targets: vec![
            RestoreTarget {
                label: "data".into(),
                path: PathBuf::from("/srv/app/data"),
                existed: true,
            },
            RestoreTarget {
                label: "new".into(),
                path: PathBuf::from("/srv/app/new"),
                existed: false,
            },
        ],
    };
    vec![record.encode()]
}

// ---- config, quiesce journal, files cache, lease rows, index rows -----------------

fn config_target(data: &[u8]) -> bool {
    use crate::repo::Config;
    let Ok((config, id)) = Config::decode(Path::new("/repo/config"), data) else {
        return false;
    };
    assert_eq!(config.validate(), Ok(()));
    let id = id.unwrap_or([7; 16]);
    let again = Config::decode(Path::new("/repo/config"), &config.encode(&id));
    assert_eq!(again.ok(), Some((config, Some(id))));
    true
}

fn config_seeds() -> Vec<Vec<u8>> {
    let small = crate::repo::Config {
        chunk_size_min: 4096,
        chunk_size_avg: 16_384,
        chunk_size_max: 65_536,
        zstd_level: 19,
    };
    // Format version 1: no repository id.
    let mut v1 = b"VSNPCONF".to_vec();
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&postcard::to_stdvec(&small).expect("config encodes"));
    vec![
        crate::repo::Config::default().encode(&[1; 16]),
        small.encode(&[2; 16]),
        v1,
    ]
}

fn quiesce_target(data: &[u8]) -> bool {
    use crate::docker::snapshot::{decode_plan, encode_plan};
    let Some(plan) = decode_plan(data) else {
        return false;
    };
    let bytes = encode_plan(&plan);
    let again = decode_plan(&bytes).expect("a decoded plan re-encodes");
    assert!(encode_plan(&again) == bytes);
    true
}

fn quiesce_seeds() -> Vec<Vec<u8>> {
    use crate::docker::snapshot::{Quiesce, Quiesced, encode_plan};
    let plan = [
        Quiesced {
            id: "a".repeat(64),
            name: "db".into(),
            how: Quiesce::Stop,
        },
        Quiesced {
            id: "b".repeat(64),
            name: "web".into(),
            how: Quiesce::Pause,
        },
    ];
    vec![encode_plan(&plan[..1]), encode_plan(&plan)]
}

fn cache_target(data: &[u8]) -> bool {
    use crate::snapshot::cache::DirCache;
    let Some(cache) = DirCache::decode(data) else {
        return false;
    };
    assert_eq!(DirCache::decode(&cache.encode()).as_ref(), Some(&cache));
    // A hit goes into the snapshot's tree as it is: that tree must read back.
    for f in cache.files.iter().filter(|f| tree::valid_name(&f.name)) {
        let tree = Tree {
            entries: vec![Entry {
                name: f.name.clone(),
                kind: Kind::File {
                    size: f.size,
                    chunks: f.chunks.clone(),
                },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ns: f.mtime_ns,
                xattrs: f.xattrs.clone(),
            }],
        };
        assert!(
            Tree::decode(&tree.encode()).is_ok(),
            "a cached file makes a tree that does not decode"
        );
    }
    true
}

fn cache_seeds() -> Vec<Vec<u8>> {
    use crate::snapshot::cache::{CachedFile, DirCache};
    let file = |name: &str, chunks: Vec<Run>| CachedFile {
        name: name.as_bytes().to_vec(),
        size: 300_000,
        mtime_ns: 1_700_000_000_000_000_001,
        ctime_ns: 1_700_000_000_000_000_002,
        ino: 77,
        xattrs: vec![Xattr {
            name: b"user.x".to_vec(),
            value: vec![1, 2, 3],
        }],
        chunks,
    };
    let row = DirCache {
        files: vec![
            file(
                "a.log",
                vec![
                    Run {
                        id: Id::of(b"1"),
                        count: 1,
                    },
                    Run {
                        id: Id::of(b"2"),
                        count: 3,
                    },
                ],
            ),
            file("empty", Vec::new()),
        ],
    };
    vec![DirCache::default().encode(), row.encode()]
}

fn lease_target(data: &[u8]) -> bool {
    use crate::repo::lease::LeaseRow;
    let Some(row) = LeaseRow::decode(data) else {
        return false;
    };
    // `live_leases` deletes `locks/<lock>` of a dead row: it must name a file there.
    let path = Path::new("/repo/locks").join(&row.lock);
    assert_eq!(path.parent(), Some(Path::new("/repo/locks")));
    assert!(row.lock.starts_with("lease-") && tree::valid_name(row.lock.as_bytes()));
    assert!(LeaseRow::decode(&row.encode()).is_some());
    true
}

fn lease_seeds() -> Vec<Vec<u8>> {
    use crate::repo::lease::LeaseRow;
    let row = LeaseRow {
        lock: "lease-Xa81Qz".into(),
        pid: 31337,
        kind: "snapshot".into(),
        started_ns: 1_700_000_000_000_000_000,
    };
    vec![row.encode()]
}

/// The index's fixed-layout rows: chunk locations, and pack rows.
fn index_row_target(data: &[u8]) -> bool {
    use crate::index::{Location, PackRow};
    let loc = Location::decode(data);
    if let Some(loc) = loc {
        assert!(loc.stored_len <= BLOB_SIZE_MAX && loc.raw_len <= BLOB_SIZE_MAX);
        assert_eq!(Location::decode(&loc.encode()), Some(loc));
    }
    let row = postcard::from_bytes::<PackRow>(data).ok();
    if let Some(row) = &row {
        let bytes = postcard::to_stdvec(row).expect("pack rows encode");
        assert_eq!(
            postcard::from_bytes::<PackRow>(&bytes).ok().as_ref(),
            Some(row)
        );
    }
    loc.is_some() || row.is_some()
}

fn index_row_seeds() -> Vec<Vec<u8>> {
    use crate::index::{Location, PackRow};
    let loc = Location {
        pack: Id::of(b"pack"),
        offset: 8 << 20,
        stored_len: 40_000,
        raw_len: 65_536,
    };
    let row = PackRow {
        kind: 0,
        size_bytes: 8 << 20,
        blobs: 130,
    };
    vec![
        loc.encode().to_vec(),
        postcard::to_stdvec(&row).expect("pack rows encode"),
    ]
}
