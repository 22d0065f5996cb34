# make demo: offline starter pipeline + shapes; fine-tune, then textual inversion; prints where the grids are.
# make test: creates both environments (.venv for PyTorch, .venv-flax for JAX) and runs both test suites.
# make benchmark: speed and memory of all four scripts on this machine; writes BENCHMARKS.md.
PYTHON ?= python3
VENV := .venv
VENV_FLAX := .venv-flax
DEMO := demo_output

.PHONY: demo test benchmark clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt pytest
	touch $@

$(VENV_FLAX)/.installed: requirements_flax.txt
	$(PYTHON) -m venv $(VENV_FLAX)
	$(VENV_FLAX)/bin/pip install --quiet --upgrade pip
	$(VENV_FLAX)/bin/pip install --quiet -r requirements_flax.txt pytest
	touch $@

# Both suites: the PyTorch scripts in .venv, the Flax twins in .venv-flax (their tests also use .venv).
test: $(VENV)/.installed $(VENV_FLAX)/.installed
	$(VENV)/bin/python -m pytest tests -q --durations=10 --ignore=tests/test_demo.py
	$(VENV)/bin/python -m pytest tests/test_demo.py -q -s
	$(VENV_FLAX)/bin/python -m pytest tests_flax -q --durations=10

demo: $(VENV)/.installed
	$(VENV)/bin/python demo/run_demo.py --output_dir $(DEMO)

benchmark: $(VENV)/.installed $(VENV_FLAX)/.installed
	$(VENV)/bin/python benchmarks/run_benchmarks.py --output BENCHMARKS.md

clean:
	rm -rf $(DEMO)
