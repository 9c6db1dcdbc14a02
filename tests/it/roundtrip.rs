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

/// A POSIX ACL in its xattr form (`system.posix_acl_*`): version 2, then (tag, perm, id)
/// entries sorted by tag: the owner, one named user, the owning group, the mask, others.
fn posix_acl(user_perm: u16, named_uid: u32, named_perm: u16, mask: u16, other: u16) -> Vec<u8> {
    const ANY: u32 = u32::MAX;
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, user_perm, ANY),
        (0x02, named_perm, named_uid),
        (0x04, 4, ANY),
        (0x10, mask, ANY),
        (0x20, other, ANY),
    ] {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// `security.capability` as setcap writes it (version 2): effective, with
/// CAP_NET_BIND_SERVICE permitted.
fn net_bind_capability() -> Vec<u8> {
    let mut out = (0x0200_0000u32 | 1).to_le_bytes().to_vec();
    for word in [1u32 << 10, 0, 0, 0] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// Reads one xattr of `p` (not following a final symlink).
fn get_xattr(p: &Path, key: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    match rustix::fs::lgetxattr(p, key, &mut buf[..]) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {} {key}: {e}", p.display()),
    }
}

/// Each member's pax `SCHILY.xattr.*` records of an uncompressed tar, read by Python's
/// tarfile: member name → (attribute name → value), as hex.
const PY_XATTRS: &str = r#"
import json, sys, tarfile
out = {}
with tarfile.open(sys.argv[1], mode="r:") as t:
    for m in t:
        x = {}
        for k, v in m.pax_headers.items():
            if k.startswith("SCHILY.xattr."):
                x[k[len("SCHILY.xattr."):]] = v.encode("utf-8", "surrogateescape").hex()
        out[m.name] = x
json.dump(out, sys.stdout)
"#;

#[test]
fn acls_capabilities_and_trusted_xattrs_round_trip_and_export() {
    // Attributes outside user.*: restore reproduces them (it runs as root here), with
    // no warning, and export carries them as pax records.
    assert!(is_root(), "these tests run as root");
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let acl_file = data.join("acl-file");
    write(&acl_file, "readable by uid 1000 too\n");
    let acl_access = posix_acl(6, 1000, 4, 5, 0);
    set_xattr(&acl_file, "system.posix_acl_access", &acl_access);
    let acl_dir = data.join("acl-dir");
    fs::create_dir(&acl_dir).unwrap();
    let acl_default = posix_acl(7, 1000, 7, 7, 5);
    set_xattr(&acl_dir, "system.posix_acl_default", &acl_default);
    set_xattr(&acl_dir, "system.posix_acl_access", &acl_access);
    // Created inside a directory with a default ACL: it inherits one.
    write(acl_dir.join("inherits"), "inherited acl\n");
    let cap_file = data.join("capable");
    write(&cap_file, "#!/bin/sh\n");
    chmod(&cap_file, 0o755);
    let cap = net_bind_capability();
    set_xattr(&cap_file, "security.capability", &cap);
    let trusted: Vec<(&str, &Path)> = vec![
        ("trusted-file", Path::new("trusted-file")),
        ("trusted-dir", Path::new("trusted-dir")),
        ("trusted-link", Path::new("trusted-link")),
    ];
    write(data.join("trusted-file"), "trusted\n");
    fs::create_dir(data.join("trusted-dir")).unwrap();
    symlink("trusted-file", data.join("trusted-link")).unwrap();
    for (what, rel) in &trusted {
        set_xattr(
            &data.join(rel),
            "trusted.volsnap.test",
            format!("{what} \u{0}binary\u{ff}").as_bytes(),
        );
    }
    // The kernel keeps what it was given (the comparison below reads these back).
    assert_eq!(
        get_xattr(&acl_file, "system.posix_acl_access"),
        Some(acl_access.clone())
    );
    assert_eq!(
        get_xattr(&cap_file, "security.capability"),
        Some(cap.clone())
    );
    assert!(get_xattr(&acl_dir.join("inherits"), "system.posix_acl_access").is_some());
    set_tree_mtimes(&data, Y2020);

    let snap = id(&repo.snapshot(&[&data], &[]));
    let restored = repo.scratch("restored");
    let out = repo.restore(&snap, &restored);
    assert_eq!(out["warnings"], serde_json::json!([]), "{out}");
    assert_same_tree(&data, &restored);
    // Named, so that a comparison that skipped them could not pass.
    assert_eq!(
        get_xattr(&restored.join("acl-file"), "system.posix_acl_access"),
        Some(acl_access.clone())
    );
    assert_eq!(
        get_xattr(&restored.join("acl-dir"), "system.posix_acl_default"),
        Some(acl_default.clone())
    );
    assert_eq!(
        get_xattr(&restored.join("capable"), "security.capability"),
        Some(cap.clone())
    );
    for (what, rel) in &trusted {
        assert_eq!(
            get_xattr(&restored.join(rel), "trusted.volsnap.test"),
            Some(format!("{what} \u{0}binary\u{ff}").into_bytes()),
            "{what}"
        );
    }

    // Export: each attribute as a pax record of its member, byte for byte.
    let archive = repo.scratch("x.tar");
    repo.ok([
        OsStr::new("export"),
        OsStr::new(&snap),
        OsStr::new("-o"),
        archive.as_os_str(),
        OsStr::new("--format"),
        OsStr::new("tar"),
    ]);
    let out = std::process::Command::new("python3")
        .args(["-c", PY_XATTRS])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let members: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let pax = |member: &str, key: &str| -> Option<String> {
        members[member][key].as_str().map(str::to_owned)
    };
    assert_eq!(
        pax("acl-file", "system.posix_acl_access"),
        Some(hex(&acl_access)),
        "{members}"
    );
    assert_eq!(
        pax("acl-dir", "system.posix_acl_default"),
        Some(hex(&acl_default)),
        "{members}"
    );
    assert_eq!(
        pax("capable", "security.capability"),
        Some(hex(&cap)),
        "{members}"
    );
    for (what, rel) in &trusted {
        assert_eq!(
            pax(rel.to_str().unwrap(), "trusted.volsnap.test"),
            Some(hex(format!("{what} \u{0}binary\u{ff}").as_bytes())),
            "{members}"
        );
    }
}
