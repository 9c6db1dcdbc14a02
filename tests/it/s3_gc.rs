//! gc across hosts on an object store (a real single-node Garage): leases in the
//! bucket, the condemned set in `gc/`, dead leases, `--release-host`. Each "host" is a
//! cache directory of its own (a new cache is a new host id).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::garage::Garage;
use crate::support::*;

/// `volsnap --repo s3://BUCKET/PREFIX --cache-dir CACHE`, pointed at `garage`.
fn volsnap(garage: &Garage, prefix: &str, cache: &Path) -> Command {
    let mut cmd = Command::new(bin());
    garage.apply_env(&mut cmd);
    cmd.arg("--repo")
        .arg(garage.repo_url(prefix))
        .arg("--cache-dir")
        .arg(cache)
        .env_remove("VOLSNAP_REPO")
        .env_remove("VOLSNAP_CACHE_DIR");
    cmd
}

/// One host: its own cache directory on one repository prefix.
struct Host<'b> {
    bucket: &'b Garage,
    prefix: String,
    cache: PathBuf,
}

impl Host<'_> {
    fn cmd(&self) -> Command {
        volsnap(self.bucket, &self.prefix, &self.cache)
    }

    fn ok(&self, args: &[&str]) -> Value {
        let mut cmd = self.cmd();
        cmd.arg("--json").args(args);
        let run = Run::from_command(cmd);
        assert_eq!(run.status, 0, "{}", run.describe());
        run.json()
    }

    fn host_id(&self) -> String {
        std::fs::read_to_string(self.cache.join("host-id"))
            .unwrap()
            .trim()
            .to_string()
    }
}

struct World {
    bucket: Garage,
    scratch: tempfile::TempDir,
    prefix: String,
}

impl World {
    fn new() -> Option<World> {
        let bucket = Garage::single()?;
        let scratch = tempfile::tempdir().unwrap();
        let prefix = format!("gc-{}", std::process::id());
        Some(World {
            bucket,
            scratch,
            prefix,
        })
    }

    fn host(&self, name: &str) -> Host<'_> {
        Host {
            bucket: &self.bucket,
            prefix: self.prefix.clone(),
            cache: self.scratch.path().join(format!("cache-{name}")),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let p = self.scratch.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

/// Starts `cmd` held at pause point `at`; returns it once it is there.
fn paused(mut cmd: Command, at: &str, pause: &Path) -> Child {
    write(pause, "hold");
    let reached = PathBuf::from(format!("{}.reached", pause.display()));
    let _ = std::fs::remove_file(&reached);
    cmd.env("VOLSNAP_PAUSE_AT", at)
        .env("VOLSNAP_PAUSE_FILE", pause)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while !reached.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "ended ({status}) before pause {at:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never reached {at:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Every listed snapshot, restored through a fresh host (an empty cache), is the
/// directory it was taken of, and `check --read-data` is clean.
fn every_snapshot_restores(w: &World, sources: &[(&str, &Path)]) {
    let fresh = w.host(&format!("fresh-{}", rand_name()));
    let check = fresh.ok(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let list = fresh.ok(&["list"]);
    let snaps = list.as_array().unwrap();
    assert!(!snaps.is_empty());
    for s in snaps {
        let name = s["series"].as_str().or(s["name"].as_str()).unwrap();
        let id = s["id"].as_str().unwrap();
        let (_, src) = sources
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("unexpected series in {s}"));
        let out = w.scratch.path().join(format!("restore-{id}"));
        fresh.ok(&["restore", id, "--to", out.to_str().unwrap()]);
        assert_same_tree(src, &out);
    }
}

fn rand_name() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A volume whose big file an incremental snapshot reuses and whose small file changes.
fn volume(w: &World, name: &str) -> PathBuf {
    let data = w.dir(name);
    write(data.join("big"), random_bytes(name, 3_000_000));
    write(data.join("small"), "v1");
    set_tree_mtimes(&data, 1_577_836_800);
    wait_out_racy_window(&data);
    data
}

#[test]
fn a_paused_snapshot_of_another_host_keeps_the_blobs_it_reuses() {
    // PSA-2025-00019-1 across hosts: host A's incremental reuses S0's chunks and is
    // held before its commit while host C forgets S0 and collects.
    let Some(w) = World::new() else { return };
    let (a, c) = (w.host("a"), w.host("c"));
    a.ok(&["init"]);
    let data = volume(&w, "s");
    let s0 = a.ok(&["snapshot", data.to_str().unwrap(), "--name", "s"]);
    write(data.join("small"), "v2");
    let pause = w.scratch.path().join("pause-a");
    let mut snap = a.cmd();
    snap.args(["--json", "snapshot", data.to_str().unwrap(), "--name", "s"]);
    let snap = paused(snap, "snapshot before commit", &pause);

    c.ok(&["forget", &id(&s0)]);
    let mut gc = c.cmd();
    gc.args(["gc"])
        .env("VOLSNAP_GC_LEASE_WAIT", "120")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut gc = gc.spawn().unwrap();
    let stderr = gc.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            all += &line;
            all += "\n";
        }
        all
    });
    // gc must be waiting for A's lease before A goes on.
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("waiting for") => {
                assert!(line.contains(&a.host_id()), "{line}");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                std::fs::remove_file(&pause).unwrap();
                panic!(
                    "gc never waited for host A's snapshot ({e}): {}",
                    reader.join().unwrap()
                );
            }
        }
    }
    std::fs::remove_file(&pause).unwrap();
    let out = snap.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s1: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stat_u64(&s1, "bytes_read"), 2, "big was reused: {s1}");
    assert!(gc.wait().unwrap().success(), "{}", reader.join().unwrap());
    every_snapshot_restores(&w, &[("s", &data)]);
}

