# make demo: offline starter pipeline + shapes; fine-tune, then textual inversion; prints where the grids are.
# make test: ruff format --check and ruff check first, then both environments (.venv for PyTorch, .venv-flax for
#            JAX) and both test suites.
# make lint: only the formatter and linter checks.
# make benchmark: speed and memory of all four scripts on this machine; writes BENCHMARKS.md.
PYTHON ?= python3
VENV := .venv
VENV_FLAX := .venv-flax
DEMO := demo_output

.PHONY: demo test lint benchmark clean

# devkit (tiny pipelines for the tests, demo and benchmark) is installed editable, so they import it by name.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

# The JAX environment also holds the UIs' model loaders that tests/test_ui_loaders.py runs (ComfyUI, InvokeAI), without
# their declared dependencies: see requirements_ui_loaders.txt.
$(VENV_FLAX)/.installed: requirements_flax.txt requirements-dev.txt requirements_ui_loaders.txt
	$(PYTHON) -m venv $(VENV_FLAX)
	$(VENV_FLAX)/bin/pip install --quiet --upgrade pip
	$(VENV_FLAX)/bin/pip install --quiet -r requirements_flax.txt -r requirements-dev.txt
	$(VENV_FLAX)/bin/pip install --quiet --no-deps -r requirements_ui_loaders.txt
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# Each suite runs on two pytest workers (the 2 cores), and the suites run one after the other: all three at once took
# longer than in series, and the demo hit its time limit. One thread per PyTorch process: on the tiny test models a
# second thread gains nothing (measured: 87 s with one, 92 s with two, for the same two tests). worksteal: a few tests
# take minutes, and an idle worker takes queued tests from the busy one. PyTorch scripts run in .venv, the Flax twins
# in .venv-flax (their tests also use .venv).
PYTEST := -q --durations=10 -n 2 --dist worksteal
test: lint $(VENV_FLAX)/.installed
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest tests $(PYTEST) --ignore=tests/test_demo.py
	$(VENV)/bin/python -m pytest tests/test_demo.py -q -s
	OMP_NUM_THREADS=1 $(VENV_FLAX)/bin/python -m pytest tests_flax $(PYTEST)

demo: $(VENV)/.installed
	$(VENV)/bin/python demo/run_demo.py --output_dir $(DEMO)

benchmark: $(VENV)/.installed $(VENV_FLAX)/.installed
	$(VENV)/bin/python benchmarks/run_benchmarks.py --output BENCHMARKS.md

clean:
	rm -rf $(DEMO)
