//! Sparse files: a hole costs neither time nor space. Snapshots find holes with
//! `SEEK_DATA`/`SEEK_HOLE` and never read them, restores leave them as holes, exports
//! carry them as zeros of the right length, and a file chunks the same whether its
//! zeros are holes or written out.
//!
//! The deadlines on child processes are failure detectors (reading a 256 GiB file takes
//! minutes), not timed assertions.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::SeekFrom;
use serde_json::Value;

use crate::support::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Creates a file of `size` bytes, all hole but `regions` (offset, length) of data;
/// returns the data written to each region.
fn make_sparse(path: &Path, size: u64, regions: &[(u64, usize)]) -> Vec<Vec<u8>> {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut out = Vec::new();
    for (i, &(at, len)) in regions.iter().enumerate() {
        let bytes = random_bytes(&format!("region {i}"), len);
        f.write_all_at(&bytes, at).unwrap();
        out.push(bytes);
    }
    out
}

/// The data extents of a file, as `SEEK_DATA`/`SEEK_HOLE` report them.
fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        match rustix::fs::seek(f.as_fd(), SeekFrom::Data(pos)) {
            Ok(start) => {
                let end = rustix::fs::seek(f.as_fd(), SeekFrom::Hole(start)).unwrap();
                out.push((start, end));
                pos = end;
            }
            Err(rustix::io::Errno::NXIO) => return out,
            Err(e) => panic!("SEEK_DATA on {}: {e}", path.display()),
        }
    }
}

fn allocated(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().blocks() * 512
}

