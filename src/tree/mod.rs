//! Trees: one canonical object per directory, stored as a content-addressed blob.
//!
//! Encoding: one version byte followed by postcard `Tree`. Canonical because
//! entries are sorted by raw name bytes, names are unique, chunk lists are collapsed
//! into maximal runs, and postcard is deterministic, so equal directories give equal
//! bytes and equal ids: an unchanged subtree is stored once and costs nothing in later
//! snapshots.
//! Versions: a file's chunks are a list of runs (`Run`: a chunk id repeated `count`
//! times; a hole or a long stretch of zeros is one run of the zero chunk). A file
//! whose runs all have a count of 1 is written as in version 1 (`File`: the plain
//! list of ids), so a tree without repeated chunks is byte for byte what version 1
//! wrote (same ids); a tree holding a file with a longer run is version 2 and writes
//! that file as `FileRuns`, a variant added after the others. Version 1 lists are
//! collapsed into runs when read.
//! **Invariant:** a tree records only what a restore can reproduce (no inode, ctime or
//! link count), so snapshotting a restored tree yields the same root id.
//! **Invariant:** `decode` rejects names that are empty, `.`, `..` or contain `/` or NUL,
//! so no hostile tree can make a restore or export write outside its target.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::limits::{
    ENTRY_BYTES_MAX, NAME_BYTES_MAX, SYMLINK_TARGET_BYTES_MAX, TREE_BLOB_BYTES_MAX,
    TREE_PART_BYTES_MAX, TREE_PART_ENTRIES_AVG,
};
use crate::repo::Repository;

/// Trees whose files all have runs of one chunk.
const TREE_VERSION: u8 = 1;
/// Trees holding a file with a run of more than one chunk (`WireKind::FileRuns`).
const TREE_VERSION_RUNS: u8 = 2;
/// A directory too large for one blob: postcard `Vec<Id>`, the ids of its parts, each
/// a version 1 or 2 tree holding the next entries in name order (see `encode_dir`).
const TREE_VERSION_SPLIT: u8 = 3;

/// An extended attribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// `count` consecutive chunks with the same id (at least one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: Id,
    pub count: u64,
}

/// Appends `count` chunks `id` to a run list, extending its last run when the id is
/// the same: the canonical form has maximal runs.
pub fn push_run(runs: &mut Vec<Run>, id: Id, count: u64) {
    assert!(count > 0, "empty run");
    match runs.last_mut() {
        Some(last) if last.id == id => last.count += count,
        _ => runs.push(Run { id, count }),
    }
}

/// What an entry is, with what is needed to recreate it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireKind", into = "WireKind")]
pub enum Kind {
    /// A regular file: `size` bytes, the concatenation of its chunks (maximal runs).
    File {
        size: u64,
        chunks: Vec<Run>,
    },
    Dir {
        tree: Id,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Another name for the file at `target` (a '/'-separated path from the volume root),
    /// which comes earlier in depth-first name order.
    Hardlink {
        target: Vec<u8>,
    },
    Fifo,
    CharDevice {
        rdev: u64,
    },
    BlockDevice {
        rdev: u64,
    },
}

/// `Kind` as encoded: the variants of version 1 in their order, then `FileRuns`.
#[derive(Serialize, Deserialize)]
enum WireKind {
    File { size: u64, chunks: Vec<Id> },
    Dir { tree: Id },
    Symlink { target: Vec<u8> },
    Hardlink { target: Vec<u8> },
    Fifo,
    CharDevice { rdev: u64 },
    BlockDevice { rdev: u64 },
    FileRuns { size: u64, runs: Vec<Run> },
}

impl From<Kind> for WireKind {
    fn from(k: Kind) -> WireKind {
        match k {
            Kind::File { size, chunks } if chunks.iter().all(|r| r.count == 1) => WireKind::File {
                size,
                chunks: chunks.into_iter().map(|r| r.id).collect(),
            },
            Kind::File { size, chunks } => WireKind::FileRuns { size, runs: chunks },
            Kind::Dir { tree } => WireKind::Dir { tree },
            Kind::Symlink { target } => WireKind::Symlink { target },
            Kind::Hardlink { target } => WireKind::Hardlink { target },
            Kind::Fifo => WireKind::Fifo,
            Kind::CharDevice { rdev } => WireKind::CharDevice { rdev },
            Kind::BlockDevice { rdev } => WireKind::BlockDevice { rdev },
        }
    }
}

impl TryFrom<WireKind> for Kind {
    type Error = &'static str;

