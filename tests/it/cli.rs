//! The command surface: init, refs, inspect commands, restore options, exit
//! codes and errors.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use serde_json::Value;

use crate::support::*;

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn assert_private(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = fs::symlink_metadata(e.path()).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(
                mode,
                0o700,
                "repository directory {} is {mode:o}",
                e.path().display()
            );
            assert_private(&e.path());
        } else {
            assert_eq!(
                mode,
                0o600,
                "repository file {} is {mode:o}",
                e.path().display()
            );
        }
    }
}

#[test]
fn init_creates_a_private_repository() {
    let repo = Repo::uninit();
    let out = repo.ok(["init"]);
    assert_eq!(out["repo"], repo.path.to_str().unwrap(), "{out}");
    assert_eq!(out["format_version"], 2, "{out}");
    assert_eq!(out["created"], true, "{out}");
    assert_eq!(
        fs::metadata(&repo.path).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(repo.path.join("config").is_file());
    assert_private(&repo.path);

    // Still private once it holds packs and snapshot records.
    let data = repo.mkdir("data");
    write(data.join("f"), random_bytes("f", 100_000));
    repo.snapshot(&[&data], &[]);
    assert!(repo.path.join("snapshots").is_dir() && repo.path.join("packs").is_dir());
    assert_private(&repo.path);
    assert!(repo.list(&[]).len() == 1);
}

#[test]
fn snapshot_describes_itself() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("one"), "1234567");
    write(data.join("sub/two"), "12");
    write(data.join("sub/deeper/three"), "");
    let snap = repo.snapshot(&[&data], &["--tag", "first", "--tag", "daily"]);
    assert_eq!(snap["version"], 1);
    assert_eq!(snap["parent"], Value::Null);
    assert_eq!(snap["skipped"], false);
    assert_eq!(snap["incomplete"], false);
    let tags: BTreeSet<&str> = snap["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tags, BTreeSet::from(["first", "daily"]));
    assert_eq!(stat_u64(&snap, "files"), 3, "{snap}");
    assert_eq!(stat_u64(&snap, "bytes"), 9, "{snap}");
    assert_eq!(snap["volumes"][0]["source"], data.to_str().unwrap());

    // show and list print the same record.
    let shown = repo.ok(["show", &id(&snap)]);
    assert_eq!(shown["id"], snap["id"]);
    assert_eq!(shown["volumes"], snap["volumes"]);
    assert_eq!(shown["tags"], snap["tags"]);
    let listed = repo.list(&[]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], snap["id"]);

    let restored = repo.restore(&id(&snap), &repo.scratch("restored"));
    assert_eq!(
        (restored["files"].as_u64(), restored["bytes"].as_u64()),
        (Some(3), Some(9)),
        "{restored}"
    );

    // VOLSNAP_REPO works in place of --repo.
    let mut cmd = std::process::Command::new(bin());
    cmd.env("VOLSNAP_REPO", &repo.path).args(["--json", "list"]);
    let via_env = Run::from_command(cmd).code(0).json();
    assert_eq!(via_env.as_array().map(|a| a.len()), Some(1), "{via_env}");
}

#[test]
fn default_series_is_stable_per_set_of_paths() {
    let repo = Repo::new();
    let a = repo.mkdir("a");
    let b = repo.mkdir("b");
    write(a.join("f"), "a");
    write(b.join("f"), "b");
    let a1 = repo.snapshot(&[&a], &[]);
    write(a.join("g"), "changed");
    let a2 = repo.snapshot(&[&a], &[]);
    let b1 = repo.snapshot(&[&b], &[]);
    assert_eq!(a1["series"], a2["series"]);
    assert_eq!(a2["version"], 2);
    assert_eq!(a2["parent"], a1["id"]);
    assert_ne!(
        b1["series"], a1["series"],
        "different paths should get different default series"
    );
    assert_eq!(b1["version"], 1);
}

