//! `volsnap export`: archives that GNU tar and Python's tarfile read back into the
//! very tree `restore` makes; safe names whatever the snapshot holds; damage never
//! produces an archive that looks complete; deterministic bytes; quiet broken pipes.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use volsnap::id::Id;
use volsnap::tree::{Entry, Kind, Run, Tree, Xattr};

use crate::crafted::{craft, entry};
use crate::roundtrip::build_every_kind;
use crate::support::*;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fmt {
    TarGz,
    Tar,
    TarZst,
}

impl Fmt {
    fn name(self) -> &'static str {
        match self {
            Fmt::TarGz => "tar.gz",
            Fmt::Tar => "tar",
            Fmt::TarZst => "tar.zst",
        }
    }
}

const FORMATS: [Fmt; 3] = [Fmt::TarGz, Fmt::Tar, Fmt::TarZst];

// ------------------------------------------------------------------ helpers

/// `export SOURCE -o OUT --format F EXTRA...` with `--json`, expecting exit 0.
fn export_to(repo: &Repo, source: &str, out: &Path, fmt: Fmt, extra: &[&str]) -> Value {
    let mut args: Vec<OsString> = vec![
        "export".into(),
        source.into(),
        "-o".into(),
        out.as_os_str().to_owned(),
        "--format".into(),
        fmt.name().into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    let v = repo.ok(&args);
    assert_eq!(v["format"], fmt.name(), "{v}");
    assert_eq!(v["output"].as_str(), out.to_str(), "{v}");
    assert_eq!(
        v["bytes_out"].as_u64(),
        Some(fs::metadata(out).unwrap().len()),
        "bytes_out is not the archive's size: {v}"
    );
    v
}

/// Runs a command to completion, panicking with its output unless it exits 0.
fn sh(cmd: &mut Command) -> Vec<u8> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    assert!(
        out.status.success(),
        "{desc} failed ({})\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The uncompressed tar stream of an archive file, decompressed by the real tools.
fn tar_bytes(archive: &Path, fmt: Fmt) -> Vec<u8> {
    match fmt {
        Fmt::Tar => fs::read(archive).unwrap(),
        Fmt::TarGz => sh(Command::new("gzip").arg("-dc").arg(archive)),
        Fmt::TarZst => sh(Command::new("zstd").arg("-dcq").arg(archive)),
    }
}

/// Extracts with GNU tar as the issue says, into `to` (created), and asserts tar
/// neither failed nor warned.
fn gnu_extract(archive: &Path, fmt: Fmt, to: &Path) {
    fs::create_dir_all(to).unwrap();
    let mut cmd = Command::new("tar");
    cmd.args(["--xattrs", "--xattrs-include=*", "--numeric-owner"]);
    match fmt {
        Fmt::TarGz => cmd.arg("-xpzf"),
        Fmt::Tar => cmd.arg("-xpf"),
        Fmt::TarZst => cmd.args(["--zstd", "-xpf"]),
    };
    cmd.arg(archive).arg("-C").arg(to);
    let desc = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    // GNU tar warns about every time before 1970 (it still extracts it).
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("implausibly old time stamp"))
        .collect();
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{desc}: {}\nstderr: {stderr}",
        out.status
    );
}

/// One archive member as Python's tarfile sees it.
#[derive(Debug, Clone)]
struct Member {
    name: Vec<u8>,
    /// The tar type flag: '0' file, '1' hardlink, '2' symlink, '3' char device,
    /// '4' block device, '5' directory, '6' fifo.
    kind: char,
    size: u64,
    /// Bytes actually read from the member's data.
    data_len: u64,
    link: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
}

const PY_LIST: &str = r#"
import io, json, sys, tarfile
data = sys.stdin.buffer.read()
out = []
with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
    for m in t:
        n = 0
        if m.isreg():
            f = t.extractfile(m)
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                n += len(b)
        out.append({
            "name": m.name.encode("utf-8", "surrogateescape").hex(),
            "type": m.type.decode("latin-1"),
            "size": m.size,
            "data": n,
            "link": m.linkname.encode("utf-8", "surrogateescape").hex(),
            "mode": m.mode,
            "uid": m.uid,
            "gid": m.gid,
        })
json.dump(out, sys.stdout)
"#;

/// The Python interpreter itself: a version manager's `python3` shim costs a shell
/// start per call.
fn python() -> &'static Path {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = sh(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]));
        PathBuf::from(String::from_utf8(out).unwrap().trim())
    })
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Lists an uncompressed tar stream with Python's tarfile, reading every member's data.
fn py_members(tar: &[u8]) -> Vec<Member> {
    let mut child = Command::new(python())
        .args(["-c", PY_LIST])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().unwrap();
    let input = tar.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(
        out.status.success(),
        "python tarfile could not read the archive: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Member {
            name: unhex(m["name"].as_str().unwrap()),
            kind: m["type"].as_str().unwrap().chars().next().unwrap(),
            size: m["size"].as_u64().unwrap(),
            data_len: m["data"].as_u64().unwrap(),
            link: unhex(m["link"].as_str().unwrap()),
            mode: m["mode"].as_u64().unwrap() as u32,
            uid: m["uid"].as_u64().unwrap() as u32,
            gid: m["gid"].as_u64().unwrap() as u32,
        })
        .collect()
}

