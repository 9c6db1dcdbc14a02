//! Retention and garbage collection: space comes back, and nothing a snapshot, a
//! running snapshot, or a crash needs is ever lost.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// Disk space the packs take, as `du` counts it: allocated blocks, so space gc gives
/// back by punching holes counts as given back.
fn packs_bytes(repo: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for shard in fs::read_dir(repo.join("packs")).unwrap() {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            total += f.unwrap().metadata().unwrap().blocks() * 512;
        }
    }
    total
}

/// Exactly the snapshots of `expected` are listed, each restores to exactly
/// `expected[id]`, and check reads clean.
fn assert_all_restore(repo: &Repo, expected: &BTreeMap<String, PathBuf>) {
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let listed: Vec<String> = repo.list(&[]).iter().map(id).collect();
    let want: Vec<&String> = expected.keys().collect();
    let mut sorted: Vec<&String> = listed.iter().collect();
    sorted.sort();
    assert_eq!(
        sorted, want,
        "the listed snapshots are not the expected ones"
    );
    for sid in &listed {
        let out = repo.scratch(&format!("verify-{}-{}", &sid[..12], rand_suffix()));
        repo.restore(sid, &out);
        assert_same_tree(&expected[sid], &out);
        fs::remove_dir_all(&out).unwrap();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Takes a snapshot of `data` and keeps a copy of what it held.
fn snapshot_and_keep(
    repo: &Repo,
    data: &Path,
    series: &str,
    expected: &mut BTreeMap<String, PathBuf>,
) -> String {
    let snap = repo.snapshot(&[data], &["--name", series]);
    let sid = id(&snap);
    let copy = repo.scratch(&format!("expected-{}", &sid[..16]));
    repo.restore(&sid, &copy);
    assert_same_tree(data, &copy);
    expected.insert(sid.clone(), copy);
    sid
}

#[test]
fn a_policy_that_keeps_nothing_is_refused_unless_keep_none_says_so() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    for n in 0..3 {
        write(data.join("f"), format!("round {n}"));
        repo.snapshot(&[&data], &["--name", "s"]);
    }
    for (args, says) in [
        (vec!["forget", "--keep-daily", "0"], "would keep nothing"),
        (
            vec!["forget", "--keep-last", "0", "--keep-weekly", "0"],
            "would keep nothing",
        ),
        (vec!["forget", "--name", "s"], "no policy was specified"),
        (vec!["forget"], "no policy was specified"),
    ] {
        let run = repo.run(&args).code(1);
        let line = run.error_line();
        assert!(
            line.contains(says) && line.contains("--keep-none"),
            "{}",
            run.describe()
        );
        assert_eq!(repo.list(&[]).len(), 3, "{args:?} forgot something");
    }
    // --keep-none goes alone.
    repo.run(["forget", "--keep-none", "--keep-last", "1"])
        .code(2);
    let dry = repo.ok(["forget", "--keep-none", "--dry-run"]);
    assert_eq!(dry["removed"].as_array().unwrap().len(), 3, "{dry}");
    assert_eq!(repo.list(&[]).len(), 3, "a dry run removed something");
    let forgot = repo.ok(["forget", "--keep-none", "--name", "s"]);
    assert_eq!(forgot["kept"].as_array().unwrap().len(), 0, "{forgot}");
    assert!(repo.list(&[]).is_empty());
}

#[test]
fn forget_and_gc_give_back_exactly_what_only_the_forgotten_snapshots_held() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("shared"), random_bytes("shared", 4_000_000));
    let mut expected = BTreeMap::new();
    for round in 0..4 {
        write(
            data.join("round"),
            random_bytes(&format!("round {round}"), 8_000_000),
        );
        snapshot_and_keep(&repo, &data, "s", &mut expected);
    }
    let before = packs_bytes(&repo.path);
    let dry = repo.ok(["forget", "--keep-last", "2", "--dry-run"]);
    assert_eq!(dry["removed"].as_array().unwrap().len(), 2, "{dry}");
    assert_eq!(repo.list(&[]).len(), 4, "a dry run removed something");
    let forgot = repo.ok(["forget", "--keep-last", "2"]);
    assert_eq!(forgot["kept"].as_array().unwrap().len(), 2);
    assert_eq!(
        packs_bytes(&repo.path),
        before,
        "forget alone must not remove data"
    );

    let dry_gc = repo.ok(["gc", "--dry-run"]);
    assert_eq!(packs_bytes(&repo.path), before, "gc --dry-run removed data");
    let report = repo.ok(["gc"]);
    let after = packs_bytes(&repo.path);
    // The two forgotten rounds held 16 MB of incompressible data nothing else shares.
    // By default gc punches their blocks out of packs that keep live blobs and leaves
    // the partial blocks at the edges of each dead run (under 1% here) rather than
    // rewrite live data; what it reports is what du sees.
    let freed = before - after;
    assert!(
        (15_840_000..17_000_000).contains(&freed),
        "freed {freed} bytes; report {report}; dry run {dry_gc}"
    );
    let reported = report["bytes_reclaimed"].as_u64().unwrap();
    assert!(
        freed.abs_diff(reported) < 64 * 1024,
        "reported {reported}, du freed {freed}"
    );
    let dry = dry_gc["bytes_reclaimed"].as_u64().unwrap();
    assert!(
        dry.abs_diff(reported) < 64 * 1024,
        "dry run said {dry}, gc reclaimed {reported}"
    );
    // Asked to leave no dead byte, gc rewrites those packs: exactly the 16 MB.
    let rest = repo.ok(["gc", "--max-unused", "0"]);
    let freed = before - packs_bytes(&repo.path);
    assert!(
        (15_900_000..17_000_000).contains(&freed),
        "freed {freed} bytes in all; last report {rest}"
    );
    assert!(
        dry_gc["unreachable_bytes"].as_u64().unwrap() >= 16_000_000,
        "{dry_gc}"
    );
    let kept: BTreeMap<String, PathBuf> = expected
        .into_iter()
        .filter(|(k, _)| repo.list(&[]).iter().any(|s| &id(s) == k))
        .collect();
    assert_eq!(kept.len(), 2);
    assert_all_restore(&repo, &kept);
    // A second gc finds nothing more.
    let again = repo.ok(["gc"]);
    assert_eq!(again["unreachable_blobs"], 0, "{again}");
}

