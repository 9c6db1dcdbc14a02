//! Many hosts on one bucket: every host is a cache directory of its own, all of them
//! running the real binary against one prefix of a real Garage.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::garage::Garage;
use crate::support::{self, assert_same_tree, random_bytes, write};

/// One host: its own cache directory, the shared bucket prefix.
struct Host<'g> {
    g: &'g Garage,
    url: String,
    cache: tempfile::TempDir,
}

impl<'g> Host<'g> {
    fn new(g: &'g Garage, prefix: &str) -> Host<'g> {
        Host {
            g,
            url: g.repo_url(prefix),
            cache: tempfile::tempdir().expect("cache dir"),
        }
    }

    fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(support::bin());
        self.g.apply_env(&mut cmd);
        cmd.arg("--repo")
            .arg(&self.url)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .args(args)
            .env_remove("VOLSNAP_REPO")
            .env_remove("VOLSNAP_CACHE_DIR");
        cmd.output().expect("run volsnap")
    }

    fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "volsnap failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    fn json<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn snapshot(&self, dir: &Path, name: &str) -> Value {
        self.json([
            "snapshot".as_ref(),
            dir.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--json".as_ref(),
        ])
    }

    /// (series, version, id) of every listed snapshot.
    fn listed(&self) -> Vec<(String, u64, String)> {
        let list = self.json(["list", "--json"]);
        let snaps = list
            .as_array()
            .or_else(|| list["snapshots"].as_array())
            .unwrap_or_else(|| panic!("list --json: {list}"))
            .clone();
        snaps
            .iter()
            .map(|s| {
                (
                    s["series"].as_str().expect("series").to_string(),
                    s["version"].as_u64().expect("version"),
                    s["id"].as_str().expect("id").to_string(),
                )
            })
            .collect()
    }

    fn restore(&self, id: &str, to: &Path) {
        self.ok([
            "restore".as_ref(),
            id.as_ref(),
            "--to".as_ref(),
            to.as_os_str(),
        ]);
    }
}

/// A volume with files of its own and `shared.bin`, the same 3 MiB in every volume.
fn volume(root: &Path, tag: &str) -> PathBuf {
    let dir = root.join(tag);
    write(dir.join("own.bin"), random_bytes(tag, 1 << 20));
    write(dir.join("notes.txt"), format!("volume {tag}\n"));
    write(dir.join("shared.bin"), random_bytes("shared", 3 << 20));
    dir
}

/// Sizes of the objects under `prefix/packs/`.
fn pack_bytes(g: &Garage, prefix: &str) -> (usize, u64) {
    let packs = g
        .client()
        .list(&format!("{prefix}/packs"))
        .expect("list packs");
    (packs.len(), packs.iter().map(|(_, s)| s).sum())
}