/// Every member name is relative, has no `..` component, and regular members hold
/// exactly the bytes their header announces.
#[track_caller]
fn assert_safe_members(members: &[Member]) {
    for m in members {
        let shown = show(&m.name);
        assert!(!m.name.is_empty(), "a member has an empty name");
        assert!(!m.name.starts_with(b"/"), "absolute member name {shown}");
        assert!(
            !m.name.split(|b| *b == b'/').any(|c| c == b".."),
            "member name with a `..` component: {shown}"
        );
        if m.kind == '0' {
            assert_eq!(
                m.size, m.data_len,
                "member {shown}: header size and data length differ"
            );
        }
        if m.kind == '1' {
            assert!(
                !m.link.starts_with(b"/") && !m.link.split(|b| *b == b'/').any(|c| c == b".."),
                "hardlink member {shown} targets {}",
                show(&m.link)
            );
        }
    }
}

/// The archive's members are exactly the entries of the tree at `expected` (a
/// restore), with matching types, sizes, symlink targets, owners and modes; each
/// hardlink group is one regular member first, then tar links naming it.
/// `root_member`: the archive starts with "./" for the root.
#[track_caller]
fn assert_members_match_tree(members: &[Member], expected: &Path, root_member: bool) {
    assert_safe_members(members);
    let scan = scan_tree(expected);
    let mut seen: BTreeMap<Vec<u8>, &Member> = BTreeMap::new();
    for m in members {
        let key = if m.name == b"." {
            Vec::new()
        } else {
            m.name.clone()
        };
        assert!(
            seen.insert(key, m).is_none(),
            "member {} appears twice",
            show(&m.name)
        );
    }
    if root_member {
        assert_eq!(
            members.first().map(|m| m.name.as_slice()),
            Some(&b"."[..]),
            "the archive should start with ./"
        );
    }
    let mut problems = Vec::new();
    for (path, meta) in &scan.entries {
        if path.is_empty() && !root_member {
            continue;
        }
        let Some(m) = seen.get(path) else {
            problems.push(format!(
                "{} ({}) missing from the archive",
                show(path),
                meta.kind
            ));
            continue;
        };
        let kind_ok = matches!(
            (meta.kind, m.kind),
            ("file", '0' | '1')
                | ("dir", '5')
                | ("symlink", '2')
                | ("fifo", '6')
                | ("chardev", '3')
                | ("blockdev", '4')
        );
        if !kind_ok {
            problems.push(format!(
                "{}: {} archived as type {:?}",
                show(path),
                meta.kind,
                m.kind
            ));
            continue;
        }
        if m.kind == '0' && Some(m.size) != meta.size {
            problems.push(format!(
                "{}: size {} != {:?}",
                show(path),
                m.size,
                meta.size
            ));
        }
        if m.kind == '2' && Some(&m.link) != meta.target.as_ref() {
            problems.push(format!(
                "{}: symlink target {} != {}",
                show(path),
                show(&m.link),
                show(meta.target.as_deref().unwrap_or_default())
            ));
        }
        if m.kind != '1' && (m.uid, m.gid, m.mode & 0o7777) != (meta.uid, meta.gid, meta.mode) {
            problems.push(format!(
                "{}: owner/mode {}:{} {:o} != {}:{} {:o}",
                show(path),
                m.uid,
                m.gid,
                m.mode,
                meta.uid,
                meta.gid,
                meta.mode
            ));
        }
    }
    for k in seen.keys() {
        if !scan.entries.contains_key(k) {
            problems.push(format!("{} is in the archive but not in the tree", show(k)));
        }
    }
    // Hardlink structure: the first member of each inode group is a regular file,
    // the later ones link to that first name.
    let mut first_of_group: BTreeMap<&Vec<u8>, &Vec<u8>> = BTreeMap::new();
    for m in members {
        let Some(rep) = scan.link_group.get(&m.name) else {
            continue;
        };
        if !(m.kind == '0' || m.kind == '1') {
            continue;
        }
        match first_of_group.get(rep) {
            None => {
                if m.kind != '0' {
                    problems.push(format!(
                        "{} is the first name of its inode in the archive but is a link to {}",
                        show(&m.name),
                        show(&m.link)
                    ));
                }
                first_of_group.insert(rep, &m.name);
            }
            Some(first) => {
                if m.kind != '1' || m.link != **first {
                    problems.push(format!(
                        "{} should be a hard link to {} (type {:?}, link {})",
                        show(&m.name),
                        show(first),
                        m.kind,
                        show(&m.link)
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the archive does not match {}:\n{}",
        expected.display(),
        problems.join("\n")
    );
}

/// Gives `to`'s root the owner, mode and mtime of `from`'s, for comparisons where
/// the archive has no entry for the top directory.
fn copy_root_meta(from: &Path, to: &Path) {
    let st = fs::symlink_metadata(from).unwrap();
    std::os::unix::fs::lchown(to, Some(st.uid()), Some(st.gid())).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(st.mode() & 0o7777)).unwrap();
    set_mtime(to, st.mtime(), st.mtime_nsec());
}

fn snapshot_id(repo: &Repo, dirs: &[&Path]) -> (String, Value) {
    let snap = repo.snapshot(dirs, &[]);
    assert_eq!(snap["incomplete"], false, "{snap}");
    (id(&snap), snap)
}

/// Exports `source` as `fmt` next to `restored` (what `restore` made of the same
/// source), reads the archive with Python (safe names, exact sizes, the restored
/// tree's entries, hardlink structure), extracts it with GNU tar and compares the
/// result with `restored`. `root_member`: the archive starts with "./" for the top.
/// Returns the JSON report and the members.
#[track_caller]
fn check_export(
    repo: &Repo,
    source: &str,
    fmt: Fmt,
    extra: &[&str],
    restored: &Path,
    root_member: bool,
) -> (Value, Vec<Member>) {
    let base = restored.file_name().unwrap().to_str().unwrap();
    let archive = repo.scratch(&format!("{base}.{}", fmt.name()));
    let report = export_to(repo, source, &archive, fmt, extra);
    let members = py_members(&tar_bytes(&archive, fmt));
    assert_members_match_tree(&members, restored, root_member);
    assert_eq!(
        report["entries"].as_u64(),
        Some(members.len() as u64),
        "entries should count the archive's members: {report}"
    );
    let extracted = repo.scratch(&format!("{base}-extracted-{}", fmt.name()));
    gnu_extract(&archive, fmt, &extracted);
    if !root_member {
        copy_root_meta(restored, &extracted);
    }
    // GNU tar writes the zeros of a member out.
    assert_same_tree_dense(restored, &extracted);
    (report, members)
}

// ---------------------------------------------------------- the test tree

/// `build_every_kind`, with a smaller sparse file (the archive holds holes as zeros),
/// plus what tar encodes specially: a path over 255 bytes reached through names over
/// 100 bytes, a symlink target over 100 bytes, and a hardlink whose first name is
/// over 100 bytes.
fn build_export_tree(data: &Path) {
    build_every_kind(data);
    fs::remove_file(data.join("sparse")).unwrap();
    let f = fs::File::create(data.join("sparse")).unwrap();
    f.set_len(4 * MIB).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"middle", MIB + 12345).unwrap();
    f.write_all_at(b"tail", 4 * MIB - 4).unwrap();
    drop(f);
    fs::remove_file(data.join("sparse-empty")).unwrap();
    fs::File::create(data.join("sparse-empty"))
        .unwrap()
        .set_len(MIB)
        .unwrap();

    let deep = make_deep_path(data, 300, 120);
    assert!(deep.len() > 255);
    // Named so that it sorts after the deep directories: the deep name comes first.
    fs::hard_link(
        data.join(OsStr::from_bytes(&deep)),
        data.join("zz-hardlink-to-deep"),
    )
    .unwrap();
    symlink(OsStr::from_bytes(&deep), data.join("zz-long-target")).unwrap();
}

// ---------------------------------------------------------------- round trip

fn round_trip(fmt: Fmt) {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    build_export_tree(&data);
    set_tree_mtimes(&data, Y2020);
    let (snap, _) = snapshot_id(&repo, &[&data]);
    let restored = repo.scratch("r1");
    repo.restore(&snap, &restored);
    let (report, members) = check_export(&repo, &snap, fmt, &[], &restored, true);
    assert_eq!(report["snapshot"], snap.as_str(), "{report}");
    // The special encodings were really exercised.
    assert!(members.iter().any(|m| m.name.len() > 255 && m.kind == '0'));
    assert!(members.iter().any(|m| m.link.len() > 255 && m.kind == '1'));
    assert!(members.iter().any(|m| m.link.len() > 255 && m.kind == '2'));
    for k in ['3', '4', '6'] {
        assert!(members.iter().any(|m| m.kind == k), "no member of type {k}");
    }
}

#[test]
fn export_tar_gz_extracts_to_the_restored_tree() {
    round_trip(Fmt::TarGz);
}

#[test]
fn export_plain_tar_extracts_to_the_restored_tree() {
    round_trip(Fmt::Tar);
}

#[test]
fn export_tar_zst_extracts_to_the_restored_tree() {
    round_trip(Fmt::TarZst);
}

/// Symlink targets are opaque bytes: tar must not tidy them.
#[test]
fn symlink_targets_are_exported_byte_for_byte() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    for (name, target) in [
        ("double-slash", "a//b"),
        ("inner-dot", "x/./y"),
        ("trailing-dot", "x/."),
        ("trailing-slash", "dir/"),
        ("leading-dot", "./x"),
        ("root", "/"),
        ("dotdot", "../up"),
    ] {
        symlink(target, data.join(name)).unwrap();
    }
    set_tree_mtimes(&data, Y2020);
    let (snap, _) = snapshot_id(&repo, &[&data]);
    let restored = repo.scratch("r1");
    repo.restore(&snap, &restored);
    check_export(&repo, &snap, Fmt::Tar, &[], &restored, true);
}

/// The pax `mtime` is a decimal number of seconds: before 1970 with nanoseconds,
/// (-1 s, +1 ns) is -0.999999999, not -1.000000001.
#[test]
fn mtimes_before_1970_keep_their_nanoseconds() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    for n in ["a", "b", "c", "d"] {
        write(data.join(n), n);
    }
    set_tree_mtimes(&data, Y2020);
    set_mtime(&data.join("a"), -1, 0);
    set_mtime(&data.join("b"), -1, 1);
    set_mtime(&data.join("c"), -1_000_000_000, 999_999_999);
    set_mtime(&data.join("d"), 0, 1);
    let (snap, _) = snapshot_id(&repo, &[&data]);
    let restored = repo.scratch("r1");
    repo.restore(&snap, &restored);
    check_export(&repo, &snap, Fmt::Tar, &[], &restored, true);
}

/// Extended attribute names are bytes: `=`, `%` and non-UTF-8 bytes are legal.
#[test]
fn xattr_names_with_odd_bytes_are_exported_exactly() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let f = data.join("f");
    write(&f, "xattrs\n");
    for (name, value) in [
        (&b"user.plain"[..], &b"1"[..]),
        (b"user.a=b", b"with an equals sign"),
        (b"user.pct%3D", b"percent"),
        (b"user.\xff\xfe", b"non-utf8 name"),
    ] {
        rustix::fs::lsetxattr(
            f.as_path(),
            OsStr::from_bytes(name),
            value,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    set_tree_mtimes(&data, Y2020);
    let (snap, _) = snapshot_id(&repo, &[&data]);
    let restored = repo.scratch("r1");
    repo.restore(&snap, &restored);
    check_export(&repo, &snap, Fmt::Tar, &[], &restored, true);
}

// ------------------------------------------------------ paths and volumes

/// A tree whose `sub/dir` holds hardlinks whose first name is outside it.
fn build_subpath_tree(data: &Path) {
    write(data.join("a-first"), random_bytes("first", 70_000));
    write(data.join("other.txt"), "not exported with sub/dir\n");
    let dir = data.join("sub/dir");
    write(dir.join("file.bin"), random_bytes("file.bin", 200_000));
    fs::hard_link(data.join("a-first"), dir.join("second")).unwrap();
    fs::hard_link(data.join("a-first"), dir.join("third")).unwrap();
    write(dir.join("inner/x"), "x\n");
    write(dir.join("inner/hl-1"), "linked inside\n");
    fs::hard_link(dir.join("inner/hl-1"), dir.join("inner/hl-2")).unwrap();
    symlink("../../a-first", dir.join("link")).unwrap();
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        dir.join("fifo"),
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        dir.as_path(),
        "user.top",
        b"on the exported top",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
    if is_root() {
        std::os::unix::fs::lchown(&dir, Some(1234), Some(5678)).unwrap();
    }
    set_tree_mtimes(data, Y2020);
}

#[test]
fn export_of_a_sub_path_matches_its_restore() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    build_subpath_tree(&data);
    let (snap, _) = snapshot_id(&repo, &[&data]);
    let source = format!("{snap}:sub/dir");
    let restored = repo.scratch("r1");
    repo.restore(&source, &restored);
    let (_, members) = check_export(&repo, &source, Fmt::TarGz, &[], &restored, true);
    // The first exported name of a group whose first name is outside carries the content.
    let second = members.iter().find(|m| m.name == b"second").unwrap();
    assert_eq!((second.kind, second.size), ('0', 70_000), "{second:?}");
    assert!(!members.iter().any(|m| m.name.ends_with(b"other.txt")));

    // A leading slash and a trailing one name the same directory.
    let a = repo.scratch("a.tar.gz");
    let b = repo.scratch("b.tar.gz");
    export_to(&repo, &source, &a, Fmt::TarGz, &[]);
    export_to(&repo, &format!("{snap}:/sub/dir/"), &b, Fmt::TarGz, &[]);
    assert!(fs::read(&a).unwrap() == fs::read(&b).unwrap());
}

#[test]
fn export_of_single_files_holds_just_that_file() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    build_subpath_tree(&data);
    let (snap, _) = snapshot_id(&repo, &[&data]);

    // A plain file, a hardlink whose first name is not exported, a symlink.
    for (path, name, kind) in [
        ("sub/dir/file.bin", "file.bin", '0'),
        ("sub/dir/third", "third", '0'),
        ("sub/dir/link", "link", '2'),
    ] {
        let source = format!("{snap}:{path}");
        let restored = repo.scratch(&format!("r1-{name}"));
        repo.restore(&source, &restored);
        let (_, members) = check_export(&repo, &source, Fmt::Tar, &[], &restored, false);
        assert_eq!(members.len(), 1, "{path}: {members:?}");
        assert_eq!(members[0].name, name.as_bytes(), "{path}: {members:?}");
        assert_eq!(members[0].kind, kind, "{path}: {members:?}");
    }
}

