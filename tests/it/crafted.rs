//! Snapshots crafted through the library, holding trees the filesystem cannot (hostile
//! names, hardlink targets, labels), for the tests of what restore and export refuse.

use std::path::Path;

use volsnap::id::Id;
use volsnap::pack::Packer;
use volsnap::pack::blob::BlobKind;
use volsnap::repo::{Config, Repository};
use volsnap::snapshot::record::{self, RootMeta};
use volsnap::snapshot::{Snapshot, Stats, Volume};
use volsnap::tree::{Entry, Kind, Tree};

pub fn entry(name: &[u8], kind: Kind) -> Entry {
    Entry {
        name: name.to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 1_500_000_000_000_000_000,
        xattrs: Vec::new(),
    }
}

/// Commits a snapshot of crafted trees (one volume per (label, tree)); file contents
/// are stored as single chunks.
pub fn craft(repo_path: &Path, volumes: &[(&str, &Tree)], contents: &[&[u8]]) -> String {
    let (repo, _) = Repository::init(repo_path, Config::default()).unwrap();
    let data = Packer::new(&repo, BlobKind::Data);
    for c in contents {
        data.store(Id::of(c), c).unwrap();
    }
    data.flush().unwrap();
    let trees = Packer::new(&repo, BlobKind::Tree);
    let mut vols = Vec::new();
    for (label, tree) in volumes {
        let bytes = tree.encode();
        let id = Id::of(&bytes);
        trees.store(id, &bytes).unwrap();
        vols.push(Volume {
            label: label.to_string(),
            source: b"/nowhere".to_vec(),
            tree: id,
            root: RootMeta {
                mode: 0o755,
                ..Default::default()
            },
        });
    }
    trees.flush().unwrap();
    let snapshot = Snapshot {
        series: "evil".into(),
        version: 0,
        time_ns: 1,
        hostname: String::new(),
        volumes: vols,
        tags: Vec::new(),
        parent: None,
        stats: Stats::default(),
        incomplete: false,
        unreadable: Vec::new(),
        notes: Vec::new(),
        containers: Vec::new(),
    };
    record::commit(&repo, snapshot).unwrap().id.hex()
}
