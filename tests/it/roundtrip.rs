//! snapshot → restore --to → the same tree, for every kind of entry and
//! every kind of metadata the restore promises.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::Path;

use rustix::fs::{CWD, FileType, Mode};

use crate::support::*;

const MIB: u64 = 1 << 20;
const SPARSE_LEN: u64 = 64 * MIB;

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn set_xattr(p: &Path, key: &str, val: &[u8]) {
    rustix::fs::lsetxattr(p, key, val, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {} {key}: {e}", p.display()));
}

/// One of everything a volume can hold.
pub(crate) fn build_every_kind(data: &Path) {
    write(data.join("plain.txt"), "hello\n");
    write(data.join("empty"), "");
    write(data.join("sub/empty-too"), "");
    write(
        data.join("sub/nested/deeper/file.bin"),
        random_bytes("nested", 300_000),
    );
    write(
        data.join("compressible.txt"),
        "all work and no play\n".repeat(50_000),
    );
    fs::create_dir(data.join("emptydir")).unwrap();

    // Names are bytes.
    write(
        data.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        "non-utf8 name",
    );
    let odd_dir = data.join(OsStr::from_bytes(b"dir-\xff\xfe"));
    fs::create_dir(&odd_dir).unwrap();
    write(odd_dir.join("inside"), "inside a non-utf8 directory");
    write(data.join("line\nbreak"), "newline in the name");
    write(data.join("tab\tcr\r and spaces "), "whitespace in the name");
    write(data.join("h\u{e9}llo-\u{65e5}\u{672c}"), "unicode name");

    // Symlinks: relative, dangling, absolute (never followed), to a
    // directory, with a non-UTF-8 target.
    symlink("plain.txt", data.join("link-rel")).unwrap();
    symlink("no/such/target", data.join("link-dangling")).unwrap();
    symlink("/etc/hostname", data.join("link-abs")).unwrap();
    symlink("sub", data.join("link-to-dir")).unwrap();
    symlink(
        OsStr::from_bytes(b"\xff-target"),
        data.join("link-non-utf8"),
    )
    .unwrap();

    // Hardlinks, one across directories.
    write(data.join("hl-a"), random_bytes("hardlinked", 10_000));
    fs::hard_link(data.join("hl-a"), data.join("hl-b")).unwrap();
    fs::hard_link(data.join("hl-a"), data.join("sub/hl-c")).unwrap();

    // Special files.
    rustix::fs::mkfifoat(CWD, data.join("fifo"), Mode::from_raw_mode(0o640)).unwrap();
    if is_root() {
        let dev = rustix::fs::makedev(1, 3);
        rustix::fs::mknodat(
            CWD,
            data.join("chardev"),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o620),
            dev,
        )
        .unwrap();
        let dev = rustix::fs::makedev(7, 200);
        rustix::fs::mknodat(
            CWD,
            data.join("blockdev"),
            FileType::BlockDevice,
            Mode::from_raw_mode(0o660),
            dev,
        )
        .unwrap();
    }
    // A socket cannot be snapshotted; it must be skipped with a note.
    drop(std::os::unix::net::UnixListener::bind(data.join("sock")).unwrap());

    // A sparse file: 64 MiB with three small islands of data.
    let f = fs::File::create(data.join("sparse")).unwrap();
    f.set_len(SPARSE_LEN).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"middle", 20 * MIB + 12345).unwrap();
    f.write_all_at(b"tail", SPARSE_LEN - 4).unwrap();
    drop(f);
    // All hole, no data.
    fs::File::create(data.join("sparse-empty"))
        .unwrap()
        .set_len(3 * MIB)
        .unwrap();

    // A name of the maximum length, and an empty file with two links.
    write(data.join("n".repeat(255)), "longest name");
    write(data.join("empty-linked"), "");
    fs::hard_link(data.join("empty-linked"), data.join("sub/empty-linked-too")).unwrap();

    // Odd owners first: chown clears setuid/setgid.
    write(data.join("owned"), "owned by 1234:5678");
    write(data.join("owned-setuid"), "setuid and owned");
    fs::create_dir(data.join("owned-dir")).unwrap();
    symlink("owned", data.join("owned-link")).unwrap();
    if is_root() {
        for n in ["owned", "owned-setuid", "owned-dir", "owned-link"] {
            std::os::unix::fs::lchown(data.join(n), Some(1234), Some(5678)).unwrap();
        }
    }

    // Modes.
    write(data.join("setuid"), "#!/bin/sh\n");
    chmod(&data.join("setuid"), 0o4755);
    chmod(&data.join("owned-setuid"), 0o4750);
    write(data.join("setgid"), "x");
    chmod(&data.join("setgid"), 0o2710);
    fs::create_dir(data.join("setgid-dir")).unwrap();
    chmod(&data.join("setgid-dir"), 0o2775);
    fs::create_dir(data.join("sticky-dir")).unwrap();
    write(data.join("sticky-dir/f"), "in a sticky dir");
    chmod(&data.join("sticky-dir"), 0o1777);
    write(data.join("readonly"), "r");
    chmod(&data.join("readonly"), 0o444);
    if is_root() {
        // Only root can read it back (see the unreadable module otherwise).
        write(data.join("nomode"), "mode 000");
        chmod(&data.join("nomode"), 0o000);
    }
    fs::create_dir(data.join("private-dir")).unwrap();
    write(data.join("private-dir/f"), "in a 0700 dir");
    chmod(&data.join("private-dir"), 0o700);

    // Extended attributes on files and directories.
    set_xattr(&data.join("plain.txt"), "user.alpha", b"1");
    set_xattr(&data.join("plain.txt"), "user.binary", &[0, 255, 10, 13]);
    set_xattr(&data.join("sub"), "user.dir-attr", b"on a directory");
    set_xattr(
        &data.join("empty"),
        "user.big",
        &random_bytes("xattr", 3000),
    );
    set_xattr(&data.join("empty"), "user.empty-value", b"");
}