#[test]
fn snapshot_refs_resolve_and_unknown_refs_fail() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), "v1");
    let s1 = repo.snapshot(&[&data], &["--name", "web"]);
    write(data.join("f"), "v2 longer");
    let s2 = repo.snapshot(&[&data], &["--name", "web"]);
    assert_eq!(s1["series"], "web");
    assert_eq!(
        (s1["version"].as_u64(), s2["version"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(s2["parent"], s1["id"]);
    let (id1, id2) = (id(&s1), id(&s2));
    assert_ne!(id1, id2);

    // The shortest prefix (at least 4) that tells the two apart.
    let common = id1
        .bytes()
        .zip(id2.bytes())
        .take_while(|(x, y)| x == y)
        .count();
    let plen = (common + 1).max(4);
    for (reference, expected) in [
        (id1.clone(), &id1),
        (id2[..8].to_owned(), &id2),
        (id1[..plen].to_owned(), &id1),
        ("web@latest".to_owned(), &id2),
        ("web@1".to_owned(), &id1),
        ("web@2".to_owned(), &id2),
    ] {
        let shown = repo.ok(["show", &reference]);
        assert_eq!(
            shown["id"].as_str(),
            Some(expected.as_str()),
            "{reference} resolved to {shown}"
        );
    }

    let unused_prefix = (0..16u8)
        .map(|d| format!("{d:x}{d:x}{d:x}{d:x}{d:x}{d:x}"))
        .find(|p| !id1.starts_with(p) && !id2.starts_with(p))
        .unwrap();
    for bad in ["web@3", "nosuch@latest", "web@0", unused_prefix.as_str()] {
        let run = repo.run(["show", bad]).code(1);
        let line = run.error_line();
        assert!(
            line.contains(bad),
            "the error should name the reference {bad}: {line}"
        );
        assert!(repo.run(["ls", bad]).code(1).stdout.is_empty());
    }
}

#[test]
fn list_filters_by_series_and_tag_oldest_first() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), "x");
    let s1 = repo.snapshot(&[&data], &["--name", "a", "--tag", "x"]);
    let s2 = repo.snapshot(&[&data], &["--name", "a", "--tag", "y"]);
    let s3 = repo.snapshot(&[&data], &["--name", "b", "--tag", "x", "--tag", "z"]);
    let ids = |v: Vec<Value>| v.iter().map(id).collect::<Vec<_>>();
    assert_eq!(ids(repo.list(&[])), [id(&s1), id(&s2), id(&s3)]);
    assert_eq!(ids(repo.list(&["--name", "a"])), [id(&s1), id(&s2)]);
    assert_eq!(ids(repo.list(&["--tag", "x"])), [id(&s1), id(&s3)]);
    assert_eq!(ids(repo.list(&["--name", "b", "--tag", "x"])), [id(&s3)]);
    assert_eq!(
        ids(repo.list(&["--name", "a", "--tag", "z"])),
        Vec::<String>::new()
    );
    assert_eq!(ids(repo.list(&["--name", "nosuch"])), Vec::<String>::new());
    let times: Vec<i64> = repo
        .list(&[])
        .iter()
        .map(|s| s["time_ns"].as_i64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "list is not oldest first: {times:?}"
    );
}

#[test]
fn commands_on_a_missing_repository_exit_10() {
    let repo = Repo::uninit();
    let to = repo.scratch("to");
    let to = to.to_str().unwrap();
    let some_id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    for args in [
        vec!["list"],
        vec!["show", some_id],
        vec!["ls", some_id],
        vec!["diff", some_id, some_id],
        vec!["restore", some_id, "--to", to],
        vec!["check"],
    ] {
        let run = repo.run(&args).code(10);
        run.error_line();
    }
    assert!(!repo.path.exists(), "a read command created the repository");
}

/// Runs the binary with no `--repo` and no `VOLSNAP_REPO`, with `XDG_DATA_HOME` and
/// `HOME` as given.
fn run_on_default(xdg: Option<&Path>, home: &Path, args: &[&std::ffi::OsStr]) -> Run {
    let mut cmd = std::process::Command::new(bin());
    cmd.env_remove("VOLSNAP_REPO").env("HOME", home).args(args);
    match xdg {
        Some(x) => cmd.env("XDG_DATA_HOME", x),
        None => cmd.env_remove("XDG_DATA_HOME"),
    };
    Run::from_command(cmd)
}

