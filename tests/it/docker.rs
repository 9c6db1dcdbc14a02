//! Docker: discovery through the real engine, and engine failures as one-line errors.
//!
//! Tests that need the engine run it for real; without one they are skipped, except in
//! CI (`CI` set to a true value: `true`, `1`, `yes`...), where a missing engine fails them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use crate::support::*;

/// The test image: a root filesystem holding a static busybox, imported into the
/// engine (no registry is needed). Built once per test run.
/// Tagged by what it holds: change the tag when the applets change.
const IMAGE: &str = "volsnap-test:busybox-2";

/// Whether an engine answers; panics in CI when none does.
fn engine() -> bool {
    let up = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !up {
        missing_component("no Docker engine answers");
    }
    up
}

#[test]
fn ci_is_any_true_value() {
    for v in ["true", "1", "yes", "TRUE", "True", "on", " true "] {
        assert!(in_ci(Some(v)), "{v:?}");
    }
    for v in [
        None,
        Some(""),
        Some("0"),
        Some("false"),
        Some("no"),
        Some("off"),
        Some("FALSE"),
    ] {
        assert!(!in_ci(v), "{v:?}");
    }
}

#[test]
fn without_an_engine_the_container_tests_fail_in_ci() {
    // The test binary itself, asked to run one container test with no engine reachable
    // (`docker` is looked up in an empty PATH): it fails in CI, skips outside.
    let me = std::env::current_exe().unwrap();
    let empty = tempfile::tempdir().unwrap();
    for (ci, fails) in [("1", true), ("yes", true), ("true", true), ("", false)] {
        let out = Command::new(&me)
            .args([
                "--exact",
                "docker::a_missing_container_is_a_one_line_error",
                "--test-threads=1",
            ])
            .env("PATH", empty.path())
            .env("CI", ci)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(!out.status.success(), fails, "CI={ci:?}: {text}");
        if fails {
            assert!(
                text.contains("no Docker engine answers"),
                "CI={ci:?}: {text}"
            );
        }
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Imports the test image if the engine does not have it yet.
fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return;
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("a static busybox (Debian package busybox-static)");
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(busybox, bin.join("busybox")).unwrap();
        for applet in [
            "sh", "sleep", "echo", "cat", "tail", "head", "tr", "dd", "cut", "ls", "sync", "date",
            "seq", "true",
        ] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        for d in ["tmp", "data", "vol", "proc", "sys", "dev", "etc"] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        let tar = root.path().join("rootfs.tar");
        let st = Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(root.path())
            .args(["bin", "tmp", "data", "vol", "proc", "sys", "dev", "etc"])
            .status()
            .unwrap();
        assert!(st.success());
        docker(&["import", tar.to_str().unwrap(), IMAGE]);
    });
    IMAGE
}

/// A container (created, not started) and the named volume it uses, removed on drop.
struct Fixture {
    name: String,
    volume: String,
    bind: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f", &self.volume])
            .output();
    }
}

fn fixture(repo: &Repo, tag: &str) -> Fixture {
    let unique = format!("volsnap-it-{tag}-{}", std::process::id());
    let bind = repo.mkdir("bind");
    write(bind.join("hello.txt"), "from the host\n");
    docker(&["volume", "create", &unique]);
    let f = Fixture {
        name: unique.clone(),
        volume: unique.clone(),
        bind: bind.clone(),
    };
    docker(&[
        "create",
        "--name",
        &unique,
        "-v",
        &format!("{}:/data", bind.display()),
        "-v",
        &format!("{unique}:/vol"),
        "--tmpfs",
        "/scratch",
        "--label",
        "volsnap.enable=true",
        image(),
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 0.1; done",
    ]);
    f
}

