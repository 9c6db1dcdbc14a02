#!/usr/bin/env bash
# Soak of the model-based test (tests/it/model.rs): random seeds for SECONDS seconds
# (default 600), OPS operations each (default 40); prints every seed, each failing
# seed with its last steps, the crash points reached and the operations per second.
# A failing seed replays with:
#   VOLSNAP_MODEL_SEED=<seed> VOLSNAP_MODEL_OPS=<ops> cargo test --test it model::replay_or_soak -- --nocapture
# (VOLSNAP_MODEL_VERBOSE=1 prints every step as it runs.)
#
#   benches/model_soak.sh [SECONDS] [OPS]
set -euo pipefail
cd "$(dirname "$0")/.."
VOLSNAP_MODEL_SECONDS=${1:-600} VOLSNAP_MODEL_OPS=${2:-40} \
  exec cargo test -j1 --test it model::replay_or_soak -- --nocapture