#[test]
fn snapshot_never_creates_a_repository_at_a_named_path() {
    let repo = Repo::uninit();
    let data = repo.mkdir("data");
    write(data.join("f"), "precious");
    // A mistyped path, a path on a disk that is not mounted (its mount point exists,
    // empty), and a path whose parents are missing too.
    let mount_point = repo.mkdir("mnt-backup");
    let missing_parent = repo.scratch("unmounted/backup/repo");
    for (path, why) in [
        (&repo.path, "does not exist"),
        (&mount_point, "holds no volsnap config"),
        (&missing_parent, "a disk not mounted"),
    ] {
        let run = Run::from_command({
            let mut cmd = std::process::Command::new(bin());
            cmd.env_remove("VOLSNAP_REPO")
                .arg("--repo")
                .arg(path)
                .arg("snapshot")
                .arg(&data);
            cmd
        })
        .code(10);
        let line = run.error_line();
        assert!(line.contains(why), "{}", run.describe());
        assert!(
            line.contains(&format!("volsnap init --repo {}", path.display())),
            "{}",
            run.describe()
        );
        // VOLSNAP_REPO names a repository as --repo does.
        let mut cmd = std::process::Command::new(bin());
        cmd.env("VOLSNAP_REPO", path).arg("snapshot").arg(&data);
        Run::from_command(cmd).code(10).error_line();
    }
    assert!(!repo.path.exists(), "snapshot created the repository");
    assert_eq!(fs::read_dir(&mount_point).unwrap().count(), 0);
    assert!(
        !repo.scratch("unmounted").exists(),
        "snapshot created missing parents"
    );
    // Once made by init, the same path takes snapshots.
    repo.ok(["init"]);
    repo.snapshot(&[&data], &[]);
}

#[test]
fn a_repository_path_that_is_a_file_exits_10() {
    let repo = Repo::uninit();
    let data = repo.mkdir("data");
    write(&repo.path, "not a repository");
    for args in [
        vec!["snapshot".as_ref(), data.as_os_str()],
        vec!["list".as_ref()],
    ] {
        let run = repo.run(&args).code(10);
        let line = run.error_line();
        assert!(line.contains("not a directory"), "{}", run.describe());
    }
    let run = repo.run(["init"]).code(1);
    assert!(
        run.error_line().contains("not a directory"),
        "{}",
        run.describe()
    );
    assert_eq!(fs::read(&repo.path).unwrap(), b"not a repository");
}

#[test]
fn init_creates_the_repository_but_not_its_missing_parents() {
    let repo = Repo::uninit();
    let parent = repo.scratch("backup");
    let path = parent.join("repo");
    let init = |path: &Path| {
        let mut cmd = std::process::Command::new(bin());
        cmd.env_remove("VOLSNAP_REPO")
            .arg("--repo")
            .arg(path)
            .arg("init");
        Run::from_command(cmd)
    };
    let run = init(&path).code(1);
    let line = run.error_line();
    assert!(
        line.contains(&format!("{} does not exist", parent.display())),
        "{}",
        run.describe()
    );
    assert!(!parent.exists(), "init created a missing parent");
    fs::create_dir(&parent).unwrap();
    init(&path).code(0);
    assert!(path.join("config").is_file());
}