#[test]
fn volumes_lists_every_mount_and_says_why_a_tmpfs_cannot_be_snapshotted() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = fixture(&repo, "volumes");
    let out: Value = repo.ok(["volumes", &f.name]);
    let c = &out[0];
    assert_eq!(c["name"], f.name.as_str(), "{out}");
    let mounts = c["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 3, "{out}");
    let at = |dest: &str| {
        mounts
            .iter()
            .find(|m| m["destination"] == dest)
            .unwrap_or_else(|| panic!("no mount at {dest}: {out}"))
            .clone()
    };
    let bind = at("/data");
    assert_eq!(bind["type"], "bind");
    assert_eq!(bind["source"], f.bind.to_str().unwrap());
    assert_eq!(bind["snapshottable"], true, "{bind}");
    let vol = at("/vol");
    assert_eq!(vol["type"], "volume");
    assert_eq!(vol["volume"], f.volume.as_str());
    let mountpoint = docker(&[
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        &f.volume,
    ]);
    assert_eq!(vol["source"], mountpoint.as_str());
    assert_eq!(vol["snapshottable"], true, "{vol}");
    let tmpfs = at("/scratch");
    assert_eq!(tmpfs["type"], "tmpfs");
    assert_eq!(tmpfs["snapshottable"], false);
    assert!(
        tmpfs["reason"]
            .as_str()
            .unwrap()
            .contains("nothing persistent"),
        "{tmpfs}"
    );
    // The same container found by label, and the human output says it too.
    let by_label: Value = repo.ok(["volumes", "--label", "volsnap.enable=true"]);
    assert!(
        by_label
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == f.name.as_str()),
        "{by_label}"
    );
    let text = repo.run(["volumes", &f.name]).code(0).stdout_str();
    assert!(
        text.contains("/scratch tmpfs - rw: not snapshottable: tmpfs holds nothing persistent"),
        "{text}"
    );
}

#[test]
fn a_missing_container_is_a_one_line_error() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let run = repo.run(["volumes", "volsnap-no-such-container"]).code(1);
    assert!(
        run.error_line().contains("does not exist"),
        "{}",
        run.describe()
    );
}

#[test]
fn no_engine_is_a_one_line_error_with_a_hint() {
    let repo = Repo::new();
    let mut cmd = repo.command();
    cmd.env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .args(["volumes", "anything"]);
    let run = Run::from_command(cmd).code(1);
    let line = run.error_line();
    assert!(line.contains("no Docker engine at"), "{}", run.describe());
    assert!(line.contains("is it running"), "{}", run.describe());
    assert_eq!(
        run.all_output().trim().lines().count(),
        1,
        "{}",
        run.describe()
    );
}

/// Size of one record the writer appends (one write(2) each).
const RECORD: usize = 256 * 1024;

/// A running container appending numbered records, each one `write(2)` of `RECORD`
/// bytes, to a file in a bind mount and in a named volume, without pause.
fn writer(repo: &Repo, tag: &str) -> Fixture {
    let unique = format!("volsnap-it-{tag}-{}", std::process::id());
    let bind = repo.mkdir("bind");
    docker(&["volume", "create", &unique]);
    let f = Fixture {
        name: unique.clone(),
        volume: unique.clone(),
        bind: bind.clone(),
    };
    // Each record: "REC <n> <boot>\n", padding, "END <n>\n", exactly RECORD bytes,
    // built in /tmp and appended by dd in a single write. <boot> changes every time the
    // container starts; numbering continues from the last record in /data/log.
    let script = format!(
        "trap 'exit 0' TERM; b=$(cut -c1-8 /proc/sys/kernel/random/uuid); i=0; \
         if [ -s /data/log ]; then i=$(tail -n 1 /data/log | cut -d' ' -f2); fi; \
         while true; do i=$((i+1)); \
         h=\"REC $i $b\"; t=\"END $i\"; \
         {{ echo \"$h\"; head -c $(( {RECORD} - ${{#h}} - ${{#t}} - 2 )) /dev/zero | tr '\\0' x; echo \"$t\"; }} > /tmp/rec; \
         dd if=/tmp/rec bs={RECORD} count=1 2>/dev/null >> /data/log; \
         dd if=/tmp/rec bs={RECORD} count=1 2>/dev/null >> /vol/log; \
         sleep 0.01; done"
    );
    docker(&[
        "run",
        "-d",
        "--name",
        &unique,
        "-v",
        &format!("{}:/data", bind.display()),
        "-v",
        &format!("{unique}:/vol"),
        image(),
        "sh",
        "-c",
        &script,
    ]);
    // Let it write a few records.
    let log = bind.join("log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(&log).map_or(0, |m| m.len()) < 4 * RECORD as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never wrote"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    f
}

/// Every record of `path` is whole (`REC n boot`, padding, `END n`) and they are
/// numbered 1, 2, ... Returns each record's boot id.
fn records(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        bytes.len() % RECORD,
        0,
        "{} ends in a torn record ({} bytes)",
        path.display(),
        bytes.len()
    );
    let mut boots = Vec::new();
    for (i, rec) in bytes.chunks(RECORD).enumerate() {
        let n = i + 1;
        let text = String::from_utf8_lossy(rec);
        let head = text.lines().next().unwrap_or("");
        let mut words = head.split(' ');
        assert_eq!(
            (words.next(), words.next()),
            (Some("REC"), Some(n.to_string().as_str())),
            "record {n} of {} is torn or out of order",
            path.display()
        );
        assert!(
            text.ends_with(&format!("END {n}\n")),
            "record {n} of {} is torn",
            path.display()
        );
        boots.push(words.next().unwrap_or("").to_string());
    }
    boots
}