#[test]
fn a_snapshot_reusing_chunks_of_a_parent_collected_meanwhile_stays_whole() {
    // The race of PBS advisory PSA-2025-00019-1: an incremental snapshot reuses the
    // chunks of its parent while the parent is forgotten and gc runs.
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("big"), random_bytes("big", 6_000_000));
    write(data.join("small"), "v1");
    set_tree_mtimes(&data, Y2020);
    wait_out_racy_window(&data);
    let parent = repo.snapshot(&[&data], &["--name", "s"]);
    // Only "small" changes; touching the others' times would change their ctimes.
    write(data.join("small"), "v2");

    let pause = repo.scratch("pause");
    write(&pause, "hold");
    let mut cmd = repo.command();
    cmd.args(["--json", "snapshot", data.to_str().unwrap(), "--name", "s"])
        .env("VOLSNAP_PAUSE_AT", "snapshot before commit")
        .env("VOLSNAP_PAUSE_FILE", &pause)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let reached = PathBuf::from(format!("{}.reached", pause.display()));
    wait_for(|| reached.exists(), "the snapshot to reach its pause");

    // The parent is forgotten and gc runs while the child holds reused chunks.
    repo.ok(["forget", &id(&parent)]);
    let mut gc = repo.command();
    gc.args(["gc"]).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut gc_child = gc.spawn().unwrap();
    // gc must have reached its wait for the older snapshot before the snapshot goes on:
    // read its stderr until it says so.
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let gc_stderr = gc_child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(gc_stderr).lines() {
            let line = line.unwrap();
            let _ = lines_tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("waiting for") => break,
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                fs::remove_file(&pause).unwrap();
                panic!(
                    "gc ended without waiting for the paused snapshot: {}",
                    reader.join().unwrap()
                );
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                fs::remove_file(&pause).unwrap();
                panic!("gc never said it waits for the paused snapshot");
            }
        }
    }
    fs::remove_file(&pause).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        stat_u64(&snap, "bytes_read"),
        2,
        "the big file was reused, not read: {snap}"
    );
    let gc_status = gc_child.wait().unwrap();
    let gc_stderr = reader.join().unwrap();
    assert!(gc_status.success(), "gc failed: {gc_stderr}");

    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let restored = repo.scratch("restored");
    repo.restore(&id(&snap), &restored);
    assert_same_tree(&data, &restored);
    // And the next gc, with nothing running, keeps it too.
    repo.ok(["gc"]);
    let again = repo.scratch("restored-again");
    repo.restore(&id(&snap), &again);
    assert_same_tree(&data, &again);
}

fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn gc_aborted_at_every_step_leaves_a_sound_repository_and_finishes_when_rerun() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let mut expected = BTreeMap::new();
    for round in 0..5 {
        // Many small files per round so packs mix live and dead blobs (repack work).
        for f in 0..30 {
            let name = format!("f{f}");
            if (f + round) % 3 == 0 || round == 0 {
                write(
                    data.join(&name),
                    random_bytes(&format!("{name} {round}"), 40_000),
                );
            }
        }
        // Dead blobs between live ones and too small to punch a block out of: only a
        // repack gives their space back.
        for f in (0..60).filter(|f| f % 2 == 0 || round == 0) {
            write(
                data.join(format!("tiny{f}")),
                random_bytes(&format!("tiny {f} {round}"), 2_000),
            );
        }
        write(
            data.join("big"),
            random_bytes(&format!("big {round}"), 3_000_000),
        );
        snapshot_and_keep(&repo, &data, "s", &mut expected);
    }
    repo.ok(["forget", "--keep-last", "2"]);
    expected.retain(|k, _| repo.list(&[]).iter().any(|s| &id(s) == k));
    assert_eq!(expected.len(), 2);
    let pristine = repo.scratch("pristine");
    copy_tree(&repo.path, &pristine);
    let reset = || {
        fs::remove_dir_all(&repo.path).unwrap();
        copy_tree(&pristine, &repo.path);
    };

    // Every kind of step, from the same start: abort there, check, finish, check. (The
    // steps between two batches of condemn and sweep: see
    // `gc_aborted_between_two_batches_leaves_a_sound_repository`.)
    for step in [
        "gc condemned",
        "gc waited",
        "gc swept",
        "gc dropped cache rows",
        "gc cleared tombstones",
        "gc waited after the sweep",
        "gc deleted a pack",
        "gc punched a pack",
        "pack written",
        "pack committed",
        "pack indexed",
        "gc repacked a pack",
    ] {
        let crashed = repo.run_crashing_at(step, &["gc", "--max-unused", "1"]);
        assert_eq!(crashed.as_deref(), Some(step), "gc never reached {step:?}");
        assert_all_restore(&repo, &expected);
        let rerun = repo.ok(["gc", "--max-unused", "1"]);
        assert_all_restore(&repo, &expected);
        let last = repo.ok(["gc", "--max-unused", "1"]);
        assert_eq!(
            last["unreachable_blobs"], 0,
            "after {step:?}: {rerun} then {last}"
        );
        assert_eq!(
            last["packs_repacked"], 0,
            "after {step:?}: {rerun} then {last}"
        );
        reset();
    }

    // Every step in order: abort at the n-th, for every n, each from the same start,
    // then finish with a rerun.
    let mut seen = Vec::new();
    let mut n = 1;
    loop {
        reset();
        let crashed = repo.run_crashing_at(n, &["gc", "--max-unused", "1"]);
        assert_all_restore(&repo, &expected);
        let Some(point) = crashed else {
            break;
        };
        seen.push(point);
        let rerun = repo.ok(["gc", "--max-unused", "1"]);
        assert_all_restore(&repo, &expected);
        let last = repo.ok(["gc", "--max-unused", "1"]);
        assert_eq!(
            last["unreachable_blobs"], 0,
            "after point {n}: {rerun} then {last}"
        );
        assert_eq!(
            last["packs_deleted"], 0,
            "after point {n}: {rerun} then {last}"
        );
        n += 1;
        assert!(n < 200, "gc never completed");
    }
    // Three forgotten packs held only dead blobs, three others keep live ones beside
    // dead runs, and one is worth rewriting; the pack it was rewritten from goes last.
    assert_eq!(
        seen,
        [
            "gc condemned",
            "gc waited",
            "gc swept",
            "gc dropped cache rows",
            "gc cleared tombstones",
            "gc waited after the sweep",
            "gc deleted a pack",
            "gc deleted a pack",
            "gc deleted a pack",
            "gc punched a pack",
            "gc punched a pack",
            "gc punched a pack",
            "pack written",
            "pack committed",
            "pack indexed",
            "gc repacked a pack",
            "gc deleted a pack",
        ],
        "the crash points gc reached"
    );
    let final_gc = repo.ok(["gc", "--max-unused", "1"]);
    assert_eq!(final_gc["unreachable_blobs"], 0, "{final_gc}");
    assert_eq!(final_gc["packs_deleted"], 0, "{final_gc}");
    assert_all_restore(&repo, &expected);
}

#[test]
fn forget_aborted_at_every_step_removes_only_what_the_policy_removes() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let mut expected = BTreeMap::new();
    let mut order = Vec::new();
    for round in 0..4 {
        write(
            data.join("f"),
            random_bytes(&format!("round {round}"), 100_000),
        );
        order.push(snapshot_and_keep(&repo, &data, "s", &mut expected));
    }
    let pristine = repo.scratch("pristine");
    copy_tree(&repo.path, &pristine);
    let kept: BTreeMap<String, PathBuf> = expected
        .iter()
        .filter(|(k, _)| *k == &order[3])
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut seen = Vec::new();
    let mut n = 1;
    loop {
        fs::remove_dir_all(&repo.path).unwrap();
        copy_tree(&pristine, &repo.path);
        let crashed = repo.run_crashing_at(n, &["forget", "--keep-last", "1"]);
        // Aborted: the snapshots still listed are the kept one and those not yet
        // removed, each whole.
        let listed: Vec<String> = repo.list(&[]).iter().map(id).collect();
        assert!(listed.contains(&order[3]), "after point {n}: {listed:?}");
        let now: BTreeMap<String, PathBuf> = expected
            .iter()
            .filter(|(k, _)| listed.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_all_restore(&repo, &now);
        let Some(point) = crashed else {
            assert_eq!(listed, [order[3].clone()]);
            break;
        };
        assert_eq!(
            listed.len(),
            4 - n,
            "after {n} crash points, {} records should be gone: {listed:?}",
            n
        );
        seen.push(point);
        // Run again, it finishes the job.
        let again = repo.ok(["forget", "--keep-last", "1"]);
        assert_eq!(again["kept"].as_array().unwrap().len(), 1, "{again}");
        assert_all_restore(&repo, &kept);
        n += 1;
        assert!(n < 20, "forget never completed");
    }
    assert_eq!(
        seen, ["snapshot record removed"; 3],
        "the crash points forget reached"
    );
}

