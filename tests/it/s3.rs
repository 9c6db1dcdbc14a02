//! Repositories in an S3-compatible bucket, against a real Garage: every command, a
//! second host with an empty cache, copies between a directory and a bucket, and
//! faults injected by a proxy on loopback (resets, 5xx answers, stalls, truncated
//! bodies, a store that is down).

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use crate::fault_proxy::{Fault, FaultProxy, Rule, Until};
use crate::garage::Garage;
use crate::support::*;

/// A tree with files of several chunks, small and empty files, subdirectories, a
/// symlink, a hardlink and modes.
fn fill(dir: &Path, seed: &str) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    write(
        dir.join("big"),
        random_bytes(&format!("{seed} big"), 3_000_000),
    );
    write(dir.join("small"), format!("{seed} small"));
    write(dir.join("empty"), "");
    write(
        dir.join("sub/deeper/file"),
        random_bytes(&format!("{seed} deep"), 70_000),
    );
    std::os::unix::fs::symlink("../big", dir.join("sub/link")).unwrap();
    std::fs::hard_link(dir.join("small"), dir.join("sub/hard")).unwrap();
    for i in 0..30 {
        write(dir.join(format!("sub/{i}")), format!("{seed} {i}"));
    }
    std::fs::set_permissions(
        dir.join("sub/deeper"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
}

/// A copy of `dir` with every timestamp and mode kept (`cp -a`).
fn keep_copy(dir: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(dir)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn args(list: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    list.iter().map(|a| a.as_ref().to_owned()).collect()
}

fn check_clean(repo: &Repo) {
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
}

/// Every listed snapshot of `repo` restores to what `expected` maps its id to.
fn assert_all_restore(repo: &Repo, expected: &[(String, &Path)], tag: &str) {
    let listed: Vec<String> = repo.list(&[]).iter().map(id).collect();
    assert_eq!(listed.len(), expected.len(), "listed {listed:?}");
    for (i, (snap, want)) in expected.iter().enumerate() {
        assert!(listed.contains(snap), "{snap} is not listed");
        let to = repo.scratch(&format!("{tag}-{i}"));
        repo.restore(snap, &to);
        assert_same_tree(want, &to);
    }
}

#[test]
fn every_command_works_on_a_bucket_and_a_new_host_reads_it() {
    let Some(garage) = Garage::single() else {
        return;
    };
    let repo = Repo::remote(&garage.repo_url("every"), garage.env());
    let out = repo.ok(["init"]);
    assert_eq!(out["created"], true, "{out}");
    assert_eq!(out["repo"], garage.repo_url("every"), "{out}");
    // init again: there already.
    assert_eq!(repo.ok(["init"])["created"], false);

    let data = repo.mkdir("data");
    fill(&data, "one");
    let v1 = repo.scratch("v1");
    keep_copy(&data, &v1);
    let s1 = repo.snapshot(&[&data], &["--name", "app", "--tag", "first"]);
    write(data.join("small"), "changed");
    write(data.join("new"), random_bytes("new", 200_000));
    std::fs::remove_file(data.join("sub/0")).unwrap();
    let s2 = repo.snapshot(&[&data], &["--name", "app"]);
    assert!(stat_u64(&s2, "new_bytes_stored") < 400_000, "{s2}");

    // Inspect.
    let listed = repo.list(&[]);
    assert_eq!(listed.len(), 2);
    let show = repo.ok(["show", "app@1"]);
    assert_eq!(show["tags"][0], "first", "{show}");
    let ls = repo.ls("app@2", &["--recursive"]);
    assert!(
        ls.contains_key("new") && !ls.contains_key("sub/0"),
        "{ls:?}"
    );
    let diff = repo.ok(["diff", "app@1", "app@2"]);
    let text = diff.to_string();
    assert!(text.contains("new") && text.contains("small"), "{diff}");

    // Restore, export.
    assert_all_restore(&repo, &[(id(&s1), &v1), (id(&s2), &data)], "r");
    let tar = repo.scratch("app.tar.gz");
    repo.ok(args(&[&"export", &"app@2", &"-o", &tar]));
    let listing = Command::new("tar").arg("tzf").arg(&tar).output().unwrap();
    assert!(listing.status.success());
    assert!(String::from_utf8_lossy(&listing.stdout).contains("sub/deeper/file"));

    // In place: the live directory becomes app@1, and the undo brings app@2 back.
    let live = repo.mkdir("live");
    fill(&live, "one");
    write(live.join("small"), "changed");
    let s3 = repo.snapshot(&[&live], &["--name", "live"]);
    write(live.join("small"), "scribbled");
    repo.ok(args(&[&"restore", &id(&s3), &"--in-place", &"--yes"]));
    assert_eq!(std::fs::read(live.join("small")).unwrap(), b"changed");

    check_clean(&repo);

    // A second host: an empty cache builds its index from the bucket.
    let other = repo.other_host();
    assert_eq!(other.list(&[]).len(), repo.list(&[]).len());
    let to = other.scratch("other-r");
    other.restore("app@2", &to);
    assert_same_tree(&data, &to);
    check_clean(&other);

    // Forget and gc, then repair the index: what is left still restores exactly.
    repo.ok(["forget", "--name", "app", "--keep-last", "1"]);
    let gc = repo.ok(["gc"]);
    assert!(gc["unreachable_blobs"].as_u64().unwrap() > 0, "{gc}");
    repo.ok(["repair", "index"]);
    check_clean(&repo);
    let to = repo.scratch("after-gc");
    repo.restore("app@2", &to);
    assert_same_tree(&data, &to);
    let err = repo.run(["show", "app@1"]).code(1).error_line();
    assert!(err.contains("app@1"), "{err}");
}

#[test]
fn copies_go_from_a_directory_to_a_bucket_and_on_to_a_new_directory_unchanged() {
    let Some(garage) = Garage::single() else {
        return;
    };
    let local = Repo::new();
    let a = local.mkdir("a");
    fill(&a, "a");
    let b = local.mkdir("b");
    fill(&b, "b");
    local.snapshot(&[&a], &["--name", "a"]);
    local.snapshot(&[&b], &["--name", "b"]);
    write(a.join("small"), "a again");
    local.snapshot(&[&a], &["--name", "a"]);

    let bucket = Repo::remote(&garage.repo_url("copies"), garage.env());
    bucket.ok(["init"]);
    let local_path = local.path.to_str().unwrap();
    let copied = bucket.ok(["copy", "--from", local_path]);
    assert_eq!(copied["copied_count"].as_u64(), Some(3), "{copied}");
    // Again: nothing is sent.
    let again = bucket.ok(["copy", "--from", local_path]);
    assert_eq!(again["copied_count"].as_u64(), Some(0), "{again}");
    check_clean(&bucket);

    // From the bucket into a new directory repository, on a "host" that never saw it.
    let fresh = Repo::new();
    let mut cmd = fresh.command();
    cmd.envs(garage.env())
        .args(["--json", "copy", "--from", &garage.repo_url("copies")]);
    let out = Run::from_command(cmd).code(0).json();
    assert_eq!(out["copied_count"].as_u64(), Some(3), "{out}");
    for (series, dir) in [("a", &a), ("b", &b)] {
        let to = fresh.scratch(&format!("fresh-{series}"));
        fresh.restore(&format!("{series}@latest"), &to);
        assert_same_tree(dir, &to);
    }
    check_clean(&fresh);
}

/// A repository reached through a proxy that injects faults, with short retry bounds.
fn through(garage: &Garage, proxy: &FaultProxy, prefix: &str, retry_s: &str) -> Repo {
    let mut env = garage.env_via(&proxy.endpoint());
    env.push(("VOLSNAP_S3_RETRY_SECONDS".into(), retry_s.into()));
    env.push(("VOLSNAP_S3_TIMEOUT_SECONDS".into(), "3".into()));
    Repo::remote(&garage.repo_url(prefix), env)
}

#[test]
fn snapshots_through_resets_errors_stalls_and_cut_bodies_commit_and_restore_exactly() {
    let Some(garage) = Garage::single() else {
        return;
    };
    let proxy = FaultProxy::new(garage.s3_addr(0));
    let repo = through(&garage, &proxy, "flaky", "60");
    repo.ok(["init"]);
    let data = repo.mkdir("data");
    fill(&data, "flaky");
    proxy.add(Rule::every(5, Fault::ResetAfter(20)));
    proxy.add(Rule::every(7, Fault::Status(503)));
    proxy.add(Rule::every(11, Fault::Status(500)));
    proxy.add(Rule::every(13, Fault::Truncate).method("GET"));
    proxy.add(Rule::every(17, Fault::Drop));
    proxy.add(Rule::every(
        19,
        Fault::Stall(Until::For(std::time::Duration::from_secs(5))),
    ));
    let s1 = repo.snapshot(&[&data], &["--name", "flaky"]);
    let v1 = repo.scratch("v1");
    keep_copy(&data, &v1);
    write(data.join("small"), "flaky again");
    let s2 = repo.snapshot(&[&data], &["--name", "flaky"]);
    let faulted = proxy.faulted();
    assert!(
        faulted.len() >= 5,
        "only {} faults were injected",
        faulted.len()
    );
    // Reads through the same faults: every restore is exact, and check finds nothing.
    assert_all_restore(&repo, &[(id(&s1), &v1), (id(&s2), &data)], "flaky");
    check_clean(&repo);
    let kinds: std::collections::BTreeSet<String> = proxy
        .faulted()
        .iter()
        .map(|s| format!("{:?}", s.fault.as_ref().unwrap()))
        .map(|f| f.split('(').next().unwrap().to_string())
        .collect();
    for kind in ["ResetAfter", "Status", "Truncate", "Drop", "Stall"] {
        assert!(
            kinds.contains(kind),
            "no {kind} fault was injected: {kinds:?}"
        );
    }
}

#[test]
fn a_store_that_is_down_fails_in_one_line_and_leaves_no_snapshot() {
    let Some(garage) = Garage::single() else {
        return;
    };
    let proxy = FaultProxy::new(garage.s3_addr(0));
    let repo = through(&garage, &proxy, "down", "2");
    repo.ok(["init"]);
    let data = repo.mkdir("data");
    fill(&data, "down");
    let before = repo.snapshot(&[&data], &["--name", "d"]);
    write(data.join("new"), random_bytes("down new", 500_000));

    // Down for every request: one line, exit 1, no record.
    proxy.add(Rule::always(Fault::Status(503)));
    let line = repo
        .run(args(&[&"snapshot", &"--name", &"d", &data]))
        .code(1)
        .error_line();
    assert!(line.contains("s3://"), "{line}");
    // Down only for writes of packs: the upload fails, nothing is committed.
    proxy.clear();
    proxy.add(
        Rule::always(Fault::Drop)
            .method("PUT")
            .path_contains("/packs/"),
    );
    repo.run(args(&[&"snapshot", &"--name", &"d", &data]))
        .code(1)
        .error_line();
    // Down for the record's write, after every pack went up: still no snapshot.
    proxy.clear();
    proxy.add(
        Rule::always(Fault::Status(500))
            .method("PUT")
            .path_contains("/snapshots/"),
    );
    repo.run(args(&[&"snapshot", &"--name", &"d", &data]))
        .code(1)
        .error_line();
    proxy.clear();

    let listed = repo.list(&[]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(id(&listed[0]), id(&before));
    // What the failed runs uploaded is unreferenced, and gc removes it.
    let gc = repo.ok(["gc"]);
    assert!(
        gc["stale_files_removed"].as_u64().unwrap() + gc["unreachable_blobs"].as_u64().unwrap() > 0,
        "{gc}"
    );
    check_clean(&repo);
    let after = repo.snapshot(&[&data], &["--name", "d"]);
    let to = repo.scratch("after");
    repo.restore(&id(&after), &to);
    assert_same_tree(&data, &to);
}

#[test]
fn a_snapshot_killed_mid_upload_leaves_only_what_gc_removes() {
    let Some(garage) = Garage::single() else {
        return;
    };
    let repo = Repo::remote(&garage.repo_url("killed"), garage.env());
    repo.ok(["init"]);
    let data = repo.mkdir("data");
    fill(&data, "killed");
    let first = repo.snapshot(&[&data], &["--name", "k"]);
    write(data.join("more"), random_bytes("killed more", 20_000_000));
    for point in [
        "pack written",
        "pack committed",
        "pack indexed",
        "snapshot record written",
    ] {
        let mut cmd = repo.command();
        cmd.env("VOLSNAP_CRASH_AT", point)
            .args(args(&[&"snapshot", &"--name", &"k", &data]));
        let run = Run::from_command(cmd);
        assert_ne!(run.status, 0, "{point}: {}", run.describe());
    }
    // The record written before the kill is a committed snapshot; the others left
    // nothing listed.
    let listed = repo.list(&[]);
    assert!(
        listed.len() <= 2 && listed.iter().any(|s| id(s) == id(&first)),
        "{listed:?}"
    );
    repo.ok(["gc"]);
    check_clean(&repo);
    for s in repo.list(&[]) {
        let to = repo.scratch(&format!("k-{}", id(&s)));
        repo.restore(&id(&s), &to);
        if id(&s) != id(&first) {
            assert_same_tree(&data, &to);
        }
    }
}

/// A three-node Garage (`replication_factor = 3`, quorum 2): a node killed in the
/// middle of a snapshot and another in the middle of a gc. Each either commits or fails
/// with one line, and every listed snapshot restores exactly.
#[test]
fn a_node_of_three_killed_during_a_snapshot_and_a_gc_loses_nothing() {
    let Some(mut garage) = Garage::cluster3() else {
        return;
    };
    let repo = Repo::remote(&garage.repo_url("three"), garage.env());
    repo.ok(["init"]);
    let data = repo.mkdir("data");
    fill(&data, "three");
    let first = repo.snapshot(&[&data], &["--name", "t"]);
    let v1 = repo.scratch("v1");
    keep_copy(&data, &v1);
    write(data.join("more"), random_bytes("three more", 20_000_000));
    let mut expected: Vec<(String, std::path::PathBuf)> = vec![(id(&first), v1)];

    // Node 2 dies after the first pack of the snapshot is stored.
    let data_arg = data.to_str().unwrap();
    let held = repo.spawn_paused("pack committed", &["snapshot", "--name", "t", data_arg]);
    garage.kill_node(2);
    held.release();
    let run = held.finish();
    if run.status == 0 {
        expected.push((id(&run.json()), data.clone()));
    } else {
        run.error_line();
    }
    garage.restart_node(2);

    // Node 1 dies while a gc waits between its condemn and its sweep.
    repo.ok(args(&[&"forget", &id(&first)]));
    expected.remove(0);
    let held = repo.spawn_paused("gc condemned", &["gc"]);
    garage.kill_node(1);
    held.release();
    let run = held.finish();
    if run.status != 0 {
        run.error_line();
    }
    let expected: Vec<(String, &Path)> = expected
        .iter()
        .map(|(s, p)| (s.clone(), p.as_path()))
        .collect();
    assert_all_restore(&repo, &expected, "one-down");
    garage.restart_node(1);
    repo.ok(["gc"]);
    check_clean(&repo);
    assert_all_restore(&repo, &expected, "all-up");
}

/// Random files filling about `mib` MiB: several packs, so uploads and downloads
/// overlap.
fn fill_packs(dir: &Path, seed: &str, mib: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..mib {
        write(
            dir.join(format!("{seed}-{i}")),
            random_bytes(&format!("{seed} {i}"), 1 << 20),
        );
    }
}

#[test]
fn a_pack_upload_failing_behind_others_in_flight_indexes_nothing_it_lost() {
    // Packs go up several at a time: the second fails for good while later ones are in
    // flight or done. Nothing of what failed may be indexed (a later snapshot would
    // reuse blobs no pack holds), and nothing may be listed.
    let Some(garage) = Garage::single() else {
        return;
    };
    let proxy = FaultProxy::new(garage.s3_addr(0));
    let repo = through(&garage, &proxy, "inflight", "2");
    repo.ok(["init"]);
    let data = repo.mkdir("data");
    fill_packs(&data, "inflight", 48);
    proxy.add(
        Rule::every(2, Fault::Status(403))
            .method("PUT")
            .path_contains("/packs/"),
    );
    let line = repo
        .run(args(&[&"snapshot", &"--name", &"f", &data]))
        .code(1)
        .error_line();
    assert!(line.contains("s3://") && line.contains("/packs/"), "{line}");
    assert!(!proxy.faulted().is_empty());
    proxy.clear();
    assert!(repo.list(&[]).is_empty());
    // Every blob the failed run did not get into the store is stored by the next.
    let snap = repo.snapshot(&[&data], &["--name", "f"]);
    let to = repo.scratch("after");
    repo.restore(&id(&snap), &to);
    assert_same_tree(&data, &to);
    check_clean(&repo);
    // A second host, from the store alone, restores it too; gc keeps it whole.
    let gc = repo.ok(["gc"]);
    assert!(
        gc["stale_files_removed"].as_u64().unwrap() + gc["unreachable_blobs"].as_u64().unwrap() > 0,
        "{gc}"
    );
    check_clean(&repo);
    let other = Repo::remote(&garage.repo_url("inflight"), garage.env());
    let to = other.scratch("other");
    other.restore(&id(&snap), &to);
    assert_same_tree(&data, &to);
}

#[test]
fn a_restore_reading_packs_ahead_retries_what_fails_and_stops_on_what_is_gone() {
    let Some(garage) = Garage::single() else {
        return;
    };
    let proxy = FaultProxy::new(garage.s3_addr(0));
    let repo = through(&garage, &proxy, "ahead", "20");
    repo.ok(["init"]);
    let data = repo.mkdir("data");
    fill_packs(&data, "ahead", 48);
    std::fs::create_dir_all(data.join("sub")).unwrap();
    for i in 0..200 {
        write(data.join(format!("sub/{i}")), format!("ahead small {i}"));
    }
    let snap = repo.snapshot(&[&data], &["--name", "a"]);
    // Downloads of packs fail now and then (answers, resets, bodies cut short): the
    // restore, several downloads in flight, is still exact.
    proxy.add(
        Rule::every(3, Fault::Status(503))
            .method("GET")
            .path_contains("/packs/"),
    );
    proxy.add(
        Rule::every(4, Fault::Truncate)
            .method("GET")
            .path_contains("/packs/"),
    );
    proxy.add(
        Rule::every(5, Fault::ResetAfter(1000))
            .method("GET")
            .path_contains("/packs/"),
    );
    let to = repo.scratch("flaky");
    repo.restore(&id(&snap), &to);
    assert_same_tree(&data, &to);
    assert!(proxy.faulted().len() >= 3, "{:#?}", proxy.faulted());
    // Every pack refused for good: one line naming a pack, and no read-ahead thread
    // left waiting (the command ends).
    proxy.clear();
    proxy.add(
        Rule::always(Fault::Status(403))
            .method("GET")
            .path_contains("/packs/"),
    );
    let to = repo.scratch("refused");
    let line = repo
        .run(args(&[&"restore", &id(&snap), &"--to", &to]))
        .code(1)
        .error_line();
    assert!(line.contains("/packs/"), "{line}");
    proxy.clear();
}

#[test]
fn endpoint_region_and_credentials_come_from_an_aws_profile() {
    let Some(garage) = Garage::single() else {
        return;
    };
    let var = |name: &str| {
        garage
            .env()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .unwrap()
    };
    let files = tempfile::tempdir().unwrap();
    let credentials = files.path().join("credentials");
    let config = files.path().join("config");
    write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = GKnotthisone\naws_secret_access_key = wrong\n\n\
             # the profile in use\n[backups]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY")
        ),
    );
    write(
        &config,
        format!(
            "[default]\nregion = {0}\nendpoint_url = {1}\n\n\
             [profile backups]\nregion = {0}\nendpoint_url = {1}\n",
            var("AWS_REGION"),
            var("AWS_ENDPOINT_URL")
        ),
    );
    // Only the files and the profile's name: no AWS_* credential or endpoint variable.
    let env = |profile: &str| {
        vec![
            ("AWS_PROFILE".to_string(), profile.to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE".to_string(),
                credentials.to_str().unwrap().to_string(),
            ),
            (
                "AWS_CONFIG_FILE".to_string(),
                config.to_str().unwrap().to_string(),
            ),
        ]
    };
    let repo = Repo::remote(&garage.repo_url("profile"), env("backups"));
    repo.ok(["init"]);
    let data = repo.mkdir("data");
    fill(&data, "profile");
    let snap = repo.snapshot(&[&data], &["--name", "p"]);
    let to = repo.scratch("restored");
    repo.restore(&id(&snap), &to);
    assert_same_tree(&data, &to);
    // Another profile, with keys the store refuses: one line.
    let wrong = Repo::remote(&garage.repo_url("profile"), env("default"));
    let line = wrong.run(["list"]).code(1).error_line();
    assert!(line.contains("s3://"), "{line}");
    // A profile that is not in the files: no credentials at all.
    let none = Repo::remote(&garage.repo_url("profile"), env("absent"));
    let line = none.run(["list"]).code(1).error_line();
    assert!(line.contains("AWS_ACCESS_KEY_ID"), "{line}");
}
