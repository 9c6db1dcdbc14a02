#!/usr/bin/env python3
"""volsnap against restic with both repositories in one S3 bucket (Garage on loopback).

    python3 benches/s3_compare.py [--runs 3] [--datasets db,small] [--scale 1.0]
                                  [--fill-mib 1024] [--fill-rounds 2] [--work DIR] [--no-write]

Starts a single-node Garage (`~/.cargo/bin/garage`, or $GARAGE) with every address on
127.0.0.1, waits for it by polling (its admin /health, then an `init` that succeeds),
and measures in the same run, per data set (generators shared with compare.py):

- first snapshot: `volsnap snapshot` against `restic backup`;
- no-change snapshot, then again after each fill round: another host (its own cache,
  another hostname through a UTS namespace when running as root) writes FILL-MIB of
  fresh random data as another series into the same repository, so the bucket holds
  many more packs that are not this host's;
- restore of the first snapshot into an empty directory (verified with `diff -r`, not
  timed): `volsnap restore --to` against `restic restore`;
- `volsnap copy --to s3://...` of a local repository holding the same snapshot, against
  restic's first backup of the data (the copy's own local snapshot is not timed).

Per step: wall time, CPU time and peak RSS (GNU time -v of the process), and the S3
requests the step made (from Garage's /metrics). Medians over --runs runs, each with
fresh repositories under their own prefixes in the same bucket. The page cache is not
dropped between steps (that needs root and a quiet machine; neither is reliable here):
every tool reads warm data and warm caches alike.

restic must be installed (Debian package `restic`; installed with apt-get when absent
and running as root, otherwise the script stops and says so).
"""

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import MIB, DbLike, SmallFiles, drop_tree, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOLSNAP = ROOT / "target/release/volsnap"
BUCKET = "volsnap-bench"