    fn try_from(w: WireKind) -> std::result::Result<Kind, &'static str> {
        Ok(match w {
            WireKind::File { size, chunks } => {
                let mut runs = Vec::with_capacity(chunks.len());
                for id in chunks {
                    push_run(&mut runs, id, 1);
                }
                Kind::File { size, chunks: runs }
            }
            WireKind::FileRuns { size, runs } => {
                let mut chunks = Vec::with_capacity(runs.len());
                for r in runs {
                    if r.count == 0 {
                        return Err("a chunk run of length 0");
                    }
                    push_run(&mut chunks, r.id, r.count);
                }
                Kind::File { size, chunks }
            }
            WireKind::Dir { tree } => Kind::Dir { tree },
            WireKind::Symlink { target } => Kind::Symlink { target },
            WireKind::Hardlink { target } => Kind::Hardlink { target },
            WireKind::Fifo => Kind::Fifo,
            WireKind::CharDevice { rdev } => Kind::CharDevice { rdev },
            WireKind::BlockDevice { rdev } => Kind::BlockDevice { rdev },
        })
    }
}

impl Kind {
    /// Whether this is a file with a run of more than one chunk (written as version 2).
    fn has_long_run(&self) -> bool {
        matches!(self, Kind::File { chunks, .. } if chunks.iter().any(|r| r.count > 1))
    }

    pub fn label(&self) -> &'static str {
        match self {
            Kind::File { .. } => "file",
            Kind::Dir { .. } => "dir",
            Kind::Symlink { .. } => "symlink",
            Kind::Hardlink { .. } => "hardlink",
            Kind::Fifo => "fifo",
            Kind::CharDevice { .. } => "chardev",
            Kind::BlockDevice { .. } => "blockdev",
        }
    }
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub xattrs: Vec<Xattr>,
}

impl Entry {
    /// Content size for files, 0 otherwise.
    pub fn size(&self) -> u64 {
        match &self.kind {
            Kind::File { size, .. } => *size,
            _ => 0,
        }
    }
}

/// A directory's entries, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub entries: Vec<Entry>,
}

/// Whether `path` is a '/'-separated relative path of valid names (a hardlink target).
pub fn valid_relative_path(path: &[u8]) -> bool {
    !path.is_empty() && path.split(|&b| b == b'/').all(valid_name)
}

/// Whether `name` is acceptable as one path component.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

impl Tree {
    /// Canonical bytes. Panics if entries are unsorted (a bug in the builder).
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.entries.windows(2).all(|w| w[0].name < w[1].name),
            "tree entries must be sorted and unique"
        );
        let version = if self.entries.iter().any(|e| e.kind.has_long_run()) {
            TREE_VERSION_RUNS
        } else {
            TREE_VERSION
        };
        let mut out = vec![version];
        postcard::to_io(self, &mut out).expect("trees encode");
        out
    }

    /// Decodes and validates a tree; hostile or damaged bytes give `Err`, never a panic.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Tree, String> {
        match bytes.first() {
            Some(&TREE_VERSION | &TREE_VERSION_RUNS) => {}
            Some(v) => return Err(format!("unknown tree version {v}")),
            None => return Err("empty tree blob".into()),
        }
        let tree: Tree = postcard::from_bytes(&bytes[1..]).map_err(|e| e.to_string())?;
        for e in &tree.entries {
            if e.name.len() > NAME_BYTES_MAX {
                return Err(format!(
                    "an entry name of {} bytes (the limit is {NAME_BYTES_MAX})",
                    e.name.len()
                ));
            }
            if let Kind::Symlink { target } = &e.kind
                && target.len() > SYMLINK_TARGET_BYTES_MAX
            {
                return Err(format!(
                    "a symlink target of {} bytes (the limit is {SYMLINK_TARGET_BYTES_MAX})",
                    target.len()
                ));
            }
            if !valid_name(&e.name) {
                return Err(format!(
                    "invalid entry name {:?}",
                    String::from_utf8_lossy(&e.name)
                ));
            }
            if let Kind::Hardlink { target } = &e.kind
                && !valid_relative_path(target)
            {
                return Err(format!(
                    "invalid hardlink target {:?}",
                    String::from_utf8_lossy(target)
                ));
            }
        }
        if !tree.entries.windows(2).all(|w| w[0].name < w[1].name) {
            return Err("entries not sorted".into());
        }
        Ok(tree)
    }

    /// Finds an entry by name.
    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// A tree blob as stored: a directory's entries, or the parts of a split directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    Tree(Tree),
    /// The ids of the parts, in name order.
    Split(Vec<Id>),
}