/// Two volumes with identical contents (so one tree id), with hardlinks in each.
fn build_volume(dir: &Path) {
    write(dir.join("hl-a"), random_bytes("volume hardlink", 50_000));
    fs::hard_link(dir.join("hl-a"), dir.join("hl-b")).unwrap();
    write(dir.join("sub/f"), "in sub\n");
    fs::hard_link(dir.join("hl-a"), dir.join("sub/hl-c")).unwrap();
    symlink("../hl-a", dir.join("sub/link")).unwrap();
    rustix::fs::lsetxattr(
        dir.join("sub/f").as_path(),
        "user.k",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    set_tree_mtimes(dir, Y2020);
}

#[test]
fn export_of_a_multi_volume_snapshot_matches_its_restore() {
    let repo = Repo::new();
    let alpha = repo.mkdir("alpha");
    let beta = repo.mkdir("beta");
    build_volume(&alpha);
    build_volume(&beta);
    set_mtime(&beta, Y2020, 6);
    let (snap, snap_v) = snapshot_id(&repo, &[&alpha, &beta]);

    let tree_of = |i: usize| snap_v["volumes"][i]["tree"].clone();
    assert_eq!(
        tree_of(0),
        tree_of(1),
        "the two volumes should share one tree"
    );

    // The expected tree: each volume restored on its own under its label. (A
    // whole-snapshot restore of volumes sharing a tree joins their hardlinks across
    // volumes: a restore bug this comparison must not inherit.)
    let restored = repo.mkdir("r1");
    for label in ["alpha", "beta"] {
        let to = restored.join(label);
        repo.ok([
            OsStr::new("restore"),
            OsStr::new(&snap),
            OsStr::new("--volume"),
            OsStr::new(label),
            OsStr::new("--to"),
            to.as_os_str(),
        ]);
        assert_same_tree(if label == "alpha" { &alpha } else { &beta }, &to);
    }
    let (_, members) = check_export(&repo, &snap, Fmt::TarZst, &[], &restored, false);
    let tops: BTreeSet<&[u8]> = members
        .iter()
        .map(|m| m.name.split(|b| *b == b'/').next().unwrap())
        .collect();
    assert_eq!(tops, BTreeSet::from([&b"alpha"[..], &b"beta"[..]]));
    // Hardlinks stay within their volume.
    for m in members.iter().filter(|m| m.kind == '1') {
        assert_eq!(m.name[..4], m.link[..4], "{m:?}");
    }

    // One volume: its root is the top of the archive.
    let one = restored.join("beta");
    check_export(&repo, &snap, Fmt::TarGz, &["--volume", "beta"], &one, true);

    // A path inside a volume, whose hardlinks' first name is outside it.
    let source = format!("{snap}:alpha/sub");
    let sub = repo.scratch("alpha-sub");
    repo.restore(&source, &sub);
    check_export(&repo, &source, Fmt::Tar, &[], &sub, true);

    // An unknown volume is refused with a clear message, and leaves no file.
    let out_dir = repo.mkdir("refused");
    let run = repo.run([
        OsStr::new("export"),
        OsStr::new(&snap),
        OsStr::new("--volume"),
        OsStr::new("gamma"),
        OsStr::new("-o"),
        out_dir.join("x.tar.gz").as_os_str(),
    ]);
    assert!(run.error_line().contains("gamma"), "{}", run.describe());
    assert_eq!(
        fs::read_dir(&out_dir).unwrap().count(),
        0,
        "a refused export left a file"
    );
}

// ------------------------------------------------------------------- hostile

fn file_entry(name: &[u8], content: &[u8]) -> Entry {
    entry(
        name,
        Kind::File {
            size: content.len() as u64,
            chunks: vec![Run {
                id: Id::of(content),
                count: 1,
            }],
        },
    )
}

fn symlink_entry(name: &[u8], target: &[u8]) -> Entry {
    entry(
        name,
        Kind::Symlink {
            target: target.to_vec(),
        },
    )
}

/// A recursive listing of `dir` (names, kinds, sizes), leaving out `skip`.
fn listing(dir: &Path, skip: &Path) -> BTreeSet<(PathBuf, String, u64)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p == skip {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            out.insert((p.clone(), format!("{:?}", m.file_type()), m.len()));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// Member names for the entries of `t` below `prefix`; its directories hold `sub`.
fn crafted_names(prefix: &[u8], t: &Tree, sub: &Tree) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for e in &t.entries {
        let mut n = prefix.to_vec();
        n.extend_from_slice(&e.name);
        if matches!(e.kind, Kind::Dir { .. }) {
            let mut p = n.clone();
            p.push(b'/');
            v.extend(crafted_names(&p, sub, sub));
        }
        v.push(n);
    }
    v
}

#[test]
fn a_hostile_snapshot_exports_only_safe_names() {
    let repo = Repo::new();
    let content: &[u8] = b"planted\n";
    let mut names: Vec<Entry> = vec![
        file_entry(b"-rf", content),
        file_entry(b"--checkpoint-action=exec=touch pwned", content),
        file_entry(b"...", content),
        file_entry(b"..foo", content),
        file_entry(b"..\\..\\win", content),
        file_entry(b"~", content),
        file_entry(b" ", content),
        file_entry(b"C:", content),
        symlink_entry(b"passwd", b"/etc/passwd"),
        symlink_entry(b"up", b"../../x"),
        symlink_entry(b"dotdot", b".."),
    ];
    // An xattr whose name and value look like pax records that would rename the entry.
    let mut tricky = file_entry(b"xattr-trick", content);
    tricky.xattrs.push(Xattr {
        name: b"user.x=/../../y".to_vec(),
        value: b"\n30 path=../../../tmp/evil\n".to_vec(),
    });
    names.push(tricky);
    let sub = Tree {
        entries: {
            let mut v = vec![
                file_entry(b"...", content),
                symlink_entry(b"escape", b"../../../../../../tmp/volsnap-export-escape"),
            ];
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        },
    };
    let sub_id = Id::of(&sub.encode());
    names.push(entry(b"..dir", Kind::Dir { tree: sub_id }));
    names.sort_by(|a, b| a.name.cmp(&b.name));
    let top = Tree { entries: names };

    // `craft` stores the trees of its volumes: `sub` is the second volume's root too.
    let snap = craft(&repo.path, &[("..vol", &top), ("-rf", &sub)], &[content]);

    let set = |extra: &[&[u8]], names: Vec<Vec<u8>>| -> BTreeSet<Vec<u8>> {
        extra.iter().map(|n| n.to_vec()).chain(names).collect()
    };
    let whole = set(
        &[b"..vol", b"-rf"],
        [
            crafted_names(b"..vol/", &top, &sub),
            crafted_names(b"-rf/", &sub, &sub),
        ]
        .concat(),
    );
    for (i, (source, extra, root_member, want)) in [
        (snap.clone(), vec![], false, whole),
        (
            snap.clone(),
            vec!["--volume", "..vol"],
            true,
            set(&[b"."], crafted_names(b"", &top, &sub)),
        ),
        (
            format!("{snap}:..vol/..dir"),
            vec![],
            true,
            set(&[b"."], crafted_names(b"", &sub, &sub)),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let parent = repo.mkdir(&format!("extract-{i}"));
        let archive = parent.join("evil.tar");
        export_to(&repo, &source, &archive, Fmt::Tar, &extra);
        let members = py_members(&fs::read(&archive).unwrap());
        assert_safe_members(&members);
        let got: BTreeSet<Vec<u8>> = members.iter().map(|m| m.name.clone()).collect();
        assert_eq!(
            got.iter().map(|n| show(n)).collect::<Vec<_>>(),
            want.iter().map(|n| show(n)).collect::<Vec<_>>(),
            "members of the export of {source} {extra:?}"
        );
        if root_member {
            assert_eq!(members[0].name, b".", "{members:?}");
        }
        // Symlink targets travel verbatim: they are data, not paths tar follows.
        for m in members.iter().filter(|m| m.kind == '2') {
            let want: &[u8] = match m.name.rsplit(|b| *b == b'/').next().unwrap() {
                b"passwd" => b"/etc/passwd",
                b"up" => b"../../x",
                b"dotdot" => b"..",
                b"escape" => b"../../../../../../tmp/volsnap-export-escape",
                other => panic!("unexpected symlink {}", show(other)),
            };
            assert_eq!(m.link, want, "{m:?}");
        }

        let to = parent.join("to");
        let before = listing(&parent, &to);
        gnu_extract(&archive, Fmt::Tar, &to);
        assert_eq!(
            before,
            listing(&parent, &to),
            "extracting {source} wrote outside its target"
        );
        assert!(!Path::new("/tmp/volsnap-export-escape").exists());
        assert!(to.read_dir().unwrap().count() > 0, "nothing was extracted");
    }
    let passwd = fs::read("/etc/passwd").unwrap();
    assert!(!passwd.starts_with(content), "/etc/passwd was overwritten");
}

// ---------------------------------------------------------------- corruption

fn flip_middle_of_largest_pack(repo: &Path) {
    let mut packs = Vec::new();
    for shard in fs::read_dir(repo.join("packs")).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for p in fs::read_dir(&shard).unwrap() {
                let p = p.unwrap().path();
                let len = fs::metadata(&p).unwrap().len();
                packs.push((len, p));
            }
        }
    }
    let (len, pack) = packs.into_iter().max().expect("no packs");
    assert!(
        len > MIB,
        "the largest pack should hold the big file: {len}"
    );
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len / 2).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, len / 2).unwrap();
}

