//! Model-based randomized test: seeded random sequences of every operation that changes
//! a repository or a live volume (snapshots after random mutations of a small tree,
//! forget by policy and by id, gc, restores to new directories, exports read back with
//! Python's tarfile, in-place restores and undos, `repair index`, deleting the index),
//! many of them aborted at a random crash point (`VOLSNAP_CRASH_AT=k`), and concurrent
//! pairs (snapshot + gc, export + gc, two snapshots of one series) with `kill -9` at a
//! random instant. After every step, and after every crash and its recovery, the
//! repository is compared with a small in-memory model: exactly the committed snapshots
//! are listed (series, version, tags), each restores byte-identically with its
//! metadata and hardlink structure, the live volume is wholly old or wholly new, `check
//! --read-data` is clean, no journal or staging directory is left, and nothing is locked.
//!
//! The generator is a seeded splitmix64, so a seed replays the same operations; a crash
//! point is deterministic, the instant of a `kill -9` is not (the seed fixes the delay,
//! not what the processes reached by then), and the model accepts either outcome.
//! CI runs the fixed seeds below; `VOLSNAP_MODEL_SEED=N` replays one seed and
//! `VOLSNAP_MODEL_SECONDS=T` runs random seeds for T seconds, printing each failing seed
//! (`benches/model_soak.sh`). A seed is tied to this generator: changing the generator
//! changes what a seed does.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

// ------------------------------------------------------------------ the generator

