//! Several volsnap processes on one repository at once.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::*;

fn build_tree(dir: &Path, seed: &str, files: usize) {
    for i in 0..files {
        let len = 2048 + (i * 977) % 8192;
        write(
            dir.join(format!("d{:02}/f{i:05}", i % 25)),
            random_bytes(&format!("{seed} {i}"), len),
        );
    }
    write(
        dir.join("big-1"),
        random_bytes(&format!("{seed} big 1"), 8 << 20),
    );
    write(
        dir.join("big-2"),
        random_bytes(&format!("{seed} big 2"), 8 << 20),
    );
}

fn spawn_snapshot(repo: &Repo, dir: &Path, series: &str) -> Child {
    let mut cmd = repo.command();
    cmd.arg("--json")
        .arg("snapshot")
        .arg(dir)
        .args(["--name", series])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

fn finish(child: Child, what: &str) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "{what} failed: {:?}\nstderr: {stderr}",
        out.status
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_snapshot_shape(&v);
    v
}

#[test]
fn concurrent_snapshots_and_readers_all_succeed() {
    let repo = Repo::new();
    let a = repo.mkdir("alpha");
    let b = repo.mkdir("beta");
    build_tree(&a, "alpha", 2500);
    build_tree(&b, "beta", 2500);

    let done = Arc::new(AtomicBool::new(false));
    let lister = {
        let done = done.clone();
        let repo_path = repo.path.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let mut cmd = std::process::Command::new(bin());
                cmd.arg("--repo").arg(&repo_path).args(["--json", "list"]);
                let run = Run::from_command(cmd).code(0);
                assert!(run.json().is_array(), "{}", run.describe());
                runs += 1;
                if finished {
                    return runs;
                }
            }
        })
    };

    let ca = spawn_snapshot(&repo, &a, "alpha");
    let cb = spawn_snapshot(&repo, &b, "beta");
    let sa = finish(ca, "snapshot alpha");
    let sb = finish(cb, "snapshot beta");
    done.store(true, Ordering::SeqCst);
    let runs = lister.join().expect("a concurrent list failed");
    assert!(runs >= 2);

    let list = repo.list(&[]);
    assert_eq!(list.len(), 2);
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["snapshots"], 2);
    assert!(check["packs"].as_u64().unwrap() >= 2, "{check}");
    assert!(
        check["blobs_read"].as_u64().unwrap() > 5000,
        "--read-data should read every blob: {check}"
    );
    assert!(check["errors"].as_array().unwrap().is_empty(), "{check}");

    let ra = repo.scratch("restored-alpha");
    repo.restore(&id(&sa), &ra);
    assert_same_tree(&a, &ra);
    let rb = repo.scratch("restored-beta");
    repo.restore(&id(&sb), &rb);
    assert_same_tree(&b, &rb);
}

#[test]
fn concurrent_first_snapshots_create_the_repository_once() {
    let repo = Repo::new();
    let a = repo.mkdir("one");
    let b = repo.mkdir("two");
    build_tree(&a, "one", 200);
    build_tree(&b, "two", 200);
    let ca = spawn_snapshot(&repo, &a, "one");
    let cb = spawn_snapshot(&repo, &b, "two");
    let sa = finish(ca, "snapshot one");
    let sb = finish(cb, "snapshot two");
    assert_eq!(repo.list(&[]).len(), 2);
    let check = repo.ok(["check"]);
    assert_eq!(check["ok"], true, "{check}");
    let ra = repo.scratch("ra");
    repo.restore(&id(&sa), &ra);
    assert_same_tree(&a, &ra);
    let rb = repo.scratch("rb");
    repo.restore(&id(&sb), &rb);
    assert_same_tree(&b, &rb);
}

#[test]
fn interrupted_snapshot_leaves_a_consistent_repository() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    for i in 0..8 {
        write(
            data.join(format!("big-{i}")),
            random_bytes(&format!("interrupt {i}"), 8 << 20),
        );
    }
    // Held once a pack is stored and indexed, while other packs are being written and
    // before any record: SIGINT there, not after a guess at how long the data takes.
    let paused = repo.spawn_paused(
        "pack indexed",
        &["snapshot", data.to_str().unwrap(), "--name", "interrupted"],
    );
    let stored = std::fs::read_dir(repo.path.join("packs"))
        .unwrap()
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .filter(|p| p.as_ref().unwrap().path().extension() == Some("pack".as_ref()))
        .count();
    assert!(
        stored >= 1,
        "held after a pack was indexed, yet no pack is stored"
    );
    let out = paused.signal(rustix::process::Signal::INT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Dying of the SIGINT itself is what a shell reports as 130.
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.code() == Some(130) || out.status.signal() == Some(2),
        "interrupted snapshot should exit 130: {:?}\nstderr: {stderr}",
        out.status
    );

    // Nothing half-written is visible and nothing stays locked.
    let listed = repo.list(&[]);
    assert!(listed.is_empty(), "{listed:?}");
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let snap = repo.snapshot(&[&data], &["--name", "interrupted"]);
    let to = repo.scratch("restored");
    repo.restore(&id(&snap), &to);
    assert_same_tree(&data, &to);
}

#[test]
fn concurrent_snapshots_of_identical_data_all_succeed() {
    // Cron jobs of several series over the same volume: their packs can come
    // out byte-identical, which must not make any of them fail. The race is
    // narrow, so run a few rounds.
    for round in 0..5 {
        let repo = Repo::new();
        let data = repo.mkdir("shared");
        for i in 0..50 {
            write(
                data.join(format!("f{i:02}")),
                random_bytes(&format!("shared {round} {i}"), 100_000),
            );
        }
        let children: Vec<Child> = (0..4)
            .map(|i| spawn_snapshot(&repo, &data, &format!("s{i}")))
            .collect();
        let snaps: Vec<_> = children
            .into_iter()
            .enumerate()
            .map(|(i, c)| finish(c, &format!("round {round} snapshot s{i}")))
            .collect();
        assert_eq!(repo.list(&[]).len(), 4);
        let check = repo.ok(["check", "--read-data"]);
        assert_eq!(check["ok"], true, "{check}");
        if round == 0 {
            for (i, snap) in snaps.iter().enumerate() {
                let to = repo.scratch(&format!("restored-{i}"));
                repo.restore(&id(snap), &to);
                assert_same_tree(&data, &to);
            }
        }
    }
}
