//! Files the snapshotting user cannot read: reported, never silently dropped.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::support::*;

/// A repository whose commands run unprivileged: as root, through setpriv
/// as nobody, with the scratch directory handed over to nobody.
fn unprivileged_repo() -> (Repo, PathBuf) {
    let mut repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("a.txt"), "readable a\n");
    write(data.join("sub/b.txt"), "readable b\n");
    write(data.join("secret"), "nobody may read this\n");
    if is_root() {
        chown_tree(repo.tmp.path(), NOBODY, NOBODY);
        repo.run_as = Some(NOBODY);
    }
    (repo, data)
}

fn chmod(p: &std::path::Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn unreadable_file_makes_an_incomplete_snapshot_of_the_rest() {
    let (repo, data) = unprivileged_repo();
    let secret = data.join("secret");
    chmod(&secret, 0o000);

    let run = repo
        .run_json(["snapshot".as_ref(), data.as_os_str()])
        .code(3);
    let snap = run.json();
    assert_snapshot_shape(&snap);
    assert_eq!(snap["incomplete"], true, "{snap}");
    let unreadable = snap["unreadable"].as_array().unwrap();
    assert_eq!(unreadable.len(), 1, "{snap}");
    assert_eq!(unreadable[0]["path"], secret.to_str().unwrap(), "{snap}");
    assert!(
        unreadable[0]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{snap}"
    );

    let listed = repo.list(&[]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], snap["id"]);
    assert_eq!(
        listed[0]["incomplete"], true,
        "the record should remember it is incomplete"
    );

    let entries = repo.ls(&id(&snap), &["-r"]);
    assert!(
        entries.contains_key("a.txt") && entries.contains_key("sub/b.txt"),
        "{entries:?}"
    );

    let to = repo.scratch("restored");
    repo.restore(&id(&snap), &to);
    assert_eq!(fs::read(to.join("a.txt")).unwrap(), b"readable a\n");
    assert_eq!(fs::read(to.join("sub/b.txt")).unwrap(), b"readable b\n");
}

#[test]
fn unreadable_directory_is_reported() {
    let (repo, data) = unprivileged_repo();
    let locked = data.join("locked");
    write(locked.join("inside"), "x");
    if is_root() {
        chown_tree(&locked, NOBODY, NOBODY);
    }
    chmod(&locked, 0o000);

    let run = repo.run_json(["snapshot".as_ref(), data.as_os_str()]);
    chmod(&locked, 0o755);
    let snap = run.code(3).json();
    assert_eq!(snap["incomplete"], true, "{snap}");
    let locked_s = locked.to_str().unwrap();
    assert!(
        snap["unreadable"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["path"].as_str().is_some_and(|p| p.starts_with(locked_s))),
        "the unreadable directory should be reported: {snap}"
    );
    let entries = repo.ls(&id(&snap), &["-r"]);
    assert!(
        entries.contains_key("a.txt") && entries.contains_key("secret"),
        "{entries:?}"
    );
}

#[test]
fn unprivileged_round_trip_of_read_only_entries() {
    // Restoring as a normal user: contents must go in before a directory
    // loses its write permission.
    let (repo, data) = unprivileged_repo();
    fs::remove_file(data.join("secret")).unwrap();
    write(data.join("ro/inner/f"), "in a read-only directory\n");
    write(data.join("ro/g"), "g\n");
    write(data.join("ro-file"), "read-only file\n");
    if is_root() {
        chown_tree(&data, NOBODY, NOBODY);
    }
    chmod(&data.join("ro-file"), 0o400);
    chmod(&data.join("ro/inner"), 0o555);
    chmod(&data.join("ro"), 0o555);
    set_tree_mtimes(&data, Y2020);

    let snap = repo.snapshot(&[&data], &[]);
    let to = repo.scratch("restored");
    repo.restore(&id(&snap), &to);
    assert_same_tree(&data, &to);
    for dir in [&data, &to] {
        chmod(&dir.join("ro/inner"), 0o755);
        chmod(&dir.join("ro"), 0o755);
    }
}