#[test]
fn two_hosts_snapshot_at_once_and_each_sees_the_others() {
    let Some(g) = Garage::single() else { return };
    let work = tempfile::tempdir().unwrap();
    let a = Host::new(&g, "hosts");
    let b = Host::new(&g, "hosts");
    a.ok(["init"]);
    let va = volume(work.path(), "a");
    let vb = volume(work.path(), "b");
    // Both at once, each into a series of its own.
    let (sa, sb) = std::thread::scope(|s| {
        let ta = s.spawn(|| a.snapshot(&va, "vol-a"));
        let tb = s.spawn(|| b.snapshot(&vb, "vol-b"));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let ids: BTreeSet<String> = [support::id(&sa), support::id(&sb)].into();
    for host in [&a, &b] {
        let seen: BTreeSet<String> = host.listed().into_iter().map(|(_, _, id)| id).collect();
        assert_eq!(seen, ids, "each host lists both snapshots");
    }
    // Each restores the other's snapshot, through the rows its sync took from the
    // other host's logs.
    let out = work.path().join("b-from-a");
    a.restore(&support::id(&sb), &out);
    assert_same_tree(&vb, &out);
    let out = work.path().join("a-from-b");
    b.restore(&support::id(&sa), &out);
    assert_same_tree(&va, &out);
    // A volume holding the shared file, snapshotted by b after it has synced: the
    // shared chunks are not stored again.
    let vc = volume(work.path(), "c");
    let (_, before) = pack_bytes(&g, "hosts");
    let sc = b.snapshot(&vc, "vol-c");
    let (_, after) = pack_bytes(&g, "hosts");
    let stored = support::stat_u64(&sc, "new_bytes_stored");
    assert!(
        stored < 2 << 20,
        "only vol-c's own 1 MiB is new, not the shared 3 MiB: {stored} bytes stored"
    );
    assert!(
        after - before < 2 << 20,
        "packs grew by {} bytes",
        after - before
    );
}

#[test]
fn versions_of_one_series_from_many_hosts_never_collide() {
    let Some(g) = Garage::single() else { return };
    let work = tempfile::tempdir().unwrap();
    let hosts: Vec<Host> = (0..3).map(|_| Host::new(&g, "versions")).collect();
    hosts[0].ok(["init"]);
    let vol = volume(work.path(), "v");
    const PER_HOST: usize = 4;
    std::thread::scope(|s| {
        for h in &hosts {
            let vol = &vol;
            s.spawn(move || {
                for _ in 0..PER_HOST {
                    h.snapshot(vol, "shared-series");
                }
            });
        }
    });
    let listed = hosts[1].listed();
    let versions: Vec<u64> = listed
        .iter()
        .filter(|(series, _, _)| series == "shared-series")
        .map(|(_, v, _)| *v)
        .collect();
    let unique: BTreeSet<u64> = versions.iter().copied().collect();
    assert_eq!(
        versions.len(),
        3 * PER_HOST,
        "every snapshot is listed: {listed:?}"
    );
    assert_eq!(
        unique.len(),
        versions.len(),
        "versions collide: {versions:?}"
    );
    // The claims are in the store, one per version (the losers' were deleted).
    let claims = g.client().list("versions/versions").expect("list claims");
    assert_eq!(
        claims.len(),
        3 * PER_HOST,
        "one claim per version: {claims:?}"
    );
}

#[test]
fn a_new_host_builds_its_index_from_logs_and_restores_everything() {
    let Some(g) = Garage::single() else { return };
    let work = tempfile::tempdir().unwrap();
    let a = Host::new(&g, "fresh");
    a.ok(["init"]);
    let va = volume(work.path(), "a");
    let vb = volume(work.path(), "b");
    let sa = a.snapshot(&va, "a");
    let sb = a.snapshot(&vb, "b");
    let (packs, _) = pack_bytes(&g, "fresh");
    assert!(packs >= 2);
    // A new host rebuilding its index reads the logs, not one pack.
    let c = Host::new(&g, "fresh");
    let report = c.json(["repair", "index", "--json"]);
    assert_eq!(report["packs_scanned"], 0, "{report}");
    assert!(report["logs"].as_u64().unwrap() >= packs as u64, "{report}");
    assert_eq!(report["packs"].as_u64().unwrap(), packs as u64, "{report}");
    // Another new host syncs at open and restores every snapshot byte-identically.
    let d = Host::new(&g, "fresh");
    for (snap, vol) in [(&sa, &va), (&sb, &vb)] {
        let out = work.path().join(format!("d-{}", support::id(snap)));
        d.restore(&support::id(snap), &out);
        assert_same_tree(vol, &out);
    }
    let check = d.json(["check", "--json"]);
    assert_eq!(check["ok"], true, "{check}");
}

#[test]
fn packs_another_host_deletes_leave_this_hosts_index() {
    let Some(g) = Garage::single() else { return };
    let work = tempfile::tempdir().unwrap();
    let a = Host::new(&g, "removal");
    let b = Host::new(&g, "removal");
    a.ok(["init"]);
    let v1 = volume(work.path(), "one");
    let v2 = volume(work.path(), "two");
    let s1 = a.snapshot(&v1, "one");
    let s2 = a.snapshot(&v2, "two");
    // b has indexed every pack.
    assert_eq!(b.listed().len(), 2);
    a.ok(["forget", &support::id(&s1)]);
    a.ok(["gc"]);
    // gc deleted packs (one's own data); b learns it from a's removal logs: its
    // check finds no row pointing at a missing pack, and the other snapshot restores.
    let check = b.json(["check", "--json"]);
    assert_eq!(check["ok"], true, "{check}");
    let out = work.path().join("two-again");
    b.restore(&support::id(&s2), &out);
    assert_same_tree(&v2, &out);
}

/// Requests Garage's node 0 logged (one line each) from byte `from` of its log on:
/// (count, lines).
fn requests_since(g: &Garage, from: usize) -> (usize, Vec<String>) {
    let log = std::fs::read_to_string(g.dir().join("node0/garage.log")).expect("garage log");
    let lines: Vec<String> = log[from.min(log.len())..]
        .lines()
        .filter(|l| {
            l.contains("generic_server") && l.contains(g.bucket()) && !l.contains("in response to")
        })
        .map(str::to_string)
        .collect();
    (lines.len(), lines)
}

fn log_len(g: &Garage) -> usize {
    std::fs::metadata(g.dir().join("node0/garage.log")).map_or(0, |m| m.len() as usize)
}

/// The requests of one no-change snapshot of `vol` by `host`, counted in Garage's own
/// request log, after a first one that takes in what other hosts wrote meanwhile.
fn no_change_requests(g: &Garage, host: &Host, vol: &Path) -> (usize, Vec<String>) {
    host.snapshot(vol, "steady");
    let from = log_len(g);
    host.snapshot(vol, "steady");
    requests_since(g, from)
}

#[test]
fn a_no_change_snapshot_costs_the_same_however_many_packs_the_bucket_holds() {
    let Some(g) = Garage::single() else { return };
    let work = tempfile::tempdir().unwrap();
    let a = Host::new(&g, "steady");
    let b = Host::new(&g, "steady");
    a.ok(["init"]);
    let vol = volume(work.path(), "steady");
    support::wait_out_racy_window(&vol);
    a.snapshot(&vol, "steady");
    // Both hosts have logs from the start: sync costs one listing per host.
    b.snapshot(&volume(work.path(), "other"), "other");
    let (few_packs, _) = pack_bytes(&g, "steady");
    let (before, lines) = no_change_requests(&g, &a, &vol);
    // 8 for the snapshot itself (config, logs, one listing per other host, records,
    // series, the version claim's write and listing, the record) and 4 for its lease
    // (this host's dead leases, the lease's write and delete, the gc/ listing).
    assert!(before <= 14, "{lines:#?}");
    // Another host fills the bucket with many more packs (each volume its own data).
    for i in 0..8 {
        let v = volume(work.path(), &format!("other-{i}"));
        b.snapshot(&v, &format!("other-{i}"));
    }
    let (many_packs, _) = pack_bytes(&g, "steady");
    assert!(
        many_packs >= few_packs + 16,
        "{few_packs} -> {many_packs} packs"
    );
    let (after, lines_after) = no_change_requests(&g, &a, &vol);
    assert_eq!(
        before, after,
        "a no-change snapshot's requests grew with the packs ({few_packs} -> {many_packs}):\n\
         {lines:#?}\n{lines_after:#?}"
    );
    assert!(
        lines_after.iter().all(|l| !l.contains("/packs/")),
        "no pack is read or listed: {lines_after:#?}"
    );
}

#[test]
fn a_damaged_log_is_reported_and_its_pack_read_instead() {
    let Some(g) = Garage::single() else { return };
    let work = tempfile::tempdir().unwrap();
    let a = Host::new(&g, "damaged");
    a.ok(["init"]);
    let vol = volume(work.path(), "d");
    let snap = a.snapshot(&vol, "d");
    let s3 = g.client();
    let logs = s3.list("damaged/logs").expect("list logs");
    assert!(!logs.is_empty());
    for (key, _) in &logs {
        let mut bytes = s3.get(key).expect("get log");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        s3.put(key, &bytes).expect("put log");
    }
    let b = Host::new(&g, "damaged");
    let out = b.run(["list"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: log") && stderr.contains("damaged (checksum mismatch)"),
        "{stderr}"
    );
    let to = work.path().join("restored");
    b.restore(&support::id(&snap), &to);
    assert_same_tree(&vol, &to);
}

/// GETs of another host's logs among Garage's request lines.
fn log_reads(lines: &[String], host: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("GET") && l.contains(&format!("/logs/{host}/")))
        .count()
}

fn host_id(h: &Host) -> String {
    std::fs::read_to_string(h.cache.path().join("host-id"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_snapshot_indexes_other_hosts_packs_only_for_new_data_and_their_removals_at_once() {
    let Some(g) = Garage::single() else { return };
    let work = tempfile::tempdir().unwrap();
    let a = Host::new(&g, "defer");
    let b = Host::new(&g, "defer");
    a.ok(["init"]);
    let steady = volume(work.path(), "steady");
    support::wait_out_racy_window(&steady);
    a.snapshot(&steady, "steady");
    a.snapshot(&steady, "steady");
    let bee = volume(work.path(), "bee");
    write(bee.join("solo.bin"), random_bytes("solo", 1 << 20));
    let sb = b.snapshot(&bee, "bee");
    let b_host = host_id(&b);

    // A no-change snapshot reads b's new logs but indexes nothing of them: it keeps
    // them in its cache (`pending-logs`), and the next one reads none again.
    let pending = a.cache.path().join("pending-logs");
    let (_, first) = no_change_requests(&g, &a, &steady);
    assert!(
        pending.exists(),
        "b's logs were indexed by a no-change snapshot"
    );
    assert_eq!(log_reads(&first, &b_host), 0, "{first:#?}");
    // New data, all of it b's: the snapshot indexes b's packs on its first miss and
    // stores nothing b stored.
    let copy = work.path().join("bee-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["own.bin", "shared.bin"] {
        std::fs::copy(bee.join(f), copy.join(f)).unwrap();
    }
    let again = a.snapshot(&copy, "copy");
    let new = again["stats"]["new_bytes_stored"].as_u64().unwrap();
    assert!(new < 100_000, "b's 4 MiB stored again: {again}");
    assert!(
        !pending.exists(),
        "b's logs are still pending after new data"
    );

    // b forgets its snapshot and gc rewrites the pack without solo.bin (a's copy keeps
    // the rest), then b writes more. a's next snapshot defers the new packs but takes
    // the removal at once: content gc deleted is stored again, never referenced where
    // it is gone.
    a.listed();
    b.ok(["forget", &support::id(&sb)]);
    b.ok(["gc", "--max-unused", "0"]);
    let more = volume(work.path(), "more");
    b.snapshot(&more, "more");
    let gone = work.path().join("gone");
    std::fs::create_dir_all(&gone).unwrap();
    std::fs::copy(bee.join("solo.bin"), gone.join("solo.bin")).unwrap();
    let s = a.snapshot(&gone, "gone");
    assert!(
        s["stats"]["new_bytes_stored"].as_u64().unwrap() >= 1 << 20,
        "content whose packs gc deleted was not stored again: {s}"
    );
    let fresh = Host::new(&g, "defer");
    let check = fresh.json(["check", "--read-data", "--json"]);
    assert_eq!(check["ok"], true, "{check}");
    for (dir, snap) in [(&gone, &s), (&copy, &again)] {
        let to = work.path().join(format!("restored-{}", support::id(snap)));
        fresh.restore(&support::id(snap), &to);
        assert_same_tree(dir, &to);
    }
}
