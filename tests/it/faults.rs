//! Faults from the filesystem. EIO: `VOLSNAP_FAIL_AT=write:N` / `fsync:N` makes the
//! N-th write or fsync of a process fail (`crash::before_write`, `crash::before_fsync`:
//! packs, records, journals, the index, restored files, exports); every N of a
//! snapshot, a gc, a restore, an in-place restore and an export is tried, each from the
//! same starting state. ENOSPC: the repository, or a restore's target, on a small tmpfs
//! with a few pages free, for every amount of free space up to what the operation
//! needs. After each failure: a non-zero exit and one error line, no success reported
//! after an fsync error and no fsync retried, nothing committed half (exactly the
//! snapshots before are listed, a live target wholly old or wholly new), nothing locked
//! or left unsettled, `check --read-data` clean, every snapshot restoring identically,
//! and the operation succeeding once the fault is gone.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use crate::model::{
    assert_check_clean, assert_restores_as, assert_settled, export_diff, listed_ids, tree_diff,
};
use crate::support::*;

/// A repository, a data directory and the snapshots it must hold (id → tree).
struct Fx {
    repo: Repo,
    data: PathBuf,
    want: BTreeMap<String, Rc<Scan>>,
    /// A copy of the repository (and of the data directory) each faulty run starts from.
    pristine: PathBuf,
    /// Where restores and exports go.
    dir: PathBuf,
    n: u64,
    /// Unmounted when dropped, before the scratch directory holding them is removed.
    mounts: Vec<Tmpfs>,
    keep: Option<Repo>,
}

