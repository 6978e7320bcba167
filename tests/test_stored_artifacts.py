"""Model artifacts written by release 0.1 still load through the registry and forecast the same numbers.

The registry's artifacts are pickled ``ForecastBundle``s: they pin module paths (shared.training,
shared.candidates, shared.features) and the bundles' attribute layout. The fixtures under
tests/fixtures/artifacts-v0.1/ were written by the release itself (tests/fixtures/make_artifacts_v0_1.py,
run against release 0.1 to regenerate); if this test fails after a refactor, the refactor broke every
model already registered in a workspace, which is what this guard is for.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.registry import ModelRegistry

FIXTURES = Path(__file__).parent / "fixtures" / "artifacts-v0.1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
BUNDLES = EXPECTED["bundles"]
RTOL = 1e-9


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every fixture registered in a fresh registry, then loaded back by the registry's own load path."""
    registry = ModelRegistry(tmp_path_factory.mktemp("registry") / "dev", "dev")
    records = registry.register_many(
        ({"partition_id": info["partition_id"], "run_id": f"release-0.1-{case}", "keys": info["keys"],
          "model_name": info["model_name"], "status": info["status"]}, FIXTURES / info["artifact"])
        for case, info in BUNDLES.items()
    )
    try:
        return {case: registry.load(record) for case, record in zip(BUNDLES, records)}
    finally:
        registry.close()


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
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert total < 400_000, f"fixtures grew to {total} bytes"


@pytest.mark.parametrize("case", sorted(BUNDLES))
def test_bundle_identity_survives(loaded: dict, case: str) -> None:
    info, bundle = BUNDLES[case], loaded[case]
    assert type(bundle).__name__ == "ForecastBundle"
    assert bundle.partition_id == info["partition_id"]
    assert dict(bundle.keys) == info["keys"]
    assert bundle.model_name == info["model_name"]
    assert bundle.freq == info["freq"]
    assert bundle.time_column == info["time_column"]
    assert list(bundle.covariates) == info["covariates"]
    assert bundle.horizon == info["horizon"]
    assert int(bundle.last_period) == info["last_period"]


CALLS = [(case, i, call["name"]) for case, info in sorted(BUNDLES.items()) for i, call in enumerate(info["calls"])]


@pytest.mark.parametrize(("case", "index", "name"), CALLS, ids=[f"{c}-{n}" for c, _, n in CALLS])
def test_predictions_equal_release_0_1(loaded: dict, case: str, index: int, name: str) -> None:
    info, bundle = BUNDLES[case], loaded[case]
    call = info["calls"][index]
    kwargs = dict(call["kwargs"])
    if "future" in kwargs:
        kwargs["future"] = future_rows(info)
    frame = bundle.predict(**kwargs)
    np.testing.assert_array_equal(frame["_period"].to_numpy(), np.asarray(call["periods"], dtype=np.int64))
    assert [str(t) for t in frame[info["time_column"]].astype(str)] == call["times"]
    np.testing.assert_allclose(frame["prediction"].to_numpy(dtype=np.float64), call["prediction"],
                               rtol=RTOL, atol=0)


@pytest.mark.parametrize("case", sorted(BUNDLES))
def test_array_path_equals_release_0_1(loaded: dict, case: str) -> None:
    """Serving's array path (no pandas) gives the stored numbers for the same future rows."""
    info, bundle = BUNDLES[case], loaded[case]
    rows = future_rows(info)
    call = next(c for c in info["calls"] if c["name"] == "future_rows")
    periods = bundle.future_periods(rows)
    cov = rows[info["covariates"]].to_numpy(dtype=np.float64).reshape(len(rows), len(info["covariates"]))
    got_periods, pred = bundle.predict_arrays(periods, cov)
    np.testing.assert_array_equal(got_periods, np.asarray(call["periods"], dtype=np.int64))
    np.testing.assert_allclose(pred, call["prediction"], rtol=RTOL, atol=0)