/// The steps of a gc run that deletes, punches and repacks, as its crash (and pause)
/// points name them.
const GC_STEPS: [&str; 12] = [
    "gc condemned",
    "gc waited",
    "gc swept",
    "gc dropped cache rows",
    "gc cleared tombstones",
    "gc waited after the sweep",
    "gc deleted a pack",
    "gc punched a pack",
    "pack written",
    "pack committed",
    "pack indexed",
    "gc repacked a pack",
];

#[test]
fn a_snapshot_committed_at_any_step_of_a_gc_stays_whole() {
    // gc held at each of its steps in turn while a snapshot runs from start to commit:
    // the snapshot holds the content of a forgotten round, whose blobs gc is condemning,
    // deleting, punching or repacking at that moment.
    let repo = Repo::new();
    let expected = forgotten_rounds(&repo);
    // Any unused byte left after punching makes gc rewrite the pack: whether the bytes
    // punching leaves (runs' unaligned ends) pass a larger threshold depends on how
    // the parallel snapshot ordered blobs in its packs, and every step must be reached.
    let plan = repo.ok(["gc", "--dry-run", "--max-unused", "0"]);
    for step in ["packs_deleted", "packs_punched", "packs_repacked"] {
        assert!(plan[step].as_u64().unwrap() > 0, "{step}: {plan}");
    }
    let forgotten = repo.scratch("forgotten");
    let pristine = repo.scratch("pristine");
    copy_tree(&repo.path, &pristine);
    for step in GC_STEPS {
        fs::remove_dir_all(&repo.path).unwrap();
        copy_tree(&pristine, &repo.path);
        first_round_again(&forgotten);
        let gc = repo.spawn_paused(step, &["gc", "--max-unused", "0"]);
        // gc is held at `step`; the snapshot commits meanwhile (it would hang here if it
        // waited for gc).
        let snap = repo.snapshot(&[&forgotten], &["--name", "again"]);
        let gc = gc.finish().code(0).json();
        assert!(gc["unreachable_blobs"].as_u64().unwrap() > 0, "{gc}");
        let mut now = expected.clone();
        let copy = repo.scratch(&format!("again-{}", step.replace(' ', "-")));
        let _ = fs::remove_dir_all(&copy);
        copy_tree(&forgotten, &copy);
        now.insert(id(&snap), copy);
        assert_all_restore(&repo, &now);
        // Nothing the snapshot needs is left for a later gc to take either.
        let again = repo.ok(["gc", "--max-unused", "0"]);
        assert_all_restore(&repo, &now);
        assert_eq!(again["unreachable_blobs"], 0, "after {step:?}: {again}");
    }
}

/// A fresh copy of the first round of `forgotten_rounds` at `to`: after the forget
/// every blob only it holds is unreachable.
fn first_round_again(to: &Path) {
    let _ = fs::remove_dir_all(to);
    fs::create_dir_all(to).unwrap();
    write(to.join("shared"), random_bytes("shared", 2_000_000));
    write(to.join("round"), random_bytes("round 0", 3_000_000));
    for f in 0..40 {
        write(
            to.join(format!("f{f}")),
            random_bytes(&format!("f{f} 0"), 30_000),
        );
    }
}

#[test]
fn a_snapshot_that_decided_to_reuse_blobs_while_gc_condemned_them_stays_whole() {
    // The snapshot starts while gc has condemned the first round's blobs, decides
    // what to store, and commits only after gc swept: it must have stored its own
    // copies of what gc condemned, since gc does not wait for it before sweeping.
    let repo = Repo::new();
    let expected = forgotten_rounds(&repo);
    let again = repo.scratch("again");
    let pristine = repo.scratch("pristine");
    copy_tree(&repo.path, &pristine);
    for step in ["gc condemned", "gc waited"] {
        fs::remove_dir_all(&repo.path).unwrap();
        copy_tree(&pristine, &repo.path);
        first_round_again(&again);
        let gc = repo.spawn_paused_human(step, &["gc", "--max-unused", "1"]);
        let snap = repo.spawn_paused(
            "snapshot before commit",
            &["snapshot", again.to_str().unwrap(), "--name", "again"],
        );
        // gc goes on: it sweeps, then waits for the snapshot (older than the sweep)
        // before it deletes anything.
        let gc = gc
            .go_until_stderr("waiting for")
            .unwrap_or_else(|run| panic!("gc never waited for the snapshot\n{}", run.describe()));
        let snap = snap.finish().code(0).json();
        let report = gc.finish().code(0);
        let mut now = expected.clone();
        let copy = repo.scratch(&format!("again-{}", step.replace(' ', "-")));
        let _ = fs::remove_dir_all(&copy);
        copy_tree(&again, &copy);
        now.insert(id(&snap), copy);
        assert_all_restore(&repo, &now);
        let last = repo.ok(["gc", "--max-unused", "1"]);
        assert_all_restore(&repo, &now);
        assert_eq!(
            last["unreachable_blobs"],
            0,
            "after {step:?}: {} then {last}",
            report.describe()
        );
    }
}

