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

/// A copy of `pristine`'s repository with `flips` random bits of `index.redb` flipped.
fn copy_with_damaged_index(pristine: &Repo, rng: &mut XorShift, flips: usize) -> Repo {
    let repo = Repo::uninit();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&pristine.path)
        .arg(&repo.path)
        .status()
        .unwrap();
    assert!(status.success());
    let index = repo.path.join("index.redb");
    let mut bytes = fs::read(&index).unwrap();
    for _ in 0..flips {
        let at = (rng.next() % bytes.len() as u64) as usize;
        bytes[at] ^= 1 << (rng.next() % 8);
    }
    fs::write(&index, bytes).unwrap();
    repo
}

#[test]
fn a_corrupted_index_file_is_one_error_line_naming_repair_never_a_panic() {
    let pristine = Repo::new();
    let (a, sa, _, sb) = two_snapshots(&pristine);
    let mut damaged_seen = 0;
    for seed in 1..=24u64 {
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let repo = copy_with_damaged_index(&pristine, &mut rng, 20);

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

#[test]
fn gc_reads_a_pack_before_deleting_it_and_keeps_what_snapshots_reference() {
    let repo = Repo::new();
    let (a, sa, b, sb) = two_snapshots(&repo);
    // A pack set aside while the index is rebuilt, then put back: no row names it.
    let victim = pack_files(&repo.path)
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let aside = repo.scratch("aside.pack");
    fs::rename(&victim, &aside).unwrap();
    repo.ok(["repair", "index"]);
    fs::rename(&aside, &victim).unwrap();

    let report = repo.ok(["gc"]);
    assert!(
        victim.exists(),
        "gc deleted a pack snapshots need: {report}"
    );
    assert!(report["blobs_reindexed"].as_u64().unwrap() > 0, "{report}");
    repo.ok(["check", "--read-data"]);
    assert_restores(&repo, &sa, &a, "ra");
    assert_restores(&repo, &sb, &b, "rb");
    // Kept for good: the next gc finds it indexed and live.
    repo.ok(["gc"]);
    assert!(victim.exists());
}

#[test]
fn gc_keeps_packs_whose_index_rows_were_damaged() {
    // Damaged chunk rows can make a pack look empty; the pack is read first.
    let pristine = Repo::new();
    let (a, sa, b, sb) = two_snapshots(&pristine);
    let mut rng = XorShift(7);
    for round in 0..12 {
        let repo = copy_with_damaged_index(&pristine, &mut rng, 40);
        // gc may refuse, or repack what it finds live; it must lose nothing.
        let _ = repo.run(["gc"]);
        let _ = repo.run(["gc", "--max-unused", "0"]);
        repo.run(["repair", "index"]).code(0);
        repo.run(["check", "--read-data"]).code(0);
        assert_restores(&repo, &sa, &a, &format!("ra-{round}"));
        assert_restores(&repo, &sb, &b, &format!("rb-{round}"));
    }
}

#[test]
fn pack_names_never_repeat_so_gc_cannot_delete_a_recreated_pack() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), random_bytes("same", 1 << 20));
    let first = repo.snapshot(&[&data], &["--name", "s"]);
    let before = pack_files(&repo.path);
    repo.ok(["forget", &id(&first)]);
    repo.ok(["gc"]);
    assert!(pack_files(&repo.path).is_empty());
    // The same content again, in a new series: same blobs, same order.
    let second = repo.snapshot(&[&data], &["--name", "t"]);
    let after = pack_files(&repo.path);
    assert_eq!(after.len(), before.len());
    for p in &after {
        assert!(!before.contains(p), "pack name {} came back", p.display());
    }
    assert_restores(&repo, &second, &data, "r");
}

#[test]
fn repair_index_is_exclusive_and_replaces_the_index_in_one_step() {
    let repo = Repo::new();
    let (a, sa, _, _) = two_snapshots(&repo);
    let index = repo.path.join("index.redb");

    // A process with the repository open keeps repair out.
    let paused = repo.spawn_paused(
        "snapshot before commit",
        &["snapshot", a.to_str().unwrap(), "--name", "a"],
    );
    let run = repo.run(["repair", "index"]).code(11);
    assert!(run.error_line().contains("open"), "{}", run.describe());
    paused.finish().code(0);

    // While repair runs, every other command waits its turn (exit 11), the index is
    // untouched until the new one is whole.
    let before = fs::read(&index).unwrap();
    let paused = repo.spawn_paused("repair index built", &["repair", "index"]);
    assert_eq!(
        fs::read(&index).unwrap(),
        before,
        "repair changed the index early"
    );
    for args in [
        vec!["list"],
        vec!["gc"],
        vec!["snapshot", a.to_str().unwrap()],
    ] {
        let run = repo.run(&args).code(11);
        assert!(
            run.error_line().contains("repair index"),
            "{}",
            run.describe()
        );
    }
    paused.finish().code(0);

    // Interrupted at the end, it leaves the old index as it was.
    let before = fs::read(&index).unwrap();
    assert!(
        repo.run_crashing_at("repair index built", &["repair", "index"])
            .is_some()
    );
    assert_eq!(fs::read(&index).unwrap(), before);
    let packs = pack_files(&repo.path);
    repo.ok(["gc"]);
    assert_eq!(pack_files(&repo.path), packs);
    repo.ok(["check", "--read-data"]);
    assert_restores(&repo, &sa, &a, "ra");
}

