#!/usr/bin/env python3
"""gc and concurrent writers: how long a snapshot waits while gc works on a large index.

Builds, once, a repository whose index holds about CHUNKS chunk rows, cheaply: `init
--chunk-size-avg 256` (chunks of 64 B to 1 KiB), then four volumes of one file of random
bytes each (CHUNKS/4 chunks of ~256 bytes), one series each, and forgets three of the four
snapshots, so three quarters of the rows are garbage for gc to condemn and sweep. A
pristine copy is kept. Then, for each binary and each run: the repository is copied back,
a loop of small snapshots starts (a directory of 8 files of 4 kB, one rewritten before each
snapshot), WARMUP snapshots complete, `gc` runs, and the loop stops with the first snapshot
that starts after gc ended. Every snapshot's wall time is recorded.

Printed per binary: gc's wall time, the median snapshot before gc started, and the longest
snapshot that overlapped gc (the longest pause a concurrent writer saw, plus its own work),
as medians over the runs and the worst of all runs.

  python3 benches/gc_stall.py [--chunks N] [--runs R] [--work DIR] BINARY [BINARY...]

The repository is built with the first binary; every binary given must read it (the index
schema is the same before and after batching gc). With GC_STALL_DEBUG=1 gc's stderr and
every snapshot's start (relative to gc's) and wall time are printed too.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CHUNK_AVG = 256
# FastCDC at 64 B / 256 B / 1 KiB cuts random bytes into chunks of about 310 bytes
# (measured: 825,000 rows from 256 MB).
CHUNK_BYTES = 310
WARMUP = 5


def run(binary, repo, *args, check=True):
    out = subprocess.run(
        [binary, "--repo", repo, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    if check and out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.decode()}")
    return out


def build(binary, work, chunks):
    repo = os.path.join(work, "pristine")
    run(binary, repo, "init", "--chunk-size-avg", str(CHUNK_AVG))
    per_volume = chunks // 4 * CHUNK_BYTES
    ids = []
    for v in range(4):
        data = os.path.join(work, f"volume{v}")
        os.makedirs(data)
        with open(os.path.join(data, "data"), "wb") as f:
            left = per_volume
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n
        t = time.monotonic()
        out = run(binary, repo, "--json", "snapshot", data, "--name", f"v{v}")
        print(f"  volume {v}: snapshot in {time.monotonic() - t:.1f} s", file=sys.stderr)
        ids.append(json.loads(out.stdout)["id"])
        shutil.rmtree(data)
    for sid in ids[:3]:
        run(binary, repo, "forget", sid)
    return repo


def loop_snapshots(binary, repo, data, stop, times):
    """Snapshots `data` until `stop` is set, appending (start, end) of each."""
    i = 0
    while not stop.is_set():
        with open(os.path.join(data, f"f{i % 8}"), "wb") as f:
            f.write(os.urandom(4096))
        start = time.monotonic()
        out = run(binary, repo, "snapshot", data, "--name", "load", check=False)
        end = time.monotonic()
        if out.returncode != 0:
            sys.exit(f"concurrent snapshot failed: {out.stderr.decode()}")
        times.append((start, end))
        i += 1


def idle_run(binary, pristine, work):
    """gc's wall time with nothing else running."""
    repo = os.path.join(work, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["cp", "-a", pristine, repo], check=True)
    start = time.monotonic()
    out = run(binary, repo, "--json", "gc")
    report = json.loads(out.stdout)
    return {
        "gc": time.monotonic() - start,
        "blobs": report["blobs"],
        "swept": report["unreachable_blobs"],
        "compaction": report["index_compaction"],
    }


def one_run(binary, pristine, work):
    repo = os.path.join(work, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["cp", "-a", pristine, repo], check=True)
    data = os.path.join(work, "load")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    for i in range(8):
        with open(os.path.join(data, f"f{i}"), "wb") as f:
            f.write(os.urandom(4096))
    stop, times = threading.Event(), []
    loop = threading.Thread(target=loop_snapshots, args=(binary, repo, data, stop, times))
    loop.start()
    while len(times) < WARMUP:
        time.sleep(0.01)
    gc_start = time.monotonic()
    out = run(binary, repo, "--json", "gc")
    gc_end = time.monotonic()
    # Stop with the first snapshot that starts after gc ended.
    while not any(s > gc_end for s, _ in times):
        time.sleep(0.01)
    stop.set()
    loop.join()
    before = [e - s for s, e in times[:WARMUP]]
    during = [(e - s, s - gc_start) for s, e in times if e > gc_start and s < gc_end]
    if os.environ.get("GC_STALL_DEBUG"):
        print(out.stderr.decode(), file=sys.stderr)
        for d, at in during:
            print(f"    snapshot at +{at:.2f} s took {d * 1000:.0f} ms", file=sys.stderr)
    longest = max(during)
    report = json.loads(out.stdout)
    check = run(binary, repo, "--json", "check", check=False)
    if check.returncode != 0:
        sys.exit(f"check failed after gc: {check.stdout.decode()}")
    return {
        "gc": gc_end - gc_start,
        "before": statistics.median(before),
        "max": longest[0],
        "max_at": longest[1],
        "n": len(during),
        "blobs": report["blobs"],
        "swept": report["unreachable_blobs"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", help="scratch directory (default: a new one in /var/tmp)")
    ap.add_argument("--idle", action="store_true",
                    help="time gc alone, with no concurrent snapshots")
    args = ap.parse_args()
    binaries = [os.path.abspath(b) for b in args.binaries]
    work = args.work or tempfile.mkdtemp(prefix="volsnap-gc-stall.", dir="/var/tmp")
    try:
        pristine = os.path.join(work, "pristine")
        if not os.path.exists(pristine):
            print(f"building a repository of ~{args.chunks} chunks", file=sys.stderr)
            build(binaries[0], work, args.chunks)
        if args.idle:
            print("| binary | index rows | rows swept | gc alone (median) | gc alone (runs) |")
            print("|---|---|---|---|---|")
            for b in binaries:
                results = [idle_run(b, pristine, work) for _ in range(args.runs)]
                for r in results:
                    print(f"  {b}: {r}", file=sys.stderr)
                each = " / ".join(f"{x['gc']:.2f}" for x in results)
                print(f"| {b} | {results[0]['blobs']} | {results[0]['swept']} "
                      f"| {statistics.median(x['gc'] for x in results):.2f} s | {each} s |")
            return
        print("| binary | index rows | rows swept | gc (median) | snapshot before gc (median) "
              "| longest snapshot during gc (median of runs) | longest of all runs | snapshots during gc |")
        print("|---|---|---|---|---|---|---|---|")
        for b in binaries:
            results = []
            for r in range(args.runs):
                res = one_run(b, pristine, work)
                print(f"  {b} run {r + 1}: {res}", file=sys.stderr)
                results.append(res)
            med = lambda k: statistics.median(x[k] for x in results)
            print(f"| {b} | {results[0]['blobs']} | {results[0]['swept']} | {med('gc'):.2f} s "
                  f"| {med('before') * 1000:.0f} ms | {med('max') * 1000:.0f} ms "
                  f"| {max(x['max'] for x in results) * 1000:.0f} ms "
                  f"| {'/'.join(str(x['n']) for x in results)} |")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