/// A snapshot of one big random file in `sub/`, with a byte flipped in its pack.
fn damaged_snapshot(repo: &Repo) -> String {
    let data = repo.mkdir("data");
    write(data.join("a-small.txt"), "before the damage\n");
    write(data.join("sub/big.bin"), random_bytes("big", 2 << 20));
    let (snap, _) = snapshot_id(repo, &[&data]);
    flip_middle_of_largest_pack(&repo.path);
    snap
}

/// Feeds `input` to a command; true when it exits 0.
fn accepts(cmd: &mut Command, input: &[u8]) -> bool {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input);
    drop(stdin);
    child.wait().unwrap().success()
}

#[test]
fn a_damaged_chunk_fails_the_export_and_leaves_nothing() {
    let repo = Repo::new();
    let snap = damaged_snapshot(&repo);
    for fmt in FORMATS {
        let out_dir = repo.mkdir(&format!("out-{}", fmt.name()));
        let out = out_dir.join(format!("x.{}", fmt.name()));
        let run = repo.run([
            OsStr::new("export"),
            OsStr::new(&snap),
            OsStr::new("-o"),
            out.as_os_str(),
            OsStr::new("--format"),
            OsStr::new(fmt.name()),
        ]);
        let line = run.error_line();
        assert!(
            line.contains("sub/big.bin"),
            "the error should name the file\n{}",
            run.describe()
        );
        let left: Vec<_> = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "a failed export left {left:?} behind");
    }

    // To a pipe: non-zero, and what came out is not a complete archive.
    let run = repo.run(["export", &snap, "-o", "-"]);
    let line = run.error_line();
    assert!(line.contains("sub/big.bin"), "{}", run.describe());
    assert!(
        !accepts(Command::new("gzip").arg("-t"), &run.stdout),
        "gzip -t accepted the output of a failed export ({} bytes)",
        run.stdout.len()
    );
    let run = repo.run(["export", &snap, "-o", "-", "--format", "tar"]);
    run.error_line();
    assert!(
        !accepts(Command::new("tar").args(["-xOf", "-"]), &run.stdout),
        "GNU tar read the output of a failed plain tar export without error"
    );
    let run = repo.run(["export", &snap, "-o", "-", "--format", "tar.zst"]);
    run.error_line();
    assert!(
        !accepts(Command::new("zstd").arg("-tq"), &run.stdout),
        "zstd -t accepted the output of a failed export"
    );
}