#[test]
fn the_default_repository_is_created_by_the_first_snapshot_and_says_so_once() {
    let scratch = Repo::uninit();
    let data = scratch.mkdir("data");
    write(data.join("f"), "contents");
    let home = scratch.mkdir("home");
    // $XDG_DATA_HOME, with missing parents, then ~/.local/share when it is unset.
    let xdg = scratch.scratch("xdg/data");
    for (xdg, expected) in [
        (Some(xdg.as_path()), xdg.join("volsnap")),
        (None, home.join(".local/share/volsnap")),
    ] {
        // A read command never creates it.
        run_on_default(xdg, &home, &["list".as_ref()]).code(10);
        assert!(!expected.exists(), "list created the default repository");

        let snap = ["snapshot".as_ref(), data.as_os_str()];
        let first = run_on_default(xdg, &home, &snap).code(0);
        let said = format!("created repository {}", expected.display());
        assert_eq!(
            first.stderr.matches(&said).count(),
            1,
            "{}",
            first.describe()
        );
        assert!(expected.join("config").is_file());
        let second = run_on_default(xdg, &home, &snap).code(0);
        assert!(
            !second.stderr.contains("created repository"),
            "{}",
            second.describe()
        );
        let listed = run_on_default(xdg, &home, &["--json".as_ref(), "list".as_ref()])
            .code(0)
            .json();
        assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let repo = Repo::new();
    repo.run(["frobnicate"]).code(2);
    repo.run(["list", "--no-such-flag"]).code(2);
    repo.run(["restore"]).code(2);
}

#[test]
fn ls_lists_children_and_recursively() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("a.txt"), "hello");
    chmod(&data.join("a.txt"), 0o640);
    write(data.join("sub/b.txt"), "bb");
    write(data.join("sub/deep/c"), "");
    chmod(&data.join("sub"), 0o750);
    symlink("a.txt", data.join("link")).unwrap();
    set_tree_mtimes(&data, Y2020);
    let (sec, nsec) = mtime_of(&data.join("a.txt"));
    let snap = repo.snapshot(&[&data], &[]);
    let sid = id(&snap);

    let top = repo.ls(&sid, &[]);
    assert_eq!(top.keys().collect::<Vec<_>>(), ["a.txt", "link", "sub"]);
    let a = &top["a.txt"];
    assert_eq!(a["name"], "a.txt");
    assert_eq!(a["kind"], "file");
    assert_eq!(a["mode"], 0o640);
    assert_eq!(a["size"], 5);
    assert_eq!(
        a["mtime_ns"].as_i64(),
        Some(sec * 1_000_000_000 + nsec),
        "{a}"
    );
    assert_eq!(a["uid"], rustix::process::geteuid().as_raw());
    assert_eq!(a["target"], Value::Null);
    assert_eq!(top["link"]["kind"], "symlink");
    assert_eq!(top["link"]["target"], "a.txt");
    assert_eq!(top["sub"]["kind"], "dir");
    assert_eq!(top["sub"]["mode"], 0o750);

    assert_eq!(repo.ls(&sid, &["-l"]), top, "-l should not change the JSON");

    let all = repo.ls(&sid, &["-r"]);
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        [
            "a.txt",
            "link",
            "sub",
            "sub/b.txt",
            "sub/deep",
            "sub/deep/c"
        ]
    );
    assert_eq!(all["sub/deep/c"]["name"], "c");
    assert_eq!(repo.ls(&sid, &["--recursive"]), all);

    let sub = repo.ls(&format!("{sid}:sub"), &[]);
    assert_eq!(sub.keys().collect::<Vec<_>>(), ["sub/b.txt", "sub/deep"]);
    let sub_r = repo.ls(&format!("{sid}:sub"), &["-r"]);
    assert_eq!(
        sub_r.keys().collect::<Vec<_>>(),
        ["sub/b.txt", "sub/deep", "sub/deep/c"]
    );

    let run = repo.run(["ls", &format!("{sid}:no/such/path")]);
    assert_ne!(run.status, 0);
    assert!(
        run.error_line().contains("no/such/path"),
        "{}",
        run.describe()
    );
}

#[test]
fn diff_names_each_kind_of_change() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    for n in [
        "content", "mode", "owner", "mtime", "kind", "xattrs", "same", "removed",
    ] {
        write(data.join(n), format!("file {n}\n"));
    }
    symlink("same", data.join("target")).unwrap();
    set_tree_mtimes(&data, Y2020);
    let s1 = repo.snapshot(&[&data], &[]);

    let m = mtime_of(&data.join("content"));
    fs::write(data.join("content"), "file CONTENT\n").unwrap();
    set_mtime(&data.join("content"), m.0, m.1);
    chmod(&data.join("mode"), 0o600);
    if is_root() {
        std::os::unix::fs::lchown(data.join("owner"), Some(4321), Some(4321)).unwrap();
    }
    set_mtime(&data.join("mtime"), Y2020 - 1000, 5);
    fs::remove_file(data.join("kind")).unwrap();
    symlink("same", data.join("kind")).unwrap();
    rustix::fs::lsetxattr(
        data.join("xattrs"),
        "user.k",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::remove_file(data.join("target")).unwrap();
    symlink("content", data.join("target")).unwrap();
    fs::remove_file(data.join("removed")).unwrap();
    write(data.join("added"), "new");
    write(data.join("added-dir/inner"), "new too");
    let s2 = repo.snapshot(&[&data], &[]);

    let diff = repo.ok(["diff", &id(&s1), &id(&s2)]);
    let added: BTreeSet<&str> = diff["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        added.contains("added") && added.contains("added-dir"),
        "{diff}"
    );
    assert!(added.iter().all(|p| p.starts_with("added")), "{diff}");
    assert_eq!(diff["removed"], serde_json::json!(["removed"]), "{diff}");
    let modified: std::collections::BTreeMap<&str, Vec<&str>> = diff["modified"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["path"].as_str().unwrap(),
                m["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap())
                    .collect(),
            )
        })
        .collect();
    let mut expect = vec!["content", "mode", "mtime", "kind", "xattrs", "target"];
    if is_root() {
        expect.push("owner");
    }
    for change in expect {
        let path = change;
        let got = modified
            .get(path)
            .unwrap_or_else(|| panic!("{path} not reported as modified: {diff}"));
        assert!(
            got.contains(&change),
            "{path} should report {change}: {diff}"
        );
    }
    assert_eq!(
        modified["mode"],
        ["mode"],
        "a chmod is only a mode change: {diff}"
    );
    assert!(!modified["content"].contains(&"mtime"), "{diff}");
    assert!(!modified.contains_key("same"), "{diff}");
    assert_eq!(
        repo.ok(["diff", &id(&s2), &id(&s2)]),
        serde_json::json!({"added": [], "removed": [], "modified": []})
    );
}

