"""Trust boundaries: what may name code, and how a model file is known to be the one registered.

Two rules live here, used by the config, the registry and the training candidates:

- **Only the operator's project file names code, and only regressors of allowed packages.** An
  extra candidate's ``estimator`` is a dotted path checked *before anything is imported*: public
  names only (no ``_private`` segment), under a package of ``training.estimator_packages``
  (scikit-learn and LightGBM by default; never a standard-library module such as ``subprocess``
  or ``os``). :func:`estimator_class` then imports it and accepts only a scikit-learn regressor
  class, still before calling it. Messages and HTTP bodies cannot set either (see
  :data:`shared.config.MESSAGE_OVERRIDES`).
- **A model file is loaded only if its SHA-256 matches the registry index.** The digest is taken
  while the artifact is written (:func:`copy_with_digest`, :func:`write_with_digest`) and checked
  on the bytes about to be unpickled (:func:`sha256_bytes`), so a file replaced or corrupted
  after registration is refused instead of run.
"""
from __future__ import annotations

import hashlib
import importlib
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from shared.errors import ManyModelsError

DEFAULT_ESTIMATOR_PACKAGES = ("sklearn", "lightgbm")
_IDENT = r"[A-Za-z][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"^{_IDENT}(\.{_IDENT})+$")
_PACKAGE = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
CHUNK = 1 << 20


class UntrustedCodeError(ManyModelsError, ValueError):
    """A config names code it may not name (an estimator outside the allowed packages)."""


class DigestMismatchError(ManyModelsError, ValueError):
    """A pickle's bytes do not match the SHA-256 its writer recorded: refused before unpickling."""


DIGEST_SUFFIX = ".sha256"  # a pickle's sidecar: the SHA-256 its writer recorded, in hex


def check_estimator_packages(packages: Iterable[str]) -> list[str]:
    """The allow-list itself: dotted package names, none of them from the standard library."""
    out = []
    for name in packages:
        if not isinstance(name, str) or not _PACKAGE.match(name):
            raise UntrustedCodeError(f"training.estimator_packages: {name!r} is not a package name")
        if name.split(".")[0] in sys.stdlib_module_names or name.split(".")[0] == "builtins":
            raise UntrustedCodeError(f"training.estimator_packages: {name!r} is a standard-library module; "
                                     "only packages of regressors may be allowed (sklearn, lightgbm...)")
        out.append(name)
    return out


def check_estimator_path(path: Any, packages: Iterable[str], where: str = "estimator") -> str:
    """Refuse a dotted path that is not a public name under an allowed package (no import)."""
    packages = check_estimator_packages(packages)
    if not isinstance(path, str) or not _DOTTED.match(path):
        raise UntrustedCodeError(f"{where}: {path!r} must be a dotted path of public names such as "
                                 "'sklearn.linear_model.Lasso'")
    if not any(path == p or path.startswith(p + ".") for p in packages):
        raise UntrustedCodeError(f"{where}: {path!r} is not under an allowed package {packages}; "
                                 "the project file's training.estimator_packages lists them")
    return path


def estimator_class(path: str, packages: Iterable[str] = DEFAULT_ESTIMATOR_PACKAGES,
                    where: str = "estimator") -> type:
    """The regressor class of an allowed dotted path: checked, imported, then checked again as a
    scikit-learn regressor class, all before anything is called."""
    check_estimator_path(path, packages, where)
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UntrustedCodeError(f"{where}: cannot import {path!r}: {exc}") from exc
    from sklearn.base import BaseEstimator, RegressorMixin

    if not (isinstance(obj, type) and issubclass(obj, BaseEstimator) and issubclass(obj, RegressorMixin)):
        raise UntrustedCodeError(f"{where}: {path!r} is not a scikit-learn regressor class")
    return obj


# -- artifact digests ----------------------------------------------------------------------

def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_path(path: str) -> str:
    """Where the writer of the pickle ``path`` records its SHA-256."""
    return path + DIGEST_SUFFIX


def check_digest(data: bytes, expected: str | None, what: str) -> None:
    """Refuse ``data`` unless it matches the writer's recorded digest; with none recorded (a file
    written before digests existed) it is accepted with a warning."""
    if not expected:
        import logging

        logging.getLogger("manymodels.trust").warning(
            "%s has no SHA-256 recorded by its writer (written before digests): loaded unverified", what)
        return
    if sha256_bytes(data) != expected.strip():
        raise DigestMismatchError(f"{what} does not match the SHA-256 its writer recorded: it was changed "
                                  "or corrupted since, so it is not unpickled; rerun the stage that wrote it")


def write_with_digest(data: bytes | bytearray | memoryview, target: Path) -> str:
    """Write ``data`` to the new file ``target`` and return its SHA-256.

    No fsync: a copy torn by a power cut no longer matches its digest, so it is refused, never run.
    """
    with open(target, "xb") as fh:
        fh.write(data)
    return sha256_bytes(data)


def copy_with_digest(source: Path | str, target: Path) -> str:
    """Copy ``source`` into a new, independent file ``target`` (never a hard link: damage to one
    copy must not reach another) and return the SHA-256 of the bytes now in ``target``."""
    shutil.copyfile(source, target)  # the kernel's copy (sendfile / copy_file_range): no Python loop
    return sha256_file(target)