/// splitmix64: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `pct` percent.
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }

    fn name(&mut self, v: &[&'static str]) -> &'static str {
        v[self.below(v.len() as u64) as usize]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

// ------------------------------------------------------------------ the model

/// A committed snapshot as the model knows it.
struct Snap {
    series: String,
    version: u64,
    tags: Vec<String>,
    time_ns: i64,
    /// The volume as it was when the snapshot was taken.
    tree: Rc<Scan>,
}

impl Snap {
    fn is_undo(&self) -> bool {
        self.tags.iter().any(|t| t == UNDO_TAG)
    }
}

const UNDO_TAG: &str = "pre-restore";

/// Crash points by name, so runs also abort at the ones a random k rarely reaches.
const SNAPSHOT_POINTS: &[&str] = &[
    "pack written",
    "pack committed",
    "pack indexed",
    "snapshot version reserved",
    "snapshot record written",
    "snapshot record indexed",
    "files cache rows written",
];
const GC_POINTS: &[&str] = &[
    "gc condemned",
    "gc waited",
    "gc swept",
    "gc waited after the sweep",
    "gc deleted a pack",
    "gc punched a pack",
    "gc repacked a pack",
    "pack committed",
];
const LIVE_POINTS: &[&str] = &[
    "live journal written",
    "restore before directory metadata",
    "live staged a volume",
    "snapshot record written",
    "live undo snapshot taken",
    "live staged",
    "live swapped a volume",
    "live committed",
    "live redeployed",
    "live removed an old tree",
];
const SERIES: [&str; 2] = ["a", "b"];
/// Kept by `forget --keep-tag keep`.
const KEEP_TAG: &str = "keep";
/// `limits::UNDO_RESTORES_KEPT`.
const UNDO_RESTORES_KEPT: usize = 3;

#[derive(Default)]
struct Model {
    /// id → snapshot: exactly what `list` must show.
    snaps: BTreeMap<String, Snap>,
    /// series → the highest version committed in it before the current operation:
    /// every snapshot an operation commits has a higher one.
    max_version: BTreeMap<String, u64>,
    /// Every (series, version) ever committed: versions are never reused.
    versions: BTreeSet<(String, u64)>,
    /// The committed in-place restores (and undos) of the live volume, oldest first,
    /// each with its undo snapshot.
    restores: Vec<String>,
}

impl Model {
    /// Adds a snapshot `list` or a command reported, checking its version is new.
    fn add(&mut self, id: &str, listed: &Value, tree: Rc<Scan>) {
        let series = listed["series"].as_str().unwrap().to_owned();
        let version = listed["version"].as_u64().unwrap();
        let max = self.max_version.get(&series).copied().unwrap_or(0);
        assert!(
            version > max && self.versions.insert((series.clone(), version)),
            "snapshot {id} of series {series} has version {version}, not a new one above {max}: {listed}"
        );
        let tags = listed["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect();
        let time_ns = listed["time_ns"].as_i64().unwrap();
        assert!(
            self.snaps
                .insert(
                    id.to_owned(),
                    Snap {
                        series,
                        version,
                        tags,
                        time_ns,
                        tree,
                    },
                )
                .is_none(),
            "snapshot {id} committed twice"
        );
    }

    /// Called before each operation: what it commits must be numbered higher.
    fn start_operation(&mut self) {
        for (series, version) in &self.versions {
            let max = self.max_version.entry(series.clone()).or_default();
            *max = (*max).max(*version);
        }
    }

    /// The series' latest ordinary snapshot (the parent of the next one).
    fn latest(&self, series: &str) -> Option<&Snap> {
        self.snaps
            .values()
            .filter(|s| s.series == series && !s.is_undo())
            .max_by_key(|s| s.version)
    }

    /// Which snapshots `forget --keep-last N [--name S] [--keep-tag keep]` removes.
    fn forget_plan(&self, last: usize, series: Option<&str>, keep_tag: bool) -> BTreeSet<String> {
        let kept_undos: BTreeSet<&String> = self
            .restores
            .iter()
            .rev()
            .take(UNDO_RESTORES_KEPT)
            .collect();
        let mut removed = BTreeSet::new();
        for name in SERIES.iter().filter(|n| series.is_none_or(|s| s == **n)) {
            let mut ordinary: Vec<(&String, &Snap)> = Vec::new();
            for (id, s) in self.snaps.iter().filter(|(_, s)| s.series == *name) {
                if s.is_undo() {
                    if !kept_undos.contains(id) {
                        removed.insert(id.clone());
                    }
                } else {
                    ordinary.push((id, s));
                }
            }
            ordinary.sort_by_key(|(_, s)| std::cmp::Reverse((s.time_ns, s.version)));
            for (i, (id, s)) in ordinary.into_iter().enumerate() {
                let tagged = keep_tag && s.tags.iter().any(|t| t == KEEP_TAG);
                if i >= last && !tagged {
                    removed.insert(id.clone());
                }
            }
        }
        removed
    }
}

// ------------------------------------------------------------------ tree comparison

/// Paths sharing an inode, as sets (single files are groups of one).
fn link_groups(s: &Scan) -> BTreeSet<BTreeSet<Vec<u8>>> {
    let mut g: BTreeMap<&Vec<u8>, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for (p, rep) in &s.link_group {
        g.entry(rep).or_default().insert(p.clone());
    }
    g.into_values().collect()
}

/// What differs between the expected tree and the one found, one line each.
pub fn tree_diff(want: &Scan, got: &Scan) -> Vec<String> {
    let mut out = Vec::new();
    for (p, m) in &want.entries {
        match got.entries.get(p) {
            None => out.push(format!("{} missing ({})", show(p), m.kind)),
            Some(g) if g != m => out.push(format!("{}: want {m:?}\n   got {g:?}", show(p))),
            Some(_) => {}
        }
    }
    for p in got.entries.keys() {
        if !want.entries.contains_key(p) {
            out.push(format!("{} unexpected", show(p)));
        }
    }
    let (a, b) = (link_groups(want), link_groups(got));
    if a != b {
        let fmt = |g: &BTreeSet<BTreeSet<Vec<u8>>>| -> Vec<Vec<String>> {
            g.iter()
                .filter(|s| s.len() > 1)
                .map(|s| s.iter().map(|p| show(p)).collect())
                .collect()
        };
        out.push(format!(
            "hardlink groups differ: want {:?}, got {:?}",
            fmt(&a),
            fmt(&b)
        ));
    }
    out
}

/// The part of `s` below the directory `dir`, as a restore of `SNAP:dir` gives it.
fn subtree(s: &Scan, dir: &[u8]) -> Scan {
    let mut prefix = dir.to_vec();
    prefix.push(b'/');
    let mut out = Scan::default();
    out.entries.insert(Vec::new(), s.entries[dir].clone());
    for (p, m) in &s.entries {
        if let Some(rest) = p.strip_prefix(prefix.as_slice()) {
            out.entries.insert(rest.to_vec(), m.clone());
        }
    }
    let mut groups: BTreeMap<&Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for (p, rep) in &s.link_group {
        if let Some(rest) = p.strip_prefix(prefix.as_slice()) {
            groups.entry(rep).or_default().push(rest.to_vec());
        }
    }
    for members in groups.into_values() {
        let rep = members.iter().min().unwrap().clone();
        for m in members {
            out.link_group.insert(m, rep.clone());
        }
    }
    out
}

/// A copy of a scan (`Scan` is not `Clone`).
pub fn copy_scan(s: &Scan) -> Scan {
    Scan {
        entries: s.entries.clone(),
        link_group: s.link_group.clone(),
        holes: s.holes.clone(),
    }
}

// ------------------------------------------------------------------ Python's view of an export

const PY_EXPORT: &str = r#"
import json, sys, tarfile
out = []
with tarfile.open(sys.argv[1], mode="r:*") as t:
    for m in t:
        data = b""
        if m.isreg():
            data = t.extractfile(m).read()
        enc = lambda s: s.encode("utf-8", "surrogateescape").hex()
        out.append({
            "name": enc(m.name),
            "type": m.type.decode("latin-1"),
            "mode": m.mode,
            "uid": m.uid,
            "gid": m.gid,
            "size": m.size,
            "mtime": m.pax_headers.get("mtime", str(int(m.mtime))),
            "link": enc(m.linkname),
            "data": data.hex(),
            "xattrs": {enc(k[len("SCHILY.xattr."):]): enc(v) for k, v in m.pax_headers.items()
                       if k.startswith("SCHILY.xattr.")},
        })
json.dump(out, sys.stdout)
"#;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// "sec.frac" (pax) or "sec" as (sec, nsec).
fn parse_mtime(s: &str) -> (i64, i64) {
    match s.split_once('.') {
        None => (s.parse().unwrap(), 0),
        Some((sec, frac)) => {
            let mut f = frac.to_owned();
            f.truncate(9);
            while f.len() < 9 {
                f.push('0');
            }
            (sec.parse().unwrap(), f.parse().unwrap())
        }
    }
}

/// Reads `archive` with Python's tarfile and compares every member with `want`.
pub fn export_diff(archive: &Path, want: &Scan) -> Vec<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(PY_EXPORT)
        .arg(archive)
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python tarfile could not read {}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let members: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut diffs = Vec::new();
    let mut seen: BTreeMap<Vec<u8>, char> = BTreeMap::new();
    for m in &members {
        let name = unhex(m["name"].as_str().unwrap());
        let path = if name == b"." { Vec::new() } else { name };
        let kind = m["type"].as_str().unwrap().chars().next().unwrap();
        if seen.insert(path.clone(), kind).is_some() {
            diffs.push(format!("{} twice in the archive", show(&path)));
        }
        let Some(w) = want.entries.get(&path) else {
            diffs.push(format!("{} unexpected in the archive", show(&path)));
            continue;
        };
        let mut bad = Vec::new();
        let link = unhex(m["link"].as_str().unwrap());
        let want_kind = match w.kind {
            "dir" => '5',
            "symlink" => '2',
            "fifo" => '6',
            "file" => {
                // The first name of a group in depth-first name order is the file.
                let group = &want.link_group[&path];
                if want
                    .link_group
                    .iter()
                    .any(|(p, g)| g == group && preorder_lt(p, &path))
                {
                    '1'
                } else {
                    '0'
                }
            }
            other => panic!("the model makes no {other}"),
        };
        if kind != want_kind {
            bad.push(format!("type {kind} want {want_kind}"));
        }
        if m["mode"].as_u64() != Some(u64::from(w.mode)) {
            bad.push(format!("mode {} want {:o}", m["mode"], w.mode));
        }
        if m["uid"].as_u64() != Some(u64::from(w.uid))
            || m["gid"].as_u64() != Some(u64::from(w.gid))
        {
            bad.push(format!("owner {}:{}", m["uid"], m["gid"]));
        }
        if kind != '1' {
            let mtime = parse_mtime(m["mtime"].as_str().unwrap());
            if mtime != w.mtime {
                bad.push(format!("mtime {mtime:?} want {:?}", w.mtime));
            }
        }
        match kind {
            '0' => {
                let data = unhex(m["data"].as_str().unwrap());
                if Some(blake3::hash(&data)) != w.content {
                    bad.push(format!("content differs ({} bytes)", data.len()));
                }
            }
            '1' => {
                let target = if link == b"." { Vec::new() } else { link };
                if want.link_group.get(&target) != want.link_group.get(&path) {
                    bad.push(format!("hardlink to {} outside its group", show(&target)));
                }
            }
            '2' if Some(&link) != w.target.as_ref() => {
                bad.push(format!("symlink to {:?}", String::from_utf8_lossy(&link)));
            }
            _ => {}
        }
        if kind == '0' || kind == '5' {
            let xattrs: BTreeMap<Vec<u8>, Vec<u8>> = m["xattrs"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (unhex(k), unhex(v.as_str().unwrap())))
                .collect();
            if xattrs != w.xattrs {
                bad.push(format!("xattrs {xattrs:?} want {:?}", w.xattrs));
            }
        }
        if !bad.is_empty() {
            diffs.push(format!("{}: {}", show(&path), bad.join("; ")));
        }
    }
    for p in want.entries.keys() {
        if !seen.contains_key(p) {
            diffs.push(format!("{} missing from the archive", show(p)));
        }
    }
    diffs
}

/// Depth-first name order of two paths: component by component.
fn preorder_lt(a: &[u8], b: &[u8]) -> bool {
    a.split(|&c| c == b'/').lt(b.split(|&c| c == b'/'))
}

// ------------------------------------------------------------------ running volsnap

/// How a run ended.
enum Ended {
    /// Exit 0.
    Ok(Run),
    /// Aborted at a crash point.
    Crashed,
}

// ------------------------------------------------------------------ invariants

/// Nothing unsettled: no restore journal, no staging or holding directory in `dirs`,
/// no lock in `locks/` held by anyone.
pub fn assert_settled(repo: &Repo, dirs: &[&Path]) {
    let journals: Vec<String> = fs::read_dir(repo.local_dir().join("journals"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".journal"))
                .collect()
        })
        .unwrap_or_default();
    assert!(journals.is_empty(), "journals left: {journals:?}");
    for dir in dirs {
        let left: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".volsnap-"))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
    }
    for e in fs::read_dir(repo.local_dir().join("locks")).unwrap() {
        let p = e.unwrap().path();
        let f = fs::File::open(&p).unwrap();
        assert!(f.try_lock().is_ok(), "{} is still locked", p.display());
    }
}

