//! `copy`: snapshots moved between two repositories, only the blobs the destination
//! lacks sent, each verified; idempotent, resumable after a kill at any crash point,
//! retention separate on each side, damaged sources refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

/// `--repo SRC copy ARGS... --to DST` with `--json`, expecting exit 0.
fn copy_to(src: &Repo, dst: &Repo, args: &[&str]) -> Value {
    let mut all = vec!["copy"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--to", dst.path.to_str().unwrap()]);
    src.ok(all)
}

fn count(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {key} in {v}"))
}

/// The snapshots of a repository by (series, time_ns): what identifies a copy.
fn by_origin(repo: &Repo) -> BTreeMap<(String, i64), Value> {
    let mut out = BTreeMap::new();
    for s in repo.list(&[]) {
        let key = (
            s["series"].as_str().unwrap().to_string(),
            s["time_ns"].as_i64().unwrap(),
        );
        assert!(
            out.insert(key.clone(), s).is_none(),
            "{key:?} is listed twice"
        );
    }
    out
}

/// Every snapshot of `dst` is a whole copy of one of `src`: same record but for the
/// version and parent, and it restores exactly as the original does.
fn assert_copies_restore(src: &Repo, dst: &Repo, tag: &str) -> usize {
    let originals = by_origin(src);
    let copies = by_origin(dst);
    for (i, (key, copy)) in copies.iter().enumerate() {
        let original = originals
            .get(key)
            .unwrap_or_else(|| panic!("{key:?} in the destination has no original"));
        for field in [
            "hostname",
            "tags",
            "volumes",
            "incomplete",
            "stats",
            "notes",
        ] {
            assert_eq!(copy[field], original[field], "{field} of {key:?}");
        }
        let a = src.scratch(&format!("{tag}-original-{i}"));
        let b = dst.scratch(&format!("{tag}-copy-{i}"));
        src.restore(&id(original), &a);
        dst.restore(&id(copy), &b);
        let volumes = copy["volumes"].as_array().unwrap();
        if volumes.len() == 1 {
            assert_same_tree(&a, &b);
        } else {
            // One directory per volume, under a top made by the restore.
            for v in volumes {
                let label = v["label"].as_str().unwrap();
                assert_same_tree(&a.join(label), &b.join(label));
            }
        }
    }
    copies.len()
}

fn check_ok(repo: &Repo) {
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
}

/// A tree with the kinds of entries a copy carries: files of several chunks, empty
/// files, subdirectories, symlinks, hardlinks, modes.
fn fill(dir: &Path, seed: &str) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    write(
        dir.join("big"),
        random_bytes(&format!("{seed} big"), 900_000),
    );
    write(dir.join("small"), format!("{seed} small"));
    write(dir.join("empty"), "");
    write(
        dir.join("sub/deeper/file"),
        random_bytes(&format!("{seed} deep"), 70_000),
    );
    write(dir.join("sub/same"), "the same in every tree");
    std::os::unix::fs::symlink("../big", dir.join("sub/link")).unwrap();
    std::fs::hard_link(dir.join("small"), dir.join("sub/hard")).unwrap();
    std::fs::create_dir(dir.join("other")).unwrap();
    for i in 0..40 {
        write(dir.join(format!("other/{i}")), format!("{seed} other {i}"));
    }
    std::fs::set_permissions(
        dir.join("sub/deeper"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
}

#[test]
fn a_copy_restores_byte_identically_and_copying_again_sends_nothing() {
    let src = Repo::new();
    let dst = Repo::new();
    let app = src.mkdir("app");
    let db = src.mkdir("db");
    fill(&app, "app 1");
    fill(&db, "db 1");
    src.snapshot(&[&app], &["--name", "app", "--tag", "nightly"]);
    src.snapshot(&[&db], &["--name", "db"]);
    write(app.join("small"), "changed");
    write(app.join("added"), random_bytes("added", 200_000));
    src.snapshot(&[&app], &["--name", "app"]);
    src.snapshot(&[&app, &db], &["--name", "both"]);

    let first = copy_to(&src, &dst, &[]);
    assert_eq!(count(&first, "copied_count"), 4, "{first}");
    assert_eq!(count(&first, "skipped_count"), 0, "{first}");
    assert!(count(&first, "data_blobs_sent") > 0, "{first}");
    assert!(count(&first, "bytes_sent") > 2_000_000, "{first}");
    assert_eq!(assert_copies_restore(&src, &dst, "first"), 4);
    check_ok(&dst);
    // The destination numbers its own versions; tags came along.
    let app_copies = dst.list(&["--name", "app"]);
    let versions: Vec<u64> = app_copies
        .iter()
        .map(|s| s["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(app_copies[0]["tags"], serde_json::json!(["nightly"]));
    // The second app snapshot's parent is the first one's copy, not a source id.
    assert_eq!(app_copies[1]["parent"], app_copies[0]["id"]);

    // Copying again: nothing sent, no record made.
    let again = copy_to(&src, &dst, &[]);
    assert_eq!(count(&again, "copied_count"), 0, "{again}");
    assert_eq!(count(&again, "skipped_count"), 4, "{again}");
    assert_eq!(count(&again, "blobs_sent"), 0, "{again}");
    assert_eq!(count(&again, "bytes_sent"), 0, "{again}");
    assert_eq!(dst.list(&[]).len(), 4);

    // One changed file: its chunk and the trees above it are sent, and the walk
    // passes over what the last copy of the series holds.
    write(
        app.join("sub/deeper/file"),
        random_bytes("changed deep", 5_000),
    );
    let newest = src.snapshot(&[&app], &["--name", "app"]);
    let next = copy_to(&src, &dst, &["app@latest"]);
    assert_eq!(count(&next, "copied_count"), 1, "{next}");
    assert_eq!(next["copied"][0]["source"], newest["id"], "{next}");
    assert_eq!(count(&next, "data_blobs_sent"), 1, "{next}");
    // The root, sub and sub/deeper.
    assert_eq!(count(&next, "tree_blobs_sent"), 3, "{next}");
    // 6 entries at the top, 4 in sub, 1 in sub/deeper; not the 40 in other.
    assert_eq!(
        count(&next, "entries_walked"),
        11,
        "the walk went through unchanged subtrees: {next}"
    );
    assert_eq!(assert_copies_restore(&src, &dst, "next"), 5);
    check_ok(&dst);
}

#[test]
fn copy_from_another_repository_into_repo() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    fill(&data, "from");
    src.snapshot(&[&data], &["--name", "web"]);
    let out = dst.ok(["copy", "--from", src.path.to_str().unwrap()]);
    assert_eq!(count(&out, "copied_count"), 1, "{out}");
    assert_eq!(out["from"], src.path.to_str().unwrap());
    assert_eq!(out["to"], dst.path.to_str().unwrap());
    assert_eq!(assert_copies_restore(&src, &dst, "from"), 1);
    let restored = dst.scratch("restored");
    dst.restore("web@latest", &restored);
    assert_same_tree(&data, &restored);
    // The source is unchanged: one snapshot, its own.
    assert_eq!(src.list(&[]).len(), 1);
}

#[test]
fn selection_by_name_tag_and_reference() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    fill(&data, "sel");
    src.snapshot(&[&data], &["--name", "a", "--tag", "keep"]);
    src.snapshot(&[&data], &["--name", "a"]);
    src.snapshot(&[&data], &["--name", "b", "--tag", "keep"]);

    let dry = copy_to(&src, &dst, &["--tag", "keep", "--dry-run"]);
    assert_eq!(count(&dry, "copied_count"), 2, "{dry}");
    assert!(count(&dry, "bytes_sent") > 0, "{dry}");
    assert!(dst.list(&[]).is_empty(), "a dry run wrote a snapshot");

    let tagged = copy_to(&src, &dst, &["--tag", "keep"]);
    assert_eq!(count(&tagged, "copied_count"), 2, "{tagged}");
    assert_eq!(
        count(&tagged, "bytes_sent"),
        count(&dry, "bytes_sent"),
        "the dry run said what would be sent"
    );
    let named = copy_to(&src, &dst, &["--name", "a"]);
    assert_eq!(count(&named, "copied_count"), 1, "{named}");
    assert_eq!(count(&named, "skipped_count"), 1, "{named}");
    // Same content as the tagged ones: only the record is new.
    assert_eq!(count(&named, "blobs_sent"), 0, "{named}");
    let by_ref = copy_to(&src, &dst, &["a@1", "b@latest"]);
    assert_eq!(count(&by_ref, "skipped_count"), 2, "{by_ref}");
    assert_eq!(assert_copies_restore(&src, &dst, "sel"), 3);
}

/// Retention is each repository's own: forgetting in one never touches the other, and
/// each numbers its series itself.
#[test]
fn retention_runs_separately_in_each_repository() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    fill(&data, "ret");
    // The destination already has a snapshot of series s of its own.
    let local = dst.mkdir("local");
    write(local.join("f"), "the destination's own");
    dst.snapshot(&[&local], &["--name", "s"]);
    for i in 0..3 {
        write(data.join("small"), format!("round {i}"));
        src.snapshot(&[&data], &["--name", "s"]);
    }
    copy_to(&src, &dst, &[]);
    let versions: Vec<u64> = dst
        .list(&["--name", "s"])
        .iter()
        .map(|s| s["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3, 4], "copies take the next versions");

    dst.ok(["forget", "--keep-last", "1"]);
    dst.ok(["gc"]);
    assert_eq!(dst.list(&[]).len(), 1);
    assert_eq!(
        src.list(&[]).len(),
        3,
        "forget in the destination reached the source"
    );
    check_ok(&src);
    let s3 = src.scratch("s3");
    src.restore("s@3", &s3);
    assert_same_tree(&data, &s3);

    src.ok(["forget", "--keep-last", "1"]);
    src.ok(["gc"]);
    assert_eq!(src.list(&[]).len(), 1);
    assert_eq!(dst.list(&[]).len(), 1);
    check_ok(&dst);
    let kept = dst.scratch("kept");
    dst.restore("s@latest", &kept);
    assert_same_tree(&data, &kept);
    // A copy forgotten in the destination while its original is still in the source
    // is copied again (documented): here the source kept only the newest, which the
    // destination has.
    let again = copy_to(&src, &dst, &[]);
    assert_eq!(count(&again, "copied_count"), 0, "{again}");
}

/// A copy killed at every crash point in turn leaves only whole snapshots in the
/// destination; the next run completes it, sending only what is still missing.
#[test]
fn a_copy_killed_at_every_step_resumes_and_every_snapshot_restores() {
    let src = Repo::new();
    let data = src.mkdir("data");
    // Over one pack (8 MiB) of new data per snapshot.
    for i in 0..4 {
        write(
            data.join(format!("f{i}")),
            random_bytes(&format!("crash {i}"), 3_000_000),
        );
    }
    src.snapshot(&[&data], &["--name", "s"]);
    write(data.join("f0"), random_bytes("crash again", 3_000_000));
    src.snapshot(&[&data], &["--name", "s"]);

    let fresh = Repo::new();
    let full = copy_to(&src, &fresh, &[]);
    let full_sent = count(&full, "data_blobs_sent");
    assert_eq!(assert_copies_restore(&src, &fresh, "full"), 2);

    let mut points = Vec::new();
    let mut n = 1;
    loop {
        let dst = Repo::new();
        let to = dst.path.to_str().unwrap().to_string();
        let crashed = src.run_crashing_at(n, &["copy", "--to", &to]);
        let whole = assert_copies_restore(&src, &dst, &format!("crash-{n}"));
        check_ok(&dst);
        let resumed = copy_to(&src, &dst, &[]);
        assert_eq!(
            count(&resumed, "copied_count") as usize + whole,
            2,
            "after crash point {n} ({crashed:?}): {resumed}"
        );
        let sent = count(&resumed, "data_blobs_sent");
        assert!(sent <= full_sent, "{resumed}");
        // The first three points are the first data pack's: past them, that pack is
        // in the destination and is not sent again.
        if n > 3 {
            assert!(sent < full_sent, "after crash point {n}: {resumed}");
        }
        assert_eq!(
            assert_copies_restore(&src, &dst, &format!("resumed-{n}")),
            2
        );
        check_ok(&dst);
        match crashed {
            Some(point) => points.push(point),
            None => break,
        }
        n += 1;
        assert!(n < 60, "the copy never completed");
    }
    let pack = ["pack written", "pack committed", "pack indexed"];
    let record = [
        "copy blobs stored",
        "snapshot version reserved",
        "snapshot record written",
        "snapshot record indexed",
    ];
    // The first snapshot: a full data pack, the rest of its data, its trees; the
    // second: its data, its trees.
    let expected: Vec<&str> = [&pack[..], &pack, &pack, &record, &pack, &pack, &record].concat();
    assert_eq!(points, expected, "the crash points the copy reached");
}

/// The pack files of a repository, by path.
fn packs(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(repo.join("packs")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

fn is_data_pack(path: &Path) -> bool {
    std::fs::read(path).unwrap()[12] == 0
}

#[test]
fn a_damaged_source_blob_is_refused_and_the_other_snapshots_are_copied() {
    let src = Repo::new();
    let dst = Repo::new();
    let good = src.mkdir("good");
    fill(&good, "good");
    src.snapshot(&[&good], &["--name", "good"]);
    let before = packs(&src.path);
    let bad = src.mkdir("bad");
    write(bad.join("f"), random_bytes("bad", 300_000));
    let bad_snap = src.snapshot(&[&bad], &["--name", "bad"]);
    let new: Vec<PathBuf> = packs(&src.path)
        .into_iter()
        .filter(|p| !before.contains(p) && is_data_pack(p))
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    // A byte of the first blob's body (random data is stored raw).
    let mut bytes = std::fs::read(&new[0]).unwrap();
    bytes[32 + 52 + 1000] ^= 0x40;
    std::fs::write(&new[0], bytes).unwrap();

    let run = src
        .run_json(["copy", "--to", dst.path.to_str().unwrap()])
        .code(1);
    let line = run.error_line();
    assert!(
        line.contains("1 snapshot(s)")
            && line.contains(&id(&bad_snap)[..8])
            && line.contains("does not match its hash"),
        "{line}"
    );
    let report = run.json();
    assert_eq!(count(&report, "copied_count"), 1, "{report}");
    assert_eq!(count(&report, "failed_count"), 1, "{report}");
    assert_eq!(report["failed"][0]["source"], bad_snap["id"]);
    // No record of it, and nothing that does not verify, in the destination.
    let listed = dst.list(&[]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["series"], "good");
    check_ok(&dst);
    assert_eq!(assert_copies_restore(&src, &dst, "damaged"), 1);
}

#[test]
fn bad_input_gets_one_line_errors() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    write(data.join("f"), "x");
    src.snapshot(&[&data], &["--name", "s"]);
    let to = dst.path.to_str().unwrap();

    let line = src
        .run(["copy", "abcdef12", "--to", to])
        .code(1)
        .error_line();
    assert!(
        line.contains("abcdef12") && line.contains("no snapshot has this id"),
        "{line}"
    );
    let line = src.run(["copy", "s@7", "--to", to]).code(1).error_line();
    assert!(line.contains("s@7"), "{line}");

    let missing = src.scratch("nowhere/repo");
    let run = src
        .run(["copy", "--to", missing.to_str().unwrap()])
        .code(10);
    let line = run.error_line();
    assert!(line.contains(missing.to_str().unwrap()), "{line}");

    let line = src
        .run(["copy", "--to", src.path.to_str().unwrap()])
        .code(1)
        .error_line();
    assert!(line.contains("--repo"), "{line}");
    // The same repository under another name.
    let alias = src.scratch("alias");
    std::os::unix::fs::symlink(&src.path, &alias).unwrap();
    let line = src
        .run(["copy", "--to", alias.to_str().unwrap()])
        .code(1)
        .error_line();
    assert!(line.contains("alias"), "{line}");
    let line = src
        .run(["copy", "--from", alias.to_str().unwrap()])
        .code(1)
        .error_line();
    assert!(line.contains("alias"), "{line}");

    let line = src
        .run(["copy", "s@1", "--name", "s", "--to", to])
        .code(1)
        .error_line();
    assert!(line.contains("not both"), "{line}");
    assert!(dst.list(&[]).is_empty());
}

/// A tree in the destination does not prove that the blobs below it are there (a
/// killed snapshot leaves tree packs whose data packs were never written; gc may keep
/// an unreachable tree and delete its chunks): the copy still sends every blob the
/// destination lacks.
#[test]
fn trees_present_without_their_chunks_do_not_stop_a_copy() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    fill(&data, "present");
    let original = src.snapshot(&[&data], &["--name", "s"]);
    // The same directory snapshotted into the destination has the same trees...
    let own = dst.snapshot(&[&data], &["--name", "s"]);
    assert_eq!(own["volumes"][0]["tree"], original["volumes"][0]["tree"]);
    // ...which stay when the snapshot is forgotten and its data packs are lost.
    dst.ok(["forget", &id(&own)]);
    for p in packs(&dst.path) {
        if is_data_pack(&p) {
            std::fs::remove_file(p).unwrap();
        }
    }
    dst.ok(["repair", "index"]);

    let out = copy_to(&src, &dst, &[]);
    assert!(count(&out, "data_blobs_sent") > 0, "{out}");
    assert_eq!(count(&out, "tree_blobs_sent"), 0, "{out}");
    check_ok(&dst);
    let restored = dst.scratch("restored");
    dst.restore("s@latest", &restored);
    assert_same_tree(&data, &restored);
}

/// Names of 200 bytes that compress poorly, so that 24,000 of them make a directory
/// too large for one tree blob.
fn wide_name(i: usize) -> String {
    let h = blake3::hash(i.to_string().as_bytes()).to_hex();
    format!("{i:07}-{}", &h.as_str().repeat(4)[..192])
}

/// A directory split across tree blobs and a chain of directories: the copy restores
/// exactly, and a copy after one entry was added walks the part that changed, not the
/// directory.
#[test]
fn split_directories_and_deep_chains_are_copied_and_shared_parts_passed_over() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    let wide = data.join("wide");
    std::fs::create_dir(&wide).unwrap();
    const N: usize = 24_000;
    for i in 0..N {
        let content = if i % 4000 == 0 {
            random_bytes(&format!("wide {i}"), 10_000)
        } else {
            Vec::new()
        };
        write(wide.join(wide_name(i)), content);
    }
    let chain = data.join("chain");
    std::fs::create_dir(&chain).unwrap();
    let leaf = make_deep_path(&chain, 600, 1);
    src.snapshot(&[&data], &["--name", "big"]);

    let first = copy_to(&src, &dst, &[]);
    assert!(count(&first, "entries_walked") > N as u64, "{first}");
    assert!(count(&first, "tree_blobs_sent") > 300 + 10, "{first}");
    assert_eq!(assert_copies_restore(&src, &dst, "wide"), 1);
    let restored = dst.scratch("restored");
    dst.restore("big@latest", &restored);
    assert_eq!(
        read_deep(&restored.join("chain"), &leaf),
        read_deep(&chain, &leaf)
    );

    write(wide.join("0012345-added"), "one more");
    src.snapshot(&[&data], &["--name", "big"]);
    let next = copy_to(&src, &dst, &[]);
    assert_eq!(count(&next, "copied_count"), 1, "{next}");
    assert!(
        count(&next, "entries_walked") < N as u64 / 2,
        "the unchanged parts were walked: {next}"
    );
    // The new root of the volume, of `wide`, and the part or two that changed.
    assert!(count(&next, "tree_blobs_sent") <= 4, "{next}");
    assert_eq!(assert_copies_restore(&src, &dst, "wide-next"), 2);
    check_ok(&dst);
}

/// Runs `gc` in `repo` and returns once it says it waits for older operations (the
/// held copy), with the child and the rest of its stderr to come.
fn gc_waiting(repo: &Repo) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::BufRead;
    let mut gc = repo.command();
    gc.args(["gc"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = gc.spawn().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = lines_tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    loop {
        match lines.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(line) if line.contains("waiting for") && line.contains("copy") => break,
            Ok(_) => {}
            Err(e) => panic!("gc never said it waits for the copy ({e}): {}", {
                let _ = child.kill();
                reader.join().unwrap()
            }),
        }
    }
    (child, reader)
}

/// gc in the destination while a copy is held after sending its blobs: the copy passed
/// over what its reference (an earlier copy) holds, the reference is forgotten, and gc
/// must still keep those blobs for the copy it waits for.
#[test]
fn gc_in_the_destination_keeps_what_a_running_copy_relies_on() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    fill(&data, "gc-dst");
    src.snapshot(&[&data], &["--name", "s"]);
    copy_to(&src, &dst, &[]);
    write(data.join("small"), "changed");
    src.snapshot(&[&data], &["--name", "s"]);

    let to = dst.path.to_str().unwrap().to_string();
    let held = src.spawn_paused("copy blobs stored", &["copy", "s@latest", "--to", &to]);
    dst.ok(["forget", "s@1"]);
    let (gc, reader) = gc_waiting(&dst);
    let run = held.finish().code(0);
    let out = run.json();
    assert_eq!(count(&out, "copied_count"), 1, "{out}");
    assert_eq!(
        count(&out, "data_blobs_sent"),
        1,
        "only the changed file: {out}"
    );
    let gc_out = gc.wait_with_output().unwrap();
    assert!(gc_out.status.success(), "gc: {}", reader.join().unwrap());
    check_ok(&dst);
    let restored = dst.scratch("restored");
    dst.restore("s@latest", &restored);
    assert_same_tree(&data, &restored);
}

/// forget and gc in the source while a copy is held after its first pack: gc waits for
/// the copy, which finishes with everything it read.
#[test]
fn gc_in_the_source_waits_for_a_running_copy() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    for i in 0..3 {
        write(
            data.join(format!("f{i}")),
            random_bytes(&format!("gc-src {i}"), 4_000_000),
        );
    }
    src.snapshot(&[&data], &["--name", "s"]);
    let to = dst.path.to_str().unwrap().to_string();
    let held = src.spawn_paused("pack indexed", &["copy", "--to", &to]);
    src.ok(["forget", "s@1"]);
    let (gc, reader) = gc_waiting(&src);
    held.finish().code(0);
    let gc_out = gc.wait_with_output().unwrap();
    assert!(gc_out.status.success(), "gc: {}", reader.join().unwrap());
    assert!(src.list(&[]).is_empty());
    check_ok(&dst);
    let restored = dst.scratch("restored");
    dst.restore("s@latest", &restored);
    assert_same_tree(&data, &restored);
}

