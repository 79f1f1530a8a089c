#!/usr/bin/env bash
# Create ./.venv (Python 3.11) and install scvi-scale with the given extras, e.g. `scripts/setup.sh dev`.
# Idempotent: re-running only installs what changed. torch is pinned to the CPU build 2.13.0 in pyproject.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q -U pip
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# one resolver run for everything, so transitive pins (botocore, torch) stay consistent; pip's chatter goes to
# a log that is shown only when the install fails
if ! .venv/bin/python -m pip install -q -e "$spec" > .venv/pip-install.log 2>&1; then
  grep -v "^WARNING: Location" .venv/pip-install.log | tail -40 >&2
  echo "pip install failed; full log: .venv/pip-install.log" >&2
  exit 1
fi
.venv/bin/python -c "import scvi_scale, torch; print('scvi-scale', scvi_scale.__version__, 'torch', torch.__version__)"
