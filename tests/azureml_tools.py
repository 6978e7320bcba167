"""Microsoft's own Azure ML runtime packages, for tests: ``mltable`` and ``azureml-inference-server-http``.

They pin versions of shared dependencies (pyarrow, azure-identity, OpenTelemetry) that differ from
the project's, so they live in their own virtual environment beside the project's (created by
``scripts/validate-azureml.sh``: ``.venv/azureml-tools``, or ``$MM_AZUREML_TOOLS_VENV``), with the
runtime requirements installed next to them, as in the Azure ML images. Tests that need them run
that environment's Python as a subprocess and are skipped, with the command to run, when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

APP_ROOT = Path(__file__).resolve().parents[1]


def azureml_tools_venv() -> Path:
    # Absolute, since the tools are run as subprocesses from other working directories.
    configured = os.environ.get("MM_AZUREML_TOOLS_VENV")
    return Path(configured).resolve() if configured else APP_ROOT / ".venv" / "azureml-tools"


def azureml_tools_python() -> Path:
    """The tools venv's Python, or skip the test saying how to create it."""
    python = azureml_tools_venv() / "bin" / "python"
    if not python.is_file():
        pytest.skip("Azure ML runtime packages not installed: run scripts/validate-azureml.sh")
    return python


def azmlinfsrv() -> Path:
    """The inference server's command (``azmlinfsrv``) in the tools venv, or skip."""
    server = azureml_tools_python().parent / "azmlinfsrv"
    if not server.is_file():
        pytest.skip("azureml-inference-server-http not installed: run scripts/validate-azureml.sh")
    return server
