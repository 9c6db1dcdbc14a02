//! Trees at and past the limits: chains of directories 100,000 levels deep and deeper
//! than `PATH_DEPTH_MAX`, crafted trees deeper still, and directories too large for
//! one tree blob. Every chain is built and compared through directory descriptors
//! (its paths are far beyond PATH_MAX), and the comparison is iterative.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, XattrFlags};
use volsnap::id::Id;
use volsnap::limits::PATH_DEPTH_MAX;
use volsnap::pack::Packer;
use volsnap::pack::blob::BlobKind;
use volsnap::repo::{Config, Repository};
use volsnap::snapshot::record::{self, RootMeta};
use volsnap::snapshot::{Snapshot, Stats, Volume};
use volsnap::tree::{self, Kind, Stored, Tree};

use crate::support::*;

// ------------------------------------------------------------------ helpers

fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> OwnedFd {
    rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open directory {:?}: {e}", String::from_utf8_lossy(name)))
}

fn write_at(dir: BorrowedFd<'_>, name: &str, content: &[u8], mode: u32) {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .unwrap();
    rustix::io::write(&fd, content).unwrap();
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).unwrap();
}

/// Builds a chain of `depth` directories named `d` below `root` (which must exist),
/// calling `at_level(level, dir)` in each directory of the chain (level 0 is `root`,
/// `depth` the bottom) before its child is made. Holds two descriptors at a time.
fn make_chain(root: &Path, depth: usize, mut at_level: impl FnMut(usize, BorrowedFd<'_>)) {
    let mut fd = open_dir(CWD, root.as_os_str().as_bytes());
    for level in 0..depth {
        at_level(level, fd.as_fd());
        rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
        fd = open_dir(fd.as_fd(), b"d");
    }
    at_level(depth, fd.as_fd());
}

/// Opens the directory `levels` steps down the chain below `root`.
fn chain_dir(root: &Path, levels: usize) -> OwnedFd {
    let mut fd = open_dir(CWD, root.as_os_str().as_bytes());
    for _ in 0..levels {
        fd = open_dir(fd.as_fd(), b"d");
    }
    fd
}

/// The path of the directory `levels` steps down the chain (relative).
fn chain_path(levels: usize) -> String {
    vec!["d"; levels].join("/")
}

fn names_of(dir: BorrowedFd<'_>) -> Vec<Vec<u8>> {
    let dup = rustix::io::fcntl_dupfd_cloexec(dir, 0).unwrap();
    let mut names: Vec<Vec<u8>> = rustix::fs::Dir::new(dup)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    names.sort();
    names
}

fn xattrs_of(fd: BorrowedFd<'_>) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut list = vec![0u8; 65536];
    let n = rustix::fs::flistxattr(fd, &mut list).unwrap();
    let mut out = BTreeMap::new();
    for name in list[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::fgetxattr(fd, name, &mut value).unwrap();
        value.truncate(len);
        out.insert(name.to_vec(), value);
    }
    out
}

/// What the comparison looks at for one entry: kind, mode, owner, mtime, xattrs
/// (every namespace the descriptor shows), link count, and the content or target.
fn describe(dir: BorrowedFd<'_>, name: &[u8]) -> String {
    let os = OsStr::from_bytes(name);
    let st = rustix::fs::statat(dir, os, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    let ft = FileType::from_raw_mode(st.st_mode);
    let mut d = format!(
        "{ft:?} mode {:o} owner {}:{} mtime {}.{:09}",
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid,
        st.st_mtime,
        st.st_mtime_nsec
    );
    match ft {
        FileType::RegularFile => {
            let fd = rustix::fs::openat(dir, os, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())
                .unwrap();
            let mut h = blake3::Hasher::new();
            std::io::copy(&mut fs::File::from(fd.try_clone().unwrap()), &mut h).unwrap();
            d += &format!(
                " links {} content {} xattrs {:?}",
                st.st_nlink,
                h.finalize().to_hex(),
                xattrs_of(fd.as_fd())
            );
        }
        FileType::Directory => {
            d += &format!(" xattrs {:?}", xattrs_of(open_dir(dir, name).as_fd()));
        }
        FileType::Symlink => {
            d += &format!(
                " -> {:?}",
                rustix::fs::readlinkat(dir, os, Vec::new()).unwrap()
            );
        }
        _ => {}
    }
    d
}

/// A directory on the comparison's stack: both sides, and the subdirectories left.
struct CmpFrame {
    a: Option<OwnedFd>,
    b: Option<OwnedFd>,
    subdirs: std::vec::IntoIter<Vec<u8>>,
    depth: usize,
}

/// Asserts that two trees hold the same names, kinds, metadata, contents and link
/// counts, walking both with an explicit stack and at most 64 descriptors per side
/// (a parent's is reopened through `..` when the walk climbs back). Returns the
/// number of entries compared and the deepest level seen.
fn assert_same_deep_tree(a: &Path, b: &Path) -> (usize, usize) {
    let ra = open_dir(CWD, a.as_os_str().as_bytes());
    let rb = open_dir(CWD, b.as_os_str().as_bytes());
    assert_eq!(
        describe(CWD, a.as_os_str().as_bytes())
            .split(" mtime")
            .next(),
        describe(CWD, b.as_os_str().as_bytes())
            .split(" mtime")
            .next(),
        "the roots differ"
    );
    let mut stack: Vec<CmpFrame> = Vec::new();
    let mut next = Some((ra, rb, 0usize));
    let (mut entries, mut deepest) = (0, 0);
    loop {
        if let Some((fa, fb, depth)) = next.take() {
            let (na, nb) = (names_of(fa.as_fd()), names_of(fb.as_fd()));
            assert_eq!(na, nb, "the names differ {depth} levels down");
            let mut subdirs = Vec::new();
            for name in na {
                let (da, db) = (describe(fa.as_fd(), &name), describe(fb.as_fd(), &name));
                assert_eq!(
                    da,
                    db,
                    "{:?} differs {} levels down",
                    String::from_utf8_lossy(&name),
                    depth + 1
                );
                entries += 1;
                deepest = deepest.max(depth + 1);
                if da.starts_with("Directory") {
                    subdirs.push(name);
                }
            }
            stack.push(CmpFrame {
                a: Some(fa),
                b: Some(fb),
                subdirs: subdirs.into_iter(),
                depth,
            });
            if stack.len() > 64 {
                let i = stack.len() - 65;
                stack[i].a = None;
                stack[i].b = None;
            }
        }
        let top = stack.last_mut().unwrap();
        if let Some(name) = top.subdirs.next() {
            let fa = open_dir(top.a.as_ref().unwrap().as_fd(), &name);
            let fb = open_dir(top.b.as_ref().unwrap().as_fd(), &name);
            next = Some((fa, fb, top.depth + 1));
            continue;
        }
        let done = stack.pop().unwrap();
        let Some(parent) = stack.last_mut() else {
            return (entries, deepest);
        };
        if parent.a.is_none() {
            parent.a = Some(open_dir(done.a.unwrap().as_fd(), b".."));
            parent.b = Some(open_dir(done.b.unwrap().as_fd(), b".."));
        }
    }
}

/// Removes a deep tree without recursion (the scratch directory's own removal
/// recurses once per level and would overflow a test thread's stack), holding one
/// descriptor and climbing back through `..`.
fn remove_deep(root: &Path) {
    let Ok(mut fd) = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let mut names: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut sub = None;
        for name in names_of(fd.as_fd()) {
            let st = rustix::fs::statat(&fd, OsStr::from_bytes(&name), AtFlags::SYMLINK_NOFOLLOW)
                .unwrap();
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                sub = Some(name);
            } else {
                rustix::fs::unlinkat(&fd, OsStr::from_bytes(&name), AtFlags::empty()).unwrap();
            }
        }
        if let Some(name) = sub {
            fd = open_dir(fd.as_fd(), &name);
            names.push(name);
            continue;
        }
        let Some(name) = names.pop() else {
            break;
        };
        fd = open_dir(fd.as_fd(), b"..");
        rustix::fs::unlinkat(&fd, OsStr::from_bytes(&name), AtFlags::REMOVEDIR).unwrap();
    }
}

