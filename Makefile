# The two commands of README.md: `make demo` and `make test`. Each creates
# .venv on first use; nothing is installed outside it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/workerpool: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,torch,loadtest,metrics,http]'
	touch $@

demo: $(BIN)/workerpool
	$(BIN)/python bin/demo

test: $(BIN)/workerpool
	bin/system-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 -m 'not alone'
	$(BIN)/python -m pytest -q -m alone

lint: $(BIN)/workerpool
	$(BIN)/ruff check .

bench: $(BIN)/workerpool
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
