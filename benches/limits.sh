#!/usr/bin/env bash
# Memory and time of huge directories and many files (issue "Limits"), one run each:
# wall time and maximum RSS (GNU time's %M) of every step.
#
#   benches/limits.sh wide VOLSNAP_BINARY DIR
#     DIR holds one directory of many entries (BENCHMARKS.md: 2,000,000 empty files
#     with 240-byte names, made by benches/limits.sh make-wide). Steps: snapshot, ls -r,
#     restore (into a directory beside DIR: on ext4 without large_dir one directory
#     cannot hold 2 million such names, so DIR and its parent are a tmpfs), 5 entries
#     added or removed then a second snapshot, diff.
#   benches/limits.sh spread VOLSNAP_BINARY DIR
#     a first snapshot of DIR (BENCHMARKS.md: 5,000,000 empty files in 5,000
#     directories of 1,000, made by benches/limits.sh make-spread).
#   benches/limits.sh make-wide DIR N | make-spread DIR N_DIRS FILES_PER_DIR
#
# Repositories go to a new directory under ${WORK_ROOT:-/var/tmp}, removed at the end.
set -euo pipefail
what=$1
shift

step() {
  local name=$1
  shift
  /usr/bin/time -f "$name: %e s, max RSS %M KB" "$@" >/dev/null
}

case $what in
  make-wide)
    python3 - "$1" "$2" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
pad = "x" * 230
for i in range(n):
    os.close(os.open(f"{i:010d}{pad}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
EOF
    ;;
  make-spread)
    python3 - "$1" "$2" "$3" <<'EOF'
import os, sys
d, dirs, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for j in range(dirs):
    sub = os.path.join(d, f"d{j // 100:03d}", f"e{j:04d}")
    os.makedirs(sub, exist_ok=True)
    fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(files):
        os.close(os.open(f"file-{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)
EOF
    ;;
  wide)
    V=$1
    DIR=$(realpath "$2")
    WORK=$(mktemp -d "${WORK_ROOT:-/var/tmp}/volsnap-limits.XXXXXX")
    OUT=$(dirname "$DIR")/restored.$$
    trap 'rm -rf "$WORK" "$OUT"' EXIT
    R=(--repo "$WORK/repo")
    "$V" "${R[@]}" init >/dev/null
    step "snapshot" "$V" "${R[@]}" snapshot "$DIR" --name wide
    S1=$("$V" "${R[@]}" --json list | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
    step "ls -r" "$V" "${R[@]}" ls -r "$S1"
    step "ls -r --json" "$V" "${R[@]}" --json ls -r "$S1"
    step "restore" "$V" "${R[@]}" restore "$S1" --to "$OUT"
    rm -rf "$OUT"
    names=(0000000007 0001234567)
    for n in "${names[@]}"; do rm "$DIR/$n"x*; done
    for n in added-a added-b zz-added-c; do touch "$DIR/$n"; done
    step "second snapshot (5 entries changed)" "$V" "${R[@]}" snapshot "$DIR" --name wide
    S2=$("$V" "${R[@]}" --json list | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
    step "diff" "$V" "${R[@]}" diff "$S1" "$S2"
    "$V" "${R[@]}" diff "$S1" "$S2" | tail -1
    ;;
  spread)
    V=$1
    DIR=$(realpath "$2")
    WORK=$(mktemp -d "${WORK_ROOT:-/var/tmp}/volsnap-limits.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    "$V" --repo "$WORK/repo" init >/dev/null
    step "snapshot" "$V" --repo "$WORK/repo" snapshot "$DIR"
    ;;
  *)
    echo "usage: see the comment at the top of $0" >&2
    exit 2
    ;;
esac
