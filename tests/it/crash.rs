//! Crash safety of the snapshot write path: the process is aborted at every crash
//! point in turn (`VOLSNAP_CRASH_AT=N`), then the repository must hold only whole
//! snapshots that restore byte-identically, unique versions, and a clean check.

use std::collections::BTreeSet;

use crate::support::*;

/// The snapshot write path of ARCHITECTURE.md ("Durability and crash safety"), one
/// crash point per step, in the order a snapshot of one data pack reaches them.
const WRITE_PATH: [&str; 10] = [
    // 1-3 for the data pack, then for the tree pack.
    "pack written",
    "pack committed",
    "pack indexed",
    "pack written",
    "pack committed",
    "pack indexed",
    // 4, 5 (the commit point), 6, 7.
    "snapshot version reserved",
    "snapshot record written",
    "snapshot record indexed",
    "files cache rows written",
];

#[test]
fn a_snapshot_aborted_at_every_step_leaves_a_sound_repository() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    for i in 0..40 {
        write(
            data.join(format!("f{i}")),
            random_bytes(&format!("f{i}"), 600_000),
        );
    }
    // Old enough for the files cache: the base snapshot caches every file, and each
    // run below changes the cached set (one file fewer), so each has cache rows to write.
    wait_out_racy_window(&data);
    let base = repo.snapshot(&[&data], &["--name", "s"]);
    assert_eq!(stat_u64(&base, "bytes_read"), 40 * 600_000, "{base}");
    let again = repo.snapshot(&[&data], &["--name", "s"]);
    assert_eq!(
        stat_u64(&again, "bytes_read"),
        0,
        "the files cache was not trusted: {again}"
    );
    let expected = repo.scratch("expected");
    repo.restore(&id(&base), &expected);

    let mut seen = Vec::new();
    let mut n = 1;
    loop {
        write(
            data.join("changing"),
            random_bytes(&format!("round {n}"), 3_000_000),
        );
        std::fs::remove_file(data.join(format!("f{n}"))).unwrap();
        let before: BTreeSet<String> = repo.list(&["--name", "s"]).iter().map(id).collect();
        let crashed = repo.run_crashing_at(n, &["snapshot", data.to_str().unwrap(), "--name", "s"]);
        // Invariants after every abort.
        let listed = repo.list(&["--name", "s"]);
        let versions: BTreeSet<u64> = listed
            .iter()
            .map(|s| s["version"].as_u64().unwrap())
            .collect();
        assert_eq!(
            versions.len(),
            listed.len(),
            "a version was handed out twice: {listed:?}"
        );
        let check = repo.ok(["check", "--read-data"]);
        assert_eq!(check["ok"], true, "after crash point {n}: {check}");
        let out = repo.scratch(&format!("base-after-{n}"));
        repo.restore(&id(&base), &out);
        assert_same_tree(&expected, &out);
        // The snapshot exists exactly when the run got past the commit point, and
        // then holds what the data held (unchanged since the run started).
        let new: Vec<&serde_json::Value> =
            listed.iter().filter(|s| !before.contains(&id(s))).collect();
        let committed = match crashed.as_deref() {
            None => true,
            Some(p) => {
                let at = WRITE_PATH.iter().position(|s| *s == p);
                let commit = WRITE_PATH
                    .iter()
                    .position(|s| *s == "snapshot record written");
                at >= commit
            }
        };
        assert_eq!(
            new.len(),
            usize::from(committed),
            "after {crashed:?}: new snapshots {new:?}"
        );
        if let Some(s) = new.first() {
            assert!(
                s["version"].as_u64() > listed[0]["version"].as_u64(),
                "{listed:?}"
            );
            let out = repo.scratch(&format!("new-{n}"));
            repo.restore(&id(s), &out);
            assert_same_tree(&data, &out);
        }
        match crashed {
            Some(point) => seen.push(point),
            None => break,
        }
        n += 1;
        assert!(n < 50, "the snapshot never completed");
    }
    assert_eq!(seen, WRITE_PATH, "the crash points the snapshot reached");
    // A crash after the version was reserved leaves gaps, never a reuse: every run
    // from "snapshot version reserved" on took a version.
    let versions: Vec<u64> = repo
        .list(&["--name", "s"])
        .iter()
        .map(|s| s["version"].as_u64().unwrap())
        .collect();
    assert_eq!(
        versions,
        [1, 2, 4, 5, 6, 7],
        "versions after the aborted runs"
    );
}
