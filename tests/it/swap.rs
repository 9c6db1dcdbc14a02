//! Entries a container swaps under the walk, between the `fstatat` that says "regular
//! file" and the open that reads it. The snapshot pauses at exactly that step
//! (`VOLSNAP_PAUSE_AT=snapshot before file open`), the test swaps the entry, then lets
//! it go on: nothing but a regular file may be opened, and nothing may block.

use std::ffi::OsStr;
use std::fs;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{CWD, FileType, Mode};
use serde_json::Value;

use crate::support::*;

/// A volume whose only regular file is `victim` (so it is the one file that reaches
/// the pause), with a directory and a symlink beside it.
fn volume(repo: &Repo) -> PathBuf {
    let data = repo.mkdir("data");
    write(data.join("victim"), "the regular file the walk saw");
    fs::create_dir(data.join("dir")).unwrap();
    std::os::unix::fs::symlink("victim", data.join("link")).unwrap();
    data
}

/// Snapshots `data`, runs `swap` while the snapshot is paused between its stat of
/// `victim` and the open, and returns the exit code and the JSON output.
/// The deadline is a failure detector (a snapshot blocked on the swapped entry never
/// ends), not a synchronisation: the steps are ordered by the pause files.
fn snapshot_with_swap(repo: &Repo, data: &Path, swap: impl FnOnce()) -> (i32, Value) {
    let pause = repo.scratch("pause");
    write(&pause, "hold");
    let mut cmd = repo.command();
    cmd.args(["--json", "snapshot"])
        .arg(data)
        .env("VOLSNAP_PAUSE_AT", "snapshot before file open")
        .env("VOLSNAP_PAUSE_FILE", &pause)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let reached = PathBuf::from(format!("{}.reached", pause.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reached.exists() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the snapshot never reached its pause: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    swap();
    fs::remove_file(&pause).unwrap();
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the snapshot never finished: it blocked on the entry swapped in");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON output ({e}): {stderr}"));
    (out.status.code().unwrap_or(-1), json)
}

/// Replaces `victim` by a node of type `kind` (the regular file is moved aside, out of
/// the names the walk already listed).
fn swap_for_node(data: &Path, kind: FileType, rdev: u64) {
    fs::rename(data.join("victim"), data.join("moved-aside")).unwrap();
    rustix::fs::mknodat(
        CWD,
        data.join("victim"),
        kind,
        Mode::from_raw_mode(0o666),
        rdev,
    )
    .unwrap();
}

/// Every name in `dir` that was opened since the watch `fd` was added.
fn opened_names(fd: &std::os::fd::OwnedFd) -> Vec<String> {
    let mut buf = [MaybeUninit::<u8>::uninit(); 8192];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    let mut names = Vec::new();
    loop {
        match reader.next() {
            Ok(ev) => {
                if ev.events().contains(ReadFlags::OPEN) {
                    let name = ev.file_name().map(|n| n.to_string_lossy().into_owned());
                    names.push(name.unwrap_or_default());
                }
            }
            Err(rustix::io::Errno::AGAIN) => return names,
            Err(e) => panic!("read inotify events: {e}"),
        }
    }
}

/// The snapshot left `victim` out, said why, and kept everything else.
fn assert_left_out_as_replaced(repo: &Repo, data: &Path, code: i32, snap: &Value) {
    assert_eq!(code, 3, "an incomplete snapshot exits with 3: {snap}");
    assert_eq!(snap["incomplete"], true, "{snap}");
    let unreadable = snap["unreadable"].as_array().unwrap();
    assert_eq!(unreadable.len(), 1, "{snap}");
    assert_eq!(
        unreadable[0]["path"],
        data.join("victim").to_str().unwrap(),
        "{snap}"
    );
    let error = unreadable[0]["error"].as_str().unwrap();
    assert!(error.contains("replaced"), "{error}");
    let entries = repo.ls(&id(snap), &["-r"]);
    assert!(!entries.contains_key("victim"), "{entries:?}");
    assert!(
        entries.contains_key("dir") && entries.contains_key("link"),
        "{entries:?}"
    );
}

#[test]
fn snapshot_never_opens_a_device_swapped_in_after_the_stat() {
    assert!(is_root(), "creating a device node needs root");
    let repo = Repo::new();
    let data = volume(&repo);
    // Opening a device runs its driver's open; inotify reports every open of the
    // node (an `O_PATH` descriptor is not an open of the file and is not reported).
    let watch = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).unwrap();
    let (code, snap) = snapshot_with_swap(&repo, &data, || {
        // /dev/null's numbers: harmless if the bug is back, and its open is observable.
        swap_for_node(&data, FileType::CharacterDevice, rustix::fs::makedev(1, 3));
        inotify::add_watch(&watch, &data, WatchFlags::OPEN).unwrap();
    });
    let opened = opened_names(&watch);
    assert!(
        !opened.iter().any(|n| n == "victim"),
        "the device swapped in for a regular file was opened: {opened:?}"
    );
    assert_left_out_as_replaced(&repo, &data, code, &snap);
}

#[test]
fn snapshot_never_blocks_on_or_opens_a_fifo_swapped_in_after_the_stat() {
    let repo = Repo::new();
    let data = volume(&repo);
    let watch = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).unwrap();
    let (code, snap) = snapshot_with_swap(&repo, &data, || {
        // A fifo without a writer: a blocking open for reading never returns.
        swap_for_node(&data, FileType::Fifo, 0);
        inotify::add_watch(&watch, &data, WatchFlags::OPEN).unwrap();
    });
    let opened = opened_names(&watch);
    assert!(
        !opened.iter().any(|n| n == "victim"),
        "the fifo swapped in for a regular file was opened: {opened:?}"
    );
    assert_left_out_as_replaced(&repo, &data, code, &snap);
}

#[test]
fn a_file_renamed_over_the_one_the_walk_saw_is_read_as_it_is_now() {
    let repo = Repo::new();
    let data = volume(&repo);
    let (code, snap) = snapshot_with_swap(&repo, &data, || {
        // The usual atomic replace of an application: write a new file, rename it over.
        write(data.join(".victim.tmp"), "the new content");
        fs::rename(data.join(".victim.tmp"), data.join("victim")).unwrap();
    });
    assert_eq!(code, 0, "{snap}");
    assert_eq!(snap["incomplete"], false, "{snap}");
    let to = repo.scratch("restored");
    repo.restore(&id(&snap), &to);
    assert_eq!(
        fs::read(to.join(OsStr::new("victim"))).unwrap(),
        b"the new content"
    );
}
