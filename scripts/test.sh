#!/usr/bin/env bash
# The test command: fetch the model and data the tests use (skipped when
# already present and verified), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo test --all-targets "$@"
