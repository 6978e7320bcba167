"""The core library of manymodels (no Azure Functions imports): see the README's project layout."""
from __future__ import annotations


def package_version() -> str:
    """The installed package's version (``0+unknown`` when run from a checkout without installing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("manymodels")
    except PackageNotFoundError:
        return "0+unknown"
