"""Stored model artifacts: every release's files load through the one loader and forecast the same numbers.

The registry's artifacts are pickled ``ForecastBundle``s: they pin module paths (``shared.training``,
``shared.features`` as 0.1 wrote them, scikit-learn's private modules) and the bundles' attribute
layout. The fixtures under tests/fixtures/artifacts-v0.1/ were written by release 0.1 itself
(tests/fixtures/make_artifacts_v0_1.py, run against release 0.1 to regenerate), those under
artifacts-format-1/ by this release's :func:`~shared.models.artifact_format.dump_artifact`
(make_artifacts_format_1.py). If this test fails after a refactor, the refactor broke every model
already registered in a workspace, which is what this guard is for: map the moved class in
``shared.models.artifact_format.CLASS_PATHS``.
"""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn
from sklearn.base import BaseEstimator, RegressorMixin

from shared.models.artifact_format import (CLASS_PATHS, FORMAT_VERSION, MAGIC, MODULE_PATHS, ArtifactFormatError,
                                    ArtifactRefusedError, ArtifactVersionError, ArtifactVersionWarning,
                                    dump_artifact, library_versions, load_artifact, read_header)
from shared.models.bundle import ForecastBundle
from shared.registries.registry import ModelRegistry

HERE = Path(__file__).parent / "fixtures"
SETS = {"v0.1": HERE / "artifacts-v0.1", "format-1": HERE / "artifacts-format-1"}
EXPECTED = {name: json.loads((folder / "expected.json").read_text(encoding="utf-8"))
            for name, folder in SETS.items()}
FIXTURES = SETS["v0.1"]
BUNDLES = EXPECTED["v0.1"]["bundles"]
ALL = [(name, case) for name in SETS for case in sorted(EXPECTED[name]["bundles"])]
IDS = [f"{name}-{case}" for name, case in ALL]
RTOL = 1e-9


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], object]:
    """Every fixture registered in a fresh registry, then loaded back by the registry's own load path."""
    registry = ModelRegistry(tmp_path_factory.mktemp("registry") / "dev", "dev")
    items = [((name, case), info) for name in SETS for case, info in EXPECTED[name]["bundles"].items()]
    records = registry.register_many(
        ({"partition_id": info["partition_id"], "run_id": f"{name}-{case}", "keys": info["keys"],
          "model_name": info["model_name"], "status": info["status"]}, SETS[name] / info["artifact"])
        for (name, case), info in items
    )
    try:
        return {key: registry.load(record) for (key, _), record in zip(items, records)}
    finally:
        registry.close()


def info_of(name: str, case: str) -> dict:
    return EXPECTED[name]["bundles"][case]


def split(data: bytes) -> tuple[bytes, dict]:
    """An artifact's pickle and header, read by the documented layout (pickle, JSON, length, magic)."""
    end = len(data) - len(MAGIC) - 4
    (size,) = struct.unpack(">I", data[end:end + 4])
    return data[:end - size], json.loads(data[end - size:end])


def joined(payload: bytes, header: dict) -> bytes:
    raw = json.dumps(header).encode("utf-8")
    return payload + raw + struct.pack(">I", len(raw)) + MAGIC


def global_call(module: str, name: str) -> bytes:
    """A hand-written pickle that calls ``module.name()``: what a planted file would do."""
    return f"c{module}\n{name}\n)R.".encode("ascii")


def future_rows(info: dict) -> pd.DataFrame:
    rows = pd.DataFrame(info["future_rows"])
    time = info["time_column"]
    if info["freq"] != "int":
        rows[time] = pd.to_datetime(rows[time])
    return rows


def test_fixtures_cover_the_artifact_kinds() -> None:
    kinds = {case: (info["model_name"], info["freq"], bool(info["covariates"])) for case, info in BUNDLES.items()}
    assert kinds["loglinear"][0] == "loglinear"
    assert kinds["gbm"][0] == "gbm"
    assert BUNDLES["baseline_only"]["status"] == "baseline_only"
    assert kinds["int_covariates"][1:] == ("int", True)
    total = sum(p.stat().st_size for folder in SETS.values() for p in folder.iterdir())
    assert total < 400_000, f"fixtures grew to {total} bytes"


@pytest.mark.parametrize(("name", "case"), ALL, ids=IDS)
def test_bundle_identity_survives(loaded: dict, name: str, case: str) -> None:
    info, bundle = info_of(name, case), loaded[name, case]
    assert type(bundle).__name__ == "ForecastBundle"
    assert bundle.partition_id == info["partition_id"]
    assert dict(bundle.keys) == info["keys"]
    assert bundle.model_name == info["model_name"]
    assert bundle.freq == info["freq"]
    assert bundle.time_column == info["time_column"]
    assert list(bundle.covariates) == info["covariates"]
    assert bundle.horizon == info["horizon"]
    assert int(bundle.last_period) == info["last_period"]


