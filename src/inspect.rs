//! Read-only views of snapshots: `ls` and `diff`.
//!
//! Paths are '/'-separated and relative to the snapshot root: in a single-volume
//! snapshot that is the volume root; with several volumes the first component is the
//! volume label.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::snapshot::{Listed, Volume};
use crate::tree::{self, Entry, Kind};
use crate::walk::join_rel;

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

fn entries(repo: &Repository, dir: &Dir<'_>) -> Result<Vec<Entry>> {
    match dir {
        Dir::Volumes(v) => Ok(v.iter().map(Volume::root_entry).collect()),
        Dir::Tree(id) => Ok(tree::load(repo, id)?.entries),
    }
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
    let components = tree::split_path(path).map_err(Error::Usage)?;
    let mut dir = top(snap);
    let mut prefix = Vec::new();
    for (i, c) in components.iter().enumerate() {
        let found = entries(repo, &dir)?
            .into_iter()
            .find(|e| e.name == *c)
            .ok_or_else(|| Error::PathNotFound {
                snapshot: snap.id.short(),
                path: String::from_utf8_lossy(path).into_owned(),
            })?;
        prefix = join_rel(&prefix, c);
        match found.kind {
            Kind::Dir { tree } => dir = Dir::Tree(tree),
            _ if i + 1 == components.len() => {
                return Ok(vec![Listing {
                    path: prefix,
                    entry: found,
                }]);
            }
            _ => {
                return Err(Error::PathNotFound {
                    snapshot: snap.id.short(),
                    path: String::from_utf8_lossy(path).into_owned(),
                });
            }
        }
    }
    let mut out = Vec::new();
    list_dir(repo, &dir, &prefix, recursive, &mut out)?;
    Ok(out)
}

fn list_dir(
    repo: &Repository,
    dir: &Dir<'_>,
    prefix: &[u8],
    recursive: bool,
    out: &mut Vec<Listing>,
) -> Result<()> {
    for entry in entries(repo, dir)? {
        let path = join_rel(prefix, &entry.name);
        let sub = match entry.kind {
            Kind::Dir { tree } if recursive => Some(tree),
            _ => None,
        };
        out.push(Listing {
            path: path.clone(),
            entry,
        });
        if let Some(tree) = sub {
            list_dir(repo, &Dir::Tree(tree), &path, true, out)?;
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

/// Compares snapshot `a` (old) with `b` (new).
pub fn diff(repo: &Repository, a: &Listed, b: &Listed) -> Result<Diff> {
    let mut out = Diff::default();
    diff_dirs(repo, &top(a), &top(b), b"", &mut out)?;
    Ok(out)
}

fn diff_dirs(
    repo: &Repository,
    a: &Dir<'_>,
    b: &Dir<'_>,
    prefix: &[u8],
    out: &mut Diff,
) -> Result<()> {
    if let (Dir::Tree(x), Dir::Tree(y)) = (a, b)
        && x == y
    {
        return Ok(());
    }
    let old = entries(repo, a)?;
    let new = entries(repo, b)?;
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, _) => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                subtree_paths(repo, &old[i], prefix, &mut out.removed)?;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                subtree_paths(repo, &new[j], prefix, &mut out.added)?;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                diff_entries(repo, &old[i], &new[j], prefix, out)?;
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

fn diff_entries(
    repo: &Repository,
    x: &Entry,
    y: &Entry,
    prefix: &[u8],
    out: &mut Diff,
) -> Result<()> {
    let path = join_rel(prefix, &x.name);
    if std::mem::discriminant(&x.kind) != std::mem::discriminant(&y.kind) {
        // Same name, another kind: the path is modified; what was below an old
        // directory is removed and what is below a new one is added.
        out.modified.push((path, vec!["kind"]));
        descendants(repo, x, prefix, &mut out.removed)?;
        descendants(repo, y, prefix, &mut out.added)?;
        return Ok(());
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
    if let (Kind::Dir { tree: t1 }, Kind::Dir { tree: t2 }) = (&x.kind, &y.kind) {
        diff_dirs(repo, &Dir::Tree(*t1), &Dir::Tree(*t2), &path, out)?;
    }
    Ok(())
}

/// The path of `entry` and of everything below it.
fn subtree_paths(
    repo: &Repository,
    entry: &Entry,
    prefix: &[u8],
    out: &mut Vec<Vec<u8>>,
) -> Result<()> {
    out.push(join_rel(prefix, &entry.name));
    descendants(repo, entry, prefix, out)
}

/// The paths of everything below `entry` (nothing unless it is a directory).
fn descendants(
    repo: &Repository,
    entry: &Entry,
    prefix: &[u8],
    out: &mut Vec<Vec<u8>>,
) -> Result<()> {
    if let Kind::Dir { tree } = entry.kind {
        let path = join_rel(prefix, &entry.name);
        for child in tree::load(repo, &tree)?.entries {
            subtree_paths(repo, &child, &path, out)?;
        }
    }
    Ok(())
}
