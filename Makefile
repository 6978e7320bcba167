# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: demo test install test-deps infra-check azureml-check worker-bundle-check bench clean

$(STAMP): requirements.in requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## make demo: generate 500 weekly store x item series and run the whole pipeline on them
demo: install
	$(VENV)/bin/manymodels demo --workdir $(DEMO)

## make test: install what the tests need (pip, npm, apt) and run the suite, a file per worker process
## (TEST_WORKERS=0 for one process; the CI machine has 2 cores)
TEST_WORKERS ?= 2
test: install test-deps infra-check azureml-check worker-bundle-check
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test-deps:
	bash scripts/install-test-deps.sh

## make infra-check: parse and lint the Bicep templates offline (tree-sitter-bicep, pycep, checkov)
infra-check:
	bash scripts/validate-infra.sh

## make azureml-check: Microsoft's mltable and azmlinfsrv (own venv) against our MLTable files and online scoring script
azureml-check: install
	bash scripts/validate-azureml.sh -q

## make worker-bundle-check: the Functions tests on the azure-functions copy the Python worker bundles (own venv)
worker-bundle-check: install
	bash scripts/validate-worker-bundle.sh -q

## make bench: the performance benchmarks (figures recorded in docs/performance.md)
bench: install
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache node_modules