fn cp_a(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// Fills `dir` with a small tree: files of several sizes (some sharing chunks), a
/// hardlink, a symlink, a subdirectory and an xattr.
fn fill(dir: &Path, round: u32) {
    for i in 0..6u32 {
        let len = [0, 10, 3_000, 9_000, 20_000, 40_000][i as usize];
        write(
            dir.join(format!("f{i}")),
            random_bytes(&format!("{round} {i}"), len),
        );
    }
    write(
        dir.join("sub/inner"),
        random_bytes(&format!("inner {round}"), 12_000),
    );
    let _ = fs::remove_file(dir.join("sub/link"));
    fs::hard_link(dir.join("f3"), dir.join("sub/link")).unwrap();
    let _ = fs::remove_file(dir.join("sym"));
    std::os::unix::fs::symlink("f1", dir.join("sym")).unwrap();
    rustix::fs::setxattr(
        dir.join("f2"),
        "user.round",
        round.to_string().as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

impl Fx {
    /// Everything (repository, data, pristine copies, restores) on a tmpfs of its own:
    /// the faulty runs are many, and fsyncs on a disk would make them slow.
    fn new() -> Fx {
        let scratch = Repo::uninit();
        let mount = scratch.scratch("fs");
        let tmpfs = Tmpfs::mount(&mount, "256m");
        let mut fx = Fx::at(mount.join("repo"), &mount);
        fx.mounts.push(tmpfs);
        fx.keep = Some(scratch);
        fx
    }

    /// With the repository at `repo` and the rest in `dir`.
    fn at(repo_path: PathBuf, dir: &Path) -> Fx {
        let mut repo = Repo::uninit();
        repo.path = repo_path;
        repo.ok(["init", "--chunk-size-avg", "1024"]);
        let data = dir.join("data");
        fs::create_dir(&data).unwrap();
        Fx {
            repo,
            data,
            want: BTreeMap::new(),
            pristine: dir.join("pristine"),
            dir: dir.to_path_buf(),
            n: 0,
            mounts: Vec::new(),
            keep: None,
        }
    }

    fn fresh(&mut self, what: &str) -> PathBuf {
        self.n += 1;
        self.dir.join(format!("{what}-{}", self.n))
    }

    fn snapshot(&mut self) -> String {
        let tree = scan_tree(&self.data);
        let v = self.repo.snapshot(&[&self.data], &["--name", "s"]);
        self.want.insert(id(&v), Rc::new(tree));
        id(&v)
    }

    /// Saves the repository and the data directory as every faulty run's start.
    fn save(&self) {
        let _ = fs::remove_dir_all(&self.pristine);
        fs::create_dir(&self.pristine).unwrap();
        cp_a(&self.repo.path, &self.pristine);
        cp_a(&self.data, &self.pristine);
    }

    fn reset(&self) {
        for (live, name) in [(&self.repo.path, "repo"), (&self.data, "data")] {
            fs::remove_dir_all(live).unwrap();
            cp_a(&self.pristine.join(name), live);
        }
    }

    /// Exactly the expected snapshots, each restoring identically; clean check; settled.
    fn verify(&mut self) {
        let want = self.want.clone();
        self.verify_with(&want);
    }

    fn verify_with(&mut self, want: &BTreeMap<String, Rc<Scan>>) {
        assert_settled(&self.repo, &[&self.dir, &self.data]);
        let listed = listed_ids(&self.repo);
        assert_eq!(
            listed.iter().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "listed snapshots"
        );
        assert_check_clean(&self.repo);
        for (sid, tree) in want {
            let to = self.fresh("verify");
            assert_restores_as(&self.repo, sid, tree, &to);
            fs::remove_dir_all(&to).unwrap();
        }
    }
}

/// A run made to fail, or not, by an injected fault.
struct Faulted {
    run: Run,
    /// The fault fired (the N-th write or fsync was reached).
    injected: bool,
}

/// Runs `volsnap --json ARGS` with `VOLSNAP_FAIL_AT=spec` and checks what every fault
/// must give: no fsync retried; when the fault fired, a non-zero exit and one
/// `error:` line naming the I/O error.
fn run_faulted(repo: &Repo, spec: &str, args: &[&str]) -> Faulted {
    let mut cmd = repo.command();
    cmd.env("VOLSNAP_FAIL_AT", spec).arg("--json").args(args);
    let run = Run::from_command(cmd);
    assert!(
        !run.stderr.contains("volsnap: fsync retried"),
        "an fsync was retried after it failed ({spec})\n{}",
        run.describe()
    );
    // A rollback may fsync a directory again for its own changes, and then fails.
    assert!(
        run.status != 0 || !run.stderr.contains("volsnap: directory fsynced again"),
        "a directory fsync that failed was followed by another, and success ({spec})\n{}",
        run.describe()
    );
    let (kind, n) = spec.split_once(':').unwrap();
    let marker = format!("volsnap: injected EIO at {kind} {n} (");
    let hit = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix(marker.as_str()))
        .map(|rest| rest.trim_end_matches(')').to_owned());
    let injected = hit.is_some();
    if let Some(path) = &hit
        && run.status == 0
    {
        // Only the index (derived data) may fail without failing the command: best-effort
        // bookkeeping after the result is durable (a lease row removed, a compaction).
        // The caller then checks that everything the command reported holds.
        assert!(
            path.ends_with("/index.redb"),
            "the {kind} error ({spec}) on {path} was reported as success\n{}",
            run.describe()
        );
    } else if injected {
        one_error_line(&run, "Input/output error");
    }
    Faulted { run, injected }
}

/// The failure is one `error:` line (besides the fault layer's own notes) mentioning
/// `cause`.
#[track_caller]
fn one_error_line(run: &Run, cause: &str) {
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| {
            !l.trim().is_empty()
                && !l.starts_with("volsnap: injected")
                && !l.starts_with("volsnap: directory fsynced again")
        })
        .collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].contains(cause),
        "expected one error line about {cause:?}\n{}",
        run.describe()
    );
}

/// Every file a failed restore left in `to` holds exactly its snapshot's bytes.
#[track_caller]
fn assert_no_wrong_bytes(tree: &Scan, to: &Path) {
    for (p, m) in &scan_tree(to).entries {
        if m.kind == "file" {
            assert_eq!(
                m.content,
                tree.entries[p].content,
                "{} holds wrong bytes after a failed restore",
                show(p)
            );
        }
    }
}

/// For N = 1, 2, ... until the operation no longer reaches an N-th write (or fsync):
/// `reset`, run `args` with that fault, then `after`. Returns how many runs failed.
fn every_fault(
    fx: &mut Fx,
    kind: &str,
    args: &[&str],
    mut after: impl FnMut(&mut Fx, &Faulted),
) -> u64 {
    for n in 1.. {
        fx.reset();
        let f = run_faulted(&fx.repo, &format!("{kind}:{n}"), args);
        if !f.injected {
            assert_eq!(f.run.status, 0, "{}", f.run.describe());
            return n - 1;
        }
        // Said before the checks, so a failing check names the fault it follows.
        eprintln!(
            "{kind}:{n}: {}",
            f.run
                .stderr
                .lines()
                .filter(|l| l.starts_with("error:"))
                .collect::<String>()
        );
        after(fx, &f);
        assert!(n < 2_000, "{args:?} never stopped writing");
    }
    unreachable!()
}

