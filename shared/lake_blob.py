"""Moved to :mod:`shared.azureml.blob_lake` (the Blob lake) and :func:`shared.backends.open_lake`.

Kept as an alias for code written against earlier releases; resolved lazily, so importing this
module imports no Azure SDK.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "open_lake":
        from shared.backends import open_lake

        return open_lake
    from shared.azureml import blob_lake

    return getattr(blob_lake, name)