CALLS = [(name, case, i) for name, case in ALL for i in range(len(info_of(name, case)["calls"]))]


@pytest.mark.parametrize(("name", "case", "index"), CALLS,
                         ids=[f"{n}-{c}-{info_of(n, c)['calls'][i]['name']}" for n, c, i in CALLS])
def test_predictions_equal_the_writing_release(loaded: dict, name: str, case: str, index: int) -> None:
    info, bundle = info_of(name, case), loaded[name, case]
    call = info["calls"][index]
    kwargs = dict(call["kwargs"])
    if "future" in kwargs:
        kwargs["future"] = future_rows(info)
    frame = bundle.predict(**kwargs)
    np.testing.assert_array_equal(frame["_period"].to_numpy(), np.asarray(call["periods"], dtype=np.int64))
    assert [str(t) for t in frame[info["time_column"]].astype(str)] == call["times"]
    np.testing.assert_allclose(frame["prediction"].to_numpy(dtype=np.float64), call["prediction"],
                               rtol=RTOL, atol=0)


@pytest.mark.parametrize(("name", "case"), ALL, ids=IDS)
def test_array_path_equals_the_writing_release(loaded: dict, name: str, case: str) -> None:
    """Serving's array path (no pandas) gives the stored numbers for the same future rows."""
    info, bundle = info_of(name, case), loaded[name, case]
    rows = future_rows(info)
    call = next(c for c in info["calls"] if c["name"] == "future_rows")
    periods = bundle.future_periods(rows)
    cov = rows[info["covariates"]].to_numpy(dtype=np.float64).reshape(len(rows), len(info["covariates"]))
    got_periods, pred = bundle.predict_arrays(periods, cov)
    np.testing.assert_array_equal(got_periods, np.asarray(call["periods"], dtype=np.int64))
    np.testing.assert_allclose(pred, call["prediction"], rtol=RTOL, atol=0)


# -- the format and its one loader --------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(BUNDLES))
def test_release_0_1_files_are_headerless_and_load_through_the_class_path_map(case: str) -> None:
    data = (FIXTURES / BUNDLES[case]["artifact"]).read_bytes()
    assert read_header(data) is None  # written before the format: no versions to compare
    assert b"shared.training" in data and ("shared.training", "ForecastBundle") in CLASS_PATHS
    bundle = load_artifact(data, f"fixture {case}")
    assert type(bundle) is ForecastBundle  # the class now lives in shared.models.bundle


@pytest.mark.parametrize("case", sorted(EXPECTED["format-1"]["bundles"]))
def test_this_release_writes_a_header_naming_the_class_and_the_library_versions(case: str) -> None:
    data = (SETS["format-1"] / info_of("format-1", case)["artifact"]).read_bytes()
    payload, header = split(data)
    assert read_header(data) == header
    assert header["format"] == FORMAT_VERSION == 1
    # written before the core was grouped into subpackages: the loader maps the module it names
    assert header["class"] == "shared.bundle.ForecastBundle" and MODULE_PATHS["shared.bundle"] == "shared.models.bundle"
    assert {"numpy", "pandas", "scikit-learn"} <= set(header["libraries"]) and header["python"]
    assert header["libraries"] == EXPECTED["format-1"]["versions"]
    assert load_artifact(data, f"fixture {case}").partition_id == info_of("format-1", case)["partition_id"]


def test_an_artifact_round_trips_and_records_this_process_versions(loaded: dict) -> None:
    bundle = loaded["v0.1", "gbm"]
    data = dump_artifact(bundle)
    header = read_header(data)
    assert header["libraries"]["scikit-learn"] == sklearn.__version__ == library_versions()["scikit-learn"]
    assert header["class"] == "shared.models.bundle.ForecastBundle"
    again = load_artifact(data, "a fresh artifact")
    pd.testing.assert_frame_equal(again.predict(horizon=9), bundle.predict(horizon=9))
    assert type(pickle.loads(data)) is ForecastBundle  # plain pickle (a rollback, a notebook) still reads it


def other_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}.0"


