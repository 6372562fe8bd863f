#!/usr/bin/env bash
# The benchmark's own virtualenv with DeepSpeed 0.19.8 (the peer dsl is measured against), on the
# same torch as dsl's, plus dsl itself with its hf extra (the shared model definition; Hugging Face
# models for tests/integration/test_ds_import.py and tests/bench/hf_engine.py). Idempotent; a
# virtualenv made before transformers was part of it gets the extra added.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${BENCH_VENV:-.venv-bench}
PYTHON=${PYTHON:-python3}
if [[ -f $VENV/.installed ]] && "$VENV/bin/python" -c 'import transformers' 2>/dev/null; then exit 0; fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0 numpy
# DS_BUILD_OPS=0: no ahead-of-time op builds (no CUDA here); DeepSpeed JIT-builds what it needs.
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install --quiet deepspeed==0.19.8
PYTHONWARNINGS='ignore:Editable installation' "$VENV/bin/python" -m pip install --quiet -e '.[hf]' 
touch "$VENV/.installed"
