//! Damaged repositories: found by `check`, never turned into wrong bytes.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

fn packs(repo: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for shard in fs::read_dir(repo.join("packs")).expect("repository has a packs directory") {
        let shard = shard.unwrap().path();
        if !shard.is_dir() {
            continue;
        }
        for p in fs::read_dir(&shard).unwrap() {
            let p = p.unwrap().path();
            if p.extension().is_some_and(|e| e == "pack") {
                let len = fs::metadata(&p).unwrap().len();
                out.push((p, len));
            }
        }
    }
    out
}

fn largest_pack(repo: &Path) -> (PathBuf, u64) {
    packs(repo)
        .into_iter()
        .max_by_key(|(_, len)| *len)
        .expect("no pack files in the repository")
}

fn pack_name(pack: &Path) -> String {
    let stem = pack.file_stem().unwrap().to_str().unwrap().to_owned();
    assert!(
        is_hex(&stem, 64),
        "pack file name is not 64 hex: {}",
        pack.display()
    );
    stem
}

fn errors(check: &Value) -> Vec<Value> {
    check["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("check without errors: {check}"))
        .clone()
}

#[test]
fn flipped_byte_in_a_data_pack_is_found_and_never_restored() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    let big = random_bytes("big", 8 << 20);
    write(data.join("sub/big.bin"), &big);
    write(data.join("small.txt"), "small and fine\n");
    let victim = repo.snapshot(&[&data], &["--name", "victim"]);

    let other = repo.mkdir("other");
    write(other.join("o.bin"), random_bytes("bystander", 100_000));
    let bystander = repo.snapshot(&[&other], &["--name", "bystander"]);

    let (pack, len) = largest_pack(&repo.path);
    assert!(
        len > 4 << 20,
        "the largest pack should hold big.bin: {len} bytes"
    );
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, len / 2).unwrap();
    byte[0] ^= 0xff;
    f.write_all_at(&byte, len / 2).unwrap();
    drop(f);

    let run = repo.run_json(["check", "--read-data"]).code(1);
    let check = run.json();
    assert_eq!(check["ok"], false, "{check}");
    let errs = errors(&check);
    assert!(
        errs.iter().any(|e| e["snapshot"]
            .as_str()
            .is_some_and(|s| s.len() >= 8 && victim["id"].as_str().unwrap().starts_with(s))
            && e["path"].as_str().is_some_and(|p| p.ends_with("big.bin"))),
        "check should name the damaged snapshot and path: {check}"
    );
    assert!(
        !errs.iter().any(|e| e["snapshot"]
            .as_str()
            .is_some_and(|s| s.len() >= 8 && bystander["id"].as_str().unwrap().starts_with(s))),
        "check blames an undamaged snapshot: {check}"
    );

    let human = repo.run(["check", "--read-data"]).code(1);
    let text = human.all_output();
    assert!(
        text.contains(victim["short_id"].as_str().unwrap()) && text.contains("big.bin"),
        "human check output should name the snapshot and the path\n{}",
        human.describe()
    );

    // Restore refuses to emit the damaged bytes.
    let to = repo.scratch("restored");
    let run = repo.run_json([
        "restore".as_ref(),
        victim["id"].as_str().unwrap().as_ref(),
        "--to".as_ref(),
        to.as_os_str(),
    ]);
    assert_ne!(
        run.status,
        0,
        "restore of a damaged file succeeded\n{}",
        run.describe()
    );
    run.error_line();
    // Not even partly: a file restore could not verify is removed, never left behind
    // holding zeros or part of its bytes.
    assert!(
        !to.join("sub/big.bin").exists(),
        "the damaged file was left behind ({:?} bytes)",
        fs::metadata(to.join("sub/big.bin")).map(|m| m.len())
    );

    // Other snapshots stay restorable.
    let ok_to = repo.scratch("bystander");
    repo.restore(&id(&bystander), &ok_to);
    assert_same_tree(&other, &ok_to);
}

#[test]
fn truncated_pack_is_reported_by_check() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("big.bin"), random_bytes("truncate me", 4 << 20));
    repo.snapshot(&[&data], &[]);
    let clean = repo.ok(["check"]);
    assert_eq!(clean["ok"], true, "{clean}");

    let (pack, len) = largest_pack(&repo.path);
    let name = pack_name(&pack);
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let check = repo.run_json(["check"]).code(1).json();
    assert_eq!(check["ok"], false, "{check}");
    assert!(
        errors(&check)
            .iter()
            .any(|e| e["pack"].as_str() == Some(name.as_str())
                || e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&name[..16]))),
        "check should name the truncated pack {name}: {check}"
    );
    let human = repo.run(["check"]).code(1);
    assert!(
        human.all_output().contains(&name[..8]),
        "human output should name the pack\n{}",
        human.describe()
    );
}

/// Every file under `dir` with its size: what a command must not have changed.
fn files_under(dir: &Path) -> std::collections::BTreeMap<PathBuf, u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                todo.push(p);
            } else {
                out.insert(p, m.len());
            }
        }
    }
    out
}