# ---------------------------------------------------------------- Garage


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Garage:
    def __init__(self, work):
        self.bin = os.environ.get("GARAGE") or str(Path.home() / ".cargo/bin/garage")
        if not os.path.exists(self.bin):
            sys.exit(f"garage not found at {self.bin} (cargo install --locked garage@2.5.0, or set GARAGE)")
        self.dir = work / "garage"
        drop_tree(self.dir)
        self.dir.mkdir(parents=True)
        self.s3_port, self.rpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.key_id = "GK" + secrets.token_hex(12)
        self.secret = secrets.token_hex(32)
        self.admin_token = secrets.token_hex(16)
        conf = self.dir / "garage.toml"
        conf.write_text(
            f'metadata_dir = "{self.dir}/meta"\n'
            f'data_dir = "{self.dir}/data"\n'
            'db_engine = "sqlite"\n'
            "replication_factor = 1\n"
            f'rpc_bind_addr = "127.0.0.1:{self.rpc_port}"\n'
            f'rpc_public_addr = "127.0.0.1:{self.rpc_port}"\n'
            f'rpc_secret = "{secrets.token_hex(32)}"\n'
            "[s3_api]\n"
            's3_region = "garage"\n'
            f'api_bind_addr = "127.0.0.1:{self.s3_port}"\n'
            'root_domain = ".s3.garage.localhost"\n'
            "[admin]\n"
            f'api_bind_addr = "127.0.0.1:{self.admin_port}"\n'
            f'admin_token = "{self.admin_token}"\n'
        )
        env = dict(os.environ)
        env.update(
            GARAGE_DEFAULT_ACCESS_KEY=self.key_id,
            GARAGE_DEFAULT_SECRET_KEY=self.secret,
            GARAGE_DEFAULT_BUCKET=BUCKET,
            RUST_LOG="warn",
        )
        self.log = open(self.dir / "garage.log", "wb")
        self.proc = subprocess.Popen(
            [self.bin, "-c", str(conf), "server", "--single-node", "--default-bucket"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "garage",
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
        }

    def admin(self, path):
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()

    def wait_ready(self, deadline_s=60):
        """Polls /health until the node answers 200, then an init of a probe repository
        until the default bucket accepts it."""
        deadline = time.monotonic() + deadline_s
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"garage exited ({self.proc.returncode}); see {self.dir}/garage.log")
            try:
                if self.admin("/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                sys.exit("garage did not become healthy in time")
            time.sleep(0.05)  # poll interval, not a synchronisation point
        probe_env = {**os.environ, **self.env}
        while True:
            p = subprocess.run(
                [VOLSNAP, "--repo", f"s3://{BUCKET}/readiness-probe", "--cache-dir", str(self.dir / "probe-cache"), "init"],
                env=probe_env, capture_output=True, text=True,
            )
            if p.returncode == 0:
                return
            if time.monotonic() > deadline:
                sys.exit(f"the bucket never accepted an init: {p.stderr.strip()[-500:]}")
            time.sleep(0.1)

    def requests(self):
        """S3 API requests served so far, by endpoint (Garage's /metrics counters)."""
        _, text = self.admin("/metrics")
        counts = {}
        for line in text.splitlines():
            if line.startswith("api_s3_request_counter{"):
                labels, value = line.rsplit(" ", 1)
                ep = labels.split('api_endpoint="', 1)[1].split('"', 1)[0]
                counts[ep] = counts.get(ep, 0) + int(float(value))
        return counts

    def bucket_objects(self):
        try:
            _, text = self.admin(f"/v2/GetBucketInfo?globalAlias={BUCKET}")
            return json.loads(text).get("objects")
        except (urllib.error.URLError, ValueError, OSError):
            return None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- steps


def measured(garage, cmd, env=None, cwd=None):
    """(wall, cpu, peak_rss, {endpoint: requests}) of one command."""
    before = garage.requests()
    wall, cpu, rss = run(cmd, env={**garage.env, **(env or {})}, cwd=cwd)
    after = garage.requests()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return wall, cpu, rss, {k: v for k, v in delta.items() if v}


def as_other_host(cmd):
    """Runs cmd under another hostname when a UTS namespace is available (root)."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        return ["unshare", "--uts", "sh", "-c", 'hostname bench-other && exec "$@"', "sh", *map(str, cmd)]
    return cmd


def make_filler(dst, mib, round_no):
    drop_tree(dst)
    dst.mkdir(parents=True)
    left = mib * MIB
    i = 0
    while left > 0:
        n = min(left, 64 * MIB)
        (dst / f"round{round_no}-{i}.bin").write_bytes(os.urandom(n))
        left -= n
        i += 1


def verify(a, b, what):
    d = subprocess.run(["diff", "-r", "--no-dereference", "-q", str(a), str(b)], capture_output=True, text=True)
    if d.returncode != 0:
        sys.exit(f"{what}: restore differs:\n{d.stdout[:2000]}{d.stderr[:500]}")


def one_run(garage, ds_name, data, base, run_no, args):
    work = base / f"{ds_name}-{run_no}"
    drop_tree(work)
    work.mkdir(parents=True)
    prefix = f"{ds_name}-{run_no}-{secrets.token_hex(3)}"
    v_repo = f"s3://{BUCKET}/{prefix}/volsnap"
    v_cache = work / "cache-volsnap"
    v = [VOLSNAP, "--repo", v_repo, "--cache-dir", v_cache]
    v_other = [VOLSNAP, "--repo", v_repo, "--cache-dir", work / "cache-other"]
    r_env = {
        "RESTIC_PASSWORD": "bench",
        "RESTIC_REPOSITORY": f"s3:{garage.endpoint}/{BUCKET}/{prefix}/restic",
        "RESTIC_CACHE_DIR": str(work / "cache-restic"),
    }
    r_other_env = {**r_env, "RESTIC_CACHE_DIR": str(work / "cache-restic-other")}
    out = {"volsnap": {}, "restic": {}}

    run([VOLSNAP, "--repo", v_repo, "--cache-dir", v_cache, "init"], env=garage.env)
    run(["restic", "init", "--repository-version", "2"], env={**garage.env, **r_env})

    def volsnap_steps():
        o = out["volsnap"]
        o["first"] = measured(garage, [*v, "snapshot", data, "--name", "bench"])
        o["unchanged"] = measured(garage, [*v, "snapshot", data, "--name", "bench"])

    def restic_steps():
        o = out["restic"]
        o["first"] = measured(garage, ["restic", "backup", "--host", "bench", data], env=r_env)
        o["unchanged"] = measured(garage, ["restic", "backup", "--host", "bench", data], env=r_env)

    # Alternate which tool goes first, so neither always meets the colder machine.
    order = [volsnap_steps, restic_steps] if run_no % 2 == 0 else [restic_steps, volsnap_steps]
    for f in order:
        f()

    # Another host fills the bucket with many more packs; this host's no-change
    # snapshot is measured after each round.
    filler = work / "filler"
    for k in range(1, args.fill_rounds + 1):
        make_filler(filler, args.fill_mib, k)
        run(as_other_host([*v_other, "snapshot", filler, "--name", f"other{k}"]), env=garage.env)
        run(["restic", "backup", "--host", "bench-other", filler], env={**garage.env, **r_other_env})
        out["volsnap"][f"unchanged+fill{k}"] = measured(garage, [*v, "snapshot", data, "--name", "bench"])
        out["restic"][f"unchanged+fill{k}"] = measured(garage, ["restic", "backup", "--host", "bench", data], env=r_env)
        out[f"objects+fill{k}"] = garage.bucket_objects()
    drop_tree(filler)
    out["objects+fill0"] = None

    # Restore: the first snapshot of the data set (the other series are not restored).
    for name in ("volsnap", "restic") if run_no % 2 == 0 else ("restic", "volsnap"):
        dst = work / f"restored-{name}"
        if name == "volsnap":
            out[name]["restore"] = measured(garage, [*v, "restore", "bench@latest", "--to", dst])
            verify(data, dst, "volsnap")
        else:
            out[name]["restore"] = measured(garage, ["restic", "restore", "latest", "--host", "bench", "--path", str(data), "--target", dst], env=r_env)
            verify(data, Path(str(dst) + str(data)), "restic")
        drop_tree(dst)

    # copy: a local repository holding the same snapshot, copied into the bucket.
    local = work / "local-repo"
    run([VOLSNAP, "--repo", local, "init"])
    run([VOLSNAP, "--repo", local, "snapshot", data, "--name", "bench"])
    c_repo = f"s3://{BUCKET}/{prefix}/copy"
    # Each repository of a copy has its own cache under $XDG_CACHE_HOME/volsnap/<id>.
    xdg = {"XDG_CACHE_HOME": str(work / "xdg-cache")}
    run([VOLSNAP, "--repo", c_repo, "init"], env={**garage.env, **xdg})
    out["volsnap"]["copy"] = measured(garage, [VOLSNAP, "--repo", local, "copy", "--to", c_repo], env=xdg)
    drop_tree(work)
    return out


# ---------------------------------------------------------------- report


def med(values):
    values = [x for x in values if x is not None]
    return statistics.median(values) if values else None


def fmt_s(x):
    return "n/a" if x is None else f"{x:.2f} s"


def fmt_b(x):
    return "n/a" if x is None else f"{x / MIB:.0f} MiB"


def fmt_req(reqs):
    """Median request count per endpoint over runs, largest first."""
    eps = sorted({k for r in reqs for k in r})
    meds = {k: med([r.get(k, 0) for r in reqs]) for k in eps}
    top = sorted(((v, k) for k, v in meds.items() if v), reverse=True)
    return ", ".join(f"{k} {v:.0f}" for v, k in top) or "0"


def report(results, sizes, args, versions, commit):
    steps = ["first", "unchanged"] + [f"unchanged+fill{k}" for k in range(1, args.fill_rounds + 1)] + ["restore"]
    lines = [
        f"Command: `{' '.join(['python3', 'benches/s3_compare.py', *sys.argv[1:]])}` at commit {commit} "
        f"(release build; medians of {args.runs} runs; fresh repositories per run, all in one bucket of one single-node Garage on 127.0.0.1).",
        "",
        "Versions: " + versions + ". restic always encrypts (AES-256 + Poly1305); volsnap uses its defaults (zstd 3, no encryption).",
        "The page cache is not dropped between steps (not reliably possible on this shared machine): both tools read warm data.",
        f"Fill rounds: another host (own cache, hostname `bench-other`) writes {args.fill_mib} MiB of fresh random data per round into the same repository.",
        "",
    ]
    targets = []
    for ds, res in results.items():
        lines.append(f"#### Data set: {ds} ({fmt_b(sizes[ds])} on disk)")
        lines.append("")
        lines.append("| step | tool | wall | CPU | peak RSS | S3 requests (median per endpoint) | restic wall / volsnap wall |")
        lines.append("|---|---|---|---|---|---|---|")
        ratio = {}
        for step in steps + ["copy"]:
            for tool in ("volsnap", "restic"):
                runs_ = [r[tool][step] for r in res if step in r[tool]]
                if not runs_:
                    continue
                w = med([m[0] for m in runs_])
                cell = ""
                if tool == "volsnap":
                    peer_step = "first" if step == "copy" else step
                    pw = med([r["restic"][peer_step][0] for r in res])
                    ratio[step] = pw / w
                    cell = f"{pw / w:.2f}×" + (" (vs restic first backup)" if step == "copy" else "")
                name = "volsnap copy --to (local repo → bucket)" if step == "copy" else step
                lines.append(f"| {name} | {tool} | {fmt_s(w)} | {fmt_s(med([m[1] for m in runs_]))} | {fmt_b(med([m[2] for m in runs_]))} | {fmt_req([m[3] for m in runs_])} | {cell} |")
        objs = [med([r.get(f"objects+fill{k}") for r in res]) for k in range(1, args.fill_rounds + 1)]
        lines.append("")
        lines.append("Objects in the bucket after each fill round (all prefixes, median): " + ", ".join("n/a" if o is None else f"{o:.0f}" for o in objs) + ".")
        lines.append("")
        rss_v = max(med([r["volsnap"][s][2] for r in res]) for s in steps + ["copy"])
        rss_r = max(med([r["restic"][s][2] for r in res]) for s in steps)
        uv = [med([r["volsnap"][s][0] for r in res]) for s in steps if s.startswith("unchanged")]
        targets.append((ds, ratio, rss_v, rss_r, uv))
    lines.append("#### Targets")
    lines.append("")
    lines.append("| data set | first ≥ 2× | no-change ≥ 10× (each fill level) | no-change flat in pack count | restore ≥ 1.5× | copy ≥ restic first | peak RSS ≤ restic |")
    lines.append("|---|---|---|---|---|---|---|")

    def mark(ok):
        return "met" if ok else "**missed**"

    for ds, ratio, rss_v, rss_r, uv in targets:
        un = [ratio[s] for s in steps if s.startswith("unchanged")]
        flat = max(uv) <= 1.25 * min(uv) + 0.05
        lines.append(
            f"| {ds} | {ratio['first']:.2f}× {mark(ratio['first'] >= 2)} | {' / '.join(f'{x:.2f}×' for x in un)} {mark(min(un) >= 10)} | "
            f"{' → '.join(f'{x:.2f} s' for x in uv)} {mark(flat)} | {ratio['restore']:.2f}× {mark(ratio['restore'] >= 1.5)} | "
            f"{ratio['copy']:.2f}× {mark(ratio['copy'] >= 1)} | {fmt_b(rss_v)} vs {fmt_b(rss_r)} {mark(rss_v <= rss_r)} |"
        )
    lines.append("")
    lines.append("Peak RSS in the targets table: the largest median over all steps of each tool. \"Flat\" means the slowest no-change snapshot is within 25% (plus 50 ms) of the fastest.")
    return "\n".join(lines)


def ensure_peers():
    missing = [p for p, b in (("restic", "restic"), ("time", "/usr/bin/time")) if shutil.which(b) is None]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"missing: {', '.join(missing)}; install the Debian packages (apt-get install -y {' '.join(missing)})")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--datasets", default="db,small")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the data sets (e.g. 0.25 on a busy machine)")
    ap.add_argument("--fill-mib", type=int, default=1024, help="random data another host writes per fill round")
    ap.add_argument("--fill-rounds", type=int, default=2)
    ap.add_argument("--work", default="/var/tmp/volsnap-s3-compare")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of updating BENCHMARKS.md")
    args = ap.parse_args()
    if args.scale != 1.0:
        DbLike.pages_per_file = int(DbLike.pages_per_file * args.scale)
        SmallFiles.max_files = int(SmallFiles.max_files * args.scale)
        SmallFiles.max_bytes = int(SmallFiles.max_bytes * args.scale)
    ensure_peers()
    subprocess.run(["cargo", "build", "--release", "-j1", "--quiet"], cwd=ROOT, check=True)
    base = Path(args.work)
    drop_tree(base)
    base.mkdir(parents=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    garage = Garage(base)
    try:
        garage.wait_ready()
        sets = {"db": DbLike(), "small": SmallFiles()}
        results, sizes = {}, {}
        for name in args.datasets.split(","):
            data = base / f"data-{name}"
            sets[name].make(data)
            sizes[name] = int(subprocess.run(["du", "-sb", str(data)], capture_output=True, text=True).stdout.split()[0])
            # Let ctimes fall out of volsnap's one-second racily-clean window, as in real use.
            time.sleep(1.1)
            results[name] = []
            for r in range(args.runs):
                print(f"{name} run {r + 1}/{args.runs}", file=sys.stderr, flush=True)
                results[name].append(one_run(garage, name, data, base, r, args))
            drop_tree(data)
    finally:
        garage.stop()
    versions = ", ".join(
        subprocess.run(c, capture_output=True, text=True).stdout.strip().splitlines()[0]
        for c in (["restic", "version"], [garage.bin, "--version"], [str(VOLSNAP), "--version"])
    )
    cpu = subprocess.run(["sh", "-c", "nproc; grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout.split("\n")
    text = f"Machine: {cpu[0]} cores, {cpu[1].split(':')[-1].strip()}, shared and noisy.\n\n" + report(results, sizes, args, versions, commit)
    raw = base.parent / "volsnap-s3-compare.json"
    raw.write_text(json.dumps(results, indent=1))
    if args.no_write:
        print(text)
        return
    bench = ROOT / "BENCHMARKS.md"
    content = bench.read_text()
    begin, end = "<!-- s3compare:begin -->", "<!-- s3compare:end -->"
    if begin in content:
        head, rest = content.split(begin, 1)
        tail = rest.split(end, 1)[1]
        content = head + begin + "\n" + text + "\n" + end + tail
    else:
        content += f"\n## Repositories in an S3 bucket: volsnap against restic\n\n{begin}\n{text}\n{end}\n"
    bench.write_text(content)
    print(text)


if __name__ == "__main__":
    main()
