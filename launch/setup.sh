#!/usr/bin/env bash
# Set up vocalign in ./.venv on a fresh machine, with espeak-ng and sox (apt, when missing): `vocalign make-demo-tts`
# speaks its training data with espeak-ng, and the speech tests use both. `test` is accepted for the README's
# test command; everything the tests need is installed either way, and with `test` also Chromium (as root, when
# missing), which tests/test_eval_html.py opens eval.html in (that test is skipped without it).
# CPU torch 2.13.0 is installed first, explicitly: an unpinned torch would pull a multi-GB CUDA build.
# On a GPU machine install your CUDA build of torch into the venv first; this script keeps it.
# Everything else installs at the tested versions of launch/constraints.txt; `CONSTRAINTS= bash launch/setup.sh`
# takes the newest releases within pyproject.toml's ranges instead (to refresh that file, see its header).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS-launch/constraints.txt}
PINNED=()
[ -z "$CONSTRAINTS" ] || PINNED=(-c "$CONSTRAINTS")
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q "${PINNED[@]}" -e ".[dev]"
# resemblyzer's own `webrtcvad` requirement does not import here; webrtcvad-wheels (installed above) replaces it
.venv/bin/python -m pip install -q "${PINNED[@]}" --no-deps resemblyzer==0.1.4
if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq espeak-ng sox >/dev/null) || echo "warning: espeak-ng not installed; vocalign make-demo-tts cannot run and speech tests will be skipped" >&2
fi
if [ "${1:-}" = test ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) || echo "warning: chromium not installed; the eval.html browser test will be skipped" >&2
fi