#[test]
fn eio_at_every_write_and_fsync_of_a_snapshot() {
    let mut fx = Fx::new();
    fill(&fx.data, 1);
    fx.snapshot();
    fill(&fx.data, 2);
    fx.save();
    let data = fx.data.to_str().unwrap().to_owned();
    let args = ["snapshot", data.as_str(), "--name", "s"];
    let tree = Rc::new(scan_tree(&fx.data));
    for kind in ["write", "fsync"] {
        let mut compactions = 0;
        let failed = every_fault(&mut fx, kind, &args, |fx, f| {
            // Nothing committed but what the run reported: the snapshots before, each
            // whole, and the new one only if it succeeded (a compaction failed after).
            let mut want = fx.want.clone();
            if f.run.status == 0 {
                want.insert(id(&f.run.json()), tree.clone());
                if f.run
                    .stderr
                    .contains("warning: the index could not be compacted")
                {
                    compactions += 1;
                }
            }
            fx.verify_with(&want);
            // And the snapshot succeeds once the fault is gone.
            let tree = scan_tree(&fx.data);
            let v = fx.repo.snapshot(&[&fx.data], &["--name", "s"]);
            assert!(tree_diff(&tree, &scan_tree(&fx.data)).is_empty());
            let to = fx.fresh("after");
            assert_restores_as(&fx.repo, &id(&v), &tree, &to);
        });
        // This snapshot adds most of the index's rows, so it compacts the index: an
        // I/O error there leaves the snapshot committed, and is said.
        assert!(
            compactions > 0,
            "no {kind} error in the compaction was reported"
        );
        assert!(failed >= 4, "only {failed} {kind}s in a snapshot");
        eprintln!("snapshot: {failed} {kind}s, each failed in turn and checked");
    }
}

#[test]
fn eio_at_every_write_and_fsync_of_a_gc() {
    let mut fx = Fx::new();
    fill(&fx.data, 1);
    let first = fx.snapshot();
    fill(&fx.data, 2);
    fx.snapshot();
    fill(&fx.data, 3);
    fx.snapshot();
    fx.repo.ok(["forget", &first]);
    fx.want.remove(&first);
    fx.save();
    for kind in ["write", "fsync"] {
        let failed = every_fault(&mut fx, kind, &["gc", "--max-unused", "0"], |fx, _| {
            fx.verify();
            // A gc without the fault finishes the job.
            fx.repo.ok(["gc", "--max-unused", "0"]);
            let again = fx.repo.ok(["gc", "--max-unused", "0"]);
            assert_eq!(again["unreachable_blobs"], 0, "{again}");
            fx.verify();
        });
        assert!(failed >= 2, "only {failed} {kind}s in a gc");
        eprintln!("gc: {failed} {kind}s, each failed in turn and checked");
    }
}

#[test]
fn eio_at_every_write_and_fsync_of_a_restore_and_an_export() {
    let mut fx = Fx::new();
    fill(&fx.data, 1);
    let snap = fx.snapshot();
    fx.save();
    let tree = fx.want[&snap].clone();
    for kind in ["write", "fsync"] {
        // restore --to: every file written is whole, or absent.
        let mut n = 1;
        loop {
            let to = fx.fresh("restore");
            let spec = format!("{kind}:{n}");
            let f = run_faulted(
                &fx.repo,
                &spec,
                &["restore", &snap, "--to", to.to_str().unwrap()],
            );
            if f.run.status == 0 {
                // Without the fault, or with it in the index's bookkeeping only.
                let diff = tree_diff(&tree, &scan_tree(&to));
                assert!(diff.is_empty(), "{spec}: {}", diff.join("\n"));
            } else if to.exists() {
                assert_no_wrong_bytes(&tree, &to);
            }
            fx.verify();
            if !f.injected {
                break;
            }
            n += 1;
        }
        eprintln!(
            "restore: {} {kind}s, each failed in turn and checked",
            n - 1
        );
        // export -o: no output unless whole.
        let mut n = 1;
        loop {
            let dir = fx.fresh("export");
            fs::create_dir(&dir).unwrap();
            let out = dir.join("out.tar");
            let spec = format!("{kind}:{n}");
            let f = run_faulted(
                &fx.repo,
                &spec,
                &[
                    "export",
                    &snap,
                    "-o",
                    out.to_str().unwrap(),
                    "--format",
                    "tar",
                ],
            );
            if f.run.status == 0 {
                let diff = export_diff(&out, &tree);
                assert!(diff.is_empty(), "{spec}: {}", diff.join("\n"));
            } else {
                let left: Vec<_> = fs::read_dir(&dir).unwrap().collect();
                assert!(left.is_empty(), "{spec}: a failed export left {left:?}");
            }
            fx.verify();
            if !f.injected {
                break;
            }
            n += 1;
        }
        assert!(n > 1, "no {kind} in an export");
        eprintln!("export: {} {kind}s, each failed in turn and checked", n - 1);
    }
}

