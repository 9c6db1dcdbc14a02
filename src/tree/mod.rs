//! Trees: one canonical object per directory, stored as a content-addressed blob.
//!
//! Encoding: one version byte (1) followed by postcard `Tree`. Canonical because
//! entries are sorted by raw name bytes, names are unique, and postcard is
//! deterministic, so equal directories give equal bytes and equal ids: an unchanged
//! subtree is stored once and costs nothing in later snapshots.
//! **Invariant:** a tree records only what a restore can reproduce (no inode, ctime or
//! link count), so snapshotting a restored tree yields the same root id.
//! **Invariant:** `decode` rejects names that are empty, `.`, `..` or contain `/` or NUL,
//! so no hostile tree can make a restore or export write outside its target.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;

const TREE_VERSION: u8 = 1;

/// An extended attribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// What an entry is, with what is needed to recreate it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File {
        size: u64,
        chunks: Vec<Id>,
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

impl Kind {
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
        let mut out = vec![TREE_VERSION];
        postcard::to_io(self, &mut out).expect("trees encode");
        out
    }

    /// Decodes and validates a tree; hostile or damaged bytes give `Err`, never a panic.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Tree, String> {
        match bytes.first() {
            Some(&TREE_VERSION) => {}
            Some(v) => return Err(format!("unknown tree version {v}")),
            None => return Err("empty tree blob".into()),
        }
        let tree: Tree = postcard::from_bytes(&bytes[1..]).map_err(|e| e.to_string())?;
        for e in &tree.entries {
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

/// Loads and verifies the tree `id`.
pub fn load(repo: &Repository, id: &Id) -> Result<Tree> {
    let unstored = repo
        .unstored
        .lock()
        .expect("unstored lock")
        .get(id)
        .cloned();
    let bytes = match unstored {
        Some(b) => b,
        None => repo.read_blob(id)?,
    };
    Tree::decode(&bytes).map_err(|detail| Error::CorruptTree { id: *id, detail })
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
                chunks: vec![Id::of(b"abc")],
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

    #[test]
    fn split_path_refuses_dotdot() {
        assert_eq!(split_path(b"/a//./b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(split_path(b"a/../b").is_err());
    }
}
