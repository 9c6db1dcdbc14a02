#!/usr/bin/env python3
"""Side-by-side comparison of volsnap with restic, borg and tar on the same data.

    python3 benches/compare.py [--runs 3] [--datasets db,small,versions] [--work DIR]

Installs its peers when absent (restic, borgbackup, pigz, from Debian packages),
generates seeded data sets, runs every tool on every data set with a fresh repository
per run, and writes the medians and ratios into BENCHMARKS.md between the markers
`<!-- compare:begin -->` and `<!-- compare:end -->`.

Steps per tool and data set: first snapshot; second snapshot with nothing changed;
snapshot after the mutator; full restore into an empty directory (verified identical
with `diff -r`, not timed); forget all but the last snapshot plus prune/gc. Measured
per step: wall time, CPU time (user + sys) and peak RSS of the process tree, and the
repository size after the step.
"""

import argparse
import hashlib
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


# ---------------------------------------------------------------- measurement


def run(cmd, cwd=None, env=None, check=True):
    """Runs cmd under GNU time; returns (wall_s, cpu_s, peak_rss_bytes) of its process
    tree. GNU time's small child execs the command, so the peak RSS is the command's
    own, not that of this Python process it was forked from."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.NamedTemporaryFile(mode="r") as stats, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.run(
            ["/usr/bin/time", "-f", "%U %S %M", "-o", stats.name, *map(str, cmd)],
            cwd=cwd, env=full_env, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        if check and p.returncode != 0:
            err.seek(0)
            sys.exit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{err.read().decode(errors='replace')[-3000:]}")
        user, sys_s, rss_kib = stats.read().split()[-3:]
    return wall, float(user) + float(sys_s), int(rss_kib) * 1024


def du(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def drop_tree(path):
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", str(path)], check=True)


# ---------------------------------------------------------------- data sets


def rand(seed):
    return random.Random(hashlib.sha256(seed.encode()).digest())


def page(r, n):
    """An 8 KiB database-like page: half random, half structured text."""
    head = r.randbytes(4096)
    text = (f"row {n:012d} status=active balance={r.randint(0, 10**9):012d} " * 64).encode()[:4096]
    return head + text


class DbLike:
    """~1 GB in a few large files; each round rewrites thousands of scattered 8 KiB
    pages and updates a real SQLite database."""

    name = "db"
    files = 4
    pages_per_file = 30_000  # 4 x 234 MiB
    pages_changed = 3_000

    def make(self, dst):
        dst.mkdir(parents=True)
        for i in range(self.files):
            r = rand(f"db-file-{i}")
            with open(dst / f"table{i}.dat", "wb") as f:
                for n in range(self.pages_per_file):
                    f.write(page(r, n))
        db = sqlite3.connect(dst / "app.sqlite")
        db.execute("PRAGMA page_size = 8192")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER)")
        r = rand("sqlite")
        db.executemany("INSERT INTO t VALUES (?, ?, ?)", ((i, r.randbytes(200).hex(), i) for i in range(200_000)))
        db.commit()
        db.close()

    def mutate(self, dst, round_no):
        r = rand(f"db-mutate-{round_no}")
        for _ in range(self.pages_changed):
            i = r.randrange(self.files)
            n = r.randrange(self.pages_per_file)
            with open(dst / f"table{i}.dat", "r+b") as f:
                f.seek(n * 8192)
                f.write(page(r, n))
        db = sqlite3.connect(dst / "app.sqlite")
        db.executemany("UPDATE t SET v = ?, n = n + 1 WHERE id = ?", ((r.randbytes(200).hex(), r.randrange(200_000)) for _ in range(2_000)))
        db.commit()
        db.close()


class SmallFiles:
    """~100,000 files, ~1 GB, copied from the machine's /usr tree; the mutator
    changes ~1% of the files and adds and deletes a few."""

    name = "small"
    max_files = 100_000
    max_bytes = 1024 * MIB
    _list = None

    def sources(self):
        if SmallFiles._list is None:
            picked, total = [], 0
            for top in ("/usr/share", "/usr/include", "/usr/lib"):
                for dirpath, dirs, files in os.walk(top):
                    dirs.sort()
                    for f in sorted(files):
                        p = os.path.join(dirpath, f)
                        try:
                            st = os.lstat(p)
                        except OSError:
                            continue
                        if not (os.path.isfile(p) and not os.path.islink(p)) or st.st_size > 4 * MIB:
                            continue
                        if len(picked) >= self.max_files or total + st.st_size > self.max_bytes:
                            break
                        picked.append(p)
                        total += st.st_size
            SmallFiles._list = picked
        return SmallFiles._list

    def make(self, dst):
        for p in self.sources():
            target = dst / p.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)

    def mutate(self, dst, round_no):
        r = rand(f"small-mutate-{round_no}")
        files = sorted(str(p) for p in dst.rglob("*") if p.is_file())
        for p in r.sample(files, len(files) // 100):
            with open(p, "r+b") as f:
                data = f.read()
                at = r.randrange(len(data) + 1)
                f.seek(at)
                f.write(r.randbytes(min(512, max(1, len(data) - at))))
        for p in r.sample(files, 20):
            os.unlink(p)
        for i in range(50):
            (dst / "usr" / f"new-{round_no}-{i}.txt").write_bytes(r.randbytes(r.randrange(100, 20000)))


class Versions:
    """Successive versions of a real source tree (Django sdists from PyPI)."""

    name = "versions"
    releases = ["4.2", "4.2.1", "4.2.2", "5.0"]
    cache = None

    def fetch(self):
        if Versions.cache is None:
            Versions.cache = Path(tempfile.mkdtemp(prefix="volsnap-django-"))
            for v in self.releases:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"django=={v}", "-d", str(Versions.cache / v)],
                    check=True,
                )
        return Versions.cache

    def unpack(self, version, dst):
        drop_tree(dst)
        dst.mkdir(parents=True)
        archive = next((self.fetch() / version).iterdir())
        subprocess.run(["tar", "xzf", str(archive), "-C", str(dst), "--strip-components=1"], check=True)

    def make(self, dst):
        self.unpack(self.releases[0], dst)

    def mutate(self, dst, round_no):
        self.unpack(self.releases[min(round_no, len(self.releases) - 1)], dst)


# ---------------------------------------------------------------- tools


class Volsnap:
    name = "volsnap"

    def __init__(self, work):
        self.bin = ROOT / "target/release/volsnap"
        self.repo = work / "repo"

    def init(self):
        return run([self.bin, "--repo", self.repo, "init"])

    def snapshot(self, data, n):
        return run([self.bin, "--repo", self.repo, "snapshot", data, "--name", "bench"])

    def restore(self, data, out):
        m = run([self.bin, "--repo", self.repo, "restore", "bench@latest", "--to", out])
        return m, out

    def prune(self):
        a = run([self.bin, "--repo", self.repo, "forget", "--keep-last", "1"])
        b = run([self.bin, "--repo", self.repo, "gc"])
        return a[0] + b[0], a[1] + b[1], max(a[2], b[2])

    def export(self, out):
        return run([self.bin, "--repo", self.repo, "export", "bench@latest", "-o", out])


class Restic:
    name = "restic"

    def __init__(self, work):
        self.repo = work / "repo"
        self.env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(self.repo), "RESTIC_CACHE_DIR": str(work / "cache")}

    def init(self):
        return run(["restic", "init", "--repository-version", "2"], env=self.env)

    def snapshot(self, data, n):
        return run(["restic", "backup", "--host", "bench", data], env=self.env)

    def restore(self, data, out):
        m = run(["restic", "restore", "latest", "--target", out], env=self.env)
        return m, Path(str(out) + str(data))

    def prune(self):
        return run(["restic", "forget", "--keep-last", "1", "--prune"], env=self.env)


class Borg:
    name = "borg"

    def __init__(self, work):
        self.repo = work / "repo"
        self.env = {
            "BORG_BASE_DIR": str(work / "borgbase"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def init(self):
        return run(["borg", "init", "--encryption=none", self.repo], env=self.env)

    def snapshot(self, data, n):
        return run(["borg", "create", "--compression", "zstd,3", f"{self.repo}::s{n}", data], env=self.env)

    def restore(self, data, out):
        out.mkdir(parents=True)
        last = subprocess.run(["borg", "list", "--short", "--last", "1", self.repo], env={**os.environ, **self.env}, capture_output=True, text=True, check=True).stdout.strip()
        m = run(["borg", "extract", f"{self.repo}::{last}"], cwd=out, env=self.env)
        return m, out / str(data).lstrip("/")

    def prune(self):
        a = run(["borg", "prune", "--keep-last", "1", self.repo], env=self.env)
        b = run(["borg", "compact", self.repo], env=self.env)
        return a[0] + b[0], a[1] + b[1], max(a[2], b[2])


TOOLS = [Volsnap, Restic, Borg]
STEPS = ["first", "unchanged", "mutated", "restore", "prune"]


def one_run(tool_cls, dataset, base, run_no):
    work = base / f"{tool_cls.name}-{dataset.name}-{run_no}"
    drop_tree(work)
    work.mkdir(parents=True)
    data = work / "data"
    dataset.make(data)
    # Data is older than the snapshot that reads it, as in real use: let ctimes fall out
    # of volsnap's one-second racily-clean window.
    time.sleep(1.1)
    tool = tool_cls(work)
    tool.init()
    out = {}
    out["first"] = tool.snapshot(data, 1) + (du(tool.repo),)
    out["unchanged"] = tool.snapshot(data, 2) + (du(tool.repo),)
    dataset.mutate(data, 1)
    before = du(tool.repo)
    out["mutated"] = tool.snapshot(data, 3) + (du(tool.repo),)
    out["new_bytes"] = out["mutated"][3] - before
    m, restored = tool.restore(data, work / "restored")
    out["restore"] = m + (du(tool.repo),)
    diff = subprocess.run(["diff", "-r", "--no-dereference", "-q", str(data), str(restored)], capture_output=True, text=True)
    if diff.returncode != 0:
        sys.exit(f"{tool_cls.name} restore of {dataset.name} differs:\n{diff.stdout[:2000]}")
    if hasattr(tool, "export"):
        out["export"] = tool.export(work / "export.tar.gz") + (os.path.getsize(work / "export.tar.gz"),)
    p = tool.prune()
    out["prune"] = None if p is None else p + (du(tool.repo),)
    drop_tree(work)
    return out


def baselines(dataset, base, run_no):
    work = base / f"baseline-{dataset.name}-{run_no}"
    drop_tree(work)
    work.mkdir(parents=True)
    data = work / "data"
    dataset.make(data)
    out = {}
    out["tar czf"] = run(["tar", "czf", work / "a.tar.gz", "-C", work, "data"])
    out["tar -I pigz"] = run(["tar", "-I", "pigz", "-cf", work / "b.tar.gz", "-C", work, "data"])
    out["find stat walk"] = run(["find", data, "-printf", "%s %T@ %C@ %i\\n"])
    run(["tar", "cf", work / "c.tar", "-C", work, "data"])
    (work / "x").mkdir()
    out["tar -xf (floor)"] = run(["tar", "xf", work / "c.tar", "-C", work / "x"])
    out["sizes"] = {"tar.gz": os.path.getsize(work / "a.tar.gz"), "data": du(data)}
    drop_tree(work)
    return out


def rss_scaling(base):
    """Peak RSS of a no-change snapshot, in a repository holding only the data set and
    in one also holding 10x as much unrelated data."""
    work = base / "rss-scaling"
    drop_tree(work)
    work.mkdir(parents=True)
    data = work / "data"
    Versions().make(data)
    size = du(data)
    v = Volsnap(work)
    v.init()
    v.snapshot(data, 1)
    time.sleep(1.1)
    small = v.snapshot(data, 2)
    other = work / "other"
    other.mkdir()
    r = rand("unrelated")
    for i in range(10):
        (other / f"blob{i}").write_bytes(r.randbytes(size))
    run([v.bin, "--repo", v.repo, "snapshot", other, "--name", "unrelated"])
    time.sleep(1.1)
    big = v.snapshot(data, 3)
    result = (size, du(v.repo), small, big)
    drop_tree(work)
    return result


def med(values):
    return statistics.median(values) if values else None


def fmt_s(v):
    return "n/a" if v is None else f"{v:.2f} s"


def fmt_b(v):
    return "n/a" if v is None else f"{v / MIB:.1f} MiB"


def report(results, base_results, runs, versions):
    lines = []
    lines.append(f"Command: `python3 benches/compare.py --runs {runs}` (medians of {runs} runs, fresh repository per run).")
    lines.append("")
    lines.append("Versions: " + versions + ".")
    lines.append("restic 0.14 always encrypts (AES-256 + Poly1305); borg runs with `--encryption=none --compression zstd,3`; volsnap uses its defaults (zstd 3).")
    lines.append("")
    for ds, per_tool in results.items():
        lines.append(f"### Data set: {ds}")
        lines.append("")
        lines.append("| step | tool | wall | CPU | peak RSS | repo size after |")
        lines.append("|---|---|---|---|---|---|")
        for step in STEPS:
            for tool, runs_out in per_tool.items():
                vals = [r[step] for r in runs_out if r[step] is not None]
                if not vals:
                    lines.append(f"| {step} | {tool} | n/a | | | |")
                    continue
                lines.append(
                    f"| {step} | {tool} | {fmt_s(med([v[0] for v in vals]))} | {fmt_s(med([v[1] for v in vals]))} | "
                    f"{fmt_b(med([v[2] for v in vals]))} | {fmt_b(med([v[3] for v in vals]))} |"
                )
        b = base_results[ds]
        for name in ("tar czf", "tar -I pigz", "find stat walk", "tar -xf (floor)"):
            vals = [r[name] for r in b]
            lines.append(f"| baseline | {name} | {fmt_s(med([v[0] for v in vals]))} | {fmt_s(med([v[1] for v in vals]))} | {fmt_b(med([v[2] for v in vals]))} | |")
        lines.append("")
        lines.append(f"Data: {fmt_b(b[0]['sizes']['data'])} on disk; `tar czf` output {fmt_b(b[0]['sizes']['tar.gz'])}.")
        lines.append("")
        # Ratios: how many times faster volsnap is (peer time / volsnap time).
        v = per_tool.get("volsnap")
        lines.append("| ratio (peer wall / volsnap wall) | " + " | ".join(STEPS) + " |")
        lines.append("|---|" + "---|" * len(STEPS))
        for peer in [t for t in per_tool if t != "volsnap"]:
            cells = []
            for step in STEPS:
                pv = [r[step][0] for r in per_tool[peer] if r[step] is not None]
                vv = [r[step][0] for r in v if r[step] is not None]
                cells.append(f"{med(pv) / med(vv):.1f}×" if pv and vv else "n/a")
            lines.append(f"| {peer} | " + " | ".join(cells) + " |")
        vf = med([r["first"][0] for r in v])
        vu = med([r["unchanged"][0] for r in v])
        lines.append(f"| tar czf (first snapshot) | {med([r['tar czf'][0] for r in b]) / vf:.1f}× | | | | |")
        ve = [r["export"] for r in v if r.get("export")]
        if ve:
            lines.append("")
            lines.append(
                f"Export of the mutated snapshot as tar.gz (`volsnap export -o FILE`, gzip level 6): wall {fmt_s(med([e[0] for e in ve]))}, "
                f"CPU {fmt_s(med([e[1] for e in ve]))}, peak RSS {fmt_b(med([e[2] for e in ve]))}, output {fmt_b(med([e[3] for e in ve]))}; "
                f"`tar czf` of the data takes {med([r['tar czf'][0] for r in b]) / med([e[0] for e in ve]):.2f}× as long "
                f"(`tar -I pigz`: {med([r['tar -I pigz'][0] for r in b]) / med([e[0] for e in ve]):.2f}×)."
            )
        lines.append(f"| find (unchanged: volsnap / find) | | {vu / med([r['find stat walk'][0] for r in b]):.2f} | | | |")
        lines.append("")
        nb = {t: med([r["new_bytes"] for r in rs]) for t, rs in per_tool.items()}
        lines.append("New bytes stored by the snapshot after the mutator: " + ", ".join(f"{t} {fmt_b(x)}" for t, x in nb.items()) + ".")
        lines.append("")
    return "\n".join(lines)


def ensure_peers():
    missing = [p for p, b in (("restic", "restic"), ("borgbackup", "borg"), ("pigz", "pigz"), ("time", "time")) if shutil.which(b) is None]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--datasets", default="db,small,versions")
    ap.add_argument("--work", default="/var/tmp/volsnap-compare")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of updating BENCHMARKS.md")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the data sets (e.g. 0.02 to try the harness)")
    args = ap.parse_args()
    if args.scale != 1.0:
        DbLike.pages_per_file = int(DbLike.pages_per_file * args.scale)
        DbLike.pages_changed = max(10, int(DbLike.pages_changed * args.scale))
        SmallFiles.max_files = int(SmallFiles.max_files * args.scale)
        SmallFiles.max_bytes = int(SmallFiles.max_bytes * args.scale)
        args.no_write = True
    ensure_peers()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    base = Path(args.work)
    base.mkdir(parents=True, exist_ok=True)
    sets = {"db": DbLike(), "small": SmallFiles(), "versions": Versions()}
    results, base_results = {}, {}
    for name in args.datasets.split(","):
        ds = sets[name]
        results[name] = {t.name: [] for t in TOOLS}
        base_results[name] = []
        for r in range(args.runs):
            base_results[name].append(baselines(ds, base, r))
            for t in TOOLS:
                print(f"{name} run {r + 1}/{args.runs}: {t.name}", file=sys.stderr, flush=True)
                results[name][t.name].append(one_run(t, ds, base, r))
    versions = ", ".join(
        subprocess.run(c, capture_output=True, text=True).stdout.strip().splitlines()[0]
        for c in (["restic", "version"], ["borg", "--version"], ["tar", "--version"], ["pigz", "--version"], [str(ROOT / "target/release/volsnap"), "--version"])
    )
    scaling = rss_scaling(base)
    cpu = subprocess.run(["sh", "-c", "nproc; grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout.split("\n")
    text = f"Machine: {cpu[0]} cores, {cpu[1].split(':')[-1].strip()}.\n\n" + report(results, base_results, args.runs, versions)
    size, repo_size, small, big = scaling
    text += (
        f"\nPeak RSS of a no-change volsnap snapshot of the versions data set ({fmt_b(size)}): {fmt_b(small[2])} when the repository holds only it, "
        f"{fmt_b(big[2])} when it also holds 10x as much unrelated data (repository {fmt_b(repo_size)}).\n"
    )
    if args.no_write:
        print(text)
        return
    bench = ROOT / "BENCHMARKS.md"
    content = bench.read_text()
    begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
    if begin in content:
        head, rest = content.split(begin, 1)
        tail = rest.split(end, 1)[1]
        content = head + begin + "\n" + text + "\n" + end + tail
    else:
        content += f"\n## Comparison with restic, borg and tar\n\n{begin}\n{text}\n{end}\n"
    bench.write_text(content)
    print(text)


if __name__ == "__main__":
    main()
