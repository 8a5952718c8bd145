# vitok: the two commands README.md promises (make demo, make test), plus lint and bench.
# Each target creates .venv and installs the project into it when needed, so each works
# alone on a fresh machine.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitok-installed

export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# The CPU build of torch first: a range alone would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# DeepSpeed compiles its CPU comm op on first use (about 45 s on 2 cores) into
	# TORCH_EXTENSIONS_DIR: build it here, not inside the first training run of a demo.
	mkdir -p .cache
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
		> .cache/deepspeed_op_build.log 2>&1 \
		|| echo "note: not prebuilt (.cache/deepspeed_op_build.log); the first run builds it"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/scaling_study.py

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) pipelines/benchmark.py all

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
