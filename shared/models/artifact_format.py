"""The stored-artifact format and its one loader: every pickled model goes through here.

Why: a pickle pins module paths (ours and scikit-learn's private ones) and depends on the library
versions that wrote it, yet a bare pickle records neither. Registry artifacts, a run's global
model and the training entry script's outputs are therefore written by :func:`dump_artifact` and
read by :func:`load_artifact`, which maps moved class paths explicitly, refuses anything outside
the libraries a model is made of, and compares the recorded library versions with this process's.

Layout of an artifact (format 1)::

    <pickle, protocol 5> <header: UTF-8 JSON> <header length: 4 bytes, big-endian> <MAGIC>

The header is written *after* the pickle so that plain ``pickle.loads`` (release 0.1, a rollback,
a notebook) still reads the model: unpickling stops at the pickle's STOP opcode. Header fields:
``format`` (:data:`FORMAT_VERSION`), ``class`` (the top-level object's class path), ``python``,
``libraries`` (installed versions of numpy, pandas, scipy, scikit-learn, lightgbm, statsforecast)
and ``manymodels`` (this release, when installed). Files without the trailing :data:`MAGIC` are
legacy: release 0.1's bare pickles and ``joblib.dump`` files; they load through the same
restrictions, without a version check (nothing was recorded).

Class paths: :data:`CLASS_PATHS` maps a stored (module, name) to where it lives now, and
:data:`MODULE_PATHS` renames whole modules (numpy 1's ``numpy.core``); a moved class is added
there, never kept importable under its old name for pickles' sake.

Data is never code: the unpickler resolves only (a) classes of our own ``shared`` package, (b)
classes of :data:`LIBRARIES` (plus the operator's ``training.estimator_packages`` when passed),
their pickle reconstructors (:data:`RECONSTRUCTORS`, Cython's ``__pyx_unpickle_*``) and (c) a few
named standard-library types (:data:`STDLIB`); nothing under an ``io``/``testing`` module and no
``numpy.memmap``. Everything else (``os``, ``subprocess``, ``builtins.eval``, ``getattr``...) is
refused with :class:`ArtifactRefusedError`. This narrows what a file can reach; the boundary stays
the SHA-256 check done before any byte is unpickled (:mod:`shared.trust`, :mod:`shared.registries.registry`).

Versions: a recorded version whose compared parts (:data:`COMPARED_PARTS`: scikit-learn
major.minor, the others' major) differ from the installed one gives an
:class:`ArtifactVersionWarning` naming both versions and the way out (retrain with ``manymodels
train --full``, or pin the recorded version); if the artifact then fails to load, the error is an
:class:`ArtifactVersionError` with the same message.
"""
from __future__ import annotations

import io
import json
import pickle
import platform
import struct
import warnings
from functools import lru_cache
from importlib import metadata
from typing import Any, Iterable, NoReturn

from shared.errors import ManyModelsError

FORMAT_VERSION = 1
MAGIC = b"\nMANYMODELS-ARTIFACT\n"  # the artifact's last bytes; a pickle ends with STOP (b".")
_LENGTH = struct.Struct(">I")

