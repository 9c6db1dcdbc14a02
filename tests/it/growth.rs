//! What can grow inside one entry or one snapshot (src/limits.rs), each at and past
//! its bound: extended attributes per entry, symlink targets, names, notes and
//! unreadable entries per snapshot. Depth and directory size are in `limits`.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::support::*;

/// `limits::XATTR_BYTES_MAX`: names and values of one entry's extended attributes.
const XATTR_BYTES_MAX: usize = 16 * 1024 * 1024;
/// `limits::NOTE_EXAMPLES_MAX`.
const NOTE_EXAMPLES_MAX: usize = 10;
/// `limits::UNREADABLE_LISTED_MAX`.
const UNREADABLE_LISTED_MAX: usize = 1000;

/// Gives `path` user xattrs whose names and values add up to exactly `total` bytes
/// (values of up to 64 KiB, the kernel's limit per value).
fn set_xattrs(path: &Path, total: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut left = total;
    let mut set = Vec::new();
    let mut i = 0;
    while left > 0 {
        let name = format!("user.x{i:04}").into_bytes();
        assert!(left > name.len(), "the total leaves room for a name");
        let len = (left - name.len()).min(64 * 1024);
        let value = random_bytes(&format!("xattr {i}"), len);
        rustix::fs::setxattr(
            path,
            name.as_slice(),
            &value,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap_or_else(|e| panic!("setxattr on {}: {e}", path.display()));
        left -= name.len() + len;
        set.push((name, value));
        i += 1;
    }
    set
}

/// Every user xattr of `path`, sorted by name.
fn user_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 1 << 16];
    let n = rustix::fs::llistxattr(path, &mut names).unwrap();
    let mut out = Vec::new();
    for name in names[..n]
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let mut value = vec![0u8; 1 << 16];
        let len = rustix::fs::lgetxattr(path, name, &mut value).unwrap();
        value.truncate(len);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