#[test]
fn restore_refuses_a_non_empty_target_without_force() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), "restored content");
    let snap = repo.snapshot(&[&data], &[]);
    let to = repo.mkdir("target");
    write(to.join("precious"), "keep me");

    let run = repo.run(["restore", id(&snap).as_str(), "--to", to.to_str().unwrap()]);
    assert_ne!(
        run.status,
        0,
        "restore into a non-empty directory\n{}",
        run.describe()
    );
    run.error_line();
    assert_eq!(fs::read(to.join("precious")).unwrap(), b"keep me");
    assert!(!to.join("f").exists(), "a refused restore wrote files");

    repo.ok([
        "restore",
        id(&snap).as_str(),
        "--to",
        to.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(fs::read(to.join("f")).unwrap(), b"restored content");

    // An existing empty directory is fine without --force.
    let empty = repo.mkdir("empty");
    repo.restore(&id(&snap), &empty);
    assert_eq!(fs::read(empty.join("f")).unwrap(), b"restored content");
}

#[test]
fn multi_volume_snapshot_restores_each_volume_under_its_label() {
    let repo = Repo::new();
    let web = repo.mkdir("web");
    let db = repo.mkdir("db");
    write(web.join("index.html"), "<h1>hi</h1>");
    write(web.join("static/app.js"), "console.log(1)");
    write(db.join("pg/base/1"), random_bytes("db", 50_000));
    set_tree_mtimes(&web, Y2020);
    set_tree_mtimes(&db, Y2020);
    let snap = repo.snapshot(&[&web, &db], &["--name", "app"]);
    let labels: Vec<&str> = snap["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["web", "db"]);
    assert_eq!(snap["volumes"][1]["source"], db.to_str().unwrap());

    let top = repo.ls("app@latest", &[]);
    assert_eq!(top.keys().collect::<Vec<_>>(), ["db", "web"]);
    assert!(
        repo.ls("app@latest:web/static", &[])
            .contains_key("web/static/app.js")
    );

    let to = repo.scratch("all");
    repo.restore("app@latest", &to);
    assert_same_tree(&web, &to.join("web"));
    assert_same_tree(&db, &to.join("db"));

    let one = repo.scratch("one");
    repo.ok([
        "restore",
        "app@latest",
        "--to",
        one.to_str().unwrap(),
        "--volume",
        "db",
    ]);
    assert!(
        !one.join("web").exists() && !one.join("index.html").exists(),
        "--volume db restored web too"
    );
    if one.join("db").exists() {
        assert_same_tree(&db, &one.join("db"));
    } else {
        assert_same_tree(&db, &one);
    }

    // A sub-path of one volume.
    let part = repo.scratch("part");
    repo.restore("app@1:web/static", &part);
    assert_same_tree(&web.join("static"), &part);
}

#[test]
fn duplicate_basenames_get_distinct_labels() {
    let repo = Repo::new();
    let x = repo.mkdir("x/data");
    let y = repo.mkdir("y/data");
    write(x.join("f"), "x");
    write(y.join("f"), "y");
    let snap = repo.snapshot(&[&x, &y], &[]);
    let labels: Vec<&str> = snap["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["data", "data-2"]);
    let to = repo.scratch("to");
    repo.restore(&id(&snap), &to);
    assert_eq!(fs::read(to.join("data/f")).unwrap(), b"x");
    assert_eq!(fs::read(to.join("data-2/f")).unwrap(), b"y");
}

#[test]
fn restore_of_a_sub_directory() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("top"), "top");
    write(data.join("sub/path/one"), "1");
    write(data.join("sub/path/two/three"), "3");
    write(data.join("sub/other"), "o");
    // Hardlinks whose first path (in name order) is outside the sub-path
    // must still be linked to each other inside it.
    write(data.join("a-first-link"), "linked");
    fs::hard_link(data.join("a-first-link"), data.join("sub/path/h1")).unwrap();
    fs::hard_link(data.join("a-first-link"), data.join("sub/path/two/h2")).unwrap();
    set_tree_mtimes(&data, Y2020);
    let snap = repo.snapshot(&[&data], &[]);
    let to = repo.scratch("to");
    repo.restore(&format!("{}:sub/path", id(&snap)), &to);
    assert_same_tree(&data.join("sub/path"), &to);
}

#[test]
fn exclude_globs_leave_matches_out() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("keep.txt"), "k");
    write(data.join("drop.log"), "d");
    write(data.join("sub/also.log"), "d");
    write(data.join("sub/keep2"), "k");
    let snap = repo.snapshot(&[&data], &["--exclude", "*.log"]);
    let all = repo.ls(&id(&snap), &["-r"]);
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        ["keep.txt", "sub", "sub/keep2"]
    );
}