# stored (module, name) -> where it lives now; add a line when a pickled class moves
CLASS_PATHS: dict[tuple[str, str], tuple[str, str]] = {
    ("shared.training", "ForecastBundle"): ("shared.models.bundle", "ForecastBundle"),  # moved after 0.1
}
# whole modules renamed: by a library (numpy 2 renamed numpy.core to numpy._core), or by us
MODULE_PATHS: dict[str, str] = {
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
    "numpy.core": "numpy._core",
    # the core grouped into subpackages (issue 21): every module a stored model may name
    "shared.artifact_format": "shared.models.artifact_format",
    "shared.backends": "shared.runs.backends",
    "shared.bundle": "shared.models.bundle",
    "shared.cache_entries": "shared.forecasts.cache_entries",
    "shared.candidate_kinds": "shared.models.candidate_kinds",
    "shared.candidates": "shared.models.candidates",
    "shared.compute": "shared.runs.compute",
    "shared.effects": "shared.models.effects",
    "shared.failures": "shared.results.failures",
    "shared.features": "shared.models.features",
    "shared.global_ar": "shared.models.global_ar",
    "shared.global_model": "shared.models.global_model",
    "shared.incremental": "shared.models.incremental",
    "shared.ingest": "shared.data.ingest",
    "shared.ingestion": "shared.data.ingestion",
    "shared.local_compute": "shared.runs.local_compute",
    "shared.local_models": "shared.models.local_models",
    "shared.metric_names": "shared.models.metric_names",
    "shared.metrics": "shared.models.metrics",
    "shared.model_cache": "shared.forecasts.model_cache",
    "shared.partitioning": "shared.data.partitioning",
    "shared.pipeline": "shared.runs.pipeline",
    "shared.promotion": "shared.registries.promotion",
    "shared.registration": "shared.registries.registration",
    "shared.registry": "shared.registries.registry",
    "shared.registry_records": "shared.registries.registry_records",
    "shared.repairs": "shared.data.repairs",
    "shared.report": "shared.results.report",
    "shared.report_data": "shared.results.report_data",
    "shared.report_format": "shared.results.report_format",
    "shared.report_render": "shared.results.report_render",
    "shared.report_series": "shared.results.report_series",
    "shared.report_table": "shared.results.report_table",
    "shared.result_store": "shared.results.result_store",
    "shared.runner": "shared.runs.runner",
    "shared.scoring": "shared.forecasts.scoring",
    "shared.selection": "shared.models.selection",
    "shared.sql_schema": "shared.results.sql_schema",
    "shared.stage_state": "shared.runs.stage_state",
    "shared.stream_parts": "shared.data.stream_parts",
    "shared.streaming": "shared.data.streaming",
    "shared.summaries": "shared.results.summaries",
    "shared.synthetic": "shared.data.synthetic",
    "shared.timegrid": "shared.data.timegrid",
    "shared.train_stage": "shared.runs.train_stage",
    "shared.training": "shared.models.training",
    "shared.validation": "shared.data.validation",
    "shared.validation_report": "shared.data.validation_report",
    "shared.workspace": "shared.runs.workspace",
}

OWN_PACKAGE = "shared"
LIBRARIES = ("numpy", "pandas", "scipy", "sklearn", "lightgbm", "statsforecast")
# functions (not classes) that libraries' pickles call to rebuild their objects
RECONSTRUCTORS: frozenset[tuple[str, str]] = frozenset({
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.ma.core", "_mareconstruct"),
    ("numpy.random._pickle", "__generator_ctor"), ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.tslibs.nattype", "__nat_unpickle"),
    ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"),
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.datetimes", "_new_DatetimeIndex"),
    ("pandas.core.indexes.period", "_new_PeriodIndex"),
})
STDLIB: dict[str, frozenset[str]] = {
    "builtins": frozenset({"object", "dict", "list", "set", "frozenset", "tuple", "slice", "range", "complex",
                           "bytes", "bytearray", "str", "int", "float", "bool"}),
    "collections": frozenset({"OrderedDict", "defaultdict", "deque", "Counter"}),
    "datetime": frozenset({"date", "datetime", "time", "timedelta", "timezone"}),
    "zoneinfo": frozenset({"ZoneInfo", "ZoneInfo._unpickle"}),
    "decimal": frozenset({"Decimal"}),
    "copyreg": frozenset({"_reconstructor"}),
    "_codecs": frozenset({"encode"}),  # how protocol 2 pickles bytes
}
_DENIED_SEGMENTS = frozenset({"io", "testing", "_testing", "f2py", "distutils"})
_DENIED = frozenset({("numpy", "memmap"), ("numpy._core.memmap", "memmap")})  # maps (and creates) files
_JOBLIB_ARRAY = ("joblib.numpy_pickle", "NumpyArrayWrapper")  # joblib's in-stream array marker

# distribution name -> import name; recorded when installed
DISTRIBUTIONS = {"numpy": "numpy", "pandas": "pandas", "scipy": "scipy", "scikit-learn": "sklearn",
                 "lightgbm": "lightgbm", "statsforecast": "statsforecast"}
# how many leading version parts must agree: scikit-learn pickles are only supported within a release
COMPARED_PARTS = {"scikit-learn": 2, "numpy": 1, "pandas": 1, "scipy": 1, "lightgbm": 1, "statsforecast": 1}