/// `records`, for when only the count matters.
fn whole_records(path: &Path) -> u64 {
    records(path).len() as u64
}

fn state(name: &str) -> String {
    docker(&["inspect", "--format", "{{.State.Status}}", name])
}

/// The snapshot's copy of the container's two logs, restored to a scratch directory.
fn restored_logs(repo: &Repo, snap: &Value, name: &str) -> (PathBuf, PathBuf) {
    let out = repo.scratch(&format!("restored-{}", &id(snap)[..12]));
    repo.restore(&id(snap), &out);
    (
        out.join(format!("{name}-data")).join("log"),
        out.join(format!("{name}-vol")).join("log"),
    )
}

#[test]
fn paused_snapshots_never_capture_a_torn_record_and_leave_the_container_running() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = writer(&repo, "torn");
    let mut last = 0;
    for _ in 0..4 {
        let out: Value = repo.ok(["snapshot", "--container", &f.name, "--quiesce", "pause"]);
        let snap = &out[0];
        assert_eq!(snap["series"], f.name.as_str(), "{out}");
        assert_eq!(state(&f.name), "running");
        let (data, vol) = restored_logs(&repo, snap, &f.name);
        let n = whole_records(&data);
        assert!(n > last, "the writer did not move on ({n} after {last})");
        last = n;
        whole_records(&vol);
    }
    // The manifest names the container, its image and both mounts.
    let shown = repo.ok(["show", &format!("{}@latest", f.name)]);
    let c = &shown["containers"][0];
    assert_eq!(c["name"], f.name.as_str(), "{shown}");
    assert_eq!(c["image"], IMAGE, "{shown}");
    assert!(
        c["image_id"].as_str().unwrap().starts_with("sha256:"),
        "{shown}"
    );
    assert_eq!(c["mounts"].as_array().unwrap().len(), 2, "{shown}");
}