/// With `-o -`, stdout carries the archive and nothing else, failure included: the
/// `--json` error document must not be appended to the archive bytes.
#[test]
fn a_failed_export_to_stdout_with_json_keeps_its_error_off_stdout() {
    let repo = Repo::new();
    let snap = damaged_snapshot(&repo);
    let run = repo.run_json(["export", &snap, "-o", "-", "--format", "tar"]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(run.stderr.contains("sub/big.bin"), "{}", run.describe());
    let tail = &run.stdout[run.stdout.len().saturating_sub(4096)..];
    assert!(
        !String::from_utf8_lossy(tail).contains("\"exit_code\""),
        "the JSON error was written into the archive stream on stdout: ...{}",
        String::from_utf8_lossy(&tail[tail.len().saturating_sub(300)..])
    );
}

// --------------------------------------------------------------- determinism

#[test]
fn exports_are_deterministic_and_report_sane_numbers() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("big.bin"), random_bytes("det", 1 << 20));
    write(data.join("text.txt"), "deterministic\n".repeat(50_000));
    write(data.join("d/e/f"), "f\n");
    symlink("d/e/f", data.join("l")).unwrap();
    set_tree_mtimes(&data, Y2020);
    let (snap, snapv) = snapshot_id(&repo, &[&data]);
    let listed = repo.ls(&snap, &["-r"]);

    for fmt in FORMATS {
        let a = repo.scratch(&format!("a.{}", fmt.name()));
        let b = repo.scratch(&format!("b.{}", fmt.name()));
        let ra = export_to(&repo, &snap, &a, fmt, &[]);
        export_to(&repo, &snap, &b, fmt, &[]);
        assert!(
            fs::read(&a).unwrap() == fs::read(&b).unwrap(),
            "two exports of one snapshot as {} differ",
            fmt.name()
        );
        assert_eq!(ra["snapshot"], snap.as_str(), "{ra}");
        assert_eq!(
            ra["bytes_in"].as_u64(),
            Some(stat_u64(&snapv, "bytes")),
            "bytes_in should be the snapshot's bytes: {ra} vs {snapv}"
        );
        assert_eq!(
            ra["entries"].as_u64(),
            Some(listed.len() as u64 + 1),
            "entries should be every entry and the root: {ra}"
        );
        assert!(ra["duration_ms"].is_u64(), "{ra}");
        match fmt {
            Fmt::TarGz => drop(sh(Command::new("gzip").arg("-t").arg(&a))),
            Fmt::TarZst => drop(sh(Command::new("zstd").arg("-tq").arg(&a))),
            Fmt::Tar => assert_eq!(
                ra["bytes_out"].as_u64().unwrap() % 512,
                0,
                "a tar stream is whole blocks"
            ),
        }
    }

    // Levels change the bytes but not the content.
    let fast = repo.scratch("fast.tar.gz");
    export_to(&repo, &snap, &fast, Fmt::TarGz, &["--level", "1"]);
    let best = repo.scratch("best.tar.zst");
    export_to(&repo, &snap, &best, Fmt::TarZst, &["--level", "19"]);
    let plain = fs::read(repo.scratch("a.tar")).unwrap();
    assert!(
        tar_bytes(&fast, Fmt::TarGz) == plain,
        "gzip level 1 changed the tar stream"
    );
    assert!(
        tar_bytes(&best, Fmt::TarZst) == plain,
        "zstd level 19 changed the tar stream"
    );
}