/// `check --read-data` finds nothing wrong.
pub fn assert_check_clean(repo: &Repo) {
    let check = repo.run_json(["check", "--read-data"]);
    assert_eq!(check.status, 0, "check failed\n{}", check.describe());
    assert_eq!(check.json()["ok"], true, "{}", check.describe());
}

/// The ids `list` shows (it must list without problems).
pub fn listed_ids(repo: &Repo) -> BTreeSet<String> {
    match repo.ok(["list"]) {
        Value::Array(a) => a.iter().map(id).collect(),
        other => panic!("list did not print an array: {other}"),
    }
}

/// `restore SNAP --to to` succeeds without warnings and gives exactly `tree`.
pub fn assert_restores_as(repo: &Repo, snap: &str, tree: &Scan, to: &Path) {
    let run = repo.run_json([
        OsString::from("restore"),
        snap.into(),
        "--to".into(),
        to.into(),
    ]);
    assert_eq!(
        run.status,
        0,
        "restore of {snap} failed\n{}",
        run.describe()
    );
    let warnings = &run.json()["warnings"];
    assert_eq!(
        warnings.as_array().map(Vec::len),
        Some(0),
        "restore warned: {warnings}"
    );
    let diff = tree_diff(tree, &scan_tree(to));
    assert!(
        diff.is_empty(),
        "snapshot {snap} restores differently:\n{}",
        diff.join("\n")
    );
}

// ------------------------------------------------------------------ the world

struct World {
    repo: Repo,
    /// The live volume, snapshotted into both series and restored in place.
    live: PathBuf,
    rng: Rng,
    model: Model,
    seed: u64,
    /// What happened so far, printed when a check fails.
    log: RefCell<Vec<String>>,
    counter: u64,
    /// Operations run (each followed by the full check).
    pub ops: u64,
    /// The crash points runs were aborted at.
    reached: RefCell<BTreeSet<String>>,
    /// Snapshots that trusted every file to the files cache (`op_age`).
    cache_hits: u64,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log.borrow();
            let from = log.len().saturating_sub(40);
            eprintln!(
                "model: seed {} failed after {} operations (replay: VOLSNAP_MODEL_SEED={} \
                 cargo test --test it model::replay_or_soak -- --nocapture); last steps:\n  {}",
                self.seed,
                self.ops,
                self.seed,
                log[from..].join("\n  ")
            );
        }
    }
}

impl World {
    /// A world whose repository is a directory, or (with `garage`) a prefix of its
    /// bucket named by the seed.
    fn new(seed: u64, garage: Option<&crate::garage::Garage>) -> World {
        let repo = match garage {
            None => Repo::uninit(),
            Some(g) => Repo::remote(&g.repo_url(&format!("model-{seed}")), g.env()),
        };
        repo.ok(["init", "--chunk-size-avg", "1024"]);
        let live = repo.mkdir("live");
        let mut w = World {
            repo,
            live,
            rng: Rng::new(seed),
            model: Model::default(),
            seed,
            log: RefCell::new(Vec::new()),
            counter: 0,
            ops: 0,
            reached: RefCell::default(),
            cache_hits: 0,
        };
        for _ in 0..8 {
            w.mutate_once();
        }
        w
    }

    fn note(&self, s: impl Into<String>) {
        let s = s.into();
        if std::env::var_os("VOLSNAP_MODEL_VERBOSE").is_some() {
            eprintln!("{s}");
        }
        self.log.borrow_mut().push(s);
    }

    fn fresh(&mut self, what: &str) -> PathBuf {
        self.counter += 1;
        self.repo.scratch(&format!("{what}-{}", self.counter))
    }

    /// Runs `volsnap --json ARGS`, aborted at crash point `crash` if given.
    fn run(&self, args: &[&str], crash: Option<String>) -> Ended {
        let mut cmd = self.repo.command();
        if let Some(k) = &crash {
            cmd.env("VOLSNAP_CRASH_AT", k);
        }
        cmd.arg("--json").args(args);
        let run = Run::from_command(cmd);
        self.ended(run, crash.is_some())
    }

    fn ended(&self, run: Run, may_crash: bool) -> Ended {
        if run.status == 0 {
            self.note(format!("    ok: {}", brief(&run)));
            return Ended::Ok(run);
        }
        let point = run
            .stderr
            .split_once("crash point ")
            .and_then(|(_, rest)| rest.split_once('(')?.1.split_once(')'))
            .map(|(name, _)| name.to_owned());
        match point {
            Some(p) if may_crash => {
                self.note(format!("    crashed at {p:?}"));
                self.reached.borrow_mut().insert(p.clone());
                Ended::Crashed
            }
            _ => panic!("volsnap failed\n{}", run.describe()),
        }
    }

    fn list(&self) -> Vec<Value> {
        match self.repo.ok(["list"]) {
            Value::Array(a) => a,
            other => panic!("list did not print an array: {other}"),
        }
    }

    /// Snapshots listed now that the model does not know, checked against `allowed`
    /// (series, is it an undo snapshot) and added with `tree`. Returns their ids.
    fn learn_new(
        &mut self,
        allowed: &[(&str, bool)],
        tree: &Rc<Scan>,
        at_most: usize,
    ) -> Vec<String> {
        let list = self.list();
        let mut new = Vec::new();
        for s in &list {
            let sid = id(s);
            if self.model.snaps.contains_key(&sid) {
                continue;
            }
            let series = s["series"].as_str().unwrap();
            let undo = s["tags"].as_array().unwrap().iter().any(|t| t == UNDO_TAG);
            assert!(
                allowed.contains(&(series, undo)),
                "snapshot {sid} appeared, series {series}, undo {undo}; expected one of {allowed:?}: {s}"
            );
            self.model.add(&sid, s, tree.clone());
            new.push(sid);
        }
        assert!(
            new.len() <= at_most,
            "{} snapshots appeared, at most {at_most} expected: {new:?}",
            new.len()
        );
        new
    }

    // -------------------------------------------------------------- the invariants

