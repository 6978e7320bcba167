#!/usr/bin/env bash
# Microsoft's own Azure ML runtime packages, for the tests that check our files against them:
#   - mltable (PyPI): loads the file-list MLTable files the parallel jobs read;
#   - azureml-inference-server-http (PyPI, `azmlinfsrv`): the server managed online endpoints run,
#     serving shared/azureml/online_score.py on 127.0.0.1 as the endpoint does.
# Both pin versions of shared dependencies (pyarrow < 26 and azure-identity 1.17 for mltable,
# OpenTelemetry 1.33 for the inference server) that conflict with the project's own environment, so
# they get their own virtual environment with requirements.in beside them, like the Azure ML images:
# $MM_AZUREML_TOOLS_VENV, default .venv/azureml-tools (inside the ignored project venv). The tests
# find it there and are skipped, naming this script, when it is absent.
# Usage: scripts/validate-azureml.sh [pytest args...]   (installs on first use, then runs the tests)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MM_AZUREML_TOOLS_VENV:-.venv/azureml-tools}"
STAMP="$VENV/.installed-1"
if [ ! -f "$STAMP" ]; then
  echo "validate-azureml: installing mltable, azureml-inference-server-http and requirements.in into $VENV"
  python3 -m venv "$VENV"
  # requirements.in's ranges, not the Function App's pins, as the Azure ML environments take them:
  # Azure ML's packages need versions the pins do not have (mltable: python-dateutil<3)
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    -r requirements.in 'mltable>=1.6,<2' 'azureml-inference-server-http>=1.4,<2'
  touch "$STAMP"
fi

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
VENV="$(cd "$VENV" && pwd)"  # absolute: the tests start its commands from other directories
MM_AZUREML_TOOLS_VENV="$VENV" "$PY" -m pytest tests/test_azureml_jobs.py tests/test_azureml_online_score.py "$@"