/// Decodes any tree blob; hostile or damaged bytes give `Err`, never a panic.
pub fn decode_stored(bytes: &[u8]) -> std::result::Result<Stored, String> {
    if bytes.first() != Some(&TREE_VERSION_SPLIT) {
        return Tree::decode(bytes).map(Stored::Tree);
    }
    let parts: Vec<Id> = postcard::from_bytes(&bytes[1..]).map_err(|e| e.to_string())?;
    if parts.len() < 2 {
        return Err(format!("a split tree of {} parts", parts.len()));
    }
    Ok(Stored::Split(parts))
}

/// The blobs of one directory, encoded: `root` is the blob its parent names; `parts`
/// are the blobs a split root names (empty for a directory that fits one blob).
#[derive(Debug)]
pub struct Encoded {
    pub root: Vec<u8>,
    pub parts: Vec<Vec<u8>>,
}

/// Encodes a directory's entries (sorted and unique), splitting it across blobs when
/// one blob would exceed `TREE_BLOB_BYTES_MAX`.
///
/// A directory that fits is one tree blob, byte for byte what `Tree::encode` writes
/// (so existing tree ids are unchanged). A larger one is a split root naming parts,
/// each a tree of consecutive entries. Parts end after an entry whose name hashes to
/// a multiple of `TREE_PART_ENTRIES_AVG` (content-defined, so adding or removing an
/// entry changes only its own part and the small root, and an unchanged part keeps its
/// id), or before an entry that would take the part over `TREE_PART_BYTES_MAX`.
/// Errors only for an entry larger than a blob can hold, which the walk's limits
/// exclude (`limits::ENTRY_BYTES_MAX`).
pub fn encode_dir(entries: &[Entry]) -> Result<Encoded> {
    assert!(
        entries.windows(2).all(|w| w[0].name < w[1].name),
        "tree entries must be sorted and unique"
    );
    let encoded: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| postcard::to_allocvec(e).expect("entries encode"))
        .collect();
    for (e, bytes) in entries.iter().zip(&encoded) {
        if bytes.len() > ENTRY_BYTES_MAX {
            return Err(entry_too_large(e, bytes.len()));
        }
    }
    let total: usize = encoded.iter().map(Vec::len).sum();
    let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
    let bounds = if total + 16 <= TREE_BLOB_BYTES_MAX {
        Vec::new()
    } else {
        part_bounds(entries, &sizes)
    };
    if bounds.len() < 2 {
        // Small enough, or one entry too large to share a part: one blob.
        return Ok(Encoded {
            root: join_entries(entries, &encoded),
            parts: Vec::new(),
        });
    }
    let parts: Vec<Vec<u8>> = bounds
        .into_iter()
        .map(|r| join_entries(&entries[r.clone()], &encoded[r]))
        .collect();
    let ids: Vec<Id> = parts.iter().map(|p| Id::of(p)).collect();
    let mut root = vec![TREE_VERSION_SPLIT];
    postcard::to_io(&ids, &mut root).expect("ids encode");
    Ok(Encoded { root, parts })
}

/// Whether a part of a split directory ends after the entry `name`.
fn part_ends_after(name: &[u8]) -> bool {
    let h = blake3::hash(name);
    let n = u32::from_le_bytes(h.as_bytes()[..4].try_into().expect("4 bytes"));
    n % TREE_PART_ENTRIES_AVG == 0
}

