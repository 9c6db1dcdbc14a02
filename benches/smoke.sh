#!/usr/bin/env bash
# Quick side-by-side figures on one directory tree (default /usr/share), medians of
# RUNS runs (default 3): volsnap first snapshot vs `tar czf`, unchanged snapshot vs a
# `find` stat walk, restore vs `tar -xf` of an uncompressed tar (the file-creation
# floor). The full comparison harness with restic and borg is a separate benchmark.
#
#   benches/smoke.sh [DIR]
set -euo pipefail
DIR=${1:-/usr/share}
RUNS=${RUNS:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
V=$PWD/target/release/volsnap
WORK=$(mktemp -d /var/tmp/volsnap-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Seconds taken by a command, as a decimal.
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
row() { printf '| %-44s | %8.3f s |\n' "$1" "$2"; }

cat "$DIR" >/dev/null 2>&1 || true
find "$DIR" -type f -print0 | xargs -0 cat >/dev/null 2>&1 || true   # warm the page cache

first=(); unchanged=(); walk=(); restore=(); untar=(); targz=()
for _ in $(seq "$RUNS"); do
  rm -rf "$WORK/repo" "$WORK/out" "$WORK/x" "$WORK/a.tar"
  "$V" --repo "$WORK/repo" init >/dev/null
  first+=("$(t "$V" --repo "$WORK/repo" snapshot "$DIR" --name smoke)")
  sleep 1.2
  unchanged+=("$(t "$V" --repo "$WORK/repo" snapshot "$DIR" --name smoke)")
  walk+=("$(t find "$DIR" -printf '%s %T@ %C@ %i\n')")
  restore+=("$(t "$V" --repo "$WORK/repo" restore smoke@1 --to "$WORK/out")")
  tar -cf "$WORK/a.tar" -C "$(dirname "$DIR")" "$(basename "$DIR")" 2>/dev/null || true
  mkdir -p "$WORK/x"
  untar+=("$(t tar -xf "$WORK/a.tar" -C "$WORK/x")")
  targz+=("$(t tar czf "$WORK/b.tar.gz" -C "$(dirname "$DIR")" "$(basename "$DIR")")")
  rm -f "$WORK/b.tar.gz"
done

echo "data: $DIR, $(find "$DIR" -type f | wc -l) files, $(du -sh "$DIR" | cut -f1); medians of $RUNS runs"
echo "| step | median |"
echo "|---|---|"
row "volsnap snapshot (first)" "$(printf '%s\n' "${first[@]}" | median)"
row "tar czf" "$(printf '%s\n' "${targz[@]}" | median)"
row "volsnap snapshot (nothing changed)" "$(printf '%s\n' "${unchanged[@]}" | median)"
row "find -printf '%s %T@ %C@ %i'" "$(printf '%s\n' "${walk[@]}" | median)"
row "volsnap restore --to (empty dir)" "$(printf '%s\n' "${restore[@]}" | median)"
row "tar -xf (uncompressed tar, the floor)" "$(printf '%s\n' "${untar[@]}" | median)"
