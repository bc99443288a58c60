# `make train` runs the main job on the embedded default; `make test` runs every test tier (and
# lists the 25 slowest tests: the suite must stay under ~25 minutes in CI).
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= medical

.PHONY: setup train test test-fast clean

setup: $(VENV)/.installed

# torch first: on a machine without CUDA, pin the CPU build (a looser pin pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

train: setup
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed launch/train.py +exp=$(EXP) $(ARGS)

test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -ra --durations=25 tests $(ARGS)

test-fast: setup
	$(PY) -m pytest -ra -m "not distributed" tests $(ARGS)

clean:
	rm -rf outputs .cache
