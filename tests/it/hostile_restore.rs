//! A hostile writer inside the restore target: the target is a container's volume, and
//! the container renames and swaps entries while volsnap restores into it, stages in
//! it, or recovers it. Each race is made deterministic with a pause point (the process
//! waits there while the test plays the adversary) or a crash point. volsnap must
//! never change, move or delete anything outside the target through what was swapped
//! in, and must say what it found. Also: every repository file is private.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use volsnap::live::journal::{self, Journal};
use volsnap::repo::Repository;

use crate::support::*;

/// Everything an adversary could try to change about a path: mode, owner, mtime and
/// extended attributes (of the path itself, not following a symlink), and for a
/// directory its names.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    xattrs: Vec<(String, Vec<u8>)>,
    names: Vec<String>,
}

fn fingerprint(p: &Path) -> Fingerprint {
    let m = fs::symlink_metadata(p).unwrap();
    let mut names: Vec<String> = if m.is_dir() {
        fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    } else {
        Vec::new()
    };
    names.sort();
    let mut list = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut list).unwrap();
    let mut xattrs = Vec::new();
    for name in list[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut value = vec![0u8; 4096];
        let len = rustix::fs::lgetxattr(p, name.as_str(), &mut value).unwrap();
        value.truncate(len);
        xattrs.push((name, value));
    }
    xattrs.sort();
    Fingerprint {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime: mtime_of(p),
        xattrs,
        names,
    }
}

fn set_xattr(p: &Path, key: &str, val: &[u8]) {
    rustix::fs::lsetxattr(p, key, val, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {} {key}: {e}", p.display()));
}

/// A root-owned directory outside every target, with a file, a distinctive mode, time
/// and extended attribute: what a swapped-in symlink points at.
fn outside(repo: &Repo) -> PathBuf {
    let dir = repo.mkdir("outside");
    write(dir.join("precious"), "not the container's\n");
    fs::set_permissions(dir.join("precious"), fs::Permissions::from_mode(0o600)).unwrap();
    set_mtime(&dir.join("precious"), Y2020 - 50, 3);
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    set_xattr(&dir, "user.owner", b"host");
    set_mtime(&dir, Y2020 - 100, 7);
    dir
}

/// A snapshot whose directory `d` (and fifo `p`) carries everything restore applies:
/// setuid and setgid bits, another owner, a time, an extended attribute.
fn snapshot_with_loud_metadata(repo: &Repo) -> String {
    let data = repo.mkdir("data");
    write(data.join("d/inner.txt"), "inside d\n");
    let fifo = data.join("p");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    set_xattr(&data.join("d"), "user.planted", b"from the snapshot");
    for p in [data.join("d"), fifo] {
        std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o6777)).unwrap();
    }
    set_tree_mtimes(&data, Y2020);
    id(&repo.snapshot(&[&data], &[]))
}

#[test]
fn restore_never_applies_directory_metadata_through_a_directory_swapped_for_a_symlink() {
    let repo = Repo::new();
    let snap = snapshot_with_loud_metadata(&repo);
    let outside = outside(&repo);
    let before = fingerprint(&outside);
    let to = repo.scratch("out");
    let paused = repo.spawn_paused(
        "restore before directory metadata",
        &["restore", &snap, "--to", to.to_str().unwrap()],
    );
    // The container moves the restored directory away and leaves a symlink to a
    // root-owned directory in its place.
    fs::rename(to.join("d"), to.join("d-moved")).unwrap();
    symlink(&outside, to.join("d")).unwrap();
    let run = paused.finish();
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.error_line()
            .contains("was replaced while volsnap was restoring it"),
        "{}",
        run.describe()
    );
    assert_eq!(
        fingerprint(&outside),
        before,
        "restore changed a directory outside its target through the symlink"
    );
    assert!(fs::symlink_metadata(to.join("d")).unwrap().is_symlink());
}

#[test]
fn restore_never_applies_directory_metadata_to_a_directory_swapped_in() {
    let repo = Repo::new();
    let snap = snapshot_with_loud_metadata(&repo);
    let to = repo.scratch("out");
    let paused = repo.spawn_paused(
        "restore before directory metadata",
        &["restore", &snap, "--to", to.to_str().unwrap()],
    );
    // Another directory of the container's, not the one restore made, takes its name:
    // it must not become setuid, setgid and owned by someone else.
    fs::rename(to.join("d"), to.join("d-moved")).unwrap();
    fs::create_dir(to.join("d")).unwrap();
    fs::set_permissions(to.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
    let before = fingerprint(&to.join("d"));
    let run = paused.finish();
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.error_line().contains("was replaced"),
        "{}",
        run.describe()
    );
    assert_eq!(fingerprint(&to.join("d")), before);
}

