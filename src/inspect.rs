//! Read-only views of snapshots: `ls` and `diff`.
//!
//! Paths are '/'-separated and relative to the snapshot root: in a single-volume
//! snapshot that is the volume root; with several volumes the first component is the
//! volume label.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::snapshot::{Listed, Volume};
use crate::tree::{self, DirEntries, Entry, Kind};

/// A directory as seen by `ls` and `diff`: a stored tree, or the virtual root listing
/// the volumes of a multi-volume snapshot.
enum Dir<'a> {
    Volumes(&'a [Volume]),
    Tree(Id),
}

fn top(snap: &Listed) -> Dir<'_> {
    match snap.snapshot.volumes.as_slice() {
        [one] => Dir::Tree(one.tree),
        many => Dir::Volumes(many),
    }
}

/// A directory's entries, read in order: the volumes of the virtual root, or a
/// stored tree one part at a time.
enum Reader {
    Volumes(std::vec::IntoIter<Entry>),
    Tree(DirEntries),
}

impl Reader {
    fn open(repo: &Repository, dir: &Dir<'_>) -> Result<Reader> {
        Ok(match dir {
            Dir::Volumes(v) => Reader::Volumes(
                v.iter()
                    .map(Volume::root_entry)
                    .collect::<Vec<_>>()
                    .into_iter(),
            ),
            Dir::Tree(id) => Reader::Tree(DirEntries::open(repo, id)?),
        })
    }

    fn next(&mut self, repo: &Repository) -> Result<Option<Entry>> {
        match self {
            Reader::Volumes(v) => Ok(v.next()),
            Reader::Tree(t) => t.next(repo),
        }
    }

    fn peek(&mut self, repo: &Repository) -> Result<Option<&Entry>> {
        match self {
            Reader::Volumes(v) => Ok(v.as_slice().first()),
            Reader::Tree(t) => t.peek(repo),
        }
    }

    /// Passes over the next part when `other` is about to read the same one: equal
    /// parts hold equal entries (used by `diff`).
    fn skip_same_part(&mut self, other: &mut Reader) -> bool {
        if let (Reader::Tree(a), Reader::Tree(b)) = (self, other)
            && let (Some(x), Some(y)) = (a.next_part_id(), b.next_part_id())
            && x == y
        {
            a.skip_part();
            b.skip_part();
            return true;
        }
        false
    }
}

fn push_name(path: &mut Vec<u8>, name: &[u8]) -> usize {
    let len = path.len();
    if !path.is_empty() {
        path.push(b'/');
    }
    path.extend_from_slice(name);
    len
}

/// One line of `ls`.
#[derive(Clone, Debug)]
pub struct Listing {
    pub path: Vec<u8>,
    pub entry: Entry,
}

/// Lists `path` in `snap`: a directory's children (all descendants when `recursive`),
/// or the entry itself when it is not a directory.
pub fn ls(repo: &Repository, snap: &Listed, path: &[u8], recursive: bool) -> Result<Vec<Listing>> {
    let mut out = Vec::new();
    ls_each(repo, snap, path, recursive, &mut |path, entry| {
        out.push(Listing {
            path: path.to_vec(),
            entry: entry.clone(),
        });
        Ok(())
    })?;
    Ok(out)
}

/// Like `ls`, handing each line to `out` as it is found (depth-first, name order):
/// memory is one frame per level and one part of each directory on the current path,
/// whatever the listing's length.
pub fn ls_each(
    repo: &Repository,
    snap: &Listed,
    path: &[u8],
    recursive: bool,
    out: &mut dyn FnMut(&[u8], &Entry) -> Result<()>,
) -> Result<()> {
    let not_found = || Error::PathNotFound {
        snapshot: snap.id.short(),
        path: String::from_utf8_lossy(path).into_owned(),
    };
    let components = tree::split_path(path).map_err(Error::Usage)?;
    let mut dir = top(snap);
    let mut prefix = Vec::new();
    for (i, c) in components.iter().enumerate() {
        let mut reader = Reader::open(repo, &dir)?;
        let found = loop {
            match reader.next(repo)? {
                Some(e) if e.name == *c => break e,
                Some(_) => {}
                None => return Err(not_found()),
            }
        };
        push_name(&mut prefix, c);
        match found.kind {
            Kind::Dir { tree } => dir = Dir::Tree(tree),
            _ if i + 1 == components.len() => return out(&prefix, &found),
            _ => return Err(not_found()),
        }
    }
    // Each frame: a directory being listed and the bytes its name added to `prefix`.
    let mut stack = vec![(Reader::open(repo, &dir)?, 0usize)];
    while let Some((reader, _)) = stack.last_mut() {
        let Some(entry) = reader.next(repo)? else {
            let (_, len) = stack.pop().expect("a frame");
            prefix.truncate(len);
            continue;
        };
        let len = push_name(&mut prefix, &entry.name);
        out(&prefix, &entry)?;
        match entry.kind {
            Kind::Dir { tree } if recursive => {
                stack.push((Reader::open(repo, &Dir::Tree(tree))?, len));
            }
            _ => prefix.truncate(len),
        }
    }
    Ok(())
}

