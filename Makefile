# `make serve` and `make test` work on a fresh clone: they create .venv, install, build the models.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
REPO   ?= model_repository
# ONNX Runtime flavour: CPU unless GPU=1. onnxruntime and onnxruntime-gpu install the same
# `onnxruntime` module and must never coexist: each path uninstalls the other first.
ifeq ($(GPU),1)
  ORT_EXTRA := gpu
  ORT_OTHER := onnxruntime
  OTHER_EXTRA := cpu
else
  ORT_EXTRA := cpu
  ORT_OTHER := onnxruntime-gpu
  OTHER_EXTRA := gpu
endif
EXTRAS := $(ORT_EXTRA),train,score,loadtest,ray,test

# The fallback tier: a second venv with the real onnxruntime-gpu wheel *without* its cuda/cudnn
# extras (no CUDA libraries), the `gpu` extra's requirement read from pyproject.toml.
GPU_VENV := .venv-gpu
ORT_GPU_BARE = $(shell $(PYTHON) -c 'import re, tomllib; \
  gpu = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]; \
  print(re.sub(r"\[[^]]*\]", "", next(r for r in gpu if r.startswith("onnxruntime-gpu"))))')
GPU_CHECK_OUT ?= runs/gpu-check

.PHONY: setup build serve test lint format clean gpu-fallback-test gpu-check

$(BIN)/.installed-$(ORT_EXTRA): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip uninstall -q -y $(ORT_OTHER)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@if $(BIN)/python -m pip show -q $(ORT_OTHER) 2>/dev/null; then \
	  echo "$(ORT_OTHER) came back beside the $(ORT_EXTRA) extra: a dependency pulls it" >&2; \
	  exit 1; fi
	rm -f $(BIN)/.installed-$(OTHER_EXTRA)
	touch $@

setup: $(BIN)/.installed-$(ORT_EXTRA)

## Train and export whatever is missing or out of date (skips the rest).
build: setup
	$(BIN)/onnxserve build --repository $(REPO)

serve: setup
	test -f $(REPO)/cnn/config.json || $(BIN)/onnxserve build --repository $(REPO)
	$(BIN)/onnxserve serve --repository $(REPO) --host 127.0.0.1 --port 8000

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: build lint $(GPU_VENV)/.installed
	ONNXSERVE_GPU_PYTHON=$(GPU_VENV)/bin/python $(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(GPU_VENV)/.installed: pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip uninstall -q -y onnxruntime
	$(GPU_VENV)/bin/python -m pip install -q -e . "$(ORT_GPU_BARE)"
	touch $@

## The real onnxruntime-gpu wheel without CUDA libraries: the server must say why it is on CPU.
gpu-fallback-test: build $(GPU_VENV)/.installed
	ONNXSERVE_GPU_PYTHON=$(GPU_VENV)/bin/python $(BIN)/python -m pytest tests/test_gpu_fallback.py -q

## On a machine with an NVIDIA GPU (run with GPU=1): parity, placement, throughput, served load.
gpu-check: build
	$(BIN)/python -m loadtests.gpu_check --repository $(REPO) --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) $(GPU_VENV) $(REPO) runs .pytest_cache .ruff_cache