#[test]
fn a_failed_or_crashed_or_interrupted_snapshot_never_leaves_the_container_paused() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = writer(&repo, "resume");
    // An error while paused.
    let mut cmd = repo.command();
    cmd.env("VOLSNAP_FAIL_AT", "docker quiesced")
        .args(["snapshot", "--container", &f.name]);
    let run = Run::from_command(cmd).code(1);
    assert!(
        run.error_line().contains("injected failure"),
        "{}",
        run.describe()
    );
    assert_eq!(state(&f.name), "running");
    // A crash while paused: the container stays paused until the next command.
    let crashed = repo.run_crashing_at(
        "docker quiesced a container",
        &["snapshot", "--container", &f.name],
    );
    assert_eq!(crashed.as_deref(), Some("docker quiesced a container"));
    assert_eq!(state(&f.name), "paused");
    let rec = repo.ok(["recover"]);
    assert_eq!(rec["resumed_containers"][0], f.name.as_str(), "{rec}");
    assert_eq!(state(&f.name), "running");
    // Interrupted (SIGINT) while paused.
    let flag = repo.scratch("pause-flag");
    write(&flag, "");
    let mut cmd = repo.command();
    cmd.env("VOLSNAP_PAUSE_AT", "docker quiesced")
        .env("VOLSNAP_PAUSE_FILE", &flag)
        .args(["snapshot", "--container", &f.name]);
    let mut child = cmd.spawn().unwrap();
    let reached = PathBuf::from(format!("{}.reached", flag.display()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !reached.exists() {
        assert!(std::time::Instant::now() < deadline, "never paused");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(state(&f.name), "paused");
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(state(&f.name), "running");
    // And a normal snapshot afterwards still captures whole records.
    let out: Value = repo.ok(["snapshot", "--container", &f.name]);
    let (data, _) = restored_logs(&repo, &out[0], &f.name);
    whole_records(&data);
}

#[test]
fn live_restore_of_a_container_runs_it_on_the_restored_data_and_undo_brings_the_newer_back() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = writer(&repo, "restore");
    let out: Value = repo.ok(["snapshot", "--container", &f.name]);
    let snap = out[0].clone();
    let (snap_data, _) = restored_logs(&repo, &snap, &f.name);
    let at_snapshot = records(&snap_data);
    // Newer data after the snapshot.
    let log = f.bind.join("log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while whole_len(&log) < at_snapshot.len() + 5 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let restored = repo.ok(["restore", &id(&snap), "--container", &f.name, "--yes"]);
    assert_eq!(restored["redeployed"], true, "{restored}");
    assert_eq!(state(&f.name), "running");
    // The container runs on the restored data: the snapshot's records, then new ones
    // continuing its numbering, written by the restarted container.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while whole_len(&log) < at_snapshot.len() + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted container wrote nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let now = records(&log);
    assert_eq!(
        &now[..at_snapshot.len()],
        &at_snapshot[..],
        "the restored prefix differs"
    );
    let new_boot = &now[at_snapshot.len()];
    assert!(
        !at_snapshot.contains(new_boot),
        "record {} was not written by the restarted container: the old data is still there",
        at_snapshot.len() + 1
    );
    // Undo: the newer data (as it was when the restore stopped the container) is back.
    let undo = repo.ok(["restore", "--undo", "--container", &f.name, "--yes"]);
    assert_eq!(undo["snapshot"], restored["undo"], "{undo}");
    assert_eq!(state(&f.name), "running");
    let (undo_data, _) = restored_logs(
        &repo,
        &repo.ok(["show", restored["undo"].as_str().unwrap()]),
        &f.name,
    );
    let newer = records(&undo_data);
    assert!(
        newer.len() >= at_snapshot.len() + 5,
        "the undo snapshot lacks the newer data"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while whole_len(&log) < newer.len() + 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(&records(&log)[..newer.len()], &newer[..]);
}

/// Whole records in `path` now (a torn last one, being written, is not counted).
fn whole_len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize / RECORD)
}

#[test]
fn killed_during_a_container_restore_then_recovered_leaves_it_running_on_old_or_new_data() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = fixture(&repo, "kill");
    docker(&["start", &f.name]);
    let snap: Value = repo.ok(["snapshot", "--container", &f.name]);
    let snap_id = id(&snap[0]);
    let new = repo.scratch("new");
    repo.restore(&snap_id, &new);
    // The live data moves on.
    write(f.bind.join("hello.txt"), "changed after the snapshot\n");
    write(f.bind.join("added.txt"), "added after the snapshot\n");
    let vol = PathBuf::from(docker(&[
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        &f.volume,
    ]));
    write(
        vol.join("later.txt"),
        "in the named volume after the snapshot\n",
    );
    let old = repo.mkdir("old");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&f.bind)
        .arg(&old)
        .status()
        .unwrap();
    assert!(st.success());
    let old = old.join(f.bind.file_name().unwrap());
    let label = format!("{}-data", f.name);
    let args = [
        "restore",
        snap_id.as_str(),
        "--container",
        f.name.as_str(),
        "--yes",
    ];
    // After a kill and `recover`: the container runs, both volumes are on the same
    // side; returns whether that is the snapshot's ("new"), after putting the old data
    // back for the next kill.
    let settle = |when: &str| -> bool {
        repo.ok(["recover"]);
        assert_eq!(state(&f.name), "running", "after a kill {when}");
        let is = |want: &Path| tree_differences(want, &f.bind, &[]).is_empty();
        let bind_new = is(&new.join(&label));
        // The named volume went the same way as the bind mount.
        assert_eq!(
            !vol.join("later.txt").exists(),
            bind_new,
            "after a kill {when} the volumes ended on different sides"
        );
        if bind_new {
            // Back to the old data for the next round, the same way.
            repo.ok(["restore", "--undo", "--container", &f.name, "--yes"]);
            assert_eq!(state(&f.name), "running");
        } else {
            assert_same_tree(&old, &f.bind);
        }
        assert!(
            tree_differences(&old, &f.bind, &[]).is_empty(),
            "not back to old data"
        );
        bind_new
    };
    // Killed (SIGKILL) at named steps: before the commit it rolls back, after it the
    // restore is finished.
    for (step, after_commit) in [
        ("live journal written", false),
        ("live quiesced", false),
        ("live staged a volume", false),
        ("live undo snapshot taken", false),
        ("live swapped a volume", false),
        ("live committed", true),
        ("live redeployed", true),
    ] {
        let paused = repo.spawn_paused(step, &args);
        paused.signal(rustix::process::Signal::KILL);
        assert_eq!(
            settle(&format!("at {step:?}")),
            after_commit,
            "killed at {step:?}"
        );
    }
    // And at instants spread over the restore, wherever they land.
    for delay_ms in [0u64, 40, 80, 150, 250, 400, 700, 1000] {
        let mut cmd = repo.command();
        cmd.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        settle(&format!("after {delay_ms} ms"));
    }
}