#[test]
fn readers_started_while_gc_deletes_and_repacks_finish_whole() {
    // gc is past its last wait before deleting: it deletes dead packs, punches and
    // repacks while a restore, an export and a check --read-data that started meanwhile
    // are under way; it must wait for each before deleting the packs it rewrote, and
    // none of them may see damage that is not there.
    let repo = Repo::new();
    let expected = forgotten_rounds(&repo);
    let latest = id(repo.list(&[]).last().unwrap());
    let pristine = repo.scratch("pristine");
    copy_tree(&repo.path, &pristine);
    for reader in ["restore", "export", "check"] {
        fs::remove_dir_all(&repo.path).unwrap();
        copy_tree(&pristine, &repo.path);
        let out = repo.scratch(&format!("read-by-{reader}"));
        let out_s = out.to_str().unwrap();
        let (point, args): (&str, Vec<&str>) = match reader {
            "restore" => ("restore started", vec!["restore", &latest, "--to", out_s]),
            "export" => (
                "export started",
                vec!["export", &latest, "--format", "tar", "-o", out_s],
            ),
            _ => ("check listed packs", vec!["check", "--read-data"]),
        };
        let gc = repo.spawn_paused_human("gc waited after the sweep", &["gc", "--max-unused", "1"]);
        let read = repo.spawn_paused(point, &args);
        let gc = gc.go_until_stderr("waiting for").unwrap_or_else(|run| {
            panic!(
                "gc did not wait for the {reader} before deleting what it rewrote\n{}",
                run.describe()
            )
        });
        let read = read.finish();
        let gc = gc.finish().code(0);
        // It did delete, punch and repack while the reader ran.
        let said = gc.stdout_str();
        let count = |what: &str| -> u64 {
            let before = said.split(what).next().unwrap();
            before.split_whitespace().last().unwrap().parse().unwrap()
        };
        assert!(
            count(" packs deleted") > 0 && count(" punched") > 0 && count(" repacked") > 0,
            "{}",
            gc.describe()
        );
        let read = read.code(0).json();
        match reader {
            "restore" => assert_same_tree(&expected[&latest], &out),
            "export" => {
                let x = repo.mkdir(&format!("extracted-{reader}"));
                let st = Command::new("tar")
                    .arg("-xf")
                    .arg(&out)
                    .arg("-C")
                    .arg(&x)
                    .status()
                    .unwrap();
                assert!(st.success());
                for f in ["shared", "round", "f0", "f1"] {
                    assert_eq!(
                        fs::read(x.join(f)).unwrap(),
                        fs::read(expected[&latest].join(f)).unwrap(),
                        "{f}"
                    );
                }
            }
            _ => assert_eq!(read["ok"], true, "check saw damage: {read}"),
        }
        assert_all_restore(&repo, &expected);
    }
}