#[test]
fn a_snapshot_started_after_gc_listed_the_leases_stores_the_condemned_blobs_again() {
    // The other half of the argument: A's lease is not among those gc waits for, so A
    // must see gc's condemned set and store its own copy of S0's chunks.
    let Some(w) = World::new() else { return };
    let (a, c) = (w.host("a"), w.host("c"));
    a.ok(&["init"]);
    let data = volume(&w, "s");
    let s0 = a.ok(&["snapshot", data.to_str().unwrap(), "--name", "s"]);
    write(data.join("small"), "v2");
    c.ok(&["forget", &id(&s0)]);
    let pause = w.scratch.path().join("pause-c");
    let mut gc = c.cmd();
    gc.args(["--json", "gc"]);
    let gc = paused(gc, "gc listed leases", &pause);
    let s1 = a.ok(&["snapshot", data.to_str().unwrap(), "--name", "s"]);
    assert!(
        stat_u64(&s1, "new_bytes_stored") >= 2_900_000,
        "the condemned chunks were stored again: {s1}"
    );
    std::fs::remove_file(&pause).unwrap();
    let out = gc.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["packs_deleted"].as_u64().unwrap() >= 1, "{report}");
    every_snapshot_restores(&w, &[("s", &data)]);
}

#[test]
fn two_hosts_snapshot_while_a_third_collects_and_every_snapshot_restores() {
    let Some(w) = World::new() else { return };
    let (a, b, c) = (w.host("a"), w.host("b"), w.host("c"));
    a.ok(&["init"]);
    let da = volume(&w, "va");
    let db = volume(&w, "vb");
    // Shared chunks between the hosts, forgotten snapshots for gc to collect.
    write(db.join("shared"), random_bytes("shared", 1_000_000));
    write(da.join("shared"), random_bytes("shared", 1_000_000));
    let forget = [
        id(&a.ok(&["snapshot", da.to_str().unwrap(), "--name", "va"])),
        id(&b.ok(&["snapshot", db.to_str().unwrap(), "--name", "vb"])),
    ];
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for (h, d, name) in [(&a, &da, "va"), (&b, &db, "vb")] {
            let stop = &stop;
            s.spawn(move || {
                let mut round = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || round < 3 {
                    round += 1;
                    write(d.join("small"), format!("{name} {round}"));
                    write(
                        d.join(format!("f{round}")),
                        random_bytes(&format!("{name}{round}"), 200_000),
                    );
                    h.ok(&["snapshot", d.to_str().unwrap(), "--name", name]);
                    if round > 6 {
                        break;
                    }
                }
            });
        }
        for f in &forget {
            c.ok(&["forget", f]);
        }
        for _ in 0..3 {
            c.ok(&["gc"]);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    // The last snapshot of each series is the volume as it is now.
    let fresh = w.host("check");
    let check = fresh.ok(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let list = fresh.ok(&["list"]);
    for s in list.as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        let out = w.scratch.path().join(format!("r-{id}"));
        fresh.ok(&["restore", id, "--to", out.to_str().unwrap()]);
        assert!(
            out.join("big").exists() && out.join("small").exists(),
            "{s}"
        );
    }
    // Latest of each series restores byte-identically.
    for (name, d) in [("va", &da), ("vb", &db)] {
        let out = w.scratch.path().join(format!("latest-{name}"));
        fresh.ok(&[
            "restore",
            &format!("{name}@latest"),
            "--to",
            out.to_str().unwrap(),
        ]);
        assert_same_tree(d, &out);
    }
}

#[test]
fn dead_leases_are_cleaned_by_their_host_and_another_hosts_stop_gc_until_released() {
    let Some(w) = World::new() else { return };
    let (x, c) = (w.host("x"), w.host("c"));
    c.ok(&["init"]);
    let data = volume(&w, "v");
    let killed = |pause: &Path| {
        let mut snap = x.cmd();
        snap.args(["snapshot", data.to_str().unwrap(), "--name", "v"]);
        let mut child = paused(snap, "snapshot before commit", pause);
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_file(pause).unwrap();
    };

    // Same host: the next command there deletes the dead lease; gc then runs through.
    killed(&w.scratch.path().join("p1"));
    x.ok(&["list"]);
    let mut gc = c.cmd();
    gc.args(["gc"]).env("VOLSNAP_GC_LEASE_WAIT", "0");
    let run = Run::from_command(gc);
    assert_eq!(run.status, 0, "{}", run.describe());

    // Another host's dead lease: gc stops with exit 11, names it, deletes nothing.
    // (New data: the blobs of the first attempt are gone, and host X's index, which
    // learns of that only through removal logs, must not be what this test exercises.)
    write(data.join("big"), random_bytes("second attempt", 3_000_000));
    killed(&w.scratch.path().join("p2"));
    let mut gc = c.cmd();
    gc.args(["gc"]).env("VOLSNAP_GC_LEASE_WAIT", "1");
    let run = Run::from_command(gc).code(11);
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{}", run.describe()))
        .to_string();
    let host = x.host_id();
    assert!(
        line.contains(&host)
            && line.contains("snapshot")
            && line.contains("by the store's clock")
            && line.contains("nothing was deleted")
            && line.contains(&format!("--release-host {host}")),
        "{line}"
    );
    // The operator declares X gone: gc finishes.
    let report = c.ok(&["gc", "--release-host", &host]);
    assert!(report["packs_deleted"].as_u64().unwrap() >= 1, "{report}");
    let mut gc = c.cmd();
    gc.args(["gc"]).env("VOLSNAP_GC_LEASE_WAIT", "0");
    let run = Run::from_command(gc);
    assert_eq!(run.status, 0, "{}", run.describe());
}