/// Removes its deep trees without recursion when dropped (declare it after the
/// `Repo`, so it runs first).
struct Deep(Vec<std::path::PathBuf>);

impl Drop for Deep {
    fn drop(&mut self) {
        for p in &self.0 {
            remove_deep(p);
        }
    }
}

fn set_xattr(fd: BorrowedFd<'_>, name: &str, value: &[u8]) {
    rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()).unwrap();
}

/// Reads an uncompressed tar file with Python's tarfile (every member, every file's
/// data); returns, per member, its type, the number of components of its path, and
/// for a file the BLAKE3-free digest Python has (sha256 of the data) or a link's
/// target.
const PY_SUMMARY: &str = r#"
import hashlib, json, sys, tarfile
out = []
with tarfile.open(sys.argv[1], "r:") as t:
    for m in t:
        item = [m.type.decode(), m.name.count("/") + 1, len(m.name), m.mode]
        if m.isreg():
            item.append(hashlib.sha256(t.extractfile(m).read()).hexdigest())
        elif m.issym() or m.islnk():
            item.append(m.linkname.rsplit("/", 1)[-1] + "@" + str(m.linkname.count("/") + 1))
        out.append(item)
json.dump(out, sys.stdout)
"#;

fn py_summary(tar: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .args(["-c", PY_SUMMARY])
        .arg(tar)
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python tarfile could not read the archive: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn sha256(data: &[u8]) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

// ------------------------------------------------------------------ deep trees

const DEEP: usize = 100_000;

/// Levels of the 100,000-level chain that hold files, a symlink, xattrs and odd modes.
const MARKED: [usize; 5] = [0, 25_000, 50_000, 75_000, DEEP];

fn mark_level(level: usize, dir: BorrowedFd<'_>) {
    if !MARKED.contains(&level) {
        return;
    }
    let content = random_bytes(&format!("level {level}"), 3000 + level % 7);
    write_at(
        dir,
        "f",
        &content,
        if level.is_multiple_of(2) {
            0o4750
        } else {
            0o640
        },
    );
    let f = rustix::fs::openat(dir, "f", OFlags::RDONLY, Mode::empty()).unwrap();
    set_xattr(f.as_fd(), "user.level", level.to_string().as_bytes());
    rustix::fs::symlinkat("f", dir, "l").unwrap();
    write_at(dir, "gone", b"removed before the second snapshot", 0o600);
    set_xattr(dir, "user.dir", format!("at {level}").as_bytes());
    rustix::fs::fchmod(dir, Mode::from_raw_mode(0o750 | (level as u32 % 2))).unwrap();
    if level == DEEP {
        // A second name of the file 50,000 levels up: hardlinks across levels.
        let up = {
            let mut fd = rustix::io::fcntl_dupfd_cloexec(dir, 0).unwrap();
            for _ in 0..DEEP - 50_000 {
                fd = open_dir(fd.as_fd(), b"..");
            }
            fd
        };
        rustix::fs::linkat(&up, "f", dir, "h", AtFlags::empty()).unwrap();
    }
}

/// A chain of 100,000 directories (a file, a symlink, xattrs and odd modes along the
/// way, a hardlink 50,000 levels apart) snapshots complete, restores identical, lists,
/// diffs, checks clean and survives forget + gc. The restore used to hold one
/// descriptor per level (the open-files limit stopped it) and build every path from
/// the root per level.
#[test]
fn a_chain_of_100000_directories_snapshots_restores_diffs_and_survives_gc() {
    let repo = Repo::new();
    let src = repo.mkdir("src");
    let _deep = Deep(vec![
        src.clone(),
        repo.scratch("out"),
        repo.scratch("again"),
    ]);
    make_chain(&src, DEEP, mark_level);

    let snap = repo.snapshot(&[&src], &[]);
    assert_eq!(snap["incomplete"], false, "{}", snap["unreadable"]);
    assert_eq!(
        stat_u64(&snap, "dirs"),
        DEEP as u64 + 1,
        "{}",
        snap["stats"]
    );
    let first = id(&snap);

    let out = repo.scratch("out");
    let restored = repo.restore(&first, &out);
    assert_eq!(restored["warnings"], serde_json::json!([]), "{restored}");
    let (entries, deepest) = assert_same_deep_tree(&src, &out);
    assert_eq!(
        deepest,
        DEEP + 1,
        "the file at the bottom is 100,001 levels down"
    );
    assert_eq!(entries, DEEP + 3 * MARKED.len() + 1);

    let top = repo.ls(&first, &[]);
    assert_eq!(
        top.keys().collect::<Vec<_>>(),
        ["d", "f", "gone", "l"],
        "{top:?}"
    );

    // Change the bottom and a level in the middle: the diff names exactly that.
    write_at(chain_dir(&src, DEEP).as_fd(), "added", b"new", 0o644);
    rustix::fs::unlinkat(chain_dir(&src, 75_000), "gone", AtFlags::empty()).unwrap();
    let second = id(&repo.snapshot(&[&src], &[]));
    let diff = repo.ok(["diff", &first, &second]);
    let bottom = chain_path(DEEP);
    let middle = chain_path(75_000);
    assert_eq!(
        diff["added"],
        serde_json::json!([format!("{bottom}/added")])
    );
    assert_eq!(
        diff["removed"],
        serde_json::json!([format!("{middle}/gone")])
    );
    let modified: Vec<(String, serde_json::Value)> = diff["modified"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["path"].as_str().unwrap().to_string(),
                m["changes"].clone(),
            )
        })
        .collect();
    assert_eq!(
        modified,
        [
            (middle, serde_json::json!(["mtime"])),
            (bottom, serde_json::json!(["mtime"]))
        ],
    );

    // Forget the first snapshot; gc keeps every tree of the second.
    repo.ok(["forget", "--keep-last", "1"]);
    repo.ok(["gc"]);
    // Every tree and chunk of the second snapshot read and verified.
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(repo.list(&[]).len(), 1);
}