/// A version 1 or 2 tree blob from entries and their encodings (postcard encodes
/// `Tree` as the entry count then the entries, so this is `Tree::encode`'s output).
fn join_entries(entries: &[Entry], encoded: &[Vec<u8>]) -> Vec<u8> {
    let version = if entries.iter().any(|e| e.kind.has_long_run()) {
        TREE_VERSION_RUNS
    } else {
        TREE_VERSION
    };
    let mut out = vec![version];
    postcard::to_io(&entries.len(), &mut out).expect("a length encodes");
    for e in encoded {
        out.extend_from_slice(e);
    }
    out
}

/// Loads and verifies the tree `id`, with the entries of every part of a split one.
pub fn load(repo: &Repository, id: &Id) -> Result<Tree> {
    Ok(load_with_parts(repo, id)?.0)
}

/// Loads and verifies the tree `id`; also returns the ids of its parts (empty unless
/// it is split), which gc marks and check verifies like the root.
pub fn load_with_parts(repo: &Repository, id: &Id) -> Result<(Tree, Vec<Id>)> {
    let corrupt = |detail: String| Error::CorruptTree { id: *id, detail };
    match decode_stored(&read_tree_blob(repo, id)?).map_err(corrupt)? {
        Stored::Tree(tree) => Ok((tree, Vec::new())),
        Stored::Split(parts) => {
            let mut entries: Vec<Entry> = Vec::new();
            for part in &parts {
                let tree = Tree::decode(&read_tree_blob(repo, part)?).map_err(|detail| {
                    Error::CorruptTree {
                        id: *part,
                        detail: format!("part of split tree {}: {detail}", id.short()),
                    }
                })?;
                let ordered = match (entries.last(), tree.entries.first()) {
                    (_, None) => false,
                    (Some(last), Some(first)) => last.name < first.name,
                    (None, Some(_)) => true,
                };
                if !ordered {
                    return Err(corrupt(format!(
                        "part {} is empty or out of order",
                        part.short()
                    )));
                }
                entries.extend(tree.entries);
            }
            Ok((Tree { entries }, parts))
        }
    }
}

/// A directory's entries in name order, read one blob at a time: a split directory
/// costs the memory of one part, not of all its entries (a directory of two million
/// entries with long names is about a gigabyte decoded).
#[derive(Debug)]
pub struct DirEntries {
    id: Id,
    /// Parts not read yet (none for a directory stored as one blob).
    parts: std::vec::IntoIter<Id>,
    all_parts: Vec<Id>,
    /// Entries of the blob being read, last first.
    current: Vec<Entry>,
    /// The last entry of the previous part, to check the order across parts.
    last_name: Option<Vec<u8>>,
}

impl DirEntries {
    /// Reads and verifies the root blob of the tree `id`.
    pub fn open(repo: &Repository, id: &Id) -> Result<DirEntries> {
        let corrupt = |detail: String| Error::CorruptTree { id: *id, detail };
        let (current, parts) = match decode_stored(&read_tree_blob(repo, id)?).map_err(corrupt)? {
            Stored::Tree(tree) => (tree.entries, Vec::new()),
            Stored::Split(parts) => (Vec::new(), parts),
        };
        let mut current = current;
        current.reverse();
        Ok(DirEntries {
            id: *id,
            parts: parts.clone().into_iter(),
            all_parts: parts,
            current,
            last_name: None,
        })
    }

    /// The ids of the parts of a split directory (empty otherwise).
    pub fn parts(&self) -> &[Id] {
        &self.all_parts
    }

    /// Whether every entry read so far was handed out and a part is next.
    pub fn at_part_start(&self) -> bool {
        self.current.is_empty()
    }

    /// The part read next, when at a part's start.
    pub fn next_part_id(&self) -> Option<&Id> {
        if self.current.is_empty() {
            self.parts.as_slice().first()
        } else {
            None
        }
    }

    /// Passes over the next part unread (`diff`, when both sides hold the same part).
    pub fn skip_part(&mut self) {
        assert!(
            self.current.is_empty(),
            "a part is skipped only at its start"
        );
        self.parts.next();
    }