class ArtifactFormatError(ManyModelsError, pickle.UnpicklingError):
    """A stored artifact cannot be read: malformed, from a newer format, or naming code it may not."""


class ArtifactRefusedError(ArtifactFormatError):
    """An artifact names code outside the allow-list: refused before anything is called."""


class ArtifactVersionError(ArtifactFormatError):
    """An artifact written with other library versions failed to load; the message names both."""


class ArtifactVersionWarning(UserWarning):
    """An artifact was written with other library versions than this process has."""


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """The installed versions of the libraries a model can be made of (read once per process)."""
    found = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


@lru_cache(maxsize=1)
def _own_version() -> str | None:
    try:
        return metadata.version("manymodels")
    except metadata.PackageNotFoundError:
        return None


def dump_artifact(obj: Any) -> bytes:
    """``obj`` pickled, followed by its header (format, class path, library versions)."""
    header: dict[str, Any] = {"format": FORMAT_VERSION, "class": _class_path(type(obj)),
                              "python": platform.python_version(), "libraries": library_versions()}
    if _own_version():
        header["manymodels"] = _own_version()
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) + raw + _LENGTH.pack(len(raw)) + MAGIC


def read_header(data: bytes) -> dict[str, Any] | None:
    """The artifact's header, or None for a legacy file (a bare pickle or a joblib file)."""
    return _split(data)[1]


