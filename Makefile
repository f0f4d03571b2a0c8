# Each target sets up what it needs in a local venv (.venv).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench compile-gate clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build).
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m nf4kern.compile_gate
	$(VPY) -m pytest -q tests

demo: $(STAMP)
	$(VPY) -m nf4kern.cli demo

bench: $(STAMP)
	$(VPY) bench/quant.py --write-docs
	$(VPY) bench/matmul.py --write-docs
	$(VPY) bench/lora.py --write-docs

compile-gate: $(STAMP)
	$(VPY) -m nf4kern.compile_gate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
