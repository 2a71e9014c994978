# `make serve` and `make test` work on a fresh clone: they create .venv, install, build the models.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
REPO   ?= model_repository
# ONNX Runtime flavour: CPU unless GPU=1 (onnxruntime and onnxruntime-gpu must never coexist).
ifeq ($(GPU),1)
  ORT_EXTRA := gpu
else
  ORT_EXTRA := cpu
endif
EXTRAS := $(ORT_EXTRA),train,score,loadtest,ray,test

.PHONY: setup build serve test lint format clean

$(BIN)/.installed-$(ORT_EXTRA): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
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

test: build lint
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(REPO) runs .pytest_cache .ruff_cache