/// A chain one level deeper than `PATH_DEPTH_MAX`: the snapshot keeps the directory
/// at the limit empty and says so (path and reason), and everything else restores.
#[test]
fn a_chain_deeper_than_the_depth_limit_is_incomplete_and_the_rest_restores() {
    let repo = Repo::new();
    let src = repo.mkdir("src");
    let _deep = Deep(vec![src.clone(), repo.scratch("out")]);
    make_chain(&src, PATH_DEPTH_MAX + 1, |level, dir| {
        if level == PATH_DEPTH_MAX - 1 {
            write_at(dir, "last-file", b"kept", 0o644);
        }
    });
    let run = repo.run_json(["snapshot", src.to_str().unwrap()]).code(3);
    let snap = run.json();
    assert_eq!(snap["incomplete"], true, "{}", snap["stats"]);
    let unreadable = snap["unreadable"].as_array().unwrap();
    assert_eq!(unreadable.len(), 1);
    let limit_dir = format!("{}/{}", src.display(), chain_path(PATH_DEPTH_MAX));
    assert_eq!(unreadable[0]["path"], limit_dir.as_str());
    let why = unreadable[0]["error"].as_str().unwrap();
    assert!(
        why.contains(&format!("nested deeper than {PATH_DEPTH_MAX} directories")),
        "{why}"
    );

    let out = repo.scratch("out");
    repo.restore(&id(&snap), &out);
    // Every level down to the limit, the file just above it, and nothing below.
    let bottom = chain_dir(&out, PATH_DEPTH_MAX);
    assert_eq!(names_of(bottom.as_fd()), Vec::<Vec<u8>>::new());
    let above = chain_dir(&out, PATH_DEPTH_MAX - 1);
    assert_eq!(
        names_of(above.as_fd()),
        [b"d".to_vec(), b"last-file".to_vec()]
    );
}

