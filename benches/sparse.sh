#!/usr/bin/env bash
# Sparse files (a preallocated database, a VM image): snapshot and restore times of an
# 8 GiB and a 256 GiB file holding 4 MB of data each (1 MB at the start, at a third,
# unaligned at two thirds, and at the end), medians of RUNS runs (default 3). Each
# snapshot goes to a new series, so the file is read every time (no files-cache hit).
# TIMEOUT (default 300 s) stops a run that reads the holes; it is then reported as
# ">TIMEOUT s".
#
#   benches/sparse.sh [VOLSNAP_BINARY]
set -euo pipefail
RUNS=${RUNS:-3}
TIMEOUT=${TIMEOUT:-300}
cd "$(dirname "$0")/.."
if [ $# -ge 1 ]; then
  V=$1
else
  cargo build --release --quiet
  V=$PWD/target/release/volsnap
fi
WORK=$(mktemp -d /var/tmp/volsnap-sparse.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Seconds taken by a command, as a decimal; ">TIMEOUT" if stopped, "failed" on an error.
t() {
  local s e rc=0
  s=$(date +%s.%N)
  timeout "$TIMEOUT" "$@" >/dev/null 2>&1 || rc=$?
  e=$(date +%s.%N)
  case $rc in
    0) printf '%.3f s\n' "$(echo "$e - $s" | bc -l)" ;;
    124) echo ">$TIMEOUT s" ;;
    *) echo "failed" ;;
  esac
}
median() { sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }

"$V" --repo "$WORK/repo" init >/dev/null
echo "| file | snapshot (median) | restore (median) | restored: allocated / apparent |"
echo "|---|---|---|---|"
for gib in 8 256; do
  d="$WORK/data-$gib"
  mkdir -p "$d"
  size=$((gib << 30))
  truncate -s "$size" "$d/img"
  for at in 0 $((size / 3)) $((size / 3 * 2 + 12345)) $((size - 1000000)); do
    head -c 1000000 /dev/urandom |
      dd of="$d/img" bs=1M seek="$at" oflag=seek_bytes conv=notrunc iflag=fullblock status=none
  done
  snap=(); restore=()
  for i in $(seq "$RUNS"); do
    snap+=("$(t "$V" --repo "$WORK/repo" snapshot "$d" --name "s$gib-$i")")
    rm -rf "$WORK/out"
    restore+=("$(t "$V" --repo "$WORK/repo" restore "s$gib-$i@latest" --to "$WORK/out")")
  done
  alloc=$(du -k "$WORK/out/img" 2>/dev/null | cut -f1 || echo "?")
  printf '| %s GiB, 4 MB of data | %s | %s | %s KiB / %s GiB |\n' "$gib" \
    "$(printf '%s\n' "${snap[@]}" | median)" \
    "$(printf '%s\n' "${restore[@]}" | median)" "$alloc" "$gib"
  rm -rf "$d" "$WORK/out"
done
