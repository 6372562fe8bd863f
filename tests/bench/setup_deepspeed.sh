#!/usr/bin/env bash
# The benchmark's own virtualenv with DeepSpeed 0.19.8 (the peer dsl is measured against), on the
# same torch as dsl's, plus dsl itself (for the shared model definition). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${BENCH_VENV:-.venv-bench}
PYTHON=${PYTHON:-python3}
if [[ -f $VENV/.installed ]]; then exit 0; fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0 numpy
# DS_BUILD_OPS=0: no ahead-of-time op builds (no CUDA here); DeepSpeed JIT-builds what it needs.
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install --quiet deepspeed==0.19.8
"$VENV/bin/python" -m pip install --quiet -e . 
touch "$VENV/.installed"
