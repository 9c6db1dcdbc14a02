#!/usr/bin/env bash
# How long a container stays paused while volsnap snapshots its volumes.
#
#   bash benches/docker_pause.sh [FILES] [RUNS]
#
# Needs a Docker engine and the test image the integration tests import
# (volsnap-test:busybox-2; run `cargo test --release --test it docker::` once first).
# Creates a container with FILES files of 64 KiB in a bind mount, takes one first
# snapshot, then RUNS incremental snapshots with one file changed each time, and
# prints the pause windows the engine's own event stream reports (pause → unpause),
# next to the whole command's wall time.
set -euo pipefail
files=${1:-2000}
runs=${2:-7}
bin="$(cd "$(dirname "$0")/.." && pwd)/target/release/volsnap"
work=$(mktemp -d)
name="volsnap-pause-bench-$$"
trap 'docker rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mkdir -p "$work/data"
for i in $(seq 1 "$files"); do head -c 65536 /dev/urandom > "$work/data/f$i"; done
docker run -d --name "$name" -v "$work/data:/data" volsnap-test:busybox-2 \
  sh -c "trap 'exit 0' TERM; while true; do sleep 0.1; done" >/dev/null
"$bin" --repo "$work/repo" init >/dev/null
"$bin" --repo "$work/repo" snapshot --container "$name" >/dev/null
sleep 1.2
for r in $(seq 1 "$runs"); do
  head -c 65536 /dev/urandom > "$work/data/f$r"
  sleep 1.1  # out of volsnap's racily-clean window, as in real use
  since=$(date +%s.%N)
  t0=$(date +%s%N)
  "$bin" --repo "$work/repo" snapshot --container "$name" >/dev/null
  t1=$(date +%s%N)
  ev=$(docker events --since "$since" --until "$(date +%s.%N)" --filter "container=$name" \
        --filter event=pause --filter event=unpause --format '{{.Action}} {{.TimeNano}}')
  p=$(echo "$ev" | awk '$1=="pause"{print $2}' | head -1)
  u=$(echo "$ev" | awk '$1=="unpause"{print $2}' | head -1)
  echo "run $r: paused $(( (u - p) / 1000000 )) ms, command $(( (t1 - t0) / 1000000 )) ms"
done
