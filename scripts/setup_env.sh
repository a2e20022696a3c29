#!/usr/bin/env bash
# Creates or refreshes .venv/ at the repo root. Idempotent: a stamp holding the hash of the requirement files and
# pyproject.toml makes a second run return at once; any change to those files triggers a reinstall.
#   scripts/setup_env.sh          CPU stack (default; what CI and the README use)
#   scripts/setup_env.sh gpu      CUDA torch + fbgemm-gpu 1.8.0 (a GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOR="${1:-${PIMM_STACK:-cpu}}"
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.pimm-stamp"
want="$FLAVOR $(cat requirements/"$FLAVOR".txt requirements/torchrec.txt requirements/dev.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing the $FLAVOR stack into $VENV (first run takes a few minutes) ..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_quiet() {  # pip's noise about absent local index folders on these machines is filtered; errors are not
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install --quiet "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true; rm -f "$log"
    echo "[setup] pip install $* failed" >&2; exit 1
  fi
  rm -f "$log"  # success: the build-backend warnings in it are not actionable
}
pip_quiet --upgrade pip
pip_quiet -r requirements/"$FLAVOR".txt -r requirements/dev.txt
pip_quiet --no-deps -r requirements/torchrec.txt  # --no-deps: see requirements/torchrec.txt
pip_quiet --no-deps -e .
# fail here, not in the first test, if the stack does not import together
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec, ray.train, pyarrow, wandb, torchmetrics" >&2
echo "$want" > "$STAMP"
echo "[setup] done" >&2
