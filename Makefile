# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv once and installs torch==2.13.0 *before* the package, so pip takes the
# local CPU build instead of pulling the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.samkit-installed

.PHONY: demo test fast lint bench clean data docs figures

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,experiments,curvature,lightning,huggingface,docs]"
	touch $(STAMP)

# Fashion-MNIST from Debian's package where we can install it (root on Debian); otherwise the
# demo falls back to scikit-learn's digits and says so.
FMNIST := /usr/share/datasets/fashion-mnist
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "samkit: could not install dataset-fashion-mnist; the demo will use scikit-learn's digits"; \
	else echo "samkit: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist, or set SAMKIT_DATA); the demo will use scikit-learn's digits"; fi

demo: $(STAMP) data
	$(VENV)/bin/samkit compare --overwrite --jobs 2

test: $(STAMP) data
	$(PY) -m pytest -q

# The fast loop: no process spawns, no torch.compile, no real data (-m "not slow"), on two
# pytest-xdist workers (one torch and one BLAS thread each); the Lightning and Hugging Face tests
# on one of them, so that only one worker pays for importing those libraries. Bytecode is
# cached even where PYTHONDONTWRITEBYTECODE is set: without it each worker compiles samkit and
# the tests, and pytest re-rewrites the asserts of its plugins (hypothesis, anyio, xdist), about
# 4 s of every run's collection.
fast: $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -m "not slow" -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py

# The documentation site into site/, warnings as errors (a broken link, a missing API object, a
# docstring that does not parse, a page missing from the nav fail it). Open site/index.html or
# `$(VENV)/bin/mkdocs serve`. `make figures` remakes docs/assets/figures/ from real runs.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 PYTHONPATH=src $(VENV)/bin/mkdocs build --strict --quiet

figures: $(STAMP) data
	$(PY) docs/figures.py

clean:
	rm -rf $(VENV) runs .pytest_cache site
