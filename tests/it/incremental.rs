//! Incremental snapshots: every change is seen, nothing unchanged is re-read.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::support::*;

/// Lets the times of everything under `dir` fall more than one second before the
/// next snapshot's start, so that they are not "racily clean".
fn let_ctimes_settle(dir: &Path) {
    wait_out_racy_window(dir);
}

fn modified_map(diff: &Value) -> BTreeMap<String, Vec<String>> {
    diff["modified"]
        .as_array()
        .unwrap_or_else(|| panic!("diff without modified: {diff}"))
        .iter()
        .map(|m| {
            let changes = m["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect();
            (m["path"].as_str().unwrap().to_owned(), changes)
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

#[test]
fn incremental_snapshot_sees_every_change_and_reads_only_those() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(
        data.join("same-size"),
        random_bytes("same-size v1", 100_000),
    );
    write(data.join("grows"), random_bytes("grows", 50_000));
    write(data.join("replaced"), random_bytes("replaced v1", 70_000));
    write(
        data.join("sub/deep/nested"),
        random_bytes("nested v1", 30_000),
    );
    write(data.join("deleted"), "soon gone");
    write(
        data.join("unchanged-big"),
        random_bytes("unchanged", 2 << 20),
    );
    let mut total = 100_000 + 50_000 + 70_000 + 30_000 + 9 + (2 << 20);
    for i in 0..200 {
        let len = 1000 + i;
        write(
            data.join(format!("small/f{i:03}")),
            random_bytes(&format!("small {i}"), len),
        );
        total += len;
    }
    set_tree_mtimes(&data, Y2020);
    let_ctimes_settle(&data);

    let s1 = repo.snapshot(&[&data], &["--name", "inc"]);
    assert_eq!(s1["version"], 1);
    assert_eq!(s1["parent"], Value::Null);
    assert_eq!(
        stat_u64(&s1, "bytes_read"),
        total as u64,
        "first snapshot reads everything: {s1}"
    );
    assert_eq!(stat_u64(&s1, "bytes"), total as u64);

    // Nothing changed: nothing read, (almost) nothing stored.
    let s2 = repo.snapshot(&[&data], &["--name", "inc"]);
    assert_eq!(s2["version"], 2);
    assert_eq!(s2["parent"], s1["id"]);
    assert_eq!(
        stat_u64(&s2, "bytes_read"),
        0,
        "unchanged snapshot re-read files: {s2}"
    );
    assert!(
        stat_u64(&s2, "new_bytes_stored") < 64 * 1024,
        "unchanged snapshot stored data: {s2}"
    );
    assert_eq!(s2["volumes"][0]["tree"], s1["volumes"][0]["tree"]);

    // --skip-if-unchanged records nothing.
    let s3 = repo.snapshot(&[&data], &["--name", "inc", "--skip-if-unchanged"]);
    assert_eq!(s3["skipped"], true, "{s3}");
    assert_eq!(
        s3["id"], s2["id"],
        "skipped snapshot should print the latest one: {s3}"
    );
    assert_eq!(repo.list(&["--name", "inc"]).len(), 2);

    // Changes, one of them visible only through ctime.
    let old_same_size = fs::read(data.join("same-size")).unwrap();
    let (sec, nsec) = mtime_of(&data.join("same-size"));
    fs::write(
        data.join("same-size"),
        random_bytes("same-size v2", 100_000),
    )
    .unwrap();
    set_mtime(&data.join("same-size"), sec, nsec);

    let mut grown = fs::read(data.join("grows")).unwrap();
    grown.extend_from_slice(&random_bytes("grows tail", 10_000));
    fs::write(data.join("grows"), &grown).unwrap();

    // A new inode with the same size and mtime.
    let (sec, nsec) = mtime_of(&data.join("replaced"));
    write(
        repo.scratch("replacement"),
        random_bytes("replaced v2", 70_000),
    );
    fs::rename(repo.scratch("replacement"), data.join("replaced")).unwrap();
    set_mtime(&data.join("replaced"), sec, nsec);

    fs::write(
        data.join("sub/deep/nested"),
        random_bytes("nested v2", 31_000),
    )
    .unwrap();
    fs::remove_file(data.join("deleted")).unwrap();
    fs::write(data.join("added"), random_bytes("added", 12_345)).unwrap();
    let expected_read = 100_000 + 60_000 + 70_000 + 31_000 + 12_345;

    let s4 = repo.snapshot(&[&data], &["--name", "inc", "--skip-if-unchanged"]);
    assert_eq!(s4["skipped"], false, "{s4}");
    assert_eq!(s4["parent"], s2["id"]);
    assert_eq!(s4["version"], 3);
    assert_eq!(
        stat_u64(&s4, "bytes_read"),
        expected_read,
        "bytes_read should be exactly the sizes of the changed files: {s4}"
    );

    let diff = repo.ok(["diff", &id(&s2), &id(&s4)]);
    assert_eq!(strings(&diff["added"]), ["added"], "{diff}");
    assert_eq!(strings(&diff["removed"]), ["deleted"], "{diff}");
    let modified = modified_map(&diff);
    for p in ["same-size", "grows", "replaced", "sub/deep/nested"] {
        let changes = modified
            .get(p)
            .unwrap_or_else(|| panic!("{p} not reported as modified: {diff}"));
        assert!(
            changes.iter().any(|c| c == "content"),
            "{p} changes {changes:?}"
        );
    }
    for (p, changes) in &modified {
        let expected = ["same-size", "grows", "replaced", "sub/deep/nested"].contains(&p.as_str());
        assert!(
            expected || changes == &["mtime"],
            "{p} reported as modified ({changes:?}) but only its directory mtime could have changed"
        );
        assert!(
            !p.starts_with("small") || p == "small",
            "unchanged {p} reported as modified"
        );
        assert_ne!(p, "unchanged-big");
    }

    let restored = repo.scratch("restored-new");
    repo.restore("inc@latest", &restored);
    assert_same_tree(&data, &restored);

    let old = repo.scratch("restored-old");
    repo.restore("inc@1", &old);
    assert_eq!(fs::read(old.join("same-size")).unwrap(), old_same_size);
    assert_eq!(fs::read(old.join("deleted")).unwrap(), b"soon gone");
    assert!(!old.join("added").exists());
}

#[test]
fn change_right_after_a_snapshot_is_not_missed() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let names: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
    let content = |round: usize, name: &str| random_bytes(&format!("{round} {name}"), 4096);
    for n in &names {
        write(data.join(n), content(0, n));
    }
    // Never changed: the files cache must be trusted for them.
    write(data.join("still"), random_bytes("still", 300_000));

    let mut snaps = Vec::new();
    for round in 0..4 {
        // Even rounds: every file is older than the racily-clean window, so the
        // snapshot caches them all, and the next one can tell the changed files only
        // by their ctime, while it trusts the cache for the unchanged one. Odd rounds:
        // the snapshot comes right after the change (racily clean: read again).
        if round % 2 == 0 {
            wait_out_racy_window(&data);
        }
        let snap = repo.snapshot(&[&data], &["--name", "tick"]);
        let read = stat_u64(&snap, "bytes_read");
        let changed = 20 * 4096;
        if round == 0 {
            assert_eq!(read, changed + 300_000, "round {round}: {snap}");
        } else {
            // "still" is not read (the cache is trusted for it). In odd rounds the
            // changed files were cached by the previous snapshot: their ctime alone
            // tells them changed (size and mtime are the same).
            assert_eq!(read, changed, "round {round}: {snap}");
        }
        snaps.push(snap);
        // Same size, mtime put back: only ctime (if the clock ticked) and the
        // racily-clean rule can tell.
        for n in &names {
            let p = data.join(n);
            let (sec, nsec) = mtime_of(&p);
            fs::write(&p, content(round + 1, n)).unwrap();
            set_mtime(&p, sec, nsec);
        }
    }
    snaps.push(repo.snapshot(&[&data], &["--name", "tick"]));

    for (round, snap) in snaps.iter().enumerate() {
        let to = repo.scratch(&format!("round-{round}"));
        repo.restore(&id(snap), &to);
        for n in &names {
            assert!(
                fs::read(to.join(n)).unwrap() == content(round, n),
                "snapshot {round} has stale content for {n}"
            );
        }
    }
    for pair in snaps.windows(2) {
        let diff = repo.ok(["diff", &id(&pair[0]), &id(&pair[1])]);
        let modified = modified_map(&diff);
        for n in &names {
            assert!(
                modified
                    .get(n)
                    .is_some_and(|c| c.iter().any(|c| c == "content")),
                "{n} not reported as modified: {diff}"
            );
        }
        assert!(!modified.contains_key("still"), "{diff}");
    }
}

#[test]
fn racily_clean_files_are_read_again() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("old"), random_bytes("old", 40_000));
    set_tree_mtimes(&data, Y2020);
    let_ctimes_settle(&data);
    // Written just before the snapshot: its times are within the timestamp
    // window of the snapshot's start, so a later change in the same tick
    // could leave them unchanged. The next snapshot must not trust them.
    write(data.join("fresh"), random_bytes("fresh", 30_000));

    let s1 = repo.snapshot(&[&data], &["--name", "racy"]);
    assert_eq!(stat_u64(&s1, "bytes_read"), 70_000, "{s1}");
    let s2 = repo.snapshot(&[&data], &["--name", "racy"]);
    assert_eq!(
        stat_u64(&s2, "bytes_read"),
        30_000,
        "a racily clean file must be read again: {s2}"
    );

    let_ctimes_settle(&data);
    repo.snapshot(&[&data], &["--name", "racy"]);
    let s4 = repo.snapshot(&[&data], &["--name", "racy"]);
    assert_eq!(
        stat_u64(&s4, "bytes_read"),
        0,
        "once settled nothing is read: {s4}"
    );
}
