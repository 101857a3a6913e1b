# Two commands set up a fresh machine (Python 3.11 and make are all it needs):
#   make demo   creates .venv, installs specprof, profiles the bundled example CNN
#   make test   creates .venv, installs specprof with its test extras, runs the tests
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[torch,postgres,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/specprof profile examples/small_cnn.onnx

test: $(STAMP)
	@.ci/ensure-postgres
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check engine plugins src tests benchmarks examples
	$(BIN)/mypy engine plugins src/specprof

clean:
	rm -rf $(VENV) build dist *.egg-info
