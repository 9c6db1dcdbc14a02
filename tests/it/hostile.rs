//! Hostile repositories: snapshots crafted through the library with names, hardlink
//! targets and volume labels that try to reach outside the restore target. volsnap
//! must refuse them and write nothing outside the target.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use volsnap::id::Id;
use volsnap::pack::Packer;
use volsnap::pack::blob::BlobKind;
use volsnap::repo::{Config, Repository};
use volsnap::snapshot::record::{self, RootMeta};
use volsnap::snapshot::{Snapshot, Stats, Volume};
use volsnap::tree::{Entry, Kind, Tree};

use crate::support::*;

fn entry(name: &str, kind: Kind) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        xattrs: Vec::new(),
    }
}

/// Stores `tree` and commits a snapshot with one volume per label, all on that tree.
fn craft(repo_path: &Path, tree: &Tree, labels: &[&str]) -> String {
    let (repo, _) = Repository::init(repo_path, Config::default()).unwrap();
    let bytes = tree.encode();
    let id = Id::of(&bytes);
    let packer = Packer::new(&repo, BlobKind::Tree);
    packer.store(id, &bytes).unwrap();
    packer.flush().unwrap();
    let volumes = labels
        .iter()
        .map(|l| Volume {
            label: l.to_string(),
            source: b"/nowhere".to_vec(),
            tree: id,
            root: RootMeta {
                mode: 0o755,
                ..Default::default()
            },
        })
        .collect();
    let snapshot = Snapshot {
        series: "evil".into(),
        version: 0,
        time_ns: 1,
        hostname: String::new(),
        volumes,
        tags: Vec::new(),
        parent: None,
        stats: Stats::default(),
        incomplete: false,
        unreadable: Vec::new(),
        notes: Vec::new(),
    };
    record::commit(&repo, snapshot).unwrap().id.hex()
}

#[test]
fn a_hardlink_target_with_dotdot_is_refused() {
    let repo = Repo::new();
    let secret = repo.mkdir("secret");
    write(secret.join("key"), "private key");
    let tree = Tree {
        entries: vec![entry(
            "stolen",
            Kind::Hardlink {
                target: b"../secret/key".to_vec(),
            },
        )],
    };
    let id = craft(&repo.path, &tree, &["vol"]);
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
            "planted",
            Kind::File {
                size: 0,
                chunks: Vec::new(),
            },
        )],
    };
    let id = craft(&repo.path, &tree, &["x", "../escaped"]);
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
    assert_eq!(repo.run(["list"]).status, 0);
}