#[test]
fn eio_at_every_write_and_fsync_of_an_in_place_restore() {
    let mut fx = Fx::new();
    fill(&fx.data, 1);
    let snap = fx.snapshot();
    fill(&fx.data, 2);
    fs::remove_file(fx.data.join("f4")).unwrap();
    fx.save();
    let new = fx.want[&snap].clone();
    let args = [
        "restore",
        &snap,
        "--in-place",
        "--yes",
        "--ignore-running-containers",
    ];
    let records = |fx: &Fx| fs::read_dir(fx.repo.path.join("restores")).map_or(0, |d| d.count());
    for kind in ["write", "fsync"] {
        let failed = every_fault(&mut fx, kind, &args, |fx, f| {
            // Whatever failed, recovery (run by every command) settles the volume.
            fx.repo.ok(["recover"]);
            let committed = records(fx) == 1;
            let old = scan_tree(&fx.pristine.join("data"));
            let now = scan_tree(&fx.data);
            let want = if committed { &*new } else { &old };
            let diff = tree_diff(want, &now);
            assert!(
                diff.is_empty(),
                "after {}: the volume is not wholly {}:\n{}",
                f.run.cmd,
                if committed { "new" } else { "old" },
                diff.join("\n")
            );
            // The undo snapshot, if it was committed, is the old volume.
            let undo: Vec<String> = listed_ids(&fx.repo)
                .into_iter()
                .filter(|i| !fx.want.contains_key(i))
                .collect();
            assert!(
                undo.len() <= 1 && (undo.len() == 1 || !committed),
                "{undo:?}"
            );
            let mut want = fx.want.clone();
            if let Some(u) = undo.first() {
                want.insert(u.clone(), Rc::new(old));
            }
            fx.verify_with(&want);
        });
        assert!(failed >= 4, "only {failed} {kind}s in an in-place restore");
        eprintln!("in-place restore: {failed} {kind}s, each failed in turn and checked");
    }
}

// ---------------------------------------------------------------------- ENOSPC

/// Bytes free on the filesystem holding `p`.
fn free_bytes(p: &Path) -> u64 {
    let st = rustix::fs::statvfs(p).unwrap();
    st.f_bavail * st.f_frsize
}

/// Leaves about `free` bytes free on the filesystem holding `dir` with a filler file.
fn leave_free(dir: &Path, free: u64) {
    let filler = dir.join("filler");
    let _ = fs::remove_file(&filler);
    let avail = free_bytes(dir);
    let len = avail.saturating_sub(free);
    let f = fs::File::create(&filler).unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len).unwrap();
}

/// A failed run on a full filesystem: one error line saying so.
#[track_caller]
fn assert_enospc(run: &Run) {
    assert_ne!(run.status, 0, "{}", run.describe());
    one_error_line(run, "No space left on device");
}

#[test]
fn enospc_in_a_snapshot_and_a_gc_commits_nothing_half() {
    // The repository alone on a small tmpfs; the rest on another.
    let mut fx = Fx::new();
    let fs_dir = fx.dir.join("small");
    fx.mounts.insert(0, Tmpfs::mount(&fs_dir, "8m"));
    fx.repo.path = fs_dir.join("repo");
    fx.repo.ok(["init", "--chunk-size-avg", "1024"]);
    fill(&fx.data, 1);
    let first = fx.snapshot();
    fill(&fx.data, 2);
    fx.save();
    let tree = Rc::new(scan_tree(&fx.data));
    let data = fx.data.to_str().unwrap().to_owned();
    // Every amount of free space, a page at a time, until the snapshot fits; each from
    // the same start.
    let mut failures = 0;
    for k in 0.. {
        fx.reset();
        leave_free(&fs_dir, k * 4096);
        let run = fx.repo.run_json(["snapshot", data.as_str(), "--name", "s"]);
        fs::remove_file(fs_dir.join("filler")).unwrap();
        if run.status == 0 {
            fx.want.insert(id(&run.json()), tree.clone());
            fx.verify();
            break;
        }
        assert_enospc(&run);
        failures += 1;
        fx.verify();
        assert!(k < 1_000, "the snapshot never fitted");
    }
    assert!(failures >= 3, "only {failures} snapshots ran out of space");
    eprintln!("snapshot: ran out of space {failures} times, each cleanly");

    // gc rewriting packs on a full filesystem.
    fx.repo.ok(["forget", &first]);
    fx.want.remove(&first);
    fx.save();
    let mut failures = 0;
    for k in 0.. {
        fx.reset();
        leave_free(&fs_dir, k * 4096);
        let run = fx.repo.run_json(["gc", "--max-unused", "0"]);
        fs::remove_file(fs_dir.join("filler")).unwrap();
        fx.verify();
        if run.status == 0 {
            break;
        }
        assert_enospc(&run);
        failures += 1;
        assert!(k < 1_000, "gc never fitted");
    }
    eprintln!("gc: ran out of space {failures} times, each cleanly");
}