#[test]
fn an_unhealthy_container_after_a_restore_is_rolled_back_when_asked() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let unique = format!("volsnap-it-health-{}", std::process::id());
    let bind = repo.mkdir("bind");
    write(bind.join("app.txt"), "version 1\n");
    let f = Fixture {
        name: unique.clone(),
        volume: unique.clone(),
        bind: bind.clone(),
    };
    docker(&[
        "run",
        "-d",
        "--name",
        &unique,
        "-v",
        &format!("{}:/data", bind.display()),
        "--health-cmd",
        "test -e /data/ok",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
        image(),
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 0.1; done",
    ]);
    // The snapshot has no /data/ok: restored, the app would be unhealthy.
    let snap: Value = repo.ok(["snapshot", "--container", &f.name]);
    write(bind.join("ok"), "");
    write(bind.join("app.txt"), "version 2\n");
    let health = || docker(&["inspect", "--format", "{{.State.Health.Status}}", &f.name]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while health() != "healthy" {
        assert!(std::time::Instant::now() < deadline, "never healthy");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let run = repo
        .run([
            "restore",
            &id(&snap[0]),
            "--container",
            &f.name,
            "--yes",
            "--health-timeout",
            "6",
            "--rollback-on-unhealthy",
        ])
        .code(1);
    assert!(
        run.all_output().contains("putting the previous data back"),
        "{}",
        run.describe()
    );
    assert!(
        run.all_output().contains("rolled back"),
        "{}",
        run.describe()
    );
    // The newer data is back and the container is healthy on it.
    assert_eq!(
        std::fs::read_to_string(bind.join("app.txt")).unwrap(),
        "version 2\n"
    );
    assert!(bind.join("ok").exists());
    assert_eq!(state(&f.name), "running");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while health() != "healthy" {
        assert!(
            std::time::Instant::now() < deadline,
            "not healthy after the rollback"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn a_container_its_user_paused_stays_paused() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = fixture(&repo, "userpause");
    docker(&["start", &f.name]);
    docker(&["pause", &f.name]);
    let out: Value = repo.ok(["snapshot", "--container", &f.name]);
    assert_eq!(out[0]["series"], f.name.as_str(), "{out}");
    assert_eq!(
        state(&f.name),
        "paused",
        "volsnap unpaused a container it did not pause"
    );
    repo.ok(["recover"]);
    assert_eq!(state(&f.name), "paused");
    docker(&["unpause", &f.name]);
}

/// A running container with extra `docker run` arguments; removed (with its volume)
/// when the fixture drops.
fn running(repo: &Repo, tag: &str, extra: &[&str]) -> Fixture {
    let unique = format!("volsnap-it-{tag}-{}", std::process::id());
    let bind = repo.mkdir(&format!("bind-{tag}"));
    write(bind.join("app.txt"), format!("{tag}\n"));
    docker(&["volume", "create", &unique]);
    let f = Fixture {
        name: unique.clone(),
        volume: unique.clone(),
        bind: bind.clone(),
    };
    run_idle(&f, &unique, extra);
    f
}

/// Starts an idle container named `name` (it exits on SIGTERM) with `f`'s bind mount
/// at /data and named volume at /vol, plus `extra` `docker run` arguments.
fn run_idle(f: &Fixture, name: &str, extra: &[&str]) {
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--name".into(),
        name.to_string(),
        "-v".into(),
        format!("{}:/data", f.bind.display()),
        "-v".into(),
        format!("{}:/vol", f.volume),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend([
        image().to_string(),
        "sh".into(),
        "-c".into(),
        "trap 'exit 0' TERM; while true; do sleep 0.1; done".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args);
}

#[test]
fn exec_hooks_run_around_a_stopped_snapshot_and_the_container_comes_back() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = running(
        &repo,
        "hooks",
        &[
            "--label",
            "volsnap.pre-snapshot=echo pre >> /data/hooks.log",
            "--label",
            "docker-volume-backup.archive-post=echo post >> /data/hooks.log",
            "--label",
            "docker-volume-backup.stop-during-backup=true",
        ],
    );
    let started_before = docker(&["inspect", "--format", "{{.State.StartedAt}}", &f.name]);
    let out: Value = repo.ok(["snapshot", "--container", &f.name]);
    assert_eq!(state(&f.name), "running");
    // It was stopped and started again (docker-volume-backup's stop label).
    let started_after = docker(&["inspect", "--format", "{{.State.StartedAt}}", &f.name]);
    assert_ne!(
        started_before, started_after,
        "the container was not stopped"
    );
    // The pre hook ran before the snapshot, the post hook after it.
    assert_eq!(
        std::fs::read_to_string(f.bind.join("hooks.log")).unwrap(),
        "pre\npost\n"
    );
    let copy = repo.scratch("copy");
    repo.restore(&id(&out[0]), &copy);
    assert_eq!(
        std::fs::read_to_string(copy.join(format!("{}-data", f.name)).join("hooks.log")).unwrap(),
        "pre\n"
    );
}

#[test]
fn a_compose_project_is_one_series_with_every_container_and_its_manifest() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let project = format!("volsnap-it-proj-{}", std::process::id());
    let label = format!("com.docker.compose.project={project}");
    let web = running(
        &repo,
        "web",
        &[
            "--label",
            &label,
            "--label",
            "com.docker.compose.service=web",
        ],
    );
    let db = running(
        &repo,
        "db",
        &[
            "--label",
            &label,
            "--label",
            "com.docker.compose.service=db",
        ],
    );
    let out: Value = repo.ok(["snapshot", "--project", &project]);
    assert_eq!(out.as_array().unwrap().len(), 1, "{out}");
    let snap = &out[0];
    assert_eq!(snap["series"], project.as_str());
    let labels: Vec<&str> = snap["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["label"].as_str().unwrap())
        .collect();
    for c in [&web.name, &db.name] {
        assert!(labels.contains(&format!("{c}-data").as_str()), "{labels:?}");
        assert!(labels.contains(&format!("{c}-vol").as_str()), "{labels:?}");
    }
    let services: Vec<&str> = snap["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["db", "web"], "{snap}");
    assert_eq!(state(&web.name), "running");
    assert_eq!(state(&db.name), "running");
}

#[test]
fn permission_denied_on_the_socket_is_a_one_line_error_with_a_hint() {
    if !engine() || !is_root() {
        return;
    }
    let mut repo = Repo::new();
    // nobody: neither root nor in the docker group.
    repo.run_as = Some(65534);
    let run = repo.run(["volumes", "anything"]).code(1);
    let line = run.error_line();
    assert!(
        line.contains("permission denied on the Docker socket"),
        "{}",
        run.describe()
    );
    assert!(line.contains("docker group"), "{}", run.describe());
}

#[test]
fn a_container_recreated_under_another_name_is_found_by_its_compose_service() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let project = format!("volsnap-it-recreate-{}", std::process::id());
    let labels = [
        "--label".to_string(),
        format!("com.docker.compose.project={project}"),
        "--label".into(),
        "com.docker.compose.service=app".into(),
        "--label".into(),
        "com.docker.compose.container-number=1".into(),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let first = running(&repo, "first", &labels);
    let snap: Value = repo.ok(["snapshot", "--project", &project]);
    write(first.bind.join("app.txt"), "changed after the snapshot\n");
    // Recreated, as `compose up` may do, under another name with the same volumes.
    docker(&["rm", "-f", &first.name]);
    let second = format!("{}-recreated", first.name);
    run_idle(&first, &second, &labels);
    let _cleanup = Fixture {
        name: second.clone(),
        volume: first.volume.clone(),
        bind: first.bind.clone(),
    };
    repo.ok(["restore", &id(&snap[0]), "--project", &project, "--yes"]);
    assert_eq!(
        std::fs::read_to_string(first.bind.join("app.txt")).unwrap(),
        "first\n",
        "the recreated container's volume was not restored"
    );
    assert_eq!(state(&second), "running");
}

#[test]
fn in_place_restores_under_running_containers_refuse_and_name_the_container_form() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = running(&repo, "busy", &[]);
    let out: Value = repo.ok(["snapshot", "--container", &f.name]);
    let snap = id(&out[0]);
    let app = f.bind.join("app.txt");
    write(&app, "changed since\n");
    let form = format!("--container {}", f.name);
    for args in [
        vec!["restore", &snap, "--in-place", "--yes"],
        vec!["restore", &snap, "--in-place", "--dry-run"],
    ] {
        let run = repo.run(&args).code(1);
        let line = run.error_line();
        assert!(
            line.contains("running containers mount the targets")
                && line.contains(&f.name)
                && line.contains(&form)
                && line.contains("--ignore-running-containers"),
            "{}",
            run.describe()
        );
    }
    assert_eq!(std::fs::read_to_string(&app).unwrap(), "changed since\n");

    // Through the container; its hint names the undo that works.
    let run = repo
        .run(["restore", &snap, "--container", &f.name, "--yes"])
        .code(0);
    let hint = format!(
        "volsnap --repo {} restore --undo {form}",
        repo.path.display()
    );
    assert!(run.stdout_str().contains(&hint), "{}", run.describe());
    assert_eq!(std::fs::read_to_string(&app).unwrap(), "busy\n");
    assert_eq!(state(&f.name), "running");
    // The plain undo would swap under the running container: refused, naming the form.
    let run = repo.run(["restore", "--undo", "--yes"]).code(1);
    assert!(
        run.error_line().contains(&format!("add {form}")),
        "{}",
        run.describe()
    );
    assert_eq!(std::fs::read_to_string(&app).unwrap(), "busy\n");
    // `Repo::run` adds --repo itself.
    let mut args: Vec<&str> = hint.split(' ').skip(3).collect();
    args.push("--yes");
    repo.run(&args).code(0);
    assert_eq!(std::fs::read_to_string(&app).unwrap(), "changed since\n");
    assert_eq!(state(&f.name), "running");
}

#[test]
fn a_container_mounting_a_directory_inside_the_target_stops_a_plain_in_place_restore() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("sub/app.txt"), "v1\n");
    write(data.join("top.txt"), "v1\n");
    let snap = id(&repo.snapshot(&[&data], &[]));
    write(data.join("top.txt"), "v2\n");
    let name = format!("volsnap-it-nested-{}", std::process::id());
    let _f = Fixture {
        name: name.clone(),
        volume: format!("{name}-none"),
        bind: data.join("sub"),
    };
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-v",
        &format!("{}:/data", data.join("sub").display()),
        image(),
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 0.1; done",
    ]);
    let run = repo.run(["restore", &snap, "--in-place", "--yes"]).code(1);
    let line = run.error_line();
    assert!(
        line.contains(&name)
            && line.contains(&data.display().to_string())
            && line.contains("stop them first")
            && line.contains("--ignore-running-containers"),
        "{}",
        run.describe()
    );
    assert_eq!(fs_read(&data.join("top.txt")), "v2\n");
    // The explicit override.
    repo.run([
        "restore",
        &snap,
        "--in-place",
        "--yes",
        "--ignore-running-containers",
    ])
    .code(0);
    assert_eq!(fs_read(&data.join("top.txt")), "v1\n");
}