def test_a_different_scikit_learn_version_warns_naming_both_and_the_way_out() -> None:
    data = (SETS["format-1"] / "gbm.pkl").read_bytes()
    payload, header = split(data)
    old = other_minor(sklearn.__version__)
    stale = joined(payload, {**header, "libraries": {**header["libraries"], "scikit-learn": old}})
    expected = (f"model gbm was written with scikit-learn {old}; this process has scikit-learn "
                f"{sklearn.__version__}: it may load wrongly or not at all. Retrain it with this environment "
                f"(manymodels train --full) or pin scikit-learn=={old}")
    with pytest.warns(ArtifactVersionWarning) as caught:
        bundle = load_artifact(stale, "model gbm")
    assert [str(w.message) for w in caught] == [expected]
    call = info_of("format-1", "gbm")["calls"][0]
    np.testing.assert_allclose(bundle.predict()["prediction"], call["prediction"], rtol=RTOL)


def test_a_patch_release_of_scikit_learn_is_the_same_version(recwarn: pytest.WarningsRecorder) -> None:
    payload, header = split((SETS["format-1"] / "loglinear.pkl").read_bytes())
    major, minor = sklearn.__version__.split(".")[:2]
    patched = {**header["libraries"], "scikit-learn": f"{major}.{minor}.99"}
    load_artifact(joined(payload, {**header, "libraries": patched}), "model loglinear")
    assert not [w for w in recwarn if issubclass(w.category, ArtifactVersionWarning)]


def test_a_model_that_cannot_load_under_other_versions_says_which_versions() -> None:
    numpy_major = int(np.__version__.split(".")[0])
    old = {"scikit-learn": "0.24.2", "numpy": f"{numpy_major - 1}.26.4"}
    header = {**read_header(dump_artifact(None)), "libraries": old}
    artifact = joined(global_call("sklearn.ensemble._gone", "OldForest"), header)
    with pytest.warns(ArtifactVersionWarning), pytest.raises(ArtifactVersionError) as info:
        load_artifact(artifact, "model p1 v3 of the dev registry")
    message = str(info.value)
    assert f"written with scikit-learn 0.24.2, numpy {numpy_major - 1}.26.4" in message
    assert f"this process has scikit-learn {sklearn.__version__}, numpy {np.__version__}" in message
    assert "manymodels train --full" in message and "sklearn.ensemble._gone.OldForest" in message


REFUSED = [("os", "system"), ("posix", "system"), ("subprocess", "getoutput"), ("builtins", "eval"),
           ("builtins", "getattr"), ("pandas", "read_pickle"), ("numpy", "memmap"), ("numpy", "save"),
           ("pandas.io.pickle", "read_pickle"), ("shared.trust", "sha256_bytes"), ("pathlib", "Path")]


@pytest.mark.parametrize("with_header", [False, True], ids=["legacy", "format-1"])
@pytest.mark.parametrize(("module", "name"), REFUSED, ids=[f"{m}.{n}" for m, n in REFUSED])
def test_a_pickle_naming_code_outside_the_allow_list_is_refused(module: str, name: str,
                                                                with_header: bool) -> None:
    """Data is never code: neither the standard library, nor a library's functions, nor our own."""
    data = global_call(module, name)
    if with_header:
        data = joined(data, read_header(dump_artifact(None)))
    with pytest.raises(ArtifactRefusedError, match=rf"planted names {module}\.{name}, .*data is never code"):
        load_artifact(data, "planted")


def test_a_planted_callable_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return Path.touch, (marker,)

    with pytest.raises(ArtifactRefusedError, match="pathlib.Path.touch"):
        load_artifact(pickle.dumps(Planted()), "planted")
    assert not marker.exists()


class PlugIn(RegressorMixin, BaseEstimator):
    """An operator's estimator from a package of ``training.estimator_packages``."""

    def __init__(self, level: float = 1.0) -> None:
        self.level = level


def test_an_operator_estimator_package_loads_only_when_the_caller_allows_it() -> None:
    data = dump_artifact(PlugIn(level=3.0))
    with pytest.raises(ArtifactRefusedError, match="PlugIn"):
        load_artifact(data, "plug-in")
    assert load_artifact(data, "plug-in", packages=[PlugIn.__module__.split(".")[0]]).level == 3.0


def test_an_artifact_of_a_newer_format_asks_for_an_upgrade() -> None:
    payload, header = split(dump_artifact({"coef": [1.0]}))
    with pytest.raises(ArtifactFormatError, match="format 2, newer than this release reads .1.: upgrade"):
        load_artifact(joined(payload, {**header, "format": 2}), "model p1")


def test_bytes_that_are_no_artifact_are_a_format_error() -> None:
    with pytest.raises(ArtifactFormatError, match="neither a manymodels artifact, a pickle nor a joblib"):
        load_artifact(b"not a pickle", "garbage")