#[test]
fn every_entry_kind_round_trips_with_metadata() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    build_every_kind(&data);
    set_tree_mtimes(&data, Y2020);
    // Times before the epoch and far in the future.
    set_mtime(&data.join("plain.txt"), -1_000_000_000, 999_999_999);
    set_mtime(&data.join("link-rel"), 4_102_444_800, 1);

    let src_sparse = rustix::fs::lstat(data.join("sparse")).unwrap();
    assert!(
        (src_sparse.st_blocks as u64) * 512 < SPARSE_LEN / 2,
        "the test filesystem does not do sparse files"
    );

    let snap = repo.snapshot(&[&data], &[]);
    assert_eq!(snap["incomplete"], false, "{snap}");
    assert_eq!(snap["unreadable"].as_array().unwrap().len(), 0, "{snap}");
    assert_eq!(snap["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(snap["volumes"][0]["label"], "data");
    assert_eq!(snap["volumes"][0]["source"], data.to_str().unwrap());
    let notes = snap["notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("sock"))),
        "the skipped socket should be mentioned in a note: {snap}"
    );

    // What ls reports for the special entries.
    let listing = repo.ls(&id(&snap), &["-r"]);
    assert!(
        !listing.contains_key("sock"),
        "a socket was listed: {:?}",
        listing.get("sock")
    );
    assert_eq!(listing["fifo"]["kind"], "fifo");
    assert_eq!(listing["link-abs"]["kind"], "symlink");
    assert_eq!(listing["link-abs"]["target"], "/etc/hostname");
    assert_eq!(listing["link-dangling"]["target"], "no/such/target");
    assert_eq!(listing["setuid"]["mode"], 0o4755);
    assert_eq!(listing["sticky-dir"]["mode"], 0o1777);
    assert_eq!(listing["sparse"]["size"], SPARSE_LEN);
    assert_eq!(listing["sub/empty-too"]["size"], 0);
    for p in ["hl-a", "hl-b", "sub/hl-c"] {
        let k = listing[p]["kind"].as_str().unwrap();
        assert!(k == "file" || k == "hardlink", "{p} listed as {k}");
    }
    if is_root() {
        assert_eq!(listing["chardev"]["kind"], "chardev");
        assert_eq!(listing["blockdev"]["kind"], "blockdev");
        assert_eq!(listing["owned"]["uid"], 1234);
        assert_eq!(listing["owned"]["gid"], 5678);
    }

    let restored = repo.scratch("restored");
    let out = repo.restore(&id(&snap), &restored);
    assert_eq!(out["snapshot"], id(&snap));
    assert_same_tree_except(&data, &restored, &[b"sock"]);

    let st = rustix::fs::lstat(restored.join("sparse")).unwrap();
    assert!(
        (st.st_blocks as u64) * 512 < SPARSE_LEN / 2,
        "restored sparse file is not sparse: {} blocks for {} bytes",
        st.st_blocks,
        SPARSE_LEN
    );

    // Snapshotting the restored tree gives the very same tree object.
    let again = repo.snapshot(&[&restored], &[]);
    assert_eq!(
        again["volumes"][0]["tree"], snap["volumes"][0]["tree"],
        "the restored tree does not snapshot to the same tree id"
    );
}

#[test]
fn huge_directories_and_paths_beyond_path_max_round_trip() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let many = data.join("many");
    fs::create_dir(&many).unwrap();
    for i in 0..20_000 {
        fs::write(many.join(format!("entry-{i:05}")), format!("{i}\n")).unwrap();
    }
    let long_file = make_deep_path(&data, 4200, 200);
    assert!(long_file.len() > 4096);
    // Deep in number of levels, too.
    let mut p = data.join("levels");
    for _ in 0..300 {
        p.push("d");
    }
    write(p.join("bottom"), "300 levels down");
    set_tree_mtimes(&data, Y2020);

    let snap = repo.snapshot(&[&data], &[]);
    assert_eq!(snap["incomplete"], false, "{snap}");
    assert!(stat_u64(&snap, "files") >= 20_002, "{snap}");

    let listing = repo.ls(&format!("{}:many", id(&snap)), &[]);
    assert_eq!(listing.len(), 20_000, "ls of the 20,000-entry directory");
    assert_eq!(listing["many/entry-12345"]["size"], 6);

    let restored = repo.scratch("restored");
    repo.restore(&id(&snap), &restored);
    assert_eq!(
        read_deep(&restored, &long_file),
        b"at the bottom of a very long path\n"
    );
    assert_same_tree(&data, &restored);

    let again = repo.snapshot(&[&restored], &[]);
    assert_eq!(again["volumes"][0]["tree"], snap["volumes"][0]["tree"]);
}

