#!/usr/bin/env python3
"""Chunk size sweep: how the average chunk size trades incremental cost against
repository overhead, on the comparison harness's data sets.

    python3 benches/chunk_sweep.py [--sizes 16384,65536,262144,1048576] [--scale 1.0]

For each average size (min = avg/4, max = avg*4) and each data set (database-like and
small files): first snapshot wall time and repository size, then the new bytes stored
by the snapshot after the mutator and its wall time. Prints a Markdown table.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16384,65536,262144,1048576")
    ap.add_argument("--datasets", default="db,small")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--work", default="/var/tmp/volsnap-sweep")
    args = ap.parse_args()
    if args.scale != 1.0:
        compare.DbLike.pages_per_file = int(compare.DbLike.pages_per_file * args.scale)
        compare.SmallFiles.max_files = int(compare.SmallFiles.max_files * args.scale)
        compare.SmallFiles.max_bytes = int(compare.SmallFiles.max_bytes * args.scale)
    compare.subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=compare.ROOT, check=True)
    vs = compare.ROOT / "target/release/volsnap"
    base = Path(args.work)
    sets = {"db": compare.DbLike(), "small": compare.SmallFiles()}
    print("| data set | avg chunk | first snapshot | repo after first | index file | snapshot after mutator | new bytes stored |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        ds = sets[name]
        for avg in (int(s) for s in args.sizes.split(",")):
            work = base / f"{name}-{avg}"
            compare.drop_tree(work)
            work.mkdir(parents=True)
            data = work / "data"
            ds.make(data)
            compare.time.sleep(1.1)
            repo = work / "repo"
            compare.run([vs, "--repo", repo, "init", "--chunk-size-avg", str(avg)])
            first = compare.run([vs, "--repo", repo, "snapshot", data, "--name", "s"])
            size_first = compare.du(repo)
            index = (repo / "index.redb").stat().st_size
            ds.mutate(data, 1)
            before = compare.du(repo)
            mutated = compare.run([vs, "--repo", repo, "snapshot", data, "--name", "s"])
            new_bytes = compare.du(repo) - before
            print(
                f"| {name} | {avg // 1024} KiB | {first[0]:.2f} s | {compare.fmt_b(size_first)} | {compare.fmt_b(index)} | "
                f"{mutated[0]:.2f} s | {compare.fmt_b(new_bytes)} |",
                flush=True,
            )
            compare.drop_tree(work)


if __name__ == "__main__":
    main()