#[test]
fn a_second_copy_into_the_same_repository_is_refused_while_one_runs() {
    let src = Repo::new();
    let dst = Repo::new();
    let data = src.mkdir("data");
    fill(&data, "twice");
    src.snapshot(&[&data], &["--name", "s"]);
    let to = dst.path.to_str().unwrap().to_string();
    let held = src.spawn_paused("copy blobs stored", &["copy", "--to", &to]);
    let line = src.run(["copy", "--to", &to]).code(11).error_line();
    assert!(line.contains("another copy"), "{line}");
    held.finish().code(0);
    let again = copy_to(&src, &dst, &[]);
    assert_eq!(count(&again, "skipped_count"), 1, "{again}");
    assert_eq!(dst.list(&[]).len(), 1);
}

/// `volsnap` with `--repo REPO` (a path or `s3://`) and the Garage environment; every
/// cache under `caches` (`XDG_CACHE_HOME`: a host of its own per directory).
fn in_garage(g: &crate::garage::Garage, repo: &str, caches: &Path, args: &[&str]) -> Run {
    let mut cmd = std::process::Command::new(bin());
    g.apply_env(&mut cmd);
    cmd.arg("--repo")
        .arg(repo)
        .arg("--json")
        .args(args)
        .env("XDG_CACHE_HOME", caches)
        .env_remove("VOLSNAP_REPO")
        .env_remove("VOLSNAP_CACHE_DIR");
    Run::from_command(cmd)
}