/// A blob header exactly as volsnap writes it, taken from a real pack of another
/// repository, followed by only part of its body.
fn genuine_header_with_a_short_body(other: &Repo) -> Vec<u8> {
    let data = other.mkdir("other-data");
    write(data.join("x"), random_bytes("other", 40_000));
    other.snapshot(&[&data], &["--name", "x"]);
    for pack in pack_files(&other.path) {
        let bytes = fs::read(&pack).unwrap();
        if let Some(at) = bytes.windows(4).position(|w| w == b"VBLB") {
            let stored_len = u32::from_le_bytes(bytes[at + 12..at + 16].try_into().unwrap());
            if stored_len > 30_000 {
                return bytes[at..at + 52 + 100].to_vec();
            }
        }
    }
    panic!("no large blob in the other repository");
}

#[test]
fn bytes_that_look_like_blob_headers_after_a_hole_never_hide_live_blobs() {
    let other = Repo::new();
    let planted = genuine_header_with_a_short_body(&other);
    let repo = Repo::new();
    let data = repo.mkdir("data");
    // Files of one chunk each (under the minimum chunk size), incompressible, ending
    // in a genuine header whose body would run far into the blobs after it.
    for n in 0..60 {
        let mut content = random_bytes(&format!("f{n}"), 12_000 - planted.len());
        content.extend_from_slice(&planted);
        write(data.join(format!("f{n:02}")), content);
    }
    repo.snapshot(&[&data], &["--name", "s"]);
    // Every other file dies: dead runs, each followed by a live blob.
    for n in (0..60).step_by(2) {
        fs::remove_file(data.join(format!("f{n:02}"))).unwrap();
    }
    let keep = repo.snapshot(&[&data], &["--name", "s"]);
    let first = repo.list(&[])[0].clone();
    repo.ok(["forget", &id(&first)]);
    let report = repo.ok(["gc", "--max-unused", "100"]);
    assert!(report["packs_punched"].as_u64().unwrap() > 0, "{report}");

    let check = repo.run_json(["check", "--read-data"]).code(0).json();
    assert_eq!(check["errors"], Value::Array(vec![]), "{check}");
    let repair = repo.ok(["repair", "index"]);
    assert_eq!(repair["damaged_blobs"], 0, "{repair}");
    repo.run_json(["check", "--read-data"]).code(0);
    repo.ok(["gc", "--max-unused", "0"]);
    repo.run_json(["check", "--read-data"]).code(0);
    assert_restores(&repo, &keep, &data, "r");
}

/// Runs `gc` and returns once it says it waits for older operations, or panics if it
/// finishes without waiting (it deleted under a reader).
fn gc_waiting(repo: &Repo) -> std::process::Child {
    use std::io::BufRead;
    let mut cmd = repo.command();
    cmd.arg("gc")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut gc = cmd.spawn().unwrap();
    let stderr = gc.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("waiting for") => break,
            Some(_) => continue,
            None => panic!(
                "gc finished without waiting for the reader: {:?}",
                gc.wait()
            ),
        }
    }
    // Keep draining stderr so gc never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    gc
}

#[test]
fn a_reader_that_resolved_its_snapshot_finishes_while_forget_and_gc_run() {
    for (point, args) in [
        ("restore started", vec!["restore", "--to"]),
        ("export started", vec!["export", "--format", "tar", "-o"]),
    ] {
        let repo = Repo::new();
        let data = repo.mkdir("data");
        write(data.join("big"), random_bytes("big", 6 << 20));
        write(data.join("sub/small"), "small\n");
        let snap = repo.snapshot(&[&data], &["--name", "s"]);
        let out = repo.scratch("out");
        let mut full: Vec<String> = vec![args[0].into(), id(&snap)];
        full.extend(args[1..].iter().map(|a| a.to_string()));
        full.push(out.display().to_string());
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        // The reader has resolved the snapshot and stops just before reading.
        let reader = repo.spawn_paused(point, &full);
        repo.ok(["forget", &id(&snap)]);
        let gc = gc_waiting(&repo);
        reader.finish().code(0);
        assert!(gc.wait_with_output().unwrap().status.success());
        if args[0] == "restore" {
            assert_same_tree(&data, &out);
        } else {
            let x = repo.mkdir("x");
            let status = std::process::Command::new("tar")
                .arg("-xf")
                .arg(&out)
                .arg("-C")
                .arg(&x)
                .status()
                .unwrap();
            assert!(status.success());
            assert_eq!(
                fs::read(x.join("big")).unwrap(),
                fs::read(data.join("big")).unwrap()
            );
        }
        // Once the reader is done, gc gave the forgotten snapshot's space back.
        assert!(pack_files(&repo.path).is_empty(), "{point}");
    }
}