/// Stores a chain of `depth` trees, each holding the next as `d`, and commits a
/// snapshot of it: what only a crafted repository can hold.
fn craft_chain(repo_path: &Path, depth: usize) -> String {
    let (repo, _) = Repository::init(repo_path, Config::default()).unwrap();
    let trees = Packer::new(&repo, BlobKind::Tree);
    let mut entries = Vec::new();
    let mut id = Id::of(b"");
    for _ in 0..depth {
        let bytes = Tree { entries }.encode();
        id = Id::of(&bytes);
        trees.store(id, &bytes).unwrap();
        entries = vec![crate::crafted::entry(b"d", Kind::Dir { tree: id })];
        entries[0].mode = 0o755;
    }
    trees.flush().unwrap();
    let snapshot = Snapshot {
        series: "evil".into(),
        version: 0,
        time_ns: 1,
        hostname: String::new(),
        volumes: vec![Volume {
            label: "deep".into(),
            source: b"/nowhere".to_vec(),
            tree: id,
            root: RootMeta {
                mode: 0o755,
                ..Default::default()
            },
        }],
        tags: Vec::new(),
        parent: None,
        stats: Stats::default(),
        incomplete: false,
        unreadable: Vec::new(),
        notes: Vec::new(),
        containers: Vec::new(),
    };
    record::commit(&repo, snapshot).unwrap().id.hex()
}