/// The off-host round trip: a local repository copied into a bucket, the bucket copied
/// into a fresh local repository by a new host (an empty cache): every snapshot
/// restores byte-identically, and copying again sends nothing either way.
#[test]
fn a_copy_through_a_bucket_into_a_fresh_repository_restores_byte_identically() {
    let Some(g) = crate::garage::Garage::single() else {
        return;
    };
    let src = Repo::new();
    let fresh = Repo::new();
    let app = src.mkdir("app");
    fill(&app, "bucket");
    src.snapshot(&[&app], &["--name", "app", "--tag", "t"]);
    write(
        app.join("sub/deeper/file"),
        random_bytes("bucket 2", 300_000),
    );
    src.snapshot(&[&app], &["--name", "app"]);
    let url = g.repo_url("copies");
    let src_path = src.path.to_str().unwrap();
    let fresh_path = fresh.path.to_str().unwrap();
    let host_a = src.mkdir("cache-host-a");
    let host_b = src.mkdir("cache-host-b");
    in_garage(&g, &url, &host_a, &["init"]).code(0);

    let up = in_garage(&g, src_path, &host_a, &["copy", "--to", &url])
        .code(0)
        .json();
    assert_eq!(count(&up, "copied_count"), 2, "{up}");
    assert_eq!(up["to"], url.as_str());
    let again = in_garage(&g, src_path, &host_a, &["copy", "--to", &url])
        .code(0)
        .json();
    assert_eq!(count(&again, "blobs_sent"), 0, "{again}");
    assert_eq!(count(&again, "skipped_count"), 2, "{again}");

    // Another host, with nothing cached, seeds a fresh repository from the bucket.
    let down = in_garage(&g, fresh_path, &host_b, &["copy", "--from", &url])
        .code(0)
        .json();
    assert_eq!(count(&down, "copied_count"), 2, "{down}");
    assert_eq!(assert_copies_restore(&src, &fresh, "bucket"), 2);
    check_ok(&fresh);
    let again = in_garage(&g, fresh_path, &host_b, &["copy", "--from", &url])
        .code(0)
        .json();
    assert_eq!(count(&again, "copied_count"), 0, "{again}");
    // The bucket's own check, from the second host.
    let check = in_garage(&g, &url, &host_b, &["check", "--read-data"])
        .code(0)
        .json();
    assert_eq!(check["ok"], true, "{check}");
}

