//! Claims of the README and ARCHITECTURE.md that no other test checked: one filesystem
//! per volume, two snapshots of one series at once, retention across series with the
//! calendar rules, `check --read-data=PERCENT`, and records of version 1.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use volsnap::calendar::days_from_civil;
use volsnap::id::Id;
use volsnap::snapshot::record::Snapshot;

use crate::support::*;

/// The record file of snapshot `id`.
fn record_path(repo: &Repo, id: &str) -> PathBuf {
    repo.path.join("snapshots").join(id)
}

/// Replaces the record of `id` by one `edit` changed (written under its new name, the
/// old file removed, as if it had always been so); returns the new id.
fn rewrite_record(repo: &Repo, id: &str, edit: impl FnOnce(&mut Snapshot)) -> String {
    let path = record_path(repo, id);
    let mut snap = Snapshot::decode(&fs::read(&path).unwrap()).unwrap();
    edit(&mut snap);
    let bytes = snap.encode();
    let new = Id::of(&bytes).hex();
    fs::write(record_path(repo, &new), &bytes).unwrap();
    fs::remove_file(&path).unwrap();
    new
}

/// Year, month, day, hour (UTC).
type UtcHour = (i64, u32, u32, i64);

fn utc_ns(y: i64, m: u32, d: u32, hour: i64) -> i64 {
    (days_from_civil(y, m, d) * 86_400 + hour * 3600) * 1_000_000_000
}

#[test]
fn a_volume_is_one_filesystem_unless_cross_filesystems_is_given() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("outer.txt"), "on the volume's filesystem\n");
    let mnt = Tmpfs::mount(&data.join("mnt"), "8m");
    write(mnt.0.join("inner.txt"), "on another filesystem\n");
    write(mnt.0.join("sub/deeper.txt"), "deeper\n");

    let one = repo.snapshot(&[&data], &["--name", "one"]);
    let notes = one["notes"].to_string();
    assert!(
        notes.contains("another filesystem is mounted here"),
        "the skipped mount is not noted: {one}"
    );
    let listed = repo.ls(&id(&one), &["-r"]);
    assert!(listed.contains_key("mnt"), "{listed:?}");
    assert!(listed.contains_key("outer.txt"), "{listed:?}");
    assert!(
        !listed.keys().any(|p| p.starts_with("mnt/")),
        "the other filesystem was read: {listed:?}"
    );
    let out = repo.scratch("one");
    repo.restore(&id(&one), &out);
    assert_eq!(
        fs::read_to_string(out.join("outer.txt")).unwrap(),
        "on the volume's filesystem\n"
    );
    assert!(out.join("mnt").is_dir());
    assert_eq!(fs::read_dir(out.join("mnt")).unwrap().count(), 0);

    let all = repo.snapshot(&[&data], &["--name", "all", "--cross-filesystems"]);
    assert!(
        !all["notes"].to_string().contains("another filesystem"),
        "{all}"
    );
    let out = repo.scratch("all");
    repo.restore(&id(&all), &out);
    assert_same_tree(&data, &out);
    assert_eq!(
        fs::read_to_string(out.join("mnt/sub/deeper.txt")).unwrap(),
        "deeper\n"
    );
}

#[test]
fn two_snapshots_of_one_series_at_once_get_distinct_versions_and_both_restore() {
    let repo = Repo::new();
    let first = repo.mkdir("first");
    let second = repo.mkdir("second");
    write(first.join("f"), random_bytes("first", 500_000));
    write(second.join("f"), random_bytes("second", 500_000));
    let base = repo.snapshot(&[&first], &["--name", "s"]);
    write(first.join("g"), "added\n");
    // Both are held after storing their data, just before the commit, then let go
    // together.
    let a = repo.spawn_paused(
        "snapshot before commit",
        &["snapshot", first.to_str().unwrap(), "--name", "s"],
    );
    let b = repo.spawn_paused(
        "snapshot before commit",
        &["snapshot", second.to_str().unwrap(), "--name", "s"],
    );
    a.release();
    b.release();
    let a = a.finish().code(0).json();
    let b = b.finish().code(0).json();
    let mut versions = vec![
        a["version"].as_u64().unwrap(),
        b["version"].as_u64().unwrap(),
    ];
    versions.sort();
    assert_eq!(versions, [2, 3], "{a}\n{b}");
    // Each started from the same latest snapshot.
    assert_eq!(a["parent"], base["id"]);
    assert_eq!(b["parent"], base["id"]);
    let listed: Vec<String> = repo.list(&["--name", "s"]).iter().map(id).collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    for (snap, data) in [(&a, &first), (&b, &second)] {
        assert!(listed.contains(&id(snap)));
        let out = repo.scratch(&format!("r-{}", &id(snap)[..8]));
        repo.restore(&id(snap), &out);
        assert_same_tree(data, &out);
    }
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
}