/// "The same snapshot gives the same bytes" on any machine: the archive must not
/// depend on how many cores the exporting process may use.
#[test]
fn archives_do_not_depend_on_the_number_of_cores() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("big.bin"), random_bytes("cores", 1 << 20));
    write(data.join("text.txt"), "cores\n".repeat(100_000));
    let (snap, _) = snapshot_id(&repo, &[&data]);
    for fmt in FORMATS {
        let all = repo.scratch(&format!("all.{}", fmt.name()));
        export_to(&repo, &snap, &all, fmt, &[]);
        let one = repo.scratch(&format!("one.{}", fmt.name()));
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0", bin(), "--repo"])
            .arg(&repo.path)
            .args(["export", &snap, "--format", fmt.name(), "-o"])
            .arg(&one)
            .env_remove("VOLSNAP_REPO");
        sh(&mut cmd);
        assert!(
            fs::read(&all).unwrap() == fs::read(&one).unwrap(),
            "the {} archive made on one core differs from the one made on all cores",
            fmt.name()
        );
    }
}

/// A full export reads what the snapshot counted: `bytes_in` equals `stats.bytes`
/// (the progress bar's total) also when files are hardlinked.
#[test]
fn bytes_in_of_a_full_export_matches_the_snapshot_with_hardlinks() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("a"), random_bytes("hl", 100_000));
    fs::hard_link(data.join("a"), data.join("b")).unwrap();
    write(data.join("c"), "not linked\n");
    let (snap, snapv) = snapshot_id(&repo, &[&data]);
    let out = repo.scratch("x.tar");
    let report = export_to(&repo, &snap, &out, Fmt::Tar, &[]);
    assert_eq!(
        report["bytes_in"].as_u64(),
        Some(stat_u64(&snapv, "bytes")),
        "export bytes_in vs snapshot stats.bytes: {report} vs {}",
        snapv["stats"]
    );
}