#[test]
fn deleted_index_gives_a_clear_error_and_loses_nothing() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("a.txt"), "some content\n");
    write(data.join("b.bin"), random_bytes("b", 200_000));
    let snap = repo.snapshot(&[&data], &[]);
    let sid = id(&snap);
    let index = repo.path.join("index.redb");
    assert!(index.is_file(), "no index at {}", index.display());
    fs::remove_file(&index).unwrap();
    let packs = files_under(&repo.path.join("packs"));
    let records = files_under(&repo.path.join("snapshots"));
    assert!(!packs.is_empty() && !records.is_empty());

    let to = repo.scratch("restored");
    let archive = repo.scratch("a.tar");
    let to_s = to.to_str().unwrap();
    let archive_s = archive.to_str().unwrap();
    let data_s = data.to_str().unwrap();
    // Every command refuses with one line naming the repair, and none of them creates
    // an index (an empty one would make gc see every pack as unindexed), writes a
    // pack or a record, or deletes one.
    let commands: Vec<Vec<&str>> = vec![
        vec!["list"],
        vec!["show", &sid],
        vec!["ls", &sid],
        vec!["diff", &sid, &sid],
        vec!["restore", &sid, "--to", to_s],
        vec!["export", &sid, "--format", "tar", "-o", archive_s],
        vec!["check"],
        vec!["check", "--read-data"],
        vec!["snapshot", data_s],
        vec!["forget", "--keep-last", "1"],
        vec!["forget", &sid],
        vec!["gc"],
        vec!["gc", "--max-unused", "0"],
    ];
    for args in &commands {
        let run = repo.run_json(args).code(1);
        let line = run.error_line();
        assert!(
            line.contains("is missing") && line.contains("`volsnap repair index`"),
            "{}",
            run.describe()
        );
        assert!(!index.exists(), "{args:?} created an index");
        assert_eq!(files_under(&repo.path.join("packs")), packs, "{args:?}");
        assert_eq!(
            files_under(&repo.path.join("snapshots")),
            records,
            "{args:?}"
        );
        assert!(!to.exists(), "{args:?} created the restore target");
        assert!(!archive.exists(), "{args:?} created the archive");
    }
    // The repair brings everything back.
    let report = repo.ok(["repair", "index"]);
    assert_eq!(report["snapshots"], 1, "{report}");
    repo.restore(&sid, &to);
    assert_same_tree(&data, &to);
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
}

#[test]
fn repair_index_rebuilds_everything_from_packs_and_records() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("a.txt"), "first version\n");
    write(data.join("b.bin"), random_bytes("b", 300_000));
    let s1 = repo.snapshot(&[&data], &["--name", "series"]);
    write(data.join("a.txt"), "second version, longer\n");
    let s2 = repo.snapshot(&[&data], &["--name", "series"]);
    assert_eq!(s2["version"], 2);
    let r2 = repo.scratch("r2-expected");
    repo.restore(&id(&s2), &r2);

    fs::remove_file(repo.path.join("index.redb")).unwrap();
    let run = repo.run(["list"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.error_line().contains("repair index"),
        "{}",
        run.describe()
    );

    let report = repo.ok(["repair", "index"]);
    assert_eq!(report["snapshots"], 2, "{report}");
    assert_eq!(report["damaged_blobs"], 0, "{report}");
    let listed: Vec<String> = repo.list(&[]).iter().map(id).collect();
    assert_eq!(listed, vec![id(&s1), id(&s2)]);
    let check = repo.ok(["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let r1 = repo.scratch("r1");
    repo.restore(&id(&s1), &r1);
    assert_eq!(fs::read(r1.join("a.txt")).unwrap(), b"first version\n");
    let again = repo.scratch("r2");
    repo.restore(&id(&s2), &again);
    assert_same_tree(&r2, &again);
    // Version numbers continue where the records left them.
    let s3 = repo.snapshot(&[&data], &["--name", "series"]);
    assert_eq!(s3["version"], 3);
    assert_eq!(s3["parent"], s2["id"]);
}

#[test]
fn repair_index_refuses_while_another_operation_runs() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), random_bytes("f", 100_000));
    repo.snapshot(&[&data], &["--name", "s"]);
    write(data.join("g"), "more");
    let pause = repo.scratch("pause");
    write(&pause, "hold");
    let mut cmd = repo.command();
    cmd.args(["snapshot", data.to_str().unwrap(), "--name", "s"])
        .env("VOLSNAP_PAUSE_AT", "snapshot before commit")
        .env("VOLSNAP_PAUSE_FILE", &pause)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let reached = PathBuf::from(format!("{}.reached", pause.display()));
    let start = std::time::Instant::now();
    while !reached.exists() {
        assert!(
            start.elapsed().as_secs() < 30,
            "the snapshot never reached its pause"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let run = repo.run(["repair", "index"]);
    assert_eq!(run.status, 11, "{}", run.describe());
    assert!(
        repo.path.join("index.redb").exists(),
        "the index was moved away anyway"
    );
    fs::remove_file(&pause).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(repo.list(&[]).len(), 2);
    // With nothing running it goes ahead.
    let report = repo.ok(["repair", "index"]);
    assert_eq!(report["snapshots"], 2, "{report}");
}
