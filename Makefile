# Two commands do all set-up on a fresh machine (CPU or CUDA):
#   make demo   - the main job: OScaR on the bundled default model (downloads it once)
#   make test   - the test suite (CPU only; Triton kernels run in the interpreter)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch==2.13.0 first: on the dev/CI machines pip takes the CPU wheel from local disk.
$(VENV)/.installed-%: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

# two pytest-xdist workers of one thread each (a 2-core box)
test: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

demo: $(VENV)/.installed-eval
	$(PY) -m oscar_compile.demo

clean:
	rm -rf $(VENV) *.egg-info .hypothesis