/// The differences between two snapshots.
#[derive(Clone, Debug, Default)]
pub struct Diff {
    pub added: Vec<Vec<u8>>,
    pub removed: Vec<Vec<u8>>,
    /// Path and what changed: "kind", "content", "mode", "owner", "mtime", "xattrs", "target".
    pub modified: Vec<(Vec<u8>, Vec<&'static str>)>,
}

/// Compares snapshot `a` (old) with `b` (new): a merge of each pair of directories in
/// name order, descending only where trees differ, with an explicit stack; parts of a
/// split directory that both sides share are passed over unread, so a few entries
/// changed in a directory of millions cost the parts that hold them.
pub fn diff(repo: &Repository, a: &Listed, b: &Listed) -> Result<Diff> {
    let mut out = Diff::default();
    let mut prefix = Vec::new();
    // Each frame: the old and new directory being merged, and the bytes its name
    // added to `prefix`.
    if let (Dir::Tree(x), Dir::Tree(y)) = (top(a), top(b))
        && x == y
    {
        return Ok(out);
    }
    let mut stack = vec![(
        Reader::open(repo, &top(a))?,
        Reader::open(repo, &top(b))?,
        0usize,
    )];
    while let Some((old, new, _)) = stack.last_mut() {
        if old.skip_same_part(new) {
            continue;
        }
        let order = match (old.peek(repo)?, new.peek(repo)?) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => {
                let (_, _, len) = stack.pop().expect("a frame");
                prefix.truncate(len);
                continue;
            }
        };
        match order {
            std::cmp::Ordering::Less => {
                let x = old.next(repo)?.expect("peeked");
                subtree_paths(repo, &x, &mut prefix, true, &mut out.removed)?;
            }
            std::cmp::Ordering::Greater => {
                let y = new.next(repo)?.expect("peeked");
                subtree_paths(repo, &y, &mut prefix, true, &mut out.added)?;
            }
            std::cmp::Ordering::Equal => {
                let x = old.next(repo)?.expect("peeked");
                let y = new.next(repo)?.expect("peeked");
                let len = push_name(&mut prefix, &x.name);
                match diff_entries(repo, &x, &y, &mut prefix, &mut out)? {
                    Some((t1, t2)) => stack.push((
                        Reader::open(repo, &Dir::Tree(t1))?,
                        Reader::open(repo, &Dir::Tree(t2))?,
                        len,
                    )),
                    None => prefix.truncate(len),
                }
            }
        }
    }
    Ok(out)
}

/// Compares two entries of one name at `path`; returns the pair of trees to compare
/// next when both are directories whose trees differ.
fn diff_entries(
    repo: &Repository,
    x: &Entry,
    y: &Entry,
    path: &mut Vec<u8>,
    out: &mut Diff,
) -> Result<Option<(Id, Id)>> {
    if std::mem::discriminant(&x.kind) != std::mem::discriminant(&y.kind) {
        // Same name, another kind: the path is modified; what was below an old
        // directory is removed and what is below a new one is added.
        out.modified.push((path.clone(), vec!["kind"]));
        subtree_below(repo, x, path, &mut out.removed)?;
        subtree_below(repo, y, path, &mut out.added)?;
        return Ok(None);
    }
    let mut changes = Vec::new();
    match (&x.kind, &y.kind) {
        (
            Kind::File {
                size: s1,
                chunks: c1,
            },
            Kind::File {
                size: s2,
                chunks: c2,
            },
        ) if s1 != s2 || c1 != c2 => {
            changes.push("content");
        }
        (Kind::Symlink { target: t1 }, Kind::Symlink { target: t2 })
        | (Kind::Hardlink { target: t1 }, Kind::Hardlink { target: t2 })
            if t1 != t2 =>
        {
            changes.push("target");
        }
        (Kind::CharDevice { rdev: r1 }, Kind::CharDevice { rdev: r2 })
        | (Kind::BlockDevice { rdev: r1 }, Kind::BlockDevice { rdev: r2 })
            if r1 != r2 =>
        {
            changes.push("device");
        }
        _ => {}
    }
    if x.mode != y.mode {
        changes.push("mode");
    }
    if (x.uid, x.gid) != (y.uid, y.gid) {
        changes.push("owner");
    }
    if x.mtime_ns != y.mtime_ns {
        changes.push("mtime");
    }
    if x.xattrs != y.xattrs {
        changes.push("xattrs");
    }
    if !changes.is_empty() {
        out.modified.push((path.clone(), changes));
    }
    if let (Kind::Dir { tree: t1 }, Kind::Dir { tree: t2 }) = (&x.kind, &y.kind)
        && t1 != t2
    {
        return Ok(Some((*t1, *t2)));
    }
    Ok(None)
}

/// Appends the path of `entry` (a child of `prefix`; when `with_self`) and of
/// everything below it to `out`, depth-first in name order, with an explicit stack.
fn subtree_paths(
    repo: &Repository,
    entry: &Entry,
    prefix: &mut Vec<u8>,
    with_self: bool,
    out: &mut Vec<Vec<u8>>,
) -> Result<()> {
    let len = push_name(prefix, &entry.name);
    if with_self {
        out.push(prefix.clone());
    }
    let result = subtree_below(repo, entry, prefix, out);
    prefix.truncate(len);
    result
}

/// Appends the paths of everything below `entry` (at `path`; nothing unless it is a
/// directory).
fn subtree_below(
    repo: &Repository,
    entry: &Entry,
    path: &mut Vec<u8>,
    out: &mut Vec<Vec<u8>>,
) -> Result<()> {
    let Kind::Dir { tree } = entry.kind else {
        return Ok(());
    };
    let base = path.len();
    let mut stack = vec![(DirEntries::open(repo, &tree)?, base)];
    while let Some((reader, _)) = stack.last_mut() {
        let Some(child) = reader.next(repo)? else {
            let (_, len) = stack.pop().expect("a frame");
            path.truncate(len);
            continue;
        };
        let len = push_name(path, &child.name);
        out.push(path.clone());
        match child.kind {
            Kind::Dir { tree } => stack.push((DirEntries::open(repo, &tree)?, len)),
            _ => path.truncate(len),
        }
    }
    path.truncate(base);
    Ok(())
}