/// A crafted tree nested deeper than `PATH_DEPTH_MAX` is refused by restore and
/// export with one line, before anything is written. (A tree at the limit restores:
/// `a_chain_deeper_than_the_depth_limit_is_incomplete_and_the_rest_restores`.)
#[test]
fn a_crafted_tree_deeper_than_the_depth_limit_is_refused_by_restore_and_export() {
    let repo = Repo::uninit();
    // The top tree is the volume root: PATH_DEPTH_MAX + 1 trees hold directories
    // down to depth PATH_DEPTH_MAX; one more puts one beyond.
    let snap = craft_chain(&repo.path, PATH_DEPTH_MAX + 2);
    let out = repo.scratch("out");
    let _deep = Deep(vec![out.clone()]);
    let run = repo
        .run(["restore", &snap, "--to", out.to_str().unwrap()])
        .code(1);
    let line = run.error_line();
    assert!(
        line.contains(&format!("nested deeper than {PATH_DEPTH_MAX} levels")),
        "{line}"
    );
    assert!(
        fs::read_dir(&out).map_or(true, |mut d| d.next().is_none()),
        "restore wrote something"
    );
    let tar = repo.scratch("deep.tar");
    let run = repo
        .run([
            "export",
            &snap,
            "-o",
            tar.to_str().unwrap(),
            "--format",
            "tar",
        ])
        .code(1);
    assert!(
        run.error_line()
            .contains(&format!("nested deeper than {PATH_DEPTH_MAX} levels")),
        "{}",
        run.stderr
    );
    assert!(!tar.exists());
}

/// Export of a chain of 10,000 directories (files, a symlink and a hardlink along
/// the way): Python's tarfile reads every member. (A tar member holds its whole
/// path, so an archive of a chain grows with the square of its depth: 100 MB here,
/// 10 GB for 100,000 levels; the export itself keeps one frame per level.)
#[test]
fn export_of_a_chain_of_10000_directories_reads_back() {
    const DEPTH: usize = 10_000;
    let repo = Repo::new();
    let src = repo.mkdir("src");
    let _deep = Deep(vec![src.clone()]);
    make_chain(&src, DEPTH, |level, dir| {
        if level.is_multiple_of(2500) || level == DEPTH {
            write_at(dir, "f", format!("at {level}").as_bytes(), 0o640);
            rustix::fs::symlinkat("f", dir, "l").unwrap();
        }
        if level == DEPTH {
            write_at(dir, "bottom", b"the bottom", 0o600);
            rustix::fs::linkat(dir, "bottom", dir, "h", AtFlags::empty()).unwrap();
        }
    });
    let snap = id(&repo.snapshot(&[&src], &[]));
    let tar = repo.scratch("chain.tar");
    repo.ok([
        "export",
        &snap,
        "-o",
        tar.to_str().unwrap(),
        "--format",
        "tar",
    ]);
    let members = py_summary(&tar);
    let dirs = members.iter().filter(|m| m[0] == "5").count();
    assert_eq!(dirs, DEPTH + 1, "every directory and ./");
    let files: Vec<&serde_json::Value> = members.iter().filter(|m| m[0] == "0").collect();
    assert_eq!(files.len(), 6, "five f and the bottom file");
    let bottom = files
        .iter()
        .find(|m| m[1] == DEPTH + 1 && m[4] == sha256(b"the bottom"))
        .expect("the bottom file");
    assert_eq!(bottom[2], 2 * DEPTH + "bottom".len());
    let links: Vec<&serde_json::Value> = members.iter().filter(|m| m[0] == "1").collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0][4], format!("bottom@{}", DEPTH + 1));
    assert_eq!(members.iter().filter(|m| m[0] == "2").count(), 5);
    // ls -r lists every entry with its whole path.
    let ls = repo.run(["ls", "-r", &snap]).code(0);
    let lines = ls.stdout_str().lines().count();
    assert_eq!(
        lines,
        members.len() - 1,
        "ls -r lists what export holds (no ./)"
    );
}

// ------------------------------------------------------------------ huge directories

/// Names of 200 bytes that compress poorly (so tree sizes mean what they say).
fn wide_name(i: usize) -> String {
    let h = blake3::hash(i.to_string().as_bytes()).to_hex();
    format!("{i:07}-{}", &h.as_str().repeat(4)[..192])
}

/// The parts of the split directory `wide` in the snapshot's volume root.
fn wide_parts(repo: &Path, snap: &serde_json::Value) -> Vec<Id> {
    let r = Repository::open(repo).unwrap();
    let root = Id::from_hex(snap["volumes"][0]["tree"].as_str().unwrap()).unwrap();
    let Stored::Tree(top) = tree::decode_stored(&r.read_blob(&root).unwrap()).unwrap() else {
        panic!("the volume root is split")
    };
    let Kind::Dir { tree } = top.get(b"wide").expect("wide").kind else {
        panic!("wide is not a directory")
    };
    match tree::decode_stored(&r.read_blob(&tree).unwrap()).unwrap() {
        Stored::Split(p) => p,
        Stored::Tree(_) => panic!("the directory is not split"),
    }
}