    /// Everything the model promises, checked against the repository and the volume.
    fn verify(&mut self) {
        assert_settled(
            &self.repo,
            &[self.live.parent().unwrap(), self.live.as_path()],
        );
        // Exactly the committed snapshots.
        let list = self.list();
        let listed: BTreeMap<String, &Value> = list.iter().map(|s| (id(s), s)).collect();
        let want: BTreeSet<&String> = self.model.snaps.keys().collect();
        let got: BTreeSet<&String> = listed.keys().collect();
        assert_eq!(got, want, "listed snapshots differ from the model");
        for (sid, s) in &self.model.snaps {
            let l = listed[sid];
            assert_eq!(l["series"], s.series.as_str(), "{sid}");
            assert_eq!(l["version"], s.version, "{sid}");
            let tags: Vec<&str> = l["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            assert_eq!(tags, s.tags, "{sid}");
        }
        assert_check_clean(&self.repo);
        // Each restores byte-identically, with its metadata and hardlinks.
        let ids: Vec<String> = self.model.snaps.keys().cloned().collect();
        for sid in ids {
            let to = self.fresh("verify");
            assert_restores_as(&self.repo, &sid, &self.model.snaps[&sid].tree, &to);
            fs::remove_dir_all(&to).unwrap();
        }
    }

    // -------------------------------------------------------------- mutations

    /// Every entry of the live volume (relative path, kind), root excluded.
    fn live_entries(&self) -> Vec<(Vec<u8>, &'static str)> {
        scan_tree(&self.live)
            .entries
            .into_iter()
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, m)| (p, m.kind))
            .collect()
    }

    fn live_path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.live.clone()
        } else {
            self.live.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    /// A random directory of the live volume (the root among them), at most two deep.
    fn some_dir(&mut self, entries: &[(Vec<u8>, &'static str)]) -> Vec<u8> {
        let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
        dirs.extend(
            entries
                .iter()
                .filter(|(p, k)| *k == "dir" && p.iter().filter(|&&c| c == b'/').count() < 2)
                .map(|(p, _)| p.clone()),
        );
        self.rng.pick(&dirs).clone()
    }

    fn child(dir: &[u8], name: &str) -> Vec<u8> {
        let mut p = dir.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        p
    }

    fn content(&mut self) -> Vec<u8> {
        match self.rng.below(6) {
            0 => Vec::new(),
            1 => {
                let n = self.rng_range(1, 100);
                self.rng.bytes(n)
            }
            2 => {
                let n = self.rng_range(100, 5_000);
                self.rng.bytes(n)
            }
            3 => {
                // Repeated blocks: dedup within and across files.
                let mut out = Vec::new();
                for _ in 0..self.rng.range(2, 12) {
                    let block = self.rng.below(4);
                    out.extend_from_slice(&random_bytes(&format!("block {block}"), 3_000));
                }
                out
            }
            4 => {
                // Zeros with a little data: runs of the zero chunk.
                let mut out = vec![0u8; self.rng_range(4_096, 40_000)];
                let at = self.rng.below(out.len() as u64) as usize;
                let data = self.rng.bytes(100);
                let end = (at + 100).min(out.len());
                out[at..end].copy_from_slice(&data[..end - at]);
                out
            }
            _ => {
                let n = self.rng_range(5_000, 30_000);
                self.rng.bytes(n)
            }
        }
    }

    fn rng_range(&mut self, lo: usize, hi: usize) -> usize {
        self.rng.range(lo as u64, hi as u64) as usize
    }

    /// One random change to the live volume.
    fn mutate_once(&mut self) {
        let entries = self.live_entries();
        let files: Vec<Vec<u8>> = entries
            .iter()
            .filter(|(_, k)| *k == "file")
            .map(|(p, _)| p.clone())
            .collect();
        let names = ["f0", "f1", "f2", "f3", "g", "d0", "d1", "e"];
        let op = self.rng.below(15);
        match op {
            // Write a new file or overwrite one (all its names see it).
            0..=2 => {
                let dir = self.some_dir(&entries);
                let p = Self::child(&dir, self.rng.name(&names));
                let data = self.content();
                let path = self.live_path(&p);
                if path.symlink_metadata().is_ok_and(|m| !m.is_file()) {
                    return;
                }
                self.note(format!("  write {} ({} bytes)", show(&p), data.len()));
                fs::write(path, data).unwrap();
            }
            // Append or truncate (shorter, or longer with zeros).
            3 if !files.is_empty() => {
                let p = self.rng.pick(&files).clone();
                let path = self.live_path(&p);
                if self.rng.chance(50) {
                    let n = self.rng_range(1, 3_000);
                    let data = self.rng.bytes(n);
                    self.note(format!("  append {} ({} bytes)", show(&p), data.len()));
                    fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .unwrap()
                        .write_all(&data)
                        .unwrap();
                } else {
                    let len = self.rng.below(20_000);
                    self.note(format!("  truncate {} to {len}", show(&p)));
                    fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_len(len)
                        .unwrap();
                }
            }
            // Changed within the same second: same size, and the mtime put back. Only
            // the ctime (and the content) tell.
            4 | 5 if !files.is_empty() => {
                self.same_size_change(&files);
            }
            // Rename anything (not into itself), replacing a file or an empty directory.
            6 if !entries.is_empty() => {
                let (from, kind) = self.rng.pick(&entries).clone();
                let dir = self.some_dir(&entries);
                let to = Self::child(&dir, self.rng.name(&names));
                if to.starts_with(&from) || from.starts_with(&to) {
                    return;
                }
                let (src, dst) = (self.live_path(&from), self.live_path(&to));
                match dst.symlink_metadata() {
                    Ok(m) if m.is_dir() != (kind == "dir") => return,
                    Ok(m) if m.is_dir() && fs::read_dir(&dst).unwrap().next().is_some() => return,
                    _ => {}
                }
                self.note(format!("  rename {} -> {}", show(&from), show(&to)));
                fs::rename(src, dst).unwrap();
            }
            // A hardlink to a file.
            7 if !files.is_empty() => {
                let p = self.rng.pick(&files).clone();
                let dir = self.some_dir(&entries);
                let to = Self::child(&dir, self.rng.name(&names));
                let dst = self.live_path(&to);
                if dst.symlink_metadata().is_ok() {
                    return;
                }
                self.note(format!("  hardlink {} -> {}", show(&to), show(&p)));
                fs::hard_link(self.live_path(&p), dst).unwrap();
            }
            // A symlink, or a fifo.
            8 => {
                let dir = self.some_dir(&entries);
                let to = Self::child(&dir, self.rng.name(&names));
                let dst = self.live_path(&to);
                if dst.symlink_metadata().is_ok() {
                    return;
                }
                if self.rng.chance(80) {
                    let target =
                        *self
                            .rng
                            .pick(&["f0", "../d0/f1", "/etc/passwd", "nowhere", "d0"]);
                    self.note(format!("  symlink {} -> {target}", show(&to)));
                    std::os::unix::fs::symlink(target, dst).unwrap();
                } else {
                    self.note(format!("  fifo {}", show(&to)));
                    rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &dst,
                        rustix::fs::FileType::Fifo,
                        rustix::fs::Mode::from_raw_mode(0o640),
                        0,
                    )
                    .unwrap();
                }
            }
            // Mode or owner of any entry, the root (often) included.
            9 => {
                let (p, kind) = if entries.is_empty() || self.rng.chance(30) {
                    (Vec::new(), "dir")
                } else {
                    self.rng.pick(&entries).clone()
                };
                let path = self.live_path(&p);
                if self.rng.chance(60) && kind != "symlink" {
                    let mode = if kind == "dir" {
                        *self.rng.pick(&[0o755, 0o700, 0o750, 0o1777, 0o2755])
                    } else {
                        *self.rng.pick(&[0o644, 0o600, 0o755, 0o640, 0o4755, 0o444])
                    };
                    self.note(format!("  chmod {mode:o} {}", show(&p)));
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                } else {
                    let owner = *self.rng.pick(&[0, NOBODY, 1000]);
                    self.note(format!("  chown {owner} {}", show(&p)));
                    std::os::unix::fs::lchown(&path, Some(owner), Some(owner)).unwrap();
                }
            }
            // Extended attributes of a file or directory.
            10 => {
                let mut all: Vec<(Vec<u8>, &str)> = vec![(Vec::new(), "dir")];
                all.extend(
                    entries
                        .iter()
                        .filter(|(_, k)| *k == "file" || *k == "dir")
                        .cloned(),
                );
                let (p, _) = self.rng.pick(&all).clone();
                let path = self.live_path(&p);
                let key = *self.rng.pick(&["user.a", "user.b", "user.long.name"]);
                if self.rng.chance(75) {
                    let len = self.rng_range(0, 40);
                    let value: Vec<u8> =
                        self.rng.bytes(len).iter().map(|b| b'a' + b % 26).collect();
                    self.note(format!("  setxattr {key} on {}", show(&p)));
                    rustix::fs::lsetxattr(&path, key, &value, rustix::fs::XattrFlags::empty())
                        .unwrap();
                } else {
                    self.note(format!("  removexattr {key} on {}", show(&p)));
                    let _ = rustix::fs::lremovexattr(&path, key);
                }
            }
            // Delete anything.
            11 if !entries.is_empty() => {
                let (p, kind) = self.rng.pick(&entries).clone();
                self.note(format!("  delete {}", show(&p)));
                let path = self.live_path(&p);
                if kind == "dir" {
                    fs::remove_dir_all(path).unwrap();
                } else {
                    fs::remove_file(path).unwrap();
                }
            }
            // A directory.
            12 => {
                let dir = self.some_dir(&entries);
                let to = Self::child(&dir, self.rng.name(&["d0", "d1", "e"]));
                let dst = self.live_path(&to);
                if dst.symlink_metadata().is_ok() {
                    return;
                }
                self.note(format!("  mkdir {}", show(&to)));
                fs::create_dir(dst).unwrap();
            }
            // An mtime set by hand (nanoseconds included), on anything.
            13 => {
                let mut all: Vec<(Vec<u8>, &str)> = vec![(Vec::new(), "dir")];
                all.extend(entries.iter().cloned());
                let (p, _) = self.rng.pick(&all).clone();
                let sec = Y2020 + self.rng.below(100_000_000) as i64;
                let nsec = self.rng.below(1_000_000_000) as i64;
                self.note(format!("  mtime {sec}.{nsec:09} on {}", show(&p)));
                set_mtime(&self.live_path(&p), sec, nsec);
            }
            _ => {}
        }
    }

    /// Changes one byte of a non-empty file of `files`, keeping its size and putting its
    /// mtime back: only the ctime (and the content) tell. Returns whether it did.
    fn same_size_change(&mut self, files: &[Vec<u8>]) -> bool {
        let p = self.rng.pick(files).clone();
        let path = self.live_path(&p);
        let mut data = fs::read(&path).unwrap();
        if data.is_empty() {
            return false;
        }
        let (sec, nsec) = mtime_of(&path);
        let at = self.rng.below(data.len() as u64) as usize;
        data[at] = data[at].wrapping_add(1 + self.rng.below(255) as u8);
        self.note(format!(
            "  same-size change of {} at {at}, mtime kept",
            show(&p)
        ));
        let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(&data).unwrap();
        drop(f);
        set_mtime(&path, sec, nsec);
        true
    }

    fn mutate(&mut self) {
        for _ in 0..self.rng.below(5) {
            self.mutate_once();
        }
    }

    // -------------------------------------------------------------- operations

    /// A crash point for the next run: `None` (run to the end) or 1..=max.
    /// A crash point for the next run (`VOLSNAP_CRASH_AT`): `None` (run to the end), the
    /// k-th point reached (1..=max), or the first point of one of `names` (reaching the
    /// rarer ones, like a gc's punch and repack).
    fn maybe_crash(&mut self, pct: u64, max: u64, names: &[&'static str]) -> Option<String> {
        if !self.rng.chance(pct) {
            return None;
        }
        Some(if names.is_empty() || self.rng.chance(50) {
            self.rng.range(1, max).to_string()
        } else {
            self.rng.name(names).to_owned()
        })
    }

    fn some_snapshot(&mut self) -> Option<String> {
        let ids: Vec<String> = self.model.snaps.keys().cloned().collect();
        (!ids.is_empty()).then(|| self.rng.pick(&ids).clone())
    }

    fn op_snapshot(&mut self) {
        self.mutate();
        let series = *self.rng.pick(&SERIES);
        let tag = self.rng.chance(25);
        let skip = self.rng.chance(20);
        let crash = self.maybe_crash(30, 11, SNAPSHOT_POINTS);
        let tree = Rc::new(scan_tree(&self.live));
        let live = self.live.to_str().unwrap().to_owned();
        let mut args = vec!["snapshot", &live, "--name", series];
        if tag {
            args.extend(["--tag", KEEP_TAG]);
        }
        if skip {
            args.push("--skip-if-unchanged");
        }
        self.note(format!("snapshot {args:?} crash {crash:?}"));
        let unchanged = self
            .model
            .latest(series)
            .is_some_and(|l| tree_diff(&l.tree, &tree).is_empty());
        match self.run(&args, crash) {
            Ended::Ok(run) => {
                let v = run.json();
                if skip && unchanged {
                    assert_eq!(v["skipped"], true, "nothing changed, yet: {v}");
                    assert!(self.model.snaps.contains_key(&id(&v)), "{v}");
                } else {
                    assert_eq!(v["skipped"], false, "the volume changed, yet: {v}");
                    self.model.add(&id(&v), &v, tree);
                    self.learn_new(&[], &Rc::new(Scan::default()), 0);
                }
            }
            Ended::Crashed => {
                self.learn_new(&[(series, false)], &tree, 1);
            }
        }
    }

    /// A plain snapshot of the live volume into `series`, added to the model.
    fn snapshot_now(&mut self, series: &str) -> Value {
        let tree = Rc::new(scan_tree(&self.live));
        let live = self.live.to_str().unwrap().to_owned();
        self.note(format!("snapshot {live} --name {series}"));
        let Ended::Ok(run) = self.run(&["snapshot", &live, "--name", series], None) else {
            unreachable!("no crash point was set")
        };
        let v = run.json();
        self.model.add(&id(&v), &v, tree);
        v
    }

    /// The files cache at work: once every file is older than the racily-clean window,
    /// a snapshot caches them all and the next one trusts them all (reads nothing);
    /// then a file changed within the same second, its size and mtime kept, must be
    /// read again (the model's restores check it was).
    fn op_age(&mut self) {
        let series = self.rng.name(&SERIES);
        self.note("wait out the racily-clean window");
        wait_out_racy_window(&self.live);
        self.snapshot_now(series);
        let again = self.snapshot_now(series);
        assert_eq!(
            again["stats"]["bytes_read"], 0,
            "nothing changed, yet files were read: {again}"
        );
        self.cache_hits += 1;
        let files: Vec<Vec<u8>> = self
            .live_entries()
            .into_iter()
            .filter(|(_, k)| *k == "file")
            .map(|(p, _)| p)
            .collect();
        if !files.is_empty() && self.same_size_change(&files) {
            let changed = self.snapshot_now(series);
            assert_ne!(
                changed["stats"]["bytes_read"], 0,
                "a file changed within the same second was not read: {changed}"
            );
        }
    }

    fn op_forget_policy(&mut self) {
        let last = self.rng.range(1, 3) as usize;
        let series = self.rng.chance(50).then(|| *self.rng.pick(&SERIES));
        let keep_tag = self.rng.chance(40);
        let crash = self.maybe_crash(30, 3, &[]);
        let last_s = last.to_string();
        let mut args = vec!["forget", "--keep-last", &last_s];
        if let Some(s) = series {
            args.extend(["--name", s]);
        }
        if keep_tag {
            args.extend(["--keep-tag", KEEP_TAG]);
        }
        self.note(format!("forget {args:?} crash {crash:?}"));
        let plan = self.model.forget_plan(last, series, keep_tag);
        match self.run(&args, crash) {
            Ended::Ok(run) => {
                let v = run.json();
                let removed: BTreeSet<String> = v["removed"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["id"].as_str().unwrap().to_owned())
                    .collect();
                assert_eq!(
                    removed, plan,
                    "forget removed other snapshots than the model: {v}"
                );
                for r in &removed {
                    self.model.snaps.remove(r);
                }
            }
            Ended::Crashed => {
                let listed: BTreeSet<String> = self.list().iter().map(id).collect();
                let gone: Vec<String> = self
                    .model
                    .snaps
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                for g in gone {
                    assert!(plan.contains(&g), "forget lost {g}, which it keeps");
                    self.model.snaps.remove(&g);
                }
            }
        }
    }

    fn op_forget_id(&mut self) {
        let Some(sid) = self.some_snapshot() else {
            return;
        };
        self.note(format!("forget {sid}"));
        self.run(&["forget", &sid], None);
        self.model.snaps.remove(&sid);
    }

    fn op_gc(&mut self) {
        let max_unused = *self.rng.pick(&["0", "10", "50"]);
        let crash = self.maybe_crash(40, 14, GC_POINTS);
        self.note(format!("gc --max-unused {max_unused} crash {crash:?}"));
        self.run(&["gc", "--max-unused", max_unused], crash);
    }

    fn op_restore_to(&mut self) {
        let Some(sid) = self.some_snapshot() else {
            return;
        };
        let tree = self.model.snaps[&sid].tree.clone();
        let dirs: Vec<Vec<u8>> = tree
            .entries
            .iter()
            .filter(|(p, m)| !p.is_empty() && m.kind == "dir")
            .map(|(p, _)| p.clone())
            .collect();
        let sub = (!dirs.is_empty() && self.rng.chance(40)).then(|| self.rng.pick(&dirs).clone());
        let crash = self.maybe_crash(40, 2, &[]);
        let to = self.fresh("restore");
        let mut source = sid.clone().into_bytes();
        if let Some(s) = &sub {
            source.push(b':');
            source.extend_from_slice(s);
        }
        let source = String::from_utf8(source).unwrap();
        self.note(format!("restore {source} crash {crash:?}"));
        if let Ended::Ok(_) = self.run(&["restore", &source, "--to", to.to_str().unwrap()], crash) {
            let want = match &sub {
                Some(s) => subtree(&tree, s),
                None => copy_scan(&tree),
            };
            let diff = tree_diff(&want, &scan_tree(&to));
            assert!(
                diff.is_empty(),
                "restore {source} differs:\n{}",
                diff.join("\n")
            );
        }
        let _ = fs::remove_dir_all(&to);
    }

    fn op_export(&mut self) {
        let Some(sid) = self.some_snapshot() else {
            return;
        };
        let format = *self.rng.pick(&["tar", "tar.gz"]);
        let crash = self.maybe_crash(30, 2, &[]);
        let dir = self.fresh("export");
        fs::create_dir(&dir).unwrap();
        let out = dir.join(format!("out.{format}"));
        self.note(format!("export {sid} {format} crash {crash:?}"));
        let args = [
            "export",
            &sid,
            "-o",
            out.to_str().unwrap(),
            "--format",
            format,
        ];
        match self.run(&args, crash) {
            Ended::Ok(_) => self.check_export(&sid, &out),
            Ended::Crashed => assert!(!out.exists(), "a crashed export left its output"),
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    fn check_export(&self, sid: &str, out: &Path) {
        let diff = export_diff(out, &self.model.snaps[sid].tree);
        assert!(
            diff.is_empty(),
            "export of {sid} differs:\n{}",
            diff.join("\n")
        );
    }

    /// Committed in-place restores, counted by their records.
    fn restore_records(&self) -> BTreeSet<OsString> {
        fs::read_dir(self.repo.local_dir().join("restores"))
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default()
    }

    /// Restores `sid` in place (or undoes the last in-place restore), maybe aborted at
    /// a crash point, then checks the volume is wholly old or wholly new and learns
    /// the undo snapshot.
    fn in_place(&mut self, sid: Option<String>, crash: Option<String>) {
        let old = Rc::new(scan_tree(&self.live));
        let before = self.restore_records();
        let live = self.live.to_str().unwrap().to_owned();
        let mut args = vec!["restore"];
        match &sid {
            Some(s) => args.extend([s.as_str(), "--in-place"]),
            None => args.extend(["--undo", &live]),
        }
        args.extend(["--yes", "--ignore-running-containers"]);
        // What undo restores: the undo snapshot of the last committed restore.
        let target = match &sid {
            Some(s) => Some(s.clone()),
            None => self.model.restores.last().cloned(),
        };
        let resolvable = target
            .as_ref()
            .is_some_and(|t| self.model.snaps.contains_key(t));
        self.note(format!("{args:?} (restores {target:?}) crash {crash:?}"));
        if !resolvable {
            let run = self.repo.run_json(&args);
            run.error_line();
            assert_eq!(self.restore_records(), before);
            assert!(tree_diff(&old, &scan_tree(&self.live)).is_empty());
            self.note("    refused (nothing to undo)");
            return;
        }
        let target = target.unwrap();
        let (new, series) = {
            let s = &self.model.snaps[&target];
            (s.tree.clone(), s.series.clone())
        };
        let ended = self.run(&args, crash);
        if let Ended::Crashed = ended {
            let rec = self.repo.ok(["recover"]);
            self.note(format!("    recover: {rec}"));
        }
        let after = self.restore_records();
        let committed = match after.len() - before.len() {
            0 => false,
            1 => true,
            n => panic!("{n} restore records appeared"),
        };
        if let Ended::Ok(_) = ended {
            assert!(committed, "a restore that succeeded left no record");
        }
        let now = scan_tree(&self.live);
        let want = if committed { &new } else { &old };
        let diff = tree_diff(want, &now);
        assert!(
            diff.is_empty(),
            "the live volume is not wholly {} (committed: {committed}):\n{}",
            if committed { "new" } else { "old" },
            diff.join("\n")
        );
        let undo = self.learn_new(&[(series.as_str(), true)], &old, 1);
        if committed {
            assert_eq!(
                undo.len(),
                1,
                "a committed restore without its undo snapshot"
            );
            self.model.restores.push(undo[0].clone());
        }
    }

    fn op_in_place(&mut self) {
        let Some(sid) = self.some_snapshot() else {
            return;
        };
        self.mutate();
        let crash = self.maybe_crash(40, 26, LIVE_POINTS);
        self.in_place(Some(sid), crash);
    }

    fn op_undo(&mut self) {
        self.mutate();
        let crash = self.maybe_crash(40, 26, LIVE_POINTS);
        self.in_place(None, crash);
    }

    fn op_repair(&mut self) {
        let crash = self.maybe_crash(30, 1, &[]);
        self.note(format!("repair index crash {crash:?}"));
        self.run(&["repair", "index"], crash);
    }

    fn op_delete_index(&mut self) {
        self.note("delete index.redb");
        fs::remove_file(self.repo.local_dir().join("index.redb")).unwrap();
        let run = self.repo.run_json(["check"]);
        if self.repo.remote.is_some() {
            // An object-store repository's index is a cache: a new one is built from
            // the store, as on a host that never used the repository.
            assert_eq!(run.status, 0, "{}", run.describe());
            assert_eq!(run.json()["ok"], true, "{}", run.describe());
            return;
        }
        let line = run.error_line();
        assert!(line.contains("volsnap repair index"), "{line}");
        let crash = self.maybe_crash(30, 1, &[]);
        self.note(format!("repair index crash {crash:?}"));
        if let Ended::Crashed = self.run(&["repair", "index"], crash) {
            self.run(&["repair", "index"], None);
        }
    }

    /// Two volsnap processes at once, one (or both, or neither) killed with SIGKILL
    /// after a seeded delay.
    fn pair(&mut self, a: &[&str], b: &[&str]) -> [Option<Run>; 2] {
        let victim = self.rng.below(4); // 0 none, 1 a, 2 b, 3 both
        let delay = Duration::from_millis(self.rng.below(120));
        self.note(format!("pair {a:?} + {b:?}, kill {victim} after {delay:?}"));
        let spawn = |args: &[&str]| {
            let mut cmd = self.repo.command();
            cmd.arg("--json")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let desc = format!("{cmd:?}");
            (cmd.spawn().unwrap(), desc)
        };
        let children = [spawn(a), spawn(b)];
        if victim > 0 {
            // The delay is the random instant of the kill, not a synchronisation: the
            // model accepts every outcome.
            std::thread::sleep(delay);
            for (i, (child, _)) in children.iter().enumerate() {
                if victim == 3 || victim == i as u64 + 1 {
                    let _ = rustix::process::kill_process(
                        rustix::process::Pid::from_child(child),
                        rustix::process::Signal::KILL,
                    );
                }
            }
        }
        children.map(|(child, desc)| {
            let out = child.wait_with_output().unwrap();
            let killed = out.status.code().is_none();
            let run = Run::from_output(desc, out);
            if killed {
                self.note("    killed");
                None
            } else {
                assert_eq!(run.status, 0, "{}", run.describe());
                self.note(format!("    ok: {}", brief(&run)));
                Some(run)
            }
        })
    }

    fn op_pair(&mut self) {
        let live = self.live.to_str().unwrap().to_owned();
        match self.rng.below(3) {
            0 => {
                self.mutate();
                let tree = Rc::new(scan_tree(&self.live));
                let series = *self.rng.pick(&SERIES);
                let [snap, _gc] = self.pair(&["snapshot", &live, "--name", series], &["gc"]);
                match snap {
                    Some(run) => {
                        let v = run.json();
                        self.model.add(&id(&v), &v, tree);
                    }
                    None => {
                        self.learn_new(&[(series, false)], &tree, 1);
                    }
                }
            }
            1 => {
                let Some(sid) = self.some_snapshot() else {
                    return;
                };
                let dir = self.fresh("export");
                fs::create_dir(&dir).unwrap();
                let out = dir.join("out.tar.gz");
                let o = out.to_str().unwrap().to_owned();
                let [export, _gc] = self.pair(&["export", &sid, "-o", &o], &["gc"]);
                if export.is_some() || out.exists() {
                    // Killed after the rename, the archive is whole.
                    self.check_export(&sid, &out);
                }
                fs::remove_dir_all(&dir).unwrap();
            }
            _ => {
                self.mutate();
                let tree = Rc::new(scan_tree(&self.live));
                let series = *self.rng.pick(&SERIES);
                let args = ["snapshot", live.as_str(), "--name", series];
                let runs = self.pair(&args, &args);
                for run in runs.iter().flatten() {
                    let v = run.json();
                    self.model.add(&id(&v), &v, tree.clone());
                }
                let killed = runs.iter().filter(|r| r.is_none()).count();
                self.learn_new(&[(series, false)], &tree, killed);
            }
        }
    }

    /// One random operation, then every invariant.
    fn step(&mut self) {
        self.ops += 1;
        self.note(format!("-- op {}", self.ops));
        self.model.start_operation();
        match self.rng.below(100) {
            0..=29 => self.op_snapshot(),
            30..=37 => self.op_forget_policy(),
            38..=40 => self.op_forget_id(),
            41..=50 => self.op_gc(),
            51..=56 => self.op_restore_to(),
            57..=64 => self.op_export(),
            65..=74 => self.op_in_place(),
            75..=80 => self.op_undo(),
            81..=84 => self.op_repair(),
            85..=87 => self.op_delete_index(),
            88..=96 => self.op_pair(),
            _ => self.op_age(),
        }
        self.verify();
    }
}

/// The first line of a run's stdout, shortened, for the log.
fn brief(run: &Run) -> String {
    let s = run.stdout_str();
    let line = s.lines().next().unwrap_or("");
    line.chars().take(160).collect()
}

/// What a seed did.
struct Summary {
    ops: u64,
    reached: BTreeSet<String>,
    cache_hits: u64,
}

/// Runs `ops` random operations from `seed`, then, if none did, the files-cache
/// scenario (`op_age`).
fn run_seed(seed: u64, ops: u64) -> Summary {
    run_seed_in(seed, ops, None)
}

fn run_seed_in(seed: u64, ops: u64, garage: Option<&crate::garage::Garage>) -> Summary {
    let mut w = World::new(seed, garage);
    w.verify();
    for _ in 0..ops {
        w.step();
    }
    if w.cache_hits == 0 {
        w.note("-- the files cache at the end");
        w.op_age();
        w.verify();
    }
    Summary {
        ops: w.ops,
        reached: w.reached.take(),
        cache_hits: w.cache_hits,
    }
}

/// A CI seed.
fn ci_seed(seed: u64) {
    let started = Instant::now();
    let s = run_seed(seed, CI_OPS);
    assert_eq!(s.ops, CI_OPS);
    eprintln!(
        "model: seed {seed}: {} operations in {:.1}s",
        s.ops,
        started.elapsed().as_secs_f64()
    );
}

/// Operations per CI seed: a few dozen keep the whole model test under a minute.
const CI_OPS: u64 = 40;

#[test]
fn seed_1() {
    ci_seed(1);
}

#[test]
fn seed_2() {
    ci_seed(2);
}

#[test]
fn seed_3() {
    ci_seed(3);
}

/// The model against a bucket of a real Garage instead of a directory: every operation,
/// crash point and invariant as above, with the index, locks and journals in the cache.
#[test]
fn seed_1_on_garage() {
    let Some(garage) = crate::garage::Garage::single() else {
        return;
    };
    let started = Instant::now();
    let s = run_seed_in(1, CI_OPS, Some(&garage));
    assert_eq!(s.ops, CI_OPS);
    eprintln!(
        "model: seed 1 on garage: {} operations in {:.1}s",
        s.ops,
        started.elapsed().as_secs_f64()
    );
}

/// The soak seed that found forgotten versions handed out again (see
/// `forgotten_versions_are_never_handed_out_again`; its kill instant decides whether it
/// reaches that state).
#[test]
fn seed_1758516286885080100() {
    ci_seed(1_758_516_286_885_080_100);
}

/// `VOLSNAP_MODEL_SEED=N` replays seed N (`VOLSNAP_MODEL_OPS` operations, default
/// `CI_OPS`); `VOLSNAP_MODEL_SECONDS=T` runs random seeds for T seconds and prints every
/// failing seed. Without either it runs one more fixed seed.
#[test]
fn replay_or_soak() {
    let ops = std::env::var("VOLSNAP_MODEL_OPS")
        .ok()
        .map_or(CI_OPS, |v| v.parse().expect("VOLSNAP_MODEL_OPS"));
    if let Ok(seed) = std::env::var("VOLSNAP_MODEL_SEED") {
        let seed = seed.parse().expect("VOLSNAP_MODEL_SEED");
        let started = Instant::now();
        let s = run_seed(seed, ops);
        eprintln!(
            "model: seed {seed}: {} operations in {:.1}s, {} snapshots trusted the files \
             cache; crash points reached: {:?}",
            s.ops,
            started.elapsed().as_secs_f64(),
            s.cache_hits,
            s.reached
        );
        return;
    }
    let Ok(secs) = std::env::var("VOLSNAP_MODEL_SECONDS") else {
        ci_seed(4);
        return;
    };
    let secs: u64 = secs.parse().expect("VOLSNAP_MODEL_SECONDS");
    let started = Instant::now();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let (mut seeds, mut total, mut failed) = (0u64, 0u64, Vec::new());
    let mut reached = BTreeSet::new();
    while started.elapsed() < Duration::from_secs(secs) {
        seed = Rng::new(seed).next();
        eprintln!("model: seed {seed}");
        match std::panic::catch_unwind(|| run_seed(seed, ops)) {
            Ok(s) => {
                total += s.ops;
                reached.extend(s.reached);
            }
            Err(_) => {
                eprintln!("model: FAILED seed {seed} (VOLSNAP_MODEL_SEED={seed})");
                failed.push(seed);
            }
        }
        seeds += 1;
    }
    eprintln!(
        "model: {seeds} seeds, {total} operations in {:.0}s ({:.2} ops/s); crash points \
         reached: {reached:?}; failed seeds: {failed:?}",
        started.elapsed().as_secs_f64(),
        total as f64 / started.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

// ------------------------------------------------------------------ regressions
// Found by the model (seeds above or the soak), kept as directed tests: a seed replays
// only with this generator, these hold whatever the generator becomes.

/// Soak seed 1758516286885080100: a snapshot forgotten, the index rebuilt, and the next
/// snapshot of the series got the forgotten one's version (the counter lived only in
/// the index), so `SERIES@N` named other data than it had.
#[test]
fn forgotten_versions_are_never_handed_out_again() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), "one");
    repo.snapshot(&[&data], &["--name", "s"]);
    write(data.join("f"), "two");
    let second = repo.snapshot(&[&data], &["--name", "s"]);
    assert_eq!(second["version"], 2);
    repo.ok(["forget", &id(&second)]);
    repo.ok(["repair", "index"]);
    write(data.join("f"), "three");
    let third = repo.snapshot(&[&data], &["--name", "s"]);
    assert_eq!(
        third["version"], 3,
        "version 2 was forgotten, not free: {third}"
    );
    // Lost index, forgotten by policy: the same.
    repo.ok(["forget", "--keep-last", "1"]);
    fs::remove_file(repo.path.join("index.redb")).unwrap();
    repo.ok(["repair", "index"]);
    let fourth = repo.snapshot(&[&data], &["--name", "s"]);
    assert_eq!(fourth["version"], 4, "{fourth}");
    assert!(repo.run_json(["show", "s@2"]).status != 0);
}

/// `--skip-if-unchanged` compared only the volumes' trees, which do not hold the root
/// directory's own mode, owner, mtime and xattrs: a change there was skipped.
#[test]
fn a_change_of_the_volume_root_alone_is_not_skipped() {
    let repo = Repo::new();
    let data = repo.mkdir("data");
    write(data.join("f"), "content");
    let first = repo.snapshot(&[&data], &["--name", "s"]);
    fs::set_permissions(&data, fs::Permissions::from_mode(0o750)).unwrap();
    let second = repo.snapshot(&[&data], &["--name", "s", "--skip-if-unchanged"]);
    assert_eq!(second["skipped"], false, "{second}");
    assert_ne!(id(&first), id(&second));
    let to = repo.scratch("to");
    repo.restore(&id(&second), &to);
    assert_same_tree(&data, &to);
    // Unchanged now: skipped.
    let third = repo.snapshot(&[&data], &["--name", "s", "--skip-if-unchanged"]);
    assert_eq!(third["skipped"], true, "{third}");
}