/// A copy into a bucket killed once its first pack is stored there: no snapshot is
/// listed in the bucket, and the next run sends only what is missing.
#[test]
fn a_copy_into_a_bucket_killed_mid_way_resumes_without_sending_again() {
    let Some(g) = crate::garage::Garage::single() else {
        return;
    };
    let src = Repo::new();
    let data = src.mkdir("data");
    fill(&data, "killed");
    src.snapshot(&[&data], &["--name", "s"]);
    write(data.join("big"), random_bytes("killed 2", 900_000));
    src.snapshot(&[&data], &["--name", "s"]);
    let src_path = src.path.to_str().unwrap();
    let caches = src.mkdir("caches");
    let (full_url, url) = (g.repo_url("full"), g.repo_url("killed"));
    in_garage(&g, &full_url, &caches, &["init"]).code(0);
    in_garage(&g, &url, &caches, &["init"]).code(0);
    let full = in_garage(&g, src_path, &caches, &["copy", "--to", &full_url])
        .code(0)
        .json();

    let mut cmd = std::process::Command::new(bin());
    g.apply_env(&mut cmd);
    cmd.args(["--repo", src_path, "copy", "--to", &url])
        .env("XDG_CACHE_HOME", &caches)
        .env("VOLSNAP_CRASH_AT", "pack indexed");
    let killed = Run::from_command(cmd);
    assert!(
        killed.stderr.contains("crash point") && killed.stderr.contains("pack indexed"),
        "{}",
        killed.describe()
    );
    let listed = in_garage(&g, &url, &caches, &["list"]).code(0).json();
    assert_eq!(listed, serde_json::json!([]), "a record of a half copy");

    let resumed = in_garage(&g, src_path, &caches, &["copy", "--to", &url])
        .code(0)
        .json();
    assert_eq!(count(&resumed, "copied_count"), 2, "{resumed}");
    assert!(
        count(&resumed, "data_blobs_sent") < count(&full, "data_blobs_sent"),
        "the pack stored before the kill was sent again: {resumed} / {full}"
    );
    let fresh = Repo::new();
    in_garage(
        &g,
        fresh.path.to_str().unwrap(),
        &caches,
        &["copy", "--from", &url],
    )
    .code(0);
    assert_eq!(assert_copies_restore(&src, &fresh, "killed"), 2);
}