/// Runs `cmd`, killing it and failing if it has not finished after `secs`.
fn run_within(mut cmd: Command, secs: u64) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} was still running after {secs} s: holes are being read");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `volsnap --json ARGS` within `secs`, expecting exit 0.
fn ok_within(repo: &Repo, args: &[&std::ffi::OsStr], secs: u64) -> Value {
    let mut cmd = repo.command();
    cmd.arg("--json").args(args);
    let out = run_within(cmd, secs);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn snapshot_within(repo: &Repo, dir: &Path, secs: u64) -> Value {
    let snap = ok_within(repo, &["snapshot".as_ref(), dir.as_os_str()], secs);
    assert_eq!(snap["incomplete"], false, "{snap}");
    snap
}

fn assert_same_regions(path: &Path, regions: &[(u64, usize)], contents: &[Vec<u8>]) {
    let f = File::open(path).unwrap();
    for (&(at, len), want) in regions.iter().zip(contents) {
        let mut got = vec![0u8; len];
        f.read_exact_at(&mut got, at).unwrap();
        assert!(got == *want, "{}: data at {at} differs", path.display());
    }
}

#[test]
fn a_256_gib_sparse_file_costs_its_data_not_its_size() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("a-small"), "a file before it in the archive");
    let img = data.join("vm.img");
    let size = 256 * GIB;
    // Data at the start, unaligned in the middle, and up to the very end.
    let regions = [
        (0, 100_000),
        (64 * GIB + 1, 300_000),
        (128 * GIB + 12_345, 1_000_000),
        (size - 5_000, 5_000),
    ];
    let contents = make_sparse(&img, size, &regions);
    assert!(
        allocated(&img) < 8 * MIB,
        "the test filesystem does not do sparse files"
    );

    let snap = snapshot_within(&repo, &data, 120);
    assert_eq!(stat_u64(&snap, "bytes"), size + 31, "{snap}");
    // Holes are neither read nor stored: only the data regions (in whole blocks).
    assert!(stat_u64(&snap, "bytes_read") < 4 * MIB, "{snap}");
    assert!(stat_u64(&snap, "new_bytes_stored") < 4 * MIB, "{snap}");
    assert_eq!(repo.ls(&id(&snap), &[])["vm.img"]["size"], size);

    // Restored sparse: the same bytes where the data is, the same holes elsewhere.
    let to = repo.scratch("restored");
    ok_within(
        &repo,
        &[
            "restore".as_ref(),
            id(&snap).as_ref(),
            "--to".as_ref(),
            to.as_os_str(),
        ],
        120,
    );
    let restored = to.join("vm.img");
    assert_eq!(fs::metadata(&restored).unwrap().len(), size);
    assert!(
        allocated(&restored) <= allocated(&img) + MIB,
        "restored file allocates {} bytes, the source {}",
        allocated(&restored),
        allocated(&img)
    );
    assert_same_regions(&restored, &regions, &contents);
    assert_eq!(data_extents(&restored), data_extents(&img));
    // And snapshotting it gives the same tree: holes are content, not allocation.
    let again = snapshot_within(&repo, &to, 120);
    assert_eq!(again["volumes"][0]["tree"], snap["volumes"][0]["tree"]);

    // Incremental: an edit inside the middle region stores the chunks around it only.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&random_bytes("edit", 4096), 128 * GIB + 500_000)
        .unwrap();
    drop(f);
    let next = snapshot_within(&repo, &data, 120);
    assert!(stat_u64(&next, "bytes_read") < 4 * MIB, "{next}");
    assert!(
        stat_u64(&next, "new_bytes_stored") < MIB,
        "the data regions did not dedup: {next}"
    );
    let diff = repo.ok(["diff", &id(&snap), &id(&next)]);
    assert_eq!(diff["modified"][0]["path"], "vm.img", "{diff}");
    assert_eq!(diff["modified"][0]["changes"][0], "content", "{diff}");

    // Exported, the file is announced with its whole size (its zeros are streamed;
    // only the start of the archive is read here).
    let mut export = repo.command();
    export
        .args(["export", &id(&snap), "--format", "tar", "-o", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = export.spawn().unwrap();
    let mut head = vec![0u8; 64 * 1024];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // The pipe is closed: the export ends quietly on the broken pipe.
    let out = run_to_end(child, 60);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );
    let mut tar = Command::new("tar");
    tar.args(["-tvf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut tar = tar.spawn().unwrap();
    {
        use std::io::Write;
        let _ = tar.stdin.take().unwrap().write_all(&head);
    }
    let listing = String::from_utf8_lossy(&tar.wait_with_output().unwrap().stdout).into_owned();
    let line = listing
        .lines()
        .find(|l| l.ends_with("vm.img"))
        .unwrap_or_else(|| panic!("vm.img not listed: {listing}"));
    assert!(
        line.split_whitespace().any(|w| w == size.to_string()),
        "{line}"
    );
}

/// Waits for a child whose stdout was already taken, within `secs`.
fn run_to_end(mut child: std::process::Child, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the export did not stop when its reader went away");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_sparse_file_exports_as_zeros_gnu_tar_extracts_byte_identical() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let size = 64 * MIB;
    let regions = [(0, 5_000), (20 * MIB + 12_345, 700_000), (size - 3, 3)];
    make_sparse(&data.join("sparse"), size, &regions);
    // All hole.
    File::create(data.join("hole"))
        .unwrap()
        .set_len(10 * MIB + 1)
        .unwrap();
    let snap = snapshot_within(&repo, &data, 120);

    let archive = repo.scratch("out.tar");
    let mut args: Vec<OsString> = vec!["export".into(), id(&snap).into(), "-o".into()];
    args.extend([
        archive.clone().into_os_string(),
        "--format".into(),
        "tar".into(),
    ]);
    repo.ok(&args);
    let out = repo.mkdir("extracted");
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    for name in ["sparse", "hole"] {
        let want = fs::read(data.join(name)).unwrap();
        let got = fs::read(out.join(name)).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        assert!(got == want, "{name}: extracted content differs");
    }
}

#[test]
fn holes_and_written_zeros_are_the_same_content() {
    // The same bytes, once with holes and once written out, give the same chunks:
    // the second snapshot stores no data, and both trees are equal.
    let repo = Repo::new();
    let sparse = repo.mkdir("sparse");
    let dense = repo.mkdir("dense");
    let size = 40 * MIB + 7;
    let regions = [(3 * MIB + 5, 200_000), (30 * MIB, 1_000_000)];
    make_sparse(&sparse.join("f"), size, &regions);
    let mut bytes = vec![0u8; size as usize];
    File::open(sparse.join("f"))
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    write(dense.join("f"), &bytes);
    assert!(allocated(&dense.join("f")) >= size, "the copy is not dense");
    for d in [&sparse, &dense] {
        set_tree_mtimes(d, 1_600_000_000);
    }

    let a = snapshot_within(&repo, &sparse, 120);
    let b = snapshot_within(&repo, &dense, 120);
    assert_eq!(stat_u64(&b, "new_chunks"), 0, "{b}");
    assert_eq!(a["volumes"][0]["tree"], b["volumes"][0]["tree"]);
    // The dense copy was read in full; the sparse one only where it has data.
    assert_eq!(stat_u64(&b, "bytes_read"), size, "{b}");
    assert!(stat_u64(&a, "bytes_read") < 2 * MIB, "{a}");
}