#[test]
fn enospc_in_an_in_place_restore_leaves_the_volume_whole() {
    // The repository (journal, undo snapshot, restore record) on a small tmpfs, the
    // volume and its staging on another with room to spare.
    let mut fx = Fx::new();
    let fs_dir = fx.dir.join("small");
    fx.mounts.insert(0, Tmpfs::mount(&fs_dir, "8m"));
    fx.repo.path = fs_dir.join("repo");
    fx.repo.ok(["init", "--chunk-size-avg", "1024"]);
    fill(&fx.data, 1);
    let snap = fx.snapshot();
    // Changed since: the undo snapshot has new data to store.
    fill(&fx.data, 2);
    fx.save();
    let old = Rc::new(scan_tree(&fx.data));
    let new = fx.want[&snap].clone();
    let args = [
        "restore",
        snap.as_str(),
        "--in-place",
        "--yes",
        "--ignore-running-containers",
    ];
    let mut failures = 0;
    for k in 0.. {
        fx.reset();
        leave_free(&fs_dir, k * 4096);
        let run = fx.repo.run_json(args);
        fs::remove_file(fs_dir.join("filler")).unwrap();
        fx.repo.ok(["recover"]);
        let committed = fs::read_dir(fx.repo.path.join("restores")).map_or(0, |d| d.count()) == 1;
        let want = if committed { &new } else { &old };
        let diff = tree_diff(want, &scan_tree(&fx.data));
        assert!(
            diff.is_empty(),
            "with {k} pages free: the volume is not wholly {}:\n{}",
            if committed { "new" } else { "old" },
            diff.join("\n")
        );
        let mut listed = fx.want.clone();
        for u in listed_ids(&fx.repo) {
            if !fx.want.contains_key(&u) {
                listed.insert(u, old.clone());
            }
        }
        assert!(listed.len() <= fx.want.len() + 1, "{listed:?}");
        if committed {
            assert_eq!(
                listed.len(),
                fx.want.len() + 1,
                "a restore without its undo"
            );
        }
        fx.verify_with(&listed);
        if run.status == 0 {
            assert!(committed);
            break;
        }
        assert_enospc(&run);
        failures += 1;
        assert!(k < 1_000, "the in-place restore never fitted");
    }
    assert!(
        failures >= 3,
        "only {failures} in-place restores ran out of space"
    );
    eprintln!("in-place restore: ran out of space {failures} times, each cleanly");
}

#[test]
fn enospc_in_a_restore_leaves_no_wrong_bytes() {
    let mut fx = Fx::new();
    fill(&fx.data, 1);
    let snap = fx.snapshot();
    let tree = fx.want[&snap].clone();
    let target_fs = fx.dir.join("target-fs");
    fx.mounts.insert(0, Tmpfs::mount(&target_fs, "1m"));
    let mut failures = 0;
    for k in 0.. {
        leave_free(&target_fs, k * 4096);
        let to = target_fs.join(format!("t{k}"));
        let run = fx.repo.run_json([
            std::ffi::OsStr::new("restore"),
            snap.as_ref(),
            "--to".as_ref(),
            to.as_os_str(),
        ]);
        if run.status == 0 {
            assert!(tree_diff(&tree, &scan_tree(&to)).is_empty());
            break;
        }
        assert_enospc(&run);
        failures += 1;
        if to.exists() {
            assert_no_wrong_bytes(&tree, &to);
            fs::remove_dir_all(&to).unwrap();
        }
        fs::remove_file(target_fs.join("filler")).unwrap();
        fx.verify();
        assert!(k < 500, "the restore never fitted");
    }
    assert!(failures >= 3, "only {failures} restores ran out of space");
    eprintln!("restore: ran out of space {failures} times, each cleanly");
}
