# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where the demo writes its run (logs, metrics, resolved spec).
DEMO_SPEC ?= configs/tiny-cpu.yaml

.PHONY: install system-deps bench-venv demo test test-unit test-integration bench lint clean cluster-up cluster-down

# The stamp depends on pyproject.toml: editing the dependencies reinstalls.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned here (CPU wheel on this machine, CUDA wheel on a GPU machine); pyproject has a range.
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	# setuptools' editable install of a package whose folders are mapped (each top-level folder is
	# a dsl.* subpackage) always prints an "Editable installation" notice that recommends nothing
	# to change here; the filter hides that notice only.
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e '.[test,hf]'
	# Triton (dsl.ops.adam's CUDA kernel; tested here under TRITON_INTERPRET=1): a CUDA build of
	# torch brings the Triton it was built with, and installing another would break it, so the
	# pinned one is installed only where torch brought none (the CPU wheel).
	$(BIN)/python -c 'import triton' 2>/dev/null || $(BIN)/python -m pip install --quiet 'triton==3.9.0'
	# An editable install leaves our modules uncompiled; with PYTHONDONTWRITEBYTECODE set every
	# `dsl` command would compile them again (~35 ms of `dsl plan`).
	$(BIN)/python -m compileall -q launcher engine topology ops > /dev/null
	touch $@

install: $(VENV)/.installed

# Debian packages of the multi-host tests (sshd, Slurm, munge, OpenMPI); a no-op when present.
system-deps:
	bash tests/cluster/install.sh

demo: install
	$(BIN)/dsl launch $(DEMO_SPEC)

# The DeepSpeed 0.19.8 virtualenv (.venv-bench): tests/integration/test_ds_import.py runs DeepSpeed
# there to make the checkpoint dsl imports; the benches compare against it.
bench-venv:
	bash tests/bench/setup_deepspeed.sh

test: install system-deps bench-venv
	$(BIN)/python -m pytest -q tests

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

test-integration: install system-deps bench-venv
	$(BIN)/python -m pytest -q tests/integration

# GPU checks: every test marked `gpu` (on a machine without CUDA each is reported skipped, with
# its reason), then on a CUDA machine the smoke checks of tests/gpu/smoke.py (part 2 under
# torchrun with 2+ GPUs; results in DSL_SMOKE_OUT, default smoke-results/), else their list.
.PHONY: test-gpu
test-gpu: install
	$(BIN)/python -m pytest -q -rs -m gpu tests
	@gpus=$$($(BIN)/python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"); \
	if [ "$$gpus" -ge 1 ]; then \
		status=0; \
		$(BIN)/python tests/gpu/smoke.py || status=1; \
		if [ "$$gpus" -ge 2 ]; then \
			$(BIN)/python -m torch.distributed.run --standalone --nproc_per_node 2 tests/gpu/smoke.py --multi || status=1; \
		fi; \
		exit $$status; \
	else \
		echo "no CUDA device here: the GPU smoke checks are listed, not run (tests/gpu/smoke.py --device cpu self-tests them)" >&2; \
		$(BIN)/python tests/gpu/smoke.py --list; \
	fi

# Side-by-side benchmarks; each writes its own section of docs/benchmarks.md:
# engine step (dsl vs DeepSpeed 0.19.8, DDP, FSDP2), fused optimizer GB/s, 1-bit compressed
# all-reduce on a 1 Gbit/s link (needs root: test-cluster namespaces + tc), memory model vs
# measured, long-context sequence lengths. `make bench BENCH=memory` runs one.
BENCH ?= run layout ds_parity ds_config_parity optim onebit memory peak longctx hf_engine plan_speed
bench: install system-deps bench-venv
	set -e; for b in $(BENCH); do echo "== tests/bench/$$b.py" >&2; $(BIN)/python tests/bench/$$b.py; done

# The test cluster (host namespaces with sshd, Slurm, OpenMPI); tests start and stop it themselves.
cluster-up: install system-deps
	$(BIN)/python -m tests.cluster up

cluster-down:
	$(BIN)/python -m tests.cluster down

clean:
	rm -rf $(VENV) build *.egg-info runs
