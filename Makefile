# Each target sets up what it needs in a local venv (.venv; the compile gate also .venv-triton36).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The GPU machine runs Triton 3.6, CI the newest: the compile gate runs under both, since their
# ptxas builds allocate registers differently (a config clean on one can spill on the other).
VENV36 := .venv-triton36
VPY36 := $(VENV36)/bin/python
STAMP36 := $(VENV36)/.installed

.PHONY: venv test demo bench compile-gate clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build).
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

$(STAMP36): pyproject.toml
	$(PY) -m venv $(VENV36)
	# numpy < 2.4: Triton 3.6's interpreter breaks under newer numpy.
	$(VPY36) -m pip install -q torch==2.13.0 'triton==3.6.0' 'numpy<2.4' scipy
	$(VPY36) -m pip install -q --no-deps -e .
	touch $(STAMP36)

venv: $(STAMP)

test: compile-gate
	$(VPY) -m pytest -q tests

demo: $(STAMP)
	$(VPY) -m nf4kern.cli demo

bench: $(STAMP)
	$(VPY) bench/quant.py --write-docs
	$(VPY) bench/matmul.py --write-docs
	$(VPY) bench/lora.py --write-docs

compile-gate: $(STAMP) $(STAMP36)
	$(VPY) -m nf4kern.compile_gate
	$(VPY36) -m nf4kern.compile_gate

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info .pytest_cache .hypothesis