def _split(data: bytes) -> tuple[int, dict[str, Any] | None]:
    """Where the pickle ends, and the header that follows it (None: a legacy file)."""
    if not data.endswith(MAGIC):
        return len(data), None
    end = len(data) - len(MAGIC) - _LENGTH.size
    if end < 0:
        raise ArtifactFormatError("artifact too short for its header")
    (size,) = _LENGTH.unpack_from(data, end)
    if end - size < 0:
        raise ArtifactFormatError("artifact header length points before the file's start")
    try:
        header = json.loads(data[end - size:end].decode("utf-8"))
    except ValueError as exc:
        raise ArtifactFormatError(f"artifact header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("format"), int):
        raise ArtifactFormatError("artifact header has no format version")
    return end - size, header


def load_artifact(data: bytes, what: str, packages: Iterable[str] = ()) -> Any:
    """The one loader: an artifact's object, after its header is read and its versions compared.

    ``what`` names the artifact in messages; ``packages`` adds the operator's estimator packages
    (``training.estimator_packages``) to :data:`LIBRARIES`. A refused class path raises
    :class:`ArtifactRefusedError`, a malformed file :class:`ArtifactFormatError`, a failure under
    other library versions :class:`ArtifactVersionError`.
    """
    allowed = (OWN_PACKAGE, *LIBRARIES, *packages)
    payload_end, header = _split(data)
    if header is None:
        return _load_legacy(data, what, allowed)
    if header["format"] > FORMAT_VERSION:
        raise ArtifactFormatError(f"{what} has artifact format {header['format']}, newer than this release "
                                  f"reads ({FORMAT_VERSION}): upgrade manymodels to load it")
    mismatch = version_mismatch(header.get("libraries") or {}, what)
    if mismatch:
        warnings.warn(mismatch, ArtifactVersionWarning, stacklevel=2)
    try:
        return _Restricted(io.BytesIO(data[:payload_end]), what, allowed).load()
    except ArtifactRefusedError:
        raise
    except Exception as exc:  # a class moved or changed between the versions: say which versions
        if mismatch:
            raise ArtifactVersionError(f"{mismatch} (loading failed: {type(exc).__name__}: {exc})") from exc
        raise


def version_mismatch(recorded: dict[str, str], what: str) -> str | None:
    """The documented message for recorded library versions that differ from the installed ones."""
    installed = library_versions()
    differ = [(lib, recorded[lib], installed.get(lib, "none")) for lib, parts in COMPARED_PARTS.items()
              if lib in recorded and _parts(recorded[lib], parts) != _parts(installed.get(lib, ""), parts)]
    if not differ:
        return None
    written = ", ".join(f"{lib} {old}" for lib, old, _ in differ)
    here = ", ".join(f"{lib} {new}" for lib, _, new in differ)
    pins = " ".join(f"{lib}=={old}" for lib, old, _ in differ)
    return (f"{what} was written with {written}; this process has {here}: it may load wrongly or not at "
            f"all. Retrain it with this environment (manymodels train --full) or pin {pins}")


def _parts(version: str, n: int) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:n])


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_legacy(data: bytes, what: str, allowed: tuple[str, ...]) -> Any:
    """A headerless file: release 0.1's pickles, or ``joblib.dump`` files (arrays beside the
    pickle stream, or compressed), each through the same restrictions."""
    if data[:1] == b"\x80":  # a protocol 2+ pickle (joblib's uncompressed files are too)
        try:
            return _Restricted(io.BytesIO(data), what, allowed).load()
        except _JoblibArrays:
            pass
    try:
        from joblib.numpy_pickle import NumpyUnpickler, _validate_fileobject_and_memmap
    except ImportError:  # no joblib: report what plain pickle says
        return _Restricted(io.BytesIO(data), what, allowed).load()

    class _RestrictedJoblib(NumpyUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == _JOBLIB_ARRAY:
                return super().find_class(module, name)
            return _resolve(module, name, what, allowed, super().find_class)

    try:
        with _validate_fileobject_and_memmap(io.BytesIO(data), "", None) as (fobj, _mmap):
            return _RestrictedJoblib("", fobj, True).load()
    except ArtifactFormatError:
        raise
    except Exception as exc:  # joblib's pure-Python unpickler fails on garbage with KeyError & co.
        raise ArtifactFormatError(f"{what} is neither a manymodels artifact, a pickle nor a joblib file "
                                  f"({type(exc).__name__}: {exc})") from exc


class _JoblibArrays(ArtifactFormatError):
    """A pickle holds joblib's array marker: a legacy joblib file needs joblib's unpickler (a
    headed artifact never holds one, so there it stays an error)."""

    def __init__(self) -> None:
        super().__init__("a joblib array marker inside a manymodels artifact")


class _Restricted(pickle.Unpickler):
    """pickle's C unpickler, resolving globals only through :func:`_resolve`."""

    def __init__(self, file: io.BytesIO, what: str, allowed: tuple[str, ...]) -> None:
        super().__init__(file, fix_imports=False)  # names are checked as written, never remapped after
        self._what, self._allowed = what, allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _JOBLIB_ARRAY:
            raise _JoblibArrays()
        return _resolve(module, name, self._what, self._allowed, super().find_class)


def _resolve(module: str, name: str, what: str, allowed: tuple[str, ...], find: Any) -> Any:
    """The object a pickle names, once mapped to its current path and found allowed."""
    module, name = CLASS_PATHS.get((module, name), (module, name))
    module = MODULE_PATHS.get(module, module)
    root = module.split(".")[0]
    if module in STDLIB:
        if name in STDLIB[module]:
            return find(module, name)
        _refuse(module, name, what, allowed)
    if root not in allowed or _DENIED_SEGMENTS.intersection(module.split(".")) or (module, name) in _DENIED:
        _refuse(module, name, what, allowed)
    try:
        obj = find(module, name)
    except (ImportError, AttributeError) as exc:
        raise ArtifactFormatError(
            f"{what} names {module}.{name}, which this environment does not have ({exc}): if the class "
            "moved, map its old path in shared.models.artifact_format.CLASS_PATHS; if a library changed, "
            "retrain (manymodels train --full) or install the library version that wrote it") from None
    if isinstance(obj, type) and (obj.__module__ or "").split(".")[0] in allowed and obj is not _memmap():
        return obj
    if root != OWN_PACKAGE and ((module, name) in RECONSTRUCTORS or name.startswith("__pyx_unpickle_")):
        return obj
    _refuse(module, name, what, allowed)


def _memmap() -> Any:
    import numpy

    return numpy.memmap


def _refuse(module: str, name: str, what: str, allowed: tuple[str, ...]) -> NoReturn:
    raise ArtifactRefusedError(
        f"{what} names {module}.{name}, which a stored model may not: only classes of {', '.join(allowed)} "
        "and their pickle helpers are loaded (data is never code). A model of another estimator "
        "package loads when the caller passes training.estimator_packages; anything else was not "
        "written by manymodels: register the model again from its training run")