/// `forget` output: series → versions, for `kept` or `removed`.
fn by_series(out: &Value, side: &str) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for d in out[side].as_array().unwrap() {
        m.entry(d["series"].as_str().unwrap().to_owned())
            .or_default()
            .push(d["version"].as_u64().unwrap());
    }
    for v in m.values_mut() {
        v.sort();
    }
    m
}

#[test]
fn retention_applies_the_calendar_rules_to_each_series_end_to_end() {
    let repo = Repo::new();
    // Series a and b, each snapshot at a chosen UTC time (records rewritten).
    let plan: [(&str, &[UtcHour]); 2] = [
        (
            "a",
            &[
                (2026, 1, 5, 10),
                (2026, 1, 5, 12),
                (2026, 1, 6, 9),
                (2026, 1, 12, 9),
                (2026, 2, 2, 9),
                (2026, 3, 1, 9),
                (2026, 3, 1, 18),
            ],
        ),
        (
            "b",
            &[
                (2025, 12, 31, 23),
                (2026, 1, 1, 1),
                (2026, 6, 15, 9),
                (2026, 6, 16, 9),
            ],
        ),
    ];
    let mut content: BTreeMap<(String, u64), PathBuf> = BTreeMap::new();
    for (series, times) in plan {
        let data = repo.mkdir(&format!("data-{series}"));
        for (n, &(y, m, d, h)) in times.iter().enumerate() {
            write(data.join("v"), format!("{series} {n}\n"));
            let snap = repo.snapshot(&[&data], &["--name", series]);
            let version = snap["version"].as_u64().unwrap();
            rewrite_record(&repo, &id(&snap), |s| {
                s.time_ns = utc_ns(y, m, d, h);
                s.parent = None;
            });
            let copy = repo.scratch(&format!("copy-{series}-{version}"));
            fs::create_dir_all(&copy).unwrap();
            write(copy.join("v"), format!("{series} {n}\n"));
            content.insert((series.to_owned(), version), copy);
        }
    }
    let policy = [
        "forget",
        "--keep-daily",
        "2",
        "--keep-weekly",
        "3",
        "--keep-monthly",
        "2",
    ];
    let mut dry = policy.to_vec();
    dry.push("--dry-run");
    let planned = repo.ok(&dry);
    // a: newest of 2026-03-01 (day, ISO week 9, month), 2026-02-02 (day, week 6,
    // month), 2026-01-12 (week 3). b: 2026-06-16 (day, week 25, month), 2026-06-15
    // (day), 2026-01-01 (ISO week 1 of 2026 and month 2026-01); 2025-12-31 shares that
    // ISO week and is the third month.
    let kept = BTreeMap::from([
        ("a".to_owned(), vec![4, 5, 7]),
        ("b".to_owned(), vec![2, 3, 4]),
    ]);
    let removed = BTreeMap::from([
        ("a".to_owned(), vec![1, 2, 3, 6]),
        ("b".to_owned(), vec![1]),
    ]);
    assert_eq!(by_series(&planned, "kept"), kept, "{planned}");
    assert_eq!(by_series(&planned, "removed"), removed, "{planned}");
    assert_eq!(repo.list(&[]).len(), 11, "a dry run removed something");
    // The reasons name the rules.
    let reasons = planned["kept"].to_string();
    for rule in ["daily", "weekly", "monthly"] {
        assert!(reasons.contains(rule), "{planned}");
    }

    let done = repo.ok(policy);
    assert_eq!(by_series(&done, "kept"), kept, "{done}");
    let now: BTreeMap<String, Vec<u64>> = {
        let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for s in repo.list(&[]) {
            m.entry(s["series"].as_str().unwrap().to_owned())
                .or_default()
                .push(s["version"].as_u64().unwrap());
        }
        m
    };
    assert_eq!(now, kept);
    repo.ok(["gc"]);
    for (series, versions) in &kept {
        for v in versions {
            let out = repo.scratch(&format!("restored-{series}-{v}"));
            repo.restore(&format!("{series}@{v}"), &out);
            assert_eq!(
                fs::read(out.join("v")).unwrap(),
                fs::read(content[&(series.clone(), *v)].join("v")).unwrap()
            );
        }
    }
    // Limited to one series, the same rules leave the other alone.
    let only_b = repo.ok(["forget", "--keep-last", "1", "--name", "b"]);
    assert_eq!(
        by_series(&only_b, "removed"),
        BTreeMap::from([("b".to_owned(), vec![2, 3])])
    );
    assert_eq!(repo.list(&["--name", "a"]).len(), 3);
}