#[test]
fn forced_restore_never_writes_through_symlinks_in_the_target() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), "from the snapshot");
    write(data.join("sub/g"), "also from the snapshot");
    let snap = repo.snapshot(&[&data], &[]);

    let outside = repo.mkdir("outside");
    write(outside.join("victim"), "must stay");
    let to = repo.mkdir("target");
    symlink(outside.join("victim"), to.join("f")).unwrap();
    symlink(&outside, to.join("sub")).unwrap();

    repo.ok([
        "restore",
        id(&snap).as_str(),
        "--to",
        to.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"must stay");
    let names: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["victim"], "restore wrote outside its target");
    assert_eq!(fs::read(to.join("f")).unwrap(), b"from the snapshot");
    assert!(fs::symlink_metadata(to.join("sub")).unwrap().is_dir());
    assert_eq!(
        fs::read(to.join("sub/g")).unwrap(),
        b"also from the snapshot"
    );
}

#[test]
fn bad_arguments_get_one_clear_error_line() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), "x");
    let snap = repo.snapshot(&[&data], &[]);

    let missing = repo.scratch("no-such-dir");
    let run = repo.run(["snapshot".as_ref(), missing.as_os_str()]).code(1);
    let line = run.error_line();
    assert!(line.contains("no-such-dir"), "{line}");
    assert!(
        line.matches("os error").count() <= 1,
        "the cause is repeated: {line}"
    );

    let run = repo
        .run(["snapshot".as_ref(), data.join("f").as_os_str()])
        .code(1);
    assert!(
        run.error_line().contains("not a directory"),
        "{}",
        run.describe()
    );

    let file_target = repo.scratch("a-file");
    write(&file_target, "occupied");
    let run = repo.run([
        "restore",
        id(&snap).as_str(),
        "--to",
        file_target.to_str().unwrap(),
    ]);
    assert_ne!(run.status, 0, "{}", run.describe());
    run.error_line();
    assert_eq!(fs::read(&file_target).unwrap(), b"occupied");

    let run = repo.run([
        "restore",
        &format!("{}:no/such", id(&snap)),
        "--to",
        repo.scratch("t").to_str().unwrap(),
    ]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(run.error_line().contains("no/such"), "{}", run.describe());
    assert_eq!(
        repo.list(&[]).len(),
        1,
        "failed commands recorded snapshots"
    );
}