    fn fill(&mut self, repo: &Repository) -> Result<bool> {
        while self.current.is_empty() {
            let Some(part) = self.parts.next() else {
                return Ok(false);
            };
            let tree = Tree::decode(&read_tree_blob(repo, &part)?).map_err(|detail| {
                Error::CorruptTree {
                    id: part,
                    detail: format!("part of split tree {}: {detail}", self.id.short()),
                }
            })?;
            let ordered = match (&self.last_name, tree.entries.first()) {
                (_, None) => false,
                (Some(last), Some(first)) => *last < first.name,
                (None, Some(_)) => true,
            };
            if !ordered {
                return Err(Error::CorruptTree {
                    id: self.id,
                    detail: format!("part {} is empty or out of order", part.short()),
                });
            }
            self.last_name = tree.entries.last().map(|e| e.name.clone());
            self.current = tree.entries;
            self.current.reverse();
        }
        Ok(true)
    }

    /// The next entry without taking it.
    pub fn peek(&mut self, repo: &Repository) -> Result<Option<&Entry>> {
        self.fill(repo)?;
        Ok(self.current.last())
    }

    /// The next entry.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self, repo: &Repository) -> Result<Option<Entry>> {
        self.fill(repo)?;
        Ok(self.current.pop())
    }

    /// The entries of the next blob (the whole directory, or its next part), in order.
    pub fn next_batch(&mut self, repo: &Repository) -> Result<Option<Vec<Entry>>> {
        if !self.fill(repo)? {
            return Ok(None);
        }
        let mut batch = std::mem::take(&mut self.current);
        batch.reverse();
        Ok(Some(batch))
    }
}

fn read_tree_blob(repo: &Repository, id: &Id) -> Result<Vec<u8>> {
    let unstored = repo
        .unstored
        .lock()
        .expect("unstored lock")
        .get(id)
        .cloned();
    match unstored {
        Some(b) => Ok(b),
        None => repo.read_blob(id),
    }
}

/// Stores a directory's blobs (parts first) through `store`; returns the root's id.
/// The blobs are exactly `encode_dir`'s, but built one part at a time: beyond the
/// entries themselves it holds one part's bytes and eight bytes per entry, where
/// `encode_dir` holds every entry's encoding and every part at once (for a directory
/// of 2 million entries, over a gigabyte).
pub fn store_dir(entries: &[Entry], mut store: impl FnMut(Id, &[u8]) -> Result<()>) -> Result<Id> {
    assert!(
        entries.windows(2).all(|w| w[0].name < w[1].name),
        "tree entries must be sorted and unique"
    );
    let mut scratch = Vec::new();
    let mut sizes = Vec::with_capacity(entries.len());
    for e in entries {
        scratch.clear();
        postcard::to_io(e, &mut scratch).expect("entries encode");
        if scratch.len() > ENTRY_BYTES_MAX {
            return Err(entry_too_large(e, scratch.len()));
        }
        sizes.push(scratch.len());
    }
    let encode = |part: &[Entry]| -> Vec<u8> {
        let version = if part.iter().any(|e| e.kind.has_long_run()) {
            TREE_VERSION_RUNS
        } else {
            TREE_VERSION
        };
        let mut out = vec![version];
        postcard::to_io(&part.len(), &mut out).expect("a length encodes");
        for e in part {
            postcard::to_io(e, &mut out).expect("entries encode");
        }
        out
    };
    let total: usize = sizes.iter().sum();
    let bounds = if total + 16 <= TREE_BLOB_BYTES_MAX {
        Vec::new()
    } else {
        part_bounds(entries, &sizes)
    };
    if bounds.len() < 2 {
        let root = encode(entries);
        let id = Id::of(&root);
        store(id, &root)?;
        return Ok(id);
    }
    let mut ids = Vec::with_capacity(bounds.len());
    for range in bounds {
        let part = encode(&entries[range]);
        let id = Id::of(&part);
        store(id, &part)?;
        ids.push(id);
    }
    let mut root = vec![TREE_VERSION_SPLIT];
    postcard::to_io(&ids, &mut root).expect("ids encode");
    let id = Id::of(&root);
    store(id, &root)?;
    Ok(id)
}

