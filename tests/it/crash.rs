//! Crash safety of the snapshot write path: the process is aborted at every crash
//! point in turn (`VOLSNAP_CRASH_AT=N`), then the repository must hold only whole
//! snapshots that restore byte-identically, unique versions, and a clean check.

use std::collections::BTreeSet;

use crate::support::*;

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
    let base = repo.snapshot(&[&data], &["--name", "s"]);
    let expected = repo.scratch("expected");
    repo.restore(&id(&base), &expected);

    let mut n = 1;
    loop {
        write(
            data.join("changing"),
            random_bytes(&format!("round {n}"), 3_000_000),
        );
        let crashed = repo
            .run_crashing_at(n, &["snapshot", data.to_str().unwrap(), "--name", "s"])
            .is_some();
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
        if !crashed {
            let last = listed.last().unwrap();
            let out = repo.scratch(&format!("last-{n}"));
            repo.restore(&id(last), &out);
            assert_same_tree(&data, &out);
            break;
        }
        n += 1;
        assert!(n < 50, "the snapshot never completed");
    }
    assert!(n >= 3, "expected several crash points, got {n}");
}
