//! Hostile repositories: snapshots crafted through the library with names, hardlink
//! targets and volume labels that try to reach outside the restore target. volsnap
//! must refuse them and write nothing outside the target.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use volsnap::tree::{Kind, Tree};

use crate::crafted::{craft, entry};
use crate::support::*;

/// Commits a snapshot with one volume per label, all on `tree`.
fn craft_on(repo_path: &Path, tree: &Tree, labels: &[&str]) -> String {
    let volumes: Vec<(&str, &Tree)> = labels.iter().map(|l| (*l, tree)).collect();
    craft(repo_path, &volumes, &[])
}

#[test]
fn a_hardlink_target_with_dotdot_is_refused() {
    let repo = Repo::new();
    let secret = repo.mkdir("secret");
    write(secret.join("key"), "private key");
    let tree = Tree {
        entries: vec![entry(
            b"stolen",
            Kind::Hardlink {
                target: b"../secret/key".to_vec(),
            },
        )],
    };
    let id = craft_on(&repo.path, &tree, &["vol"]);
    let to = repo.scratch("out");
    let run = repo.run(["restore", &id, "--to", to.to_str().unwrap()]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.error_line().contains("invalid hardlink target"),
        "{}",
        run.describe()
    );
    assert_eq!(
        fs::metadata(secret.join("key")).unwrap().nlink(),
        1,
        "the secret was linked into the restore"
    );
    assert!(!to.join("stolen").exists());
    let check = repo.run_json(["check"]);
    assert_eq!(
        check.status,
        1,
        "check must report the bad tree\n{}",
        check.describe()
    );
}

#[test]
fn a_volume_label_that_is_a_path_is_refused() {
    let repo = Repo::new();
    let tree = Tree {
        entries: vec![entry(
            b"planted",
            Kind::File {
                size: 0,
                chunks: Vec::new(),
            },
        )],
    };
    let id = craft_on(&repo.path, &tree, &["x", "../escaped"]);
    let to = repo.scratch("out");
    let run = repo.run(["restore", &id, "--to", to.to_str().unwrap()]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        !to.parent().unwrap().join("escaped").exists(),
        "restore wrote outside its target"
    );
    // The damaged record does not take the others down; check names it.
    let check = repo.run_json(["check"]);
    assert_eq!(check.status, 1, "{}", check.describe());
    assert!(
        check.stdout_str().contains("invalid volume label"),
        "{}",
        check.describe()
    );
    // `list` still works and names the record it cannot use (exit 1).
    let list = repo.run(["list"]);
    assert_eq!(list.status, 1, "{}", list.describe());
    assert!(list.stderr.contains(&id), "{}", list.describe());
}
