#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder with libFuzzer, on a stable toolchain.
#
#   fuzz/coverage.sh [SECONDS] [libFuzzer options...]      (default: 600 seconds)
#
# Builds the cargo-fuzz target (fuzz/fuzz_targets/decode.rs) with the coverage
# instrumentation cargo-fuzz passes (sanitizer coverage is stable; AddressSanitizer is
# not, and is left out: volsnap is safe Rust, and the stable harness in `cargo test`
# bounds memory), starts from the seeds and the regression corpus of tests/fuzz.rs, and
# fuzzes for SECONDS. The corpus grows in fuzz/corpus/decode, crashes land in
# fuzz/artifacts/decode. The first byte of an input picks the decoder (its index in
# volsnap::fuzz::TARGETS); the rest, saved as tests/fuzz_corpus/<decoder>/NAME.bin,
# becomes a regression input that `cargo test --test fuzz` replays every run.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-600}"
shift || true
triple="$(rustc -vV | sed -n 's/^host: //p')"
target_dir=target/libfuzzer
export RUSTFLAGS="-Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the instrumentation out of build scripts, which are not linked with
# libFuzzer.
cargo build --release --manifest-path fuzz/Cargo.toml --target "$triple" \
  --target-dir "$target_dir" --bin decode
unset RUSTFLAGS

corpus=fuzz/corpus/decode
artifacts=fuzz/artifacts/decode
mkdir -p "$corpus" "$artifacts"
VOLSNAP_FUZZ_EXPORT="$corpus" cargo test --test fuzz

exec "$target_dir/$triple/release/decode" "$corpus" \
  -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
  -artifact_prefix="$artifacts/" -print_final_stats=1 "$@"