/// Every pack file of the repository.
fn pack_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in fs::read_dir(repo.join("packs")).unwrap() {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out
}

#[test]
fn check_read_data_percent_reads_that_share_of_the_packs() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    for i in 0..6 {
        write(
            data.join(format!("f{i}")),
            random_bytes(&format!("f{i}"), 9_000_000),
        );
    }
    repo.snapshot(&[&data], &[]);
    let packs = pack_files(&repo.path).len() as u64;
    assert!(packs >= 6, "{packs} packs");
    let none = repo.ok(["check"]);
    assert_eq!(none["packs_read"], 0, "{none}");
    for arg in ["--read-data", "--read-data=100"] {
        let all = repo.ok(["check", arg]);
        assert_eq!(all["packs"].as_u64(), Some(packs), "{all}");
        assert_eq!(all["packs_read"].as_u64(), Some(packs), "{arg}: {all}");
    }
    // A share: each pack is drawn afresh per run, so runs differ; 1% reads few.
    let mut total = 0;
    for _ in 0..10 {
        let some = repo.ok(["check", "--read-data=50"]);
        let read = some["packs_read"].as_u64().unwrap();
        assert!(read <= packs, "{some}");
        total += read;
    }
    assert!(
        total > 0 && total < 10 * packs,
        "ten runs at 50% read {total} of {} packs",
        10 * packs
    );
    let few = repo.ok(["check", "--read-data=1"]);
    assert!(few["packs_read"].as_u64().unwrap() < packs, "{few}");
    // Out of range: a usage error.
    for bad in ["--read-data=0", "--read-data=101", "--read-data=x"] {
        repo.run(["check", bad]).code(2);
    }
    // Damage in a pack is found by a full read, not by the plain check.
    let victim = pack_files(&repo.path)
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&victim, bytes).unwrap();
    assert_eq!(repo.ok(["check"])["ok"], true);
    let found = repo.run_json(["check", "--read-data=100"]).code(1).json();
    assert_eq!(found["ok"], false, "{found}");
}

#[test]
fn a_record_of_version_1_is_listed_restored_checked_and_continued() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("a.txt"), "written by an older volsnap\n");
    write(data.join("b.bin"), random_bytes("b", 300_000));
    set_tree_mtimes(&data, Y2020);
    let snap = repo.snapshot(&[&data], &["--name", "old"]);
    // Version 1 is version 2 without the containers (the last field): postcard writes
    // an empty list as one zero byte at the end.
    let v2 = fs::read(record_path(&repo, &id(&snap))).unwrap();
    assert_eq!(&v2[8..12], &2u32.to_le_bytes(), "not a version 2 record");
    assert_eq!(v2.last(), Some(&0), "a record with containers");
    let mut v1 = v2[..v2.len() - 1].to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    let v1_id = Id::of(&v1).hex();
    fs::write(record_path(&repo, &v1_id), &v1).unwrap();
    fs::remove_file(record_path(&repo, &id(&snap))).unwrap();

    let listed = repo.list(&[]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(id(&listed[0]), v1_id);
    assert_eq!(listed[0]["series"], "old");
    assert_eq!(listed[0]["version"], 1);
    let shown = repo.ok(["show", &v1_id]);
    assert_eq!(shown["containers"], serde_json::json!([]), "{shown}");
    let out = repo.scratch("restored");
    repo.restore(&v1_id, &out);
    assert_same_tree(&data, &out);
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    // The next snapshot of the series follows it.
    write(data.join("a.txt"), "written by this one\n");
    let next = repo.snapshot(&[&data], &["--name", "old"]);
    assert_eq!(next["version"], 2, "{next}");
    assert_eq!(next["parent"].as_str(), Some(v1_id.as_str()), "{next}");
    let diff = repo.ok(["diff", &v1_id, &id(&next)]);
    assert!(diff.to_string().contains("a.txt"), "{diff}");
    // The record file is read as it is, never rewritten.
    assert_eq!(fs::read(record_path(&repo, &v1_id)).unwrap(), v1);
    let forgot = repo.ok(["forget", "--keep-last", "1"]);
    assert_eq!(forgot["removed"][0]["id"].as_str(), Some(v1_id.as_str()));
}