#[test]
fn a_second_gc_exits_11_while_one_runs() {
    let repo = Repo::new();
    let expected = forgotten_rounds(&repo);
    let first = repo.spawn_paused("gc condemned", &["gc"]);
    for args in [vec!["gc"], vec!["gc", "--dry-run"]] {
        let run = repo.run(&args).code(11);
        assert!(
            run.error_line().contains("another gc is running"),
            "{}",
            run.describe()
        );
    }
    let report = first.finish().code(0).json();
    assert!(
        report["unreachable_blobs"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_all_restore(&repo, &expected);
    // Once it is done the next one runs.
    repo.ok(["gc"]);
}

#[test]
fn snapshots_keep_running_while_forget_and_gc_loop() {
    const ROUNDS: usize = 4;
    let repo = Repo::new();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..2 {
        let repo_path = repo.path.clone();
        let data = repo.mkdir(&format!("data{w}"));
        let keep_dir = repo.scratch(&format!("kept{w}"));
        let done = done.clone();
        writers.push(std::thread::spawn(move || {
            let mut taken = Vec::new();
            fs::create_dir_all(&keep_dir).unwrap();
            for round in 0..ROUNDS {
                // Mutate: rewrite a few files, keep the rest (so chunks are reused).
                for f in 0..6 {
                    if round == 0 || (f + round) % 3 == 0 {
                        write(
                            data.join(format!("f{f}")),
                            random_bytes(&format!("w{w} f{f} r{round}"), 300_000),
                        );
                    }
                }
                let out = Command::new(bin())
                    .args([
                        "--repo",
                        repo_path.to_str().unwrap(),
                        "--json",
                        "snapshot",
                        data.to_str().unwrap(),
                        "--name",
                        &format!("w{w}"),
                    ])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "snapshot failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
                let copy = keep_dir.join(format!("r{round}"));
                copy_tree(&data, &copy);
                taken.push((id(&snap), copy));
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            taken
        }));
    }
    let repo_path = repo.path.clone();
    let collector = std::thread::spawn(move || {
        // Until both writers are done, then once more.
        let mut last = false;
        while !last {
            last = done.load(std::sync::atomic::Ordering::SeqCst) == 2;
            for args in [
                vec!["forget", "--keep-last", "2"],
                vec!["gc", "--max-unused", "5"],
            ] {
                let out = Command::new(bin())
                    .arg("--repo")
                    .arg(&repo_path)
                    .args(&args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    });
    // The last forget ran after every snapshot: exactly the two latest of each writer
    // are left.
    let mut expected = BTreeMap::new();
    for w in writers {
        let taken = w.join().unwrap();
        assert_eq!(taken.len(), ROUNDS);
        expected.extend(taken.into_iter().skip(ROUNDS - 2));
    }
    collector.join().unwrap();
    assert_all_restore(&repo, &expected);
}

fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Snapshots four rounds of data (a shared file, a changing one, small files of which
/// half change) and forgets the first two, so gc both deletes and punches packs.
fn forgotten_rounds(repo: &Repo) -> BTreeMap<String, PathBuf> {
    let data = repo.mkdir("data");
    write(data.join("shared"), random_bytes("shared", 2_000_000));
    let mut expected = BTreeMap::new();
    for round in 0..4 {
        write(
            data.join("round"),
            random_bytes(&format!("round {round}"), 3_000_000),
        );
        for f in (0..40).filter(|f| f % 2 == 0 || round == 0) {
            write(
                data.join(format!("f{f}")),
                random_bytes(&format!("f{f} {round}"), 30_000),
            );
        }
        snapshot_and_keep(repo, &data, "s", &mut expected);
    }
    repo.ok(["forget", "--keep-last", "2"]);
    expected.retain(|k, _| repo.list(&[]).iter().any(|s| &id(s) == k));
    assert_eq!(expected.len(), 2);
    expected
}

#[test]
fn repair_index_after_gc_punched_packs_loses_nothing() {
    let repo = Repo::new();
    let expected = forgotten_rounds(&repo);
    let report = repo.ok(["gc"]);
    assert!(report["packs_punched"].as_u64().unwrap() > 0, "{report}");
    fs::remove_file(repo.path.join("index.redb")).unwrap();
    let repaired = repo.ok(["repair", "index"]);
    // Blobs whose space gc gave back are not damage.
    assert_eq!(repaired["damaged_blobs"], 0, "{repaired}");
    assert_eq!(repaired["snapshots"], 2, "{repaired}");
    assert_all_restore(&repo, &expected);
    let again = repo.ok(["gc"]);
    assert_all_restore(&repo, &expected);
    let last = repo.ok(["gc"]);
    assert_eq!(last["unreachable_blobs"], 0, "{again} then {last}");
}

#[test]
fn check_reports_a_hole_in_a_live_blob() {
    let repo = Repo::new();
    forgotten_rounds(&repo);
    repo.ok(["gc"]);
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    // A hole where a live blob is: as if the filesystem lost the blocks.
    let mut packs: Vec<PathBuf> = fs::read_dir(repo.path.join("packs"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .collect();
    // A pack without holes (gc punched none: all its blobs are live), largest first.
    packs.retain(|p| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(p).unwrap();
        m.blocks() * 512 >= m.len() && m.len() > 200_000
    });
    packs.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).unwrap().len()));
    assert!(!packs.is_empty(), "no pack without holes");
    let status = Command::new("fallocate")
        .args(["--punch-hole", "--offset", "65536", "--length", "4096"])
        .arg(&packs[0])
        .status()
        .unwrap();
    assert!(status.success());
    let report = repo.run_json(["check", "--read-data"]).code(1).json();
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["snapshot"].is_string()),
        "no snapshot named as damaged: {report}"
    );
}

#[test]
fn a_pack_committed_while_gc_counts_live_rows_is_not_taken_for_an_empty_one() {
    // After the sweep gc lists the packs and counts the rows left in each; one with
    // none is deleted. A snapshot that commits a pack between the two must keep it.
    let repo = Repo::new();
    let mut expected = forgotten_rounds(&repo);
    let data = repo.mkdir("new");
    write(data.join("f"), random_bytes("new", 300_000));
    let gc = repo.spawn_paused("gc listed packs", &["gc"]);
    let snap = repo.snapshot(&[&data], &["--name", "new"]);
    let report = gc.finish().code(0).json();
    assert!(report["packs_deleted"].as_u64().unwrap() > 0, "{report}");
    expected.insert(id(&snap), data);
    assert_all_restore(&repo, &expected);
}

/// Runs `volsnap --json snapshot DIR --name SERIES` to its end and returns its output,
/// failing the test if it has not finished within a minute: a gc holding the index's
/// write lock (one transaction over every row) would hold it there.
fn snapshot_within_a_minute(repo: &Repo, data: &Path, series: &str) -> Value {
    let mut cmd = repo.command();
    cmd.args([
        "--json",
        "snapshot",
        data.to_str().unwrap(),
        "--name",
        series,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{desc} did not finish in a minute while gc was paused\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let snap = Run::from_output(desc, child.wait_with_output().unwrap())
        .code(0)
        .json();
    assert_snapshot_shape(&snap);
    snap
}

/// Three directories of twelve 100 kB files: `kept` (a snapshot that stays), `again`
/// (snapshotted, then forgotten: what tests snapshot again while gc works) and `gone`
/// (snapshotted and forgotten). Their files are older than the racily-clean window, so
/// the files cache of series `again` names the chunks gc condemns. Returns the
/// directories and the snapshots still listed, with what each must restore to.
fn kept_again_gone(repo: &Repo) -> (PathBuf, PathBuf, BTreeMap<String, PathBuf>) {
    let (kept, again, gone) = (repo.mkdir("kept"), repo.mkdir("again"), repo.mkdir("gone"));
    for f in 0..12 {
        for (dir, what) in [(&kept, "kept"), (&again, "again"), (&gone, "gone")] {
            write(
                dir.join(format!("f{f}")),
                random_bytes(&format!("{what} {f}"), 100_000),
            );
        }
    }
    // Let the ctimes leave the racily-clean window: the files cache is then trusted.
    for dir in [&kept, &again, &gone] {
        wait_out_racy_window(dir);
    }
    let mut expected = BTreeMap::new();
    snapshot_and_keep(repo, &kept, "kept", &mut expected);
    for (dir, series) in [(&again, "again"), (&gone, "gone")] {
        let sid = snapshot_and_keep(repo, dir, series, &mut expected);
        repo.ok(["forget", &sid]);
        expected.remove(&sid);
    }
    (kept, again, expected)
}

#[test]
fn snapshots_commit_while_gc_is_paused_between_condemn_batches_and_between_sweep_batches() {
    let repo = Repo::new();
    let (_, again, mut expected) = kept_again_gone(&repo);
    // Four rows per index transaction: condemn and sweep take many batches here.
    let small_batches = [("VOLSNAP_GC_BATCH_ROWS", "4")];
    let mut previous: Option<String> = None;
    for pause in ["gc condemned a batch", "gc swept a batch"] {
        if let Some(sid) = previous.take() {
            // The snapshot taken during the last gc becomes the garbage of this one.
            repo.ok(["forget", &sid]);
            expected.remove(&sid);
        }
        let mut gc = repo.spawn_paused_env(pause, &["gc"], &small_batches);
        // gc has committed some batches and has more to do. A snapshot whose files
        // cache names condemned (mid-sweep: some deleted) chunks commits meanwhile.
        let snap = snapshot_within_a_minute(&repo, &again, "again");
        assert!(
            gc.is_running(),
            "gc ended although it was held at {pause:?}"
        );
        if pause == "gc swept a batch" {
            // Every chunk of `again` is condemned or already deleted: every cache hit
            // was checked and every file read again.
            assert_eq!(stat_u64(&snap, "bytes_read"), 12 * 100_000, "{snap}");
        }
        let report = gc.finish().code(0).json();
        let deleted = report["unreachable_blobs"].as_u64().unwrap();
        if pause == "gc condemned a batch" {
            // `gone`'s twelve files at least.
            assert!(deleted >= 12, "{pause}: {report}");
        } else {
            // The batch swept before the pause; the snapshot stored every other
            // condemned blob again, which lifted its condemnation.
            assert_eq!(deleted, 4, "{pause}: {report}");
        }
        let sid = id(&snap);
        expected.insert(sid.clone(), again.clone());
        previous = Some(sid);
        assert_all_restore(&repo, &expected);
        assert_eq!(repo.list(&[]).len(), expected.len());
    }
    let last = repo.ok(["gc"]);
    assert_eq!(last["unreachable_blobs"], 0, "{last}");
    assert_all_restore(&repo, &expected);
}

#[test]
fn a_gc_stopped_after_its_sweep_leaves_no_cache_row_a_snapshot_trusts() {
    // The sweep deletes rows in batches and drops the files-cache rows naming them
    // afterwards: stopped in between, the rows of series `again` name deleted chunks.
    let repo = Repo::new();
    let (_, again, mut expected) = kept_again_gone(&repo);
    let crashed = repo.run_crashing_at_env("gc swept", &["gc"], &[("VOLSNAP_GC_BATCH_ROWS", "4")]);
    assert_eq!(crashed.as_deref(), Some("gc swept"));
    let snap = repo.snapshot(&[&again], &["--name", "again"]);
    assert_eq!(
        stat_u64(&snap, "bytes_read"),
        12 * 100_000,
        "a cached chunk list naming deleted chunks was trusted: {snap}"
    );
    expected.insert(id(&snap), again.clone());
    assert_all_restore(&repo, &expected);
    let rerun = repo.ok(["gc"]);
    assert_all_restore(&repo, &expected);
    let last = repo.ok(["gc"]);
    assert_eq!(last["unreachable_blobs"], 0, "{rerun} then {last}");
    // With the tombstones gone, the cache is trusted again.
    let next = repo.snapshot(&[&again], &["--name", "again"]);
    assert_eq!(stat_u64(&next, "bytes_read"), 0, "{next}");
}

#[test]
fn a_blob_stored_again_after_a_stopped_sweep_is_not_taken_for_the_one_it_deleted() {
    // A sweep that stopped leaves tombstones for the rows it deleted. A writer that
    // stores such a blob again, while the next gc resumes the sweep, must lose the
    // tombstone with it: otherwise the sweep deletes the new copy, which that writer's
    // snapshot (not yet committed when gc marked) references.
    let repo = Repo::new();
    let (_, again, mut expected) = kept_again_gone(&repo);
    let small_batches = [("VOLSNAP_GC_BATCH_ROWS", "4")];
    let crashed = repo.run_crashing_at_env("gc swept", &["gc"], &small_batches);
    assert_eq!(crashed.as_deref(), Some("gc swept"));
    let gc = repo.spawn_paused_env("gc swept a batch", &["gc"], &small_batches);
    let data = again.to_str().unwrap();
    let writer = repo.spawn_paused(
        "snapshot before commit",
        &["snapshot", data, "--name", "again"],
    );
    // The writer's packs, holding `again`'s blobs anew, are indexed; the sweep goes on
    // over the tombstones of those blobs, then waits for the writer's lease.
    gc.release();
    let snap = writer.finish().code(0).json();
    assert_eq!(stat_u64(&snap, "bytes_read"), 12 * 100_000, "{snap}");
    let report = gc.finish().code(0).json();
    expected.insert(id(&snap), again.clone());
    assert_all_restore(&repo, &expected);
    let last = repo.ok(["gc"]);
    assert_eq!(last["unreachable_blobs"], 0, "{report} then {last}");
    assert_all_restore(&repo, &expected);
}

#[test]
fn gc_aborted_between_two_batches_leaves_a_sound_repository() {
    // Two rows per index transaction: condemn, sweep and the files-cache pass (three
    // series, three rows) each take several batches; gc is aborted after the first
    // batch of each. A snapshot of `again` (whose files-cache
    // rows name condemned or deleted chunks) then stays whole, and a rerun finishes.
    let repo = Repo::new();
    let (_, again, expected) = kept_again_gone(&repo);
    let pristine = repo.scratch("pristine");
    copy_tree(&repo.path, &pristine);
    for step in [
        "gc condemned a batch",
        "gc swept a batch",
        "gc dropped a batch of cache rows",
    ] {
        fs::remove_dir_all(&repo.path).unwrap();
        copy_tree(&pristine, &repo.path);
        let crashed = repo.run_crashing_at_env(step, &["gc"], &[("VOLSNAP_GC_BATCH_ROWS", "2")]);
        assert_eq!(crashed.as_deref(), Some(step), "gc never reached {step:?}");
        assert_all_restore(&repo, &expected);
        let snap = repo.snapshot(&[&again], &["--name", "again"]);
        let mut now = expected.clone();
        now.insert(id(&snap), again.clone());
        assert_all_restore(&repo, &now);
        let rerun = repo.ok(["gc"]);
        assert_all_restore(&repo, &now);
        let last = repo.ok(["gc"]);
        assert_eq!(
            last["unreachable_blobs"], 0,
            "after {step:?}: {rerun} then {last}"
        );
    }
}

#[test]
fn gc_compacts_the_index_only_while_no_operation_runs() {
    // Compaction holds the whole index file: every other process waits for it.
    let repo = Repo::new();
    forgotten_rounds(&repo);
    let pristine = repo.scratch("pristine");
    copy_tree(&repo.path, &pristine);
    let report = repo.ok(["gc"]);
    assert_eq!(report["index_compaction"], "compacted", "{report}");

    fs::remove_dir_all(&repo.path).unwrap();
    copy_tree(&pristine, &repo.path);
    let data = repo.mkdir("new");
    write(data.join("f"), random_bytes("new", 100_000));
    // A snapshot that starts once gc no longer waits for anything holds its lease while
    // gc reaches the compaction.
    let gc = repo.spawn_paused("gc waited after the sweep", &["gc"]);
    let snap = repo.spawn_paused(
        "snapshot before commit",
        &["snapshot", data.to_str().unwrap(), "--name", "new"],
    );
    let report = gc.finish().code(0).json();
    assert_eq!(
        report["index_compaction"], "skipped: 1 operations running",
        "{report}"
    );
    snap.finish().code(0);
}