/// A directory whose tree is over `TREE_BLOB_BYTES_MAX` (40,000 entries of 200-byte
/// names, about 9 MB of tree) is split across tree blobs; it restores identical,
/// exports, lists; a second snapshot after a few entries come and go stores only the
/// parts that hold them and a new root, and the diff names exactly them; forget + gc
/// keep every part, and `repair index` finds them all again.
#[test]
fn a_directory_split_across_tree_blobs_round_trips_diffs_and_survives_gc() {
    const N: usize = 40_000;
    let repo = Repo::new();
    let src = repo.mkdir("src");
    let wide = src.join("wide");
    fs::create_dir(&wide).unwrap();
    let dir = open_dir(CWD, wide.as_os_str().as_bytes());
    for i in 0..N {
        let content = if i % 5000 == 0 {
            random_bytes(&format!("wide {i}"), 10_000)
        } else {
            Vec::new()
        };
        write_at(dir.as_fd(), &wide_name(i), &content, 0o644);
    }
    write(src.join("small"), "a small file beside it");

    let snap1 = repo.snapshot(&[&src], &[]);
    let first = id(&snap1);
    let parts1 = wide_parts(&repo.path, &snap1);
    assert!(parts1.len() >= 10, "{} parts", parts1.len());

    let out = repo.scratch("out");
    repo.restore(&first, &out);
    assert_same_tree(&src, &out);

    let tar = repo.scratch("wide.tar");
    repo.ok([
        "export",
        &first,
        "-o",
        tar.to_str().unwrap(),
        "--format",
        "tar",
    ]);
    let members = py_summary(&tar);
    assert_eq!(members.len(), N + 3, "./, wide/, small and every file");
    assert_eq!(
        members
            .iter()
            .filter(|m| m[1] == 2 && m[2] == 5 + 200)
            .count(),
        N
    );
    let ls = repo.ls(&format!("{first}:wide"), &[]);
    assert_eq!(ls.len(), N);
    assert!(ls.contains_key(&format!("wide/{}", wide_name(N - 1))));
    let ls_r = repo.run(["ls", "-r", &first]).code(0);
    assert_eq!(ls_r.stdout_str().lines().count(), N + 2);

    // A few entries come and go: each changes the part that holds it (two, when
    // it is where a part ends).
    let removed = [wide_name(7), wide_name(23_456)];
    for name in &removed {
        fs::remove_file(wide.join(name)).unwrap();
    }
    let added = ["added-a", "zz-added-b", "0000123-added-c"];
    for name in added {
        write(wide.join(name), name);
    }
    let snap2 = repo.snapshot(&[&src], &[]);
    let second = id(&snap2);
    let parts2 = wide_parts(&repo.path, &snap2);
    let new_parts: Vec<&Id> = parts2.iter().filter(|p| !parts1.contains(p)).collect();
    assert!(
        !new_parts.is_empty() && new_parts.len() <= 2 * (removed.len() + added.len()),
        "{} of {} parts are new",
        new_parts.len(),
        parts2.len()
    );
    assert!(
        parts2.len() - new_parts.len() >= parts1.len() - 2 * (removed.len() + added.len()),
        "unchanged parts keep their ids"
    );
    let diff = repo.ok(["diff", &first, &second]);
    let mut want_added: Vec<String> = added.iter().map(|n| format!("wide/{n}")).collect();
    want_added.sort();
    let mut got_added: Vec<String> = diff["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    got_added.sort();
    assert_eq!(got_added, want_added);
    let want_removed: Vec<String> = removed.iter().map(|n| format!("wide/{n}")).collect();
    assert_eq!(diff["removed"], serde_json::json!(want_removed));
    assert_eq!(
        diff["modified"],
        serde_json::json!([{"path": "wide", "changes": ["mtime"]}])
    );

    repo.ok(["forget", "--keep-last", "1"]);
    repo.ok(["gc"]);
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    // The parts are ordinary tree blobs: an index rebuilt from the packs finds them.
    fs::remove_file(repo.path.join("index.redb")).unwrap();
    repo.ok(["repair", "index"]);
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let again = repo.scratch("again");
    repo.restore(&second, &again);
    assert_same_tree(&src, &again);
}
