#!/usr/bin/env bash
# The main job on a fresh machine: set up, then generate a synthetic atlas, train, embed and report.
# Extra arguments go to `scvi-scale demo` (e.g. --out DIR --n-cells 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/scvi-scale demo "$@"