fn fs_read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

fn started_at(name: &str) -> String {
    docker(&["inspect", "--format", "{{.State.StartedAt}}", name])
}

/// A `StartedAt` time (RFC 3339, UTC, up to nanoseconds) as a string that sorts in
/// time order.
fn sortable_time(t: &str) -> String {
    let t = t.trim_end_matches('Z');
    let (secs, frac) = t.split_once('.').unwrap_or((t, ""));
    format!("{secs}.{frac:0<9}")
}

#[test]
fn quiesce_pause_stop_and_none_do_what_they_say_during_the_snapshot() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let f = running(&repo, "quiesce", &[]);
    for (mode, during, restarted) in [
        ("pause", "paused", false),
        ("stop", "exited", true),
        ("none", "running", false),
    ] {
        let before = started_at(&f.name);
        let held = repo.spawn_paused(
            "snapshot before commit",
            &["snapshot", "--container", &f.name, "--quiesce", mode],
        );
        // Held with its volumes read, before the container is resumed.
        assert_eq!(state(&f.name), during, "--quiesce {mode}");
        let out = held.finish().code(0).json();
        assert_eq!(state(&f.name), "running", "--quiesce {mode}");
        assert_eq!(
            started_at(&f.name) != before,
            restarted,
            "--quiesce {mode}: started before {before}, now {}",
            started_at(&f.name)
        );
        let copy = repo.scratch(&format!("copy-{mode}"));
        repo.restore(&id(&out[0]), &copy);
        assert_eq!(
            std::fs::read_to_string(copy.join(format!("{}-data", f.name)).join("app.txt")).unwrap(),
            "quiesce\n"
        );
    }
    // Anything else is refused before anything is touched.
    let run = repo
        .run(["snapshot", "--container", &f.name, "--quiesce", "freeze"])
        .code(2);
    assert!(run.stderr.contains("freeze"), "{}", run.describe());
    assert_eq!(state(&f.name), "running");
}