#[test]
fn a_repository_of_a_newer_format_is_refused_clearly() {
    let repo = Repo::new();
    let config = repo.path.join("config");
    let mut bytes = fs::read(&config).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    fs::write(&config, &bytes).unwrap();
    for args in [vec!["list"], vec!["check"]] {
        let run = repo.run(&args);
        assert_eq!(run.status, 1, "{}", run.describe());
        let line = run.error_line();
        assert!(
            line.contains("format version 99") && line.contains("upgrade"),
            "{line}"
        );
    }
}

#[test]
fn init_refuses_a_directory_that_holds_other_things() {
    let repo = Repo::uninit();
    fs::create_dir_all(&repo.path).unwrap();
    write(repo.path.join("precious.txt"), "not a repository");
    let run = repo.run(["init"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.error_line().contains("not a volsnap repository"),
        "{}",
        run.describe()
    );
    let names: Vec<_> = fs::read_dir(&repo.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("precious.txt")]);
}

#[test]
fn forced_restores_never_join_hardlinks_to_files_already_in_the_target() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("a"), "snapshot-time content");
    fs::hard_link(data.join("a"), data.join("b")).unwrap();
    let snap = id(&repo.snapshot(&[&data], &["--name", "s"]));

    // One name of a hardlinked pair, into a directory holding an unrelated "a".
    let live = repo.mkdir("live");
    write(live.join("a"), "unrelated live file");
    repo.ok([
        "restore",
        &format!("{snap}:b"),
        "--to",
        live.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(fs::read(live.join("b")).unwrap(), b"snapshot-time content");
    assert_eq!(fs::read(live.join("a")).unwrap(), b"unrelated live file");
    assert_ne!(
        fs::metadata(live.join("a")).unwrap().ino(),
        fs::metadata(live.join("b")).unwrap().ino()
    );

    // Restoring twice over the same place with --force keeps the links.
    let twice = repo.scratch("twice");
    repo.ok(["restore", &snap, "--to", twice.to_str().unwrap()]);
    repo.ok(["restore", &snap, "--to", twice.to_str().unwrap(), "--force"]);
    assert_same_tree(&data, &twice);
}

#[test]
fn hardlinks_stay_within_their_volume_when_volumes_are_identical() {
    let repo = Repo::new();
    let mut dirs = Vec::new();
    for label in ["alpha", "beta"] {
        let d = repo.mkdir(label);
        write(d.join("hl-a"), "same content");
        fs::hard_link(d.join("hl-a"), d.join("hl-b")).unwrap();
        dirs.push(d);
    }
    set_tree_mtimes(&dirs[0], Y2020);
    set_tree_mtimes(&dirs[1], Y2020);
    let snap = repo.snapshot(&[&dirs[0], &dirs[1]], &[]);
    let out = repo.scratch("out");
    repo.restore(&id(&snap), &out);
    for label in ["alpha", "beta"] {
        let a = fs::metadata(out.join(label).join("hl-a")).unwrap();
        let b = fs::metadata(out.join(label).join("hl-b")).unwrap();
        assert_eq!(
            a.ino(),
            b.ino(),
            "{label}: the two names must stay one file"
        );
        assert_eq!(a.nlink(), 2, "{label}: linked across volumes");
    }
}

#[test]
fn a_format_1_repository_is_still_read_and_written() {
    let repo = Repo::new();
    let data = tempfile::tempdir().unwrap();
    fs::write(data.path().join("a"), b"one").unwrap();
    repo.snapshot(&[data.path()], &["--name", "s"]);
    // The config of format version 1: the same settings, no repository id.
    let config = repo.path.join("config");
    let mut bytes = fs::read(&config).unwrap();
    assert_eq!(&bytes[8..12], &2u32.to_le_bytes());
    bytes.truncate(bytes.len() - 16);
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    fs::write(&config, &bytes).unwrap();
    fs::write(data.path().join("b"), b"two").unwrap();
    repo.snapshot(&[data.path()], &["--name", "s"]);
    assert_eq!(repo.list(&[]).len(), 2);
    let dest = repo.scratch("r");
    repo.restore("s@2", &dest);
    assert_eq!(fs::read(dest.join("b")).unwrap(), b"two");
    // And a config that claims version 1 but carries an id is damage, not silently read.
    let mut bad = bytes.clone();
    bad.extend_from_slice(&[0; 16]);
    fs::write(&config, &bad).unwrap();
    let err = repo.run(["list"]).error_line();
    assert!(err.contains("corrupt config"), "{err}");
}
