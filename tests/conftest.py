"""Shared fixtures: small seeded panels from the synthetic generator, and temporary workdirs."""
from __future__ import annotations

import os

# Keep numerical libraries single-threaded: the suite runs on 2 cores with process pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

pytest_plugins = ["azurite"]  # Azurite emulator fixtures (tests/azurite.py)