#[test]
fn a_container_restore_starts_compose_services_in_depends_on_order() {
    if !engine() {
        return;
    }
    let repo = Repo::new();
    let project = format!("volsnap-it-order-{}", std::process::id());
    let label = format!("com.docker.compose.project={project}");
    // By name "app" would start first; it depends on "zdb".
    let zdb = running(
        &repo,
        "zdb",
        &[
            "--label",
            &label,
            "--label",
            "com.docker.compose.service=zdb",
        ],
    );
    let app = running(
        &repo,
        "app",
        &[
            "--label",
            &label,
            "--label",
            "com.docker.compose.service=app",
            "--label",
            "com.docker.compose.depends_on=zdb:service_started:false",
        ],
    );
    assert!(app.name < zdb.name);
    let snap: Value = repo.ok(["snapshot", "--project", &project]);
    write(app.bind.join("app.txt"), "changed\n");
    let (app_before, zdb_before) = (started_at(&app.name), started_at(&zdb.name));
    repo.ok(["restore", &id(&snap[0]), "--project", &project, "--yes"]);
    assert_eq!(
        std::fs::read_to_string(app.bind.join("app.txt")).unwrap(),
        "app\n"
    );
    for c in [&app, &zdb] {
        assert_eq!(state(&c.name), "running");
    }
    let (app_after, zdb_after) = (started_at(&app.name), started_at(&zdb.name));
    assert_ne!(app_after, app_before, "app was not restarted");
    assert_ne!(zdb_after, zdb_before, "zdb was not restarted");
    assert!(
        sortable_time(&zdb_after) < sortable_time(&app_after),
        "app started ({app_after}) before zdb ({zdb_after}), which it depends on"
    );
}

