# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv once and installs torch==2.13.0 *before* the package, so pip takes the
# local CPU build instead of pulling the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.samkit-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,experiments,curvature]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/samkit demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