#[test]
fn restore_never_applies_node_metadata_through_a_node_swapped_for_a_symlink() {
    let repo = Repo::new();
    let snap = snapshot_with_loud_metadata(&repo);
    let outside = outside(&repo);
    let precious = outside.join("precious");
    let before = fingerprint(&precious);
    let to = repo.scratch("out");
    let paused = repo.spawn_paused(
        "restore created a node",
        &["restore", &snap, "--to", to.to_str().unwrap()],
    );
    fs::rename(to.join("p"), to.join("p-moved")).unwrap();
    symlink(&precious, to.join("p")).unwrap();
    let run = paused.finish();
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.error_line().contains("was replaced") && run.error_line().contains("a symlink"),
        "{}",
        run.describe()
    );
    assert_eq!(
        fingerprint(&precious),
        before,
        "restore changed a file outside its target through the symlink"
    );
}

/// A mounted volume (so an in-place restore must swap its entries) holding `old`, a
/// snapshot of it holding `new`, and a root-owned directory outside it.
struct MountedVolume {
    // Unmounted before the scratch directory holding it is removed.
    volume: Tmpfs,
    repo: Repo,
    snap: String,
    /// A copy of the volume as it is before the in-place restore.
    old_copy: PathBuf,
    outside: PathBuf,
}

fn mounted_volume() -> MountedVolume {
    let repo = Repo::new();
    let volume = Tmpfs::mount(&repo.scratch("volume"), "32m");
    write(volume.0.join("a.txt"), "snapshot a\n");
    write(volume.0.join("sub/b.bin"), random_bytes("b", 50_000));
    let snap = id(&repo.snapshot(&[&volume.0], &[]));
    write(volume.0.join("a.txt"), "changed since\n");
    write(volume.0.join("added.txt"), "added since\n");
    let old_copy = repo.mkdir("old-copy");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(volume.0.join("."))
        .arg(&old_copy)
        .status()
        .unwrap();
    assert!(st.success());
    let root = fs::metadata(&volume.0).unwrap();
    fs::set_permissions(&old_copy, root.permissions()).unwrap();
    let (sec, nsec) = mtime_of(&volume.0);
    set_mtime(&old_copy, sec, nsec);
    let outside = outside(&repo);
    MountedVolume {
        repo,
        volume,
        snap,
        old_copy,
        outside,
    }
}

/// The restore id, read from the staging directory an entry swap keeps in the target.
fn restore_id_in(volume: &Path) -> String {
    let stage = fs::read_dir(volume)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(".volsnap-stage-"))
        .expect("a staging directory in the volume");
    let rest = stage.strip_prefix(".volsnap-stage-").unwrap();
    rest.rsplit_once('-').unwrap().0.to_string()
}

/// Asserts the volume holds what `expected` holds, besides the adversary's `planted`
/// entry.
fn assert_volume_is(volume: &Path, expected: &Path, planted: &str) {
    let diffs = tree_differences(expected, volume, &[]);
    let others: Vec<&str> = diffs.lines().filter(|l| !l.contains(planted)).collect();
    assert!(others.is_empty(), "{diffs}");
}

#[test]
fn an_entry_swap_never_moves_entries_through_a_planted_holding_directory() {
    let v = mounted_volume();
    let before = fingerprint(&v.outside);
    let paused = v.repo.spawn_paused(
        "live entry swap",
        &[
            "restore",
            &v.snap,
            "--in-place",
            "--yes",
            "--allow-in-place-copy",
        ],
    );
    // The container saw the staging directory's name and plants the holding
    // directory's name as a symlink to a root-owned directory.
    let id = restore_id_in(&v.volume.0);
    let planted = v.volume.0.join(format!(".volsnap-old-{id}-0"));
    symlink(&v.outside, &planted).unwrap();
    let run = paused.finish();
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.error_line()
            .contains("already exists and was not made by this restore"),
        "{}",
        run.describe()
    );
    assert_eq!(
        fingerprint(&v.outside),
        before,
        "the volume's entries were moved outside it"
    );
    // Rolled back: the volume holds what it held, and the planted link is left alone.
    assert_volume_is(&v.volume.0, &v.old_copy, &format!(".volsnap-old-{id}-0"));
    assert!(fs::symlink_metadata(&planted).unwrap().is_symlink());
}