#[test]
fn extended_attributes_at_the_limit_are_kept_and_past_it_left_out_with_the_reason() {
    let repo = Repo::new();
    // tmpfs takes large user xattrs (ext4 keeps one block's worth).
    let _vol = Tmpfs::mount(&repo.scratch("vol"), "64m");
    let _to = Tmpfs::mount(&repo.scratch("to"), "64m");
    let vol = repo.scratch("vol");
    write(vol.join("at"), "at the limit\n");
    write(vol.join("past"), "one byte past it\n");
    std::fs::create_dir(vol.join("pastdir")).unwrap();
    write(vol.join("pastdir/inside"), "kept\n");
    let at = set_xattrs(&vol.join("at"), XATTR_BYTES_MAX);
    set_xattrs(&vol.join("past"), XATTR_BYTES_MAX + 1);
    set_xattrs(&vol.join("pastdir"), XATTR_BYTES_MAX + 1);

    let snap = repo
        .run_json(["snapshot".as_ref(), vol.as_os_str()])
        .code(3)
        .json();
    let unreadable = snap["unreadable"].as_array().unwrap();
    let paths: Vec<&str> = unreadable
        .iter()
        .map(|u| u["path"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = ["past", "pastdir"]
        .iter()
        .map(|n| vol.join(n).to_str().unwrap().to_string())
        .collect();
    assert_eq!(paths, expected, "{snap}");
    for u in unreadable {
        let error = u["error"].as_str().unwrap();
        assert!(
            error.contains("over the limit") && error.contains(&XATTR_BYTES_MAX.to_string()),
            "the reason names the limit: {error}"
        );
    }

    let to = repo.scratch("to").join("r");
    let restored = repo.restore(&id(&snap), &to);
    assert_eq!(
        restored["warnings"].as_array().map_or(0, Vec::len),
        0,
        "{restored}"
    );
    assert_eq!(user_xattrs(&to.join("at")), at, "all 16 MiB come back");
    assert_eq!(user_xattrs(&to.join("past")), Vec::new());
    assert_eq!(user_xattrs(&to.join("pastdir")), Vec::new());
    assert_eq!(
        std::fs::read(to.join("past")).unwrap(),
        b"one byte past it\n",
        "the entry itself is kept"
    );
    assert_eq!(std::fs::read(to.join("pastdir/inside")).unwrap(), b"kept\n");
}

#[test]
fn the_longest_names_and_symlink_targets_linux_makes_round_trip() {
    let repo = Repo::new();
    let vol = repo.mkdir("vol");
    // NAME_MAX on ext4 and tmpfs; PATH_MAX less its NUL for a symlink target.
    let name = "n".repeat(255);
    write(vol.join(&name), "long name\n");
    let target = "t/".repeat(2047) + "t";
    assert_eq!(target.len(), 4095);
    std::os::unix::fs::symlink(&target, vol.join("link")).unwrap();
    let snap = repo.snapshot(&[&vol], &[]);
    assert_eq!(snap["incomplete"], false, "{snap}");
    let to = repo.scratch("to");
    repo.restore(&id(&snap), &to);
    assert_eq!(std::fs::read(to.join(&name)).unwrap(), b"long name\n");
    assert_eq!(
        std::fs::read_link(to.join("link"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        target.as_bytes()
    );
}

/// Makes `n` sockets named `sock-NNNNN` in `dir`.
fn sockets(dir: &Path, from: usize, n: usize) {
    for i in from..from + n {
        drop(UnixListener::bind(dir.join(format!("sock-{i:05}"))).unwrap());
    }
}

fn notes_of(snap: &serde_json::Value) -> Vec<&str> {
    snap["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect()
}

#[test]
fn notes_keep_ten_examples_per_kind_and_count_the_rest() {
    let repo = Repo::new();
    let vol = repo.mkdir("vol");
    write(vol.join("data"), "data\n");
    sockets(&vol, 0, NOTE_EXAMPLES_MAX);
    let snap = repo.snapshot(&[&vol], &[]);
    let notes = notes_of(&snap);
    assert_eq!(notes.len(), NOTE_EXAMPLES_MAX, "{notes:?}");
    assert!(
        notes.iter().all(|n| n.contains("socket skipped")),
        "{notes:?}"
    );

    // 20,000 sockets once made a 1.36 MB record that every command loads.
    sockets(&vol, NOTE_EXAMPLES_MAX, 20_000 - NOTE_EXAMPLES_MAX);
    let snap = repo.snapshot(&[&vol], &[]);
    let notes = notes_of(&snap);
    assert_eq!(notes.len(), NOTE_EXAMPLES_MAX + 1, "{notes:?}");
    for (i, note) in notes[..NOTE_EXAMPLES_MAX].iter().enumerate() {
        let path = vol.join(format!("sock-{i:05}"));
        assert!(
            note.starts_with(path.to_str().unwrap()),
            "the first paths in name order: {note}"
        );
    }
    assert_eq!(
        notes[NOTE_EXAMPLES_MAX],
        format!(
            "{} more entries: socket skipped (sockets cannot be restored)",
            20_000 - NOTE_EXAMPLES_MAX
        )
    );
    let record = repo.path.join("snapshots").join(id(&snap));
    let size = std::fs::metadata(&record).unwrap().len();
    assert!(size < 8 * 1024, "record of {size} bytes");
}

#[test]
fn a_snapshot_lists_the_first_thousand_unreadable_entries_and_counts_the_rest() {
    if !is_root() {
        eprintln!("needs root to run the snapshot as another user");
        return;
    }
    let mut repo = Repo::new();
    let vol = repo.mkdir("vol");
    write(vol.join("readable"), "readable\n");
    let secret = |i: usize| vol.join(format!("secret-{i:05}"));
    for i in 0..UNREADABLE_LISTED_MAX {
        write(secret(i), "no\n");
    }
    chown_tree(repo.tmp.path(), NOBODY, NOBODY);
    for i in 0..UNREADABLE_LISTED_MAX {
        std::fs::set_permissions(secret(i), std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    repo.run_as = Some(NOBODY);
    let at = repo
        .run_json(["snapshot".as_ref(), vol.as_os_str()])
        .code(3)
        .json();
    assert_eq!(
        at["unreadable"].as_array().unwrap().len(),
        UNREADABLE_LISTED_MAX
    );
    assert_eq!(at["notes"].as_array().unwrap().len(), 0, "{}", at["notes"]);

    repo.run_as = None;
    for i in UNREADABLE_LISTED_MAX..UNREADABLE_LISTED_MAX + 5 {
        write(secret(i), "no\n");
        chown_tree(&secret(i), NOBODY, NOBODY);
        std::fs::set_permissions(secret(i), std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    repo.run_as = Some(NOBODY);
    let past = repo
        .run_json(["snapshot".as_ref(), vol.as_os_str()])
        .code(3)
        .json();
    let listed = past["unreadable"].as_array().unwrap();
    assert_eq!(listed.len(), UNREADABLE_LISTED_MAX);
    assert_eq!(
        listed.last().unwrap()["path"],
        secret(UNREADABLE_LISTED_MAX - 1).to_str().unwrap(),
        "the first in path order are listed"
    );
    assert_eq!(
        past["notes"],
        serde_json::json!([format!(
            "5 more paths could not be read; only the first {UNREADABLE_LISTED_MAX} are listed"
        )])
    );
    assert_eq!(past["incomplete"], true);
}