/// Where the parts of a split directory begin and end (see `encode_dir`), from the
/// entries' names and encoded sizes.
fn part_bounds(entries: &[Entry], sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for i in 0..entries.len() {
        if i > start && bytes + sizes[i] > TREE_PART_BYTES_MAX {
            parts.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += sizes[i];
        if part_ends_after(&entries[i].name) {
            parts.push(start..i + 1);
            (start, bytes) = (i + 1, 0);
        }
    }
    if start < entries.len() {
        parts.push(start..entries.len());
    }
    parts
}

fn entry_too_large(e: &Entry, len: usize) -> Error {
    Error::Usage(format!(
        "directory entry {:?} encodes to {len} bytes, over the limit of {ENTRY_BYTES_MAX}",
        String::from_utf8_lossy(&e.name)
    ))
}

/// Splits a '/'-separated path into components, dropping empty ones and `.`.
/// `..` is refused.
pub fn split_path(path: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        if c.is_empty() || c == b"." {
            continue;
        }
        if c == b".." {
            return Err("'..' is not allowed in a snapshot path".into());
        }
        out.push(c);
    }
    Ok(out)
}

/// Follows `components` from the tree `root`. Returns the entry reached (`None` for the
/// root itself).
pub fn resolve(repo: &Repository, root: &Id, components: &[&[u8]]) -> Result<Option<Entry>> {
    let mut tree_id = *root;
    let mut found = None;
    for (i, c) in components.iter().enumerate() {
        let tree = load(repo, &tree_id)?;
        let entry = tree.get(c).cloned().ok_or_else(|| Error::PathNotFound {
            snapshot: String::new(),
            path: String::from_utf8_lossy(&components[..=i].join(&b'/')).into_owned(),
        })?;
        if i + 1 < components.len() {
            match entry.kind {
                Kind::Dir { tree } => tree_id = tree,
                _ => {
                    return Err(Error::PathNotFound {
                        snapshot: String::new(),
                        path: String::from_utf8_lossy(&components.join(&b'/')).into_owned(),
                    });
                }
            }
        }
        found = Some(entry);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &[u8]) -> Entry {
        Entry {
            name: name.to_vec(),
            kind: Kind::File {
                size: 3,
                chunks: vec![Run {
                    id: Id::of(b"abc"),
                    count: 1,
                }],
            },
            mode: 0o4755,
            uid: 1,
            gid: 2,
            mtime_ns: 1_700_000_000_123_456_789,
            xattrs: vec![Xattr {
                name: b"user.k".to_vec(),
                value: b"v".to_vec(),
            }],
        }
    }

    #[test]
    fn encode_is_canonical_and_round_trips() {
        let tree = Tree {
            entries: vec![entry(b"a\n"), entry(&[0xff, 0xfe]), entry(b"b")]
                .into_iter()
                .collect(),
        };
        let mut sorted = tree.clone();
        sorted.entries.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = sorted.encode();
        assert_eq!(Tree::decode(&bytes).unwrap(), sorted);
        assert_eq!(Id::of(&bytes), Id::of(&sorted.clone().encode()));
    }

    #[test]
    fn hostile_names_are_rejected() {
        for bad in [&b".."[..], b".", b"a/b", b"", b"a\0"] {
            let tree = Tree {
                entries: vec![entry(bad)],
            };
            let mut bytes = vec![TREE_VERSION];
            postcard::to_io(&tree, &mut bytes).unwrap();
            assert!(Tree::decode(&bytes).is_err(), "{bad:?} accepted");
        }
        assert!(Tree::decode(&[1, 0xff, 0xff, 0xff]).is_err());
        assert!(Tree::decode(&[]).is_err());
    }

    #[test]
    fn damaged_trees_never_panic() {
        let tree = Tree {
            entries: vec![entry(b"a"), entry(b"b")],
        };
        let bytes = tree.encode();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut damaged = bytes.clone();
            let at = (x as usize) % damaged.len();
            damaged[at] = (x >> 32) as u8;
            if round % 5 == 0 {
                damaged.truncate((x >> 16) as usize % damaged.len());
            }
            // Either an error or a tree that passes validation; never a panic.
            if let Ok(t) = Tree::decode(&damaged) {
                assert!(t.entries.iter().all(|e| valid_name(&e.name)));
            }
        }
    }

    /// The entry layout version 1 wrote, before chunk runs existed.
    mod v1 {
        use super::super::Xattr;
        use crate::id::Id;
        use serde::Serialize;

        #[derive(Serialize)]
        pub enum Kind {
            File { size: u64, chunks: Vec<Id> },
        }

        #[derive(Serialize)]
        pub struct Entry {
            pub name: Vec<u8>,
            pub kind: Kind,
            pub mode: u32,
            pub uid: u32,
            pub gid: u32,
            pub mtime_ns: i64,
            pub xattrs: Vec<Xattr>,
        }

        #[derive(Serialize)]
        pub struct Tree {
            pub entries: Vec<Entry>,
        }
    }

    fn v1_bytes(chunks: Vec<Id>) -> Vec<u8> {
        let e = entry(b"f");
        let tree = v1::Tree {
            entries: vec![v1::Entry {
                name: e.name,
                kind: v1::Kind::File { size: 3, chunks },
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime_ns: e.mtime_ns,
                xattrs: e.xattrs,
            }],
        };
        let mut bytes = vec![1];
        postcard::to_io(&tree, &mut bytes).unwrap();
        bytes
    }

    fn file_with(runs: Vec<Run>) -> Tree {
        let mut e = entry(b"f");
        e.kind = Kind::File {
            size: 3,
            chunks: runs,
        };
        Tree { entries: vec![e] }
    }

    #[test]
    fn trees_without_repeated_chunks_keep_the_version_1_bytes() {
        let (a, b) = (Id::of(b"a"), Id::of(b"b"));
        let tree = file_with(vec![Run { id: a, count: 1 }, Run { id: b, count: 1 }]);
        assert_eq!(tree.encode(), v1_bytes(vec![a, b]));
        assert_eq!(Tree::decode(&v1_bytes(vec![a, b])).unwrap(), tree);
    }

    #[test]
    fn runs_make_version_2_and_version_1_repeats_read_as_runs() {
        let (a, z) = (Id::of(b"a"), Id::of(&[0; 16]));
        let tree = file_with(vec![
            Run { id: a, count: 1 },
            Run {
                id: z,
                count: 1 << 40,
            },
        ]);
        let bytes = tree.encode();
        assert_eq!(bytes[0], 2);
        assert!(
            bytes.len() < 200,
            "a run costs one entry: {} bytes",
            bytes.len()
        );
        assert_eq!(Tree::decode(&bytes).unwrap(), tree);
        // A version 1 list with a repeated chunk is the same content.
        let old = Tree::decode(&v1_bytes(vec![a, z, z, z])).unwrap();
        assert_eq!(
            old,
            file_with(vec![Run { id: a, count: 1 }, Run { id: z, count: 3 }])
        );
    }

    #[test]
    fn an_empty_run_is_refused() {
        // Postcard encodes a struct as its fields in order, so tuples stand in for
        // `Tree` and `Entry` to craft what `encode` never writes.
        let e = entry(b"f");
        let wire = (vec![(
            e.name,
            WireKind::FileRuns {
                size: 0,
                runs: vec![Run {
                    id: Id::of(b"z"),
                    count: 0,
                }],
            },
            e.mode,
            e.uid,
            e.gid,
            e.mtime_ns,
            e.xattrs,
        )],);
        let mut bytes = vec![2];
        postcard::to_io(&wire, &mut bytes).unwrap();
        assert!(Tree::decode(&bytes).is_err());
        // The same with a count of 1 decodes: the crafting is faithful.
        let mut ok = wire;
        if let WireKind::FileRuns { runs, .. } = &mut ok.0[0].1 {
            runs[0].count = 1;
        }
        let mut bytes = vec![2];
        postcard::to_io(&ok, &mut bytes).unwrap();
        assert!(Tree::decode(&bytes).is_ok());
    }

    /// Raw bytes of a one-entry tree, however invalid the entry.
    fn raw_tree(e: &Entry) -> Vec<u8> {
        let mut bytes = vec![TREE_VERSION];
        postcard::to_io(&vec![e.clone()], &mut bytes).unwrap();
        bytes
    }

    #[test]
    fn names_and_symlink_targets_are_refused_past_their_limits() {
        let mut e = entry(&vec![b'n'; NAME_BYTES_MAX]);
        assert!(Tree::decode(&raw_tree(&e)).is_ok());
        e.name.push(b'n');
        let err = Tree::decode(&raw_tree(&e)).unwrap_err();
        assert!(err.contains("limit"), "{err}");
        let mut e = entry(b"l");
        e.kind = Kind::Symlink {
            target: vec![b't'; SYMLINK_TARGET_BYTES_MAX],
        };
        assert!(Tree::decode(&raw_tree(&e)).is_ok());
        e.kind = Kind::Symlink {
            target: vec![b't'; SYMLINK_TARGET_BYTES_MAX + 1],
        };
        assert!(Tree::decode(&raw_tree(&e)).is_err());
    }

    fn entries(n: usize, name_len: usize) -> Vec<Entry> {
        let mut v: Vec<Entry> = (0..n)
            .map(|i| {
                let mut name = format!("{i:08}").into_bytes();
                name.resize(name_len, b'x');
                entry(&name)
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    #[test]
    fn small_directories_are_one_blob_as_before_and_large_ones_split_by_content() {
        let small = entries(100, 20);
        let enc = encode_dir(&small).unwrap();
        assert!(enc.parts.is_empty());
        assert_eq!(
            enc.root,
            Tree {
                entries: small.clone()
            }
            .encode()
        );

        // About 150 bytes per entry: 40,000 entries are over TREE_BLOB_BYTES_MAX.
        let large = entries(40_000, 100);
        let enc = encode_dir(&large).unwrap();
        assert!(enc.parts.len() > 2, "{} parts", enc.parts.len());
        assert!(enc.parts.iter().all(|p| p.len() <= TREE_PART_BYTES_MAX));
        let Stored::Split(ids) = decode_stored(&enc.root).unwrap() else {
            panic!("a split root")
        };
        assert_eq!(ids.len(), enc.parts.len());
        let mut all = Vec::new();
        for (id, part) in ids.iter().zip(&enc.parts) {
            assert_eq!(*id, Id::of(part));
            all.extend(Tree::decode(part).unwrap().entries);
        }
        assert_eq!(all, large);

        // One entry more changes one part (and the root), not the others.
        let mut more = large.clone();
        let mut extra = entry(b"00020000-added");
        extra.mode = 0o600;
        more.push(extra);
        more.sort_by(|a, b| a.name.cmp(&b.name));
        let enc2 = encode_dir(&more).unwrap();
        let before: std::collections::HashSet<Id> = enc.parts.iter().map(|p| Id::of(p)).collect();
        let changed = enc2
            .parts
            .iter()
            .filter(|p| !before.contains(&Id::of(p)))
            .count();
        assert_eq!(changed, 1, "parts changed by one added entry");
    }

    #[test]
    fn store_dir_stores_exactly_the_blobs_encode_dir_makes() {
        for entries in [entries(0, 8), entries(100, 20), entries(40_000, 100)] {
            let enc = encode_dir(&entries).unwrap();
            let mut stored = Vec::new();
            let id = store_dir(&entries, |id, bytes| {
                assert_eq!(id, Id::of(bytes));
                stored.push(bytes.to_vec());
                Ok(())
            })
            .unwrap();
            let mut expected = enc.parts.clone();
            expected.push(enc.root.clone());
            assert_eq!(stored, expected);
            assert_eq!(id, Id::of(&enc.root));
        }
    }

    #[test]
    fn an_entry_larger_than_a_blob_can_hold_is_an_error_not_a_panic() {
        let mut e = entry(b"huge");
        e.xattrs = vec![Xattr {
            name: b"user.big".to_vec(),
            value: vec![0; ENTRY_BYTES_MAX],
        }];
        let err = encode_dir(std::slice::from_ref(&e))
            .unwrap_err()
            .to_string();
        assert!(err.contains("over the limit"), "{err}");
        let err = store_dir(&[e], |_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("over the limit"), "{err}");
    }

    #[test]
    fn split_path_refuses_dotdot() {
        assert_eq!(split_path(b"/a//./b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(split_path(b"a/../b").is_err());
    }
}