#[test]
fn recovery_never_moves_entries_out_of_a_holding_directory_swapped_for_a_symlink() {
    let v = mounted_volume();
    let before = fingerprint(&v.outside);
    let crashed = v.repo.run_crashing_at(
        "live moved old entries out",
        &[
            "restore",
            &v.snap,
            "--in-place",
            "--yes",
            "--allow-in-place-copy",
        ],
    );
    assert_eq!(crashed.as_deref(), Some("live moved old entries out"));
    // While nobody runs, the container swaps the holding directory for a symlink to
    // a root-owned directory: recovery must not move that directory's entries in.
    let id = restore_id_in(&v.volume.0);
    let held = v.volume.0.join(format!(".volsnap-old-{id}-0"));
    fs::rename(&held, v.volume.0.join("held-moved")).unwrap();
    symlink(&v.outside, &held).unwrap();
    let run = v.repo.run(["recover"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.error_line()
            .contains("is not the directory volsnap made there"),
        "{}",
        run.describe()
    );
    assert_eq!(fingerprint(&v.outside), before);
    assert!(!v.volume.0.join("precious").exists());
    // The journal stays for a recovery once the volume is mended.
    assert_eq!(
        journal::list(&Repository::open(&v.repo.path).unwrap()).unwrap(),
        [id]
    );
}

#[test]
fn recovery_refuses_a_journal_whose_staging_path_is_not_its_own() {
    let repo = Repo::new();
    let parent = repo.mkdir("live");
    let vol = parent.join("vol");
    write(vol.join("f"), "snapshot\n");
    let snap = id(&repo.snapshot(&[&vol], &[]));
    write(vol.join("f"), "changed\n");
    let crashed = repo.run_crashing_at(
        "live staged a volume",
        &["restore", &snap, "--in-place", "--yes"],
    );
    assert_eq!(crashed.as_deref(), Some("live staged a volume"));
    // A journal naming a directory of someone else's as its staging directory.
    let victim = outside(&repo);
    let before = fingerprint(&victim);
    let r = Repository::open(&repo.path).unwrap();
    let ids = journal::list(&r).unwrap();
    assert_eq!(ids.len(), 1);
    let mut j = Journal::load(&r, &ids[0]).unwrap().unwrap();
    let stage = j.volumes[0].stage.clone();
    j.volumes[0].stage = victim.clone();
    j.save(&r).unwrap();
    drop(r);
    let run = repo.run(["recover"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    let line = run.error_line();
    assert!(
        line.contains(&format!("staging path {} is not", victim.display()))
            && line.contains("nothing was moved or deleted"),
        "{}",
        run.describe()
    );
    assert_eq!(fingerprint(&victim), before, "recovery deleted {victim:?}");
    assert!(stage.exists(), "the real staging directory is left too");
}

/// Every file under `root` is 0600 and every directory 0700 (the root included);
/// returns the names of the files seen.
fn assert_private(root: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        if m.is_dir() {
            assert_eq!(m.mode() & 0o7777, 0o700, "directory {rel:?}");
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            assert!(m.is_file(), "{rel:?} is neither a file nor a directory");
            assert_eq!(m.mode() & 0o7777, 0o600, "file {rel:?}");
            seen.push(rel);
        }
    }
    seen
}

#[test]
fn every_repository_file_is_private_after_snapshot_gc_and_in_place_restore() {
    // Whatever umask the tests inherit, a default one would make 0644 files.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let repo = Repo::new();
    let parent = repo.mkdir("live");
    let vol = parent.join("vol");
    let junk = repo.mkdir("junk");
    write(vol.join("f"), random_bytes("f", 100_000));
    write(junk.join("j"), random_bytes("j", 100_000));
    let snap = id(&repo.snapshot(&[&vol], &["--name", "v"]));
    write(vol.join("f"), random_bytes("f2", 100_000));

    // A snapshot in flight holds its lease lock.
    let paused = repo.spawn_paused(
        "snapshot before commit",
        &["snapshot", junk.to_str().unwrap(), "--name", "junk"],
    );
    let files = assert_private(&repo.path);
    assert!(
        files.iter().any(|f| f.starts_with("locks/lease-")),
        "{files:?}"
    );
    let junk_snap = id(&paused.finish().code(0).json());

    repo.ok(["forget", &junk_snap]);
    repo.ok(["gc"]);
    let files = assert_private(&repo.path);
    assert!(files.iter().any(|f| f == "locks/gc.lock"), "{files:?}");

    // An interrupted in-place restore leaves its journal and the journal's lock.
    let crashed = repo.run_crashing_at(
        "live staged a volume",
        &["restore", &snap, "--in-place", "--yes"],
    );
    assert_eq!(crashed.as_deref(), Some("live staged a volume"));
    let files = assert_private(&repo.path);
    for ext in [".journal", ".lock"] {
        assert!(
            files
                .iter()
                .any(|f| f.starts_with("journals/") && f.ends_with(ext)),
            "{files:?}"
        );
    }
    repo.ok(["recover"]);
    repo.ok(["restore", &snap, "--in-place", "--yes"]);
    let files = assert_private(&repo.path);
    assert!(
        files.iter().any(|f| f.starts_with("restores/")),
        "{files:?}"
    );
}