#[test]
fn shared_content_is_stored_once() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let base = random_bytes("base", 16 * MIB as usize);
    write(data.join("a"), &base);
    let mut b = base.clone();
    b[8 * MIB as usize..8 * MIB as usize + 64].fill(0x5a);
    write(data.join("b-changed-middle"), &b);
    let mut c = random_bytes("prefix", 5000);
    c.extend_from_slice(&base);
    write(data.join("c-shifted"), &c);
    write(data.join("d-copy"), &base);
    let total = (base.len() * 3 + c.len()) as u64;
    set_tree_mtimes(&data, Y2020);

    let snap = repo.snapshot(&[&data], &[]);
    assert_eq!(stat_u64(&snap, "bytes"), total, "{snap}");
    assert_eq!(stat_u64(&snap, "files"), 4, "{snap}");
    let stored = stat_u64(&snap, "new_bytes_stored");
    assert!(
        stored >= base.len() as u64,
        "random data cannot take less than its size: {snap}"
    );
    assert!(
        stored < base.len() as u64 + 12 * MIB,
        "{stored} bytes stored for {total} bytes of which about {} are distinct: {snap}",
        base.len()
    );

    // Another series reading the same data finds every chunk already stored.
    let other = repo.snapshot(&[&data], &["--name", "other"]);
    assert_eq!(other["parent"], serde_json::Value::Null);
    assert_eq!(stat_u64(&other, "bytes_read"), total, "{other}");
    assert!(stat_u64(&other, "new_bytes_stored") < 256 * 1024, "{other}");

    let restored = repo.scratch("restored");
    repo.restore(&id(&snap), &restored);
    assert_same_tree(&data, &restored);
}