#[test]
fn containers_snapshot_into_a_bucket_and_restore_from_it_on_another_host() {
    if !engine() {
        return;
    }
    let Some(g) = crate::garage::Garage::single() else {
        return;
    };
    let repo = Repo::remote(&g.repo_url("containers"), g.env());
    repo.ok(["init"]);
    let f = running(&repo, "bucket", &[]);
    docker(&[
        "exec",
        &f.name,
        "sh",
        "-c",
        "seq 1 20000 > /vol/numbers; echo first > /vol/state",
    ]);
    let out: Value = repo.ok(["snapshot", "--container", &f.name]);
    let snap = out[0].clone();
    assert_eq!(state(&f.name), "running");
    // The container goes on: both of its volumes change.
    docker(&[
        "exec",
        &f.name,
        "sh",
        "-c",
        "echo second > /vol/state; rm /vol/numbers; echo changed > /data/app.txt",
    ]);
    // Another host, from the bucket alone (an empty cache), puts the container back.
    let other = repo.other_host();
    let restored = other.ok(["restore", &id(&snap), "--container", &f.name, "--yes"]);
    assert_eq!(restored["redeployed"], true, "{restored}");
    assert_eq!(state(&f.name), "running");
    assert_eq!(fs_read(&f.bind.join("app.txt")), "bucket\n");
    assert_eq!(docker(&["exec", &f.name, "cat", "/vol/state"]), "first");
    let numbers = docker(&["exec", &f.name, "sh", "-c", "tail -n 1 /vol/numbers"]);
    assert_eq!(numbers, "20000");
    // Its undo snapshot went to the bucket too: the first host sees and restores it.
    let undo = restored["undo"]
        .as_str()
        .expect("an undo snapshot")
        .to_string();
    let listed: Vec<String> = repo.list(&[]).iter().map(id).collect();
    assert!(listed.contains(&undo), "{listed:?}");
    let to = repo.scratch("undo");
    repo.restore(&undo, &to);
    let grep = Command::new("grep")
        .args(["-rlx", "second"])
        .arg(&to)
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&grep.stdout);
    assert!(found.trim_end().ends_with("/state"), "{found:?}");
}