// -------------------------------------------------------------------- stdout

/// Waits for a child, failing the test if it takes longer than `limit`.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("volsnap did not exit within {limit:?} after its reader went away");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_closed_pipe_is_a_quiet_exit() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("big.bin"), random_bytes("pipe", 1 << 20));
    let (snap, _) = snapshot_id(&repo, &[&data]);
    for fmt in FORMATS {
        for json in [false, true] {
            let mut cmd = repo.command();
            if json {
                cmd.arg("--json");
            }
            cmd.args(["export", &snap, "--format", fmt.name()]);
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut head = [0u8; 100];
            child
                .stdout
                .as_mut()
                .unwrap()
                .read_exact(&mut head)
                .unwrap();
            drop(child.stdout.take());
            let mut stderr = child.stderr.take().unwrap();
            let status = wait_bounded(&mut child, Duration::from_secs(30));
            let mut err = String::new();
            stderr.read_to_string(&mut err).unwrap();
            assert!(
                !err.contains("panicked") && !err.lines().any(|l| l.starts_with("error")),
                "export {} (json: {json}) into a closed pipe: {status}\nstderr: {err}",
                fmt.name()
            );
            assert!(
                status.success(),
                "export {} (json: {json}) into a closed pipe should exit quietly: {status}\nstderr: {err}",
                fmt.name()
            );
        }
    }
}

#[test]
fn with_json_and_stdout_the_archive_is_alone_on_stdout() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f.txt"), "content\n");
    write(data.join("g/h"), random_bytes("h", 100_000));
    set_tree_mtimes(&data, Y2020);
    let (snap, snapv) = snapshot_id(&repo, &[&data]);
    let restored = repo.scratch("r1");
    repo.restore(&snap, &restored);

    for fmt in FORMATS {
        let run = repo
            .run_json(["export", &snap, "-o", "-", "--format", fmt.name()])
            .code(0);
        let report: Value = serde_json::from_str(run.stderr.trim()).unwrap_or_else(|e| {
            panic!("stderr should be the JSON report ({e})\n{}", run.describe())
        });
        assert_eq!(report["output"], "-", "{report}");
        assert_eq!(report["format"], fmt.name(), "{report}");
        assert_eq!(report["snapshot"], snap.as_str(), "{report}");
        assert_eq!(
            report["bytes_out"].as_u64(),
            Some(run.stdout.len() as u64),
            "{report}"
        );
        assert_eq!(
            report["bytes_in"].as_u64(),
            Some(stat_u64(&snapv, "bytes")),
            "{report}"
        );
        let file = repo.scratch(&format!("stdout.{}", fmt.name()));
        fs::write(&file, &run.stdout).unwrap();
        let members = py_members(&tar_bytes(&file, fmt));
        assert_members_match_tree(&members, &restored, true);
        // And the same bytes as an export to a file.
        let to_file = repo.scratch(&format!("file.{}", fmt.name()));
        export_to(&repo, &snap, &to_file, fmt, &[]);
        assert!(
            fs::read(&to_file).unwrap() == run.stdout,
            "-o - and -o FILE differ"
        );
    }

    // Without --json, stdout is still only the archive.
    let run = repo.run(["export", &snap, "--format", "tar"]).code(0);
    let members = py_members(&run.stdout);
    assert_members_match_tree(&members, &restored, true);
}

// ------------------------------------------------------------------ refusals

#[test]
fn bad_formats_and_levels_are_refused() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), "f\n");
    let (snap, _) = snapshot_id(&repo, &[&data]);
    let out_dir = repo.mkdir("out");
    let out = out_dir.join("x");
    let out = out.to_str().unwrap();

    let run = repo.run(["export", &snap, "-o", out, "--format", "zip"]);
    let line = run.error_line();
    assert!(
        line.contains("zip") && line.contains("tar.gz"),
        "{}",
        run.describe()
    );

    for (fmt, level) in [
        ("tar.gz", "0"),
        ("tar.gz", "10"),
        ("tar.zst", "0"),
        ("tar.zst", "20"),
    ] {
        let run = repo.run([
            "export", &snap, "-o", out, "--format", fmt, "--level", level,
        ]);
        let line = run.error_line();
        assert!(
            line.contains(level) && line.contains("level"),
            "{}",
            run.describe()
        );
    }
    let run = repo.run(["export", &snap, "-o", out, "--level", "-1"]);
    assert_ne!(run.status, 0, "{}", run.describe());

    let left: Vec<_> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "refused exports left {left:?}");

    // A path that is not in the snapshot.
    let run = repo.run(["export", &format!("{snap}:no/such"), "-o", out]);
    assert!(run.error_line().contains("no/such"), "{}", run.describe());
}
