"""Property-based campaign (hypothesis) over the data contract and the message and HTTP bodies.

Whatever the input — random schemas and types, NaN and infinities, unicode and path-like keys,
dates from any century, integer periods of any size, any JSON — the answer is either a clear
error (a ``ManyModelsError`` / ``MessageError`` naming what is wrong, a 400) or a consistent
result, never a traceback, never a 500, and nothing is written outside the lake. Example counts
are small and fixed (derandomized, no example database) so the suite stays fast and repeatable;
``MM_PROPERTY_SCALE=20`` multiplies them and randomizes the search for a deeper campaign.
"""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared.config import MESSAGE_OVERRIDES, ConfigError, ProjectConfig
from shared.errors import ManyModelsError
from shared.keys import PARTITION_ID
from shared.data.timegrid import PERIOD
from shared.data.validation import validate

# MM_PROPERTY_SCALE=20 runs a deeper, randomized campaign (the suite runs the fixed, fast one).
SCALE = int(os.environ.get("MM_PROPERTY_SCALE", "1"))
FAST = settings(max_examples=100 * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=25 * SCALE)

# -- strategies ----------------------------------------------------------------------------------
# Most values are well formed (so the repairs and the result get exercised), some are hostile.
GOOD_KEYS = st.sampled_from(["S1", "S2", "../../etc/passwd", "/tmp/x", "..", "C:\\evil", "a/b", "ü", "🙂",
                             "007", "NaN", " "])
BAD_KEYS = st.one_of(st.none(), st.text(max_size=6), st.integers(-3, 3), st.sampled_from(["", "\x00"]))
GOOD_FLOATS = st.one_of(st.floats(0, 1000), st.integers(0, 50))
BAD_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.none(), st.integers(-5, -1),
                       st.sampled_from(["1.5", "x", "", "true"]))
BAD_DATES = st.one_of(
    st.datetimes(min_value=pd.Timestamp("1000-01-01").to_pydatetime()),  # any century up to 9999
    st.sampled_from(["", "soon", "2020-13-45", None]),
)
BAD_INTS = st.one_of(st.integers(-(2**62), 2**62), st.sampled_from([1.5, "7", None, float("nan")]))


def mostly(draw, good, bad, n: int, hostile_one_in: int = 12) -> list:
    """``n`` values, each from ``bad`` with probability about 1/hostile_one_in."""
    # hypothesis favours boundary values (0, the maximum): "hostile" is a value in the middle
    return [draw(bad) if draw(st.integers(0, hostile_one_in - 1)) == hostile_one_in // 2 else draw(good)
            for _ in range(n)]


@st.composite
def raw_frames(draw):
    """A long frame in the contract's shape, with hostile values, and a matching project config."""
    freq = draw(st.sampled_from(["D", "W", "MS", "int"]))
    n_keys = draw(st.integers(1, 2))
    keys = ["store", "item"][:n_keys]
    n = draw(st.integers(1, 30))
    frame = {k: mostly(draw, GOOD_KEYS, BAD_KEYS, n) for k in keys}
    offsets = st.integers(0, 40)
    if freq == "int":
        frame["date"] = mostly(draw, offsets, BAD_INTS, n)
    else:
        start = pd.Timestamp("2020-01-05")
        step = {"D": "D", "W": "W", "MS": "MS"}[freq]
        good = offsets.map(lambda k: (start + pd.tseries.frequencies.to_offset(step) * k))
        frame["date"] = mostly(draw, good, BAD_DATES, n)
        if draw(st.booleans()):  # as text, the way a CSV holds them
            frame["date"] = [d.strftime("%Y-%m-%d") if isinstance(d, (pd.Timestamp,)) or hasattr(d, "strftime")
                             else d for d in frame["date"]]
    frame["sales"] = mostly(draw, GOOD_FLOATS, BAD_FLOATS, n)
    covariates = draw(st.sampled_from([[], ["price"]]))
    for c in covariates:
        frame[c] = mostly(draw, GOOD_FLOATS, BAD_FLOATS, n)
    df = pd.DataFrame(frame)
    if draw(st.integers(0, 9)) == 5:
        df = df.drop(columns=[draw(st.sampled_from(list(df.columns)))])  # a missing column
    policy = {
        "validation.null_keys": draw(st.sampled_from(["error", "drop"])),
        "validation.null_target": draw(st.sampled_from(["drop", "zero", "error"])),
        "validation.negative_target": draw(st.sampled_from(["clip", "drop", "keep", "error"])),
        "validation.duplicates": draw(st.sampled_from(["sum", "last", "error"])),
        "validation.gaps": draw(st.sampled_from(["zero", "interpolate", "keep"])),
        "validation.null_covariates": draw(st.sampled_from(["ffill", "zero", "error"])),
    }
    cfg = ProjectConfig().with_overrides({"data.keys": keys, "data.freq": freq, "data.covariates": covariates,
                                          **policy})
    return df, cfg


def check_consistent(frame: pd.DataFrame, cfg: ProjectConfig, out: pd.DataFrame, report) -> None:
    """What a validated frame promises downstream."""
    assert report.input_rows == len(frame) and report.output_rows == len(out) > 0
    assert report.partitions == out[PARTITION_ID].nunique()
    ids, periods = out[PARTITION_ID].to_numpy(), out[PERIOD].to_numpy()
    order = np.lexsort((periods, ids))
    assert (order == np.arange(len(out))).all(), "rows not sorted by partition and period"
    assert not out.duplicated([PARTITION_ID, PERIOD]).any()
    target = out[cfg.data.target].to_numpy(dtype=float)
    assert np.isfinite(target).all()
    if cfg.validation.negative_target != "keep":
        assert (target >= 0).all()
    for c in cfg.data.covariates:
        assert np.isfinite(out[c].to_numpy(dtype=float)).all()
    if cfg.data.freq != "int":
        times = pd.to_datetime(out[cfg.data.time])
        assert times.min() >= pd.Timestamp("1678-01-01") and times.max() <= pd.Timestamp("2262-01-01")
    assert out[cfg.data.keys].notna().all().all()


@FAST
@given(raw_frames())
def test_validation_gives_a_clear_error_or_a_consistent_frame(case):
    frame, cfg = case
    try:
        out, report = validate(frame, cfg)
    except ManyModelsError as exc:
        assert str(exc).strip()  # a message naming the problem
        event(f"refused: {getattr(exc, 'rule', str(exc))[:40]}")
        return
    event("validated")
    check_consistent(frame, cfg, out, report)


@SLOW
@given(raw_frames(), st.sampled_from(["csv", "parquet"]), st.booleans())
def test_ingest_through_a_file_writes_only_inside_the_lake(case, kind, stream):
    """In memory or streamed through bucket files and worker processes (tiny parts)."""
    from shared.lake import LocalLake
    from shared.data.streaming import StreamPlan, ingest_source

    frame, cfg = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "input" / f"data.{kind}"
        source.parent.mkdir()
        (root / "tmp").mkdir()
        try:
            if kind == "csv":
                frame.to_csv(source, index=False)
            else:
                frame.astype({c: str for c in frame.columns if frame[c].dtype == object}).to_parquet(source)
        except (ValueError, TypeError, OverflowError):
            return  # pandas cannot even write this frame: nothing to ingest
        before = {p for p in root.rglob("*")}
        try:
            plan = StreamPlan(batch_rows=7, buckets=16, part_rows=5, workers=1, worker_mb=64) if stream else None
            dataset, report = ingest_source(LocalLake(root / "lake"), source, cfg, tmp_root=root / "tmp",
                                            stream=stream, plan=plan)
        except ManyModelsError as exc:
            assert str(exc).strip()
            event(f"{'streamed' if stream else 'in memory'}: refused")
        else:
            assert dataset.n_partitions == report.partitions > 0
            event(f"{'streamed' if stream else 'in memory'}: ingested")
        written = {p for p in root.rglob("*")} - before
        lake = (root / "lake").resolve()
        outside = [p for p in written if lake not in p.resolve().parents and p.resolve() != lake]
        assert not outside, f"written outside the lake: {outside}"


# -- messages and HTTP bodies --------------------------------------------------------------------
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)
CONFIG_KEYS = st.one_of(st.sampled_from(sorted(MESSAGE_OVERRIDES)),
                        st.sampled_from(["training.extra_candidates", "data.keys", "runner.workers",
                                         "store.sqlite_file", "training.estimator_packages", "x", ""]),
                        st.text(max_size=12))
CONFIG_VALUES = st.one_of(JSON, st.integers(-5, 2000), st.sampled_from([["baseline"], ["baseline", "gbm"],
                                                                        ["production", "baseline"], "wape", True]))
OPTIONS = st.fixed_dictionaries({}, optional={
    "group_size": JSON | st.integers(-2, 5), "min_accuracy": JSON | st.floats(-1, 2),
    "config": st.dictionaries(CONFIG_KEYS, CONFIG_VALUES, max_size=4) | JSON,
})
MESSAGES = st.fixed_dictionaries({"type": st.sampled_from(["dataset-ready", "retrain", "score", "promote", "x"])},
                                 optional={"path": st.sampled_from(["raw/a.csv", "raw/../x.csv", "/etc/passwd",
                                                                    "scoring/f.parquet", "raw/a.txt"]) | JSON,
                                           "partitions": st.just("all") | JSON,
                                           "dataset_id": st.just("d0123456789abcdef") | JSON,
                                           "horizon": st.integers(-2, 10**6) | JSON,
                                           "options": OPTIONS | JSON, "etag": JSON})


@FAST
@given(st.one_of(MESSAGES, JSON))
def test_upstream_messages_are_parsed_or_refused_by_field(body):
    from function_app.messages import MessageError, parse_upstream_message

    try:
        parsed = parse_upstream_message(json.dumps(body))
    except MessageError as exc:
        assert exc.field and exc.reason
        return
    config = parsed.request.options.config
    assert all(k in MESSAGE_OVERRIDES for k in config)  # only data options get through
    try:
        ProjectConfig().with_overrides(config)
    except ConfigError as exc:
        assert str(exc)


@FAST
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_are_parsed_or_refused(raw):
    from function_app.messages import MessageError, parse_promotion_message, parse_upstream_message

    for parse in (parse_upstream_message, parse_promotion_message):
        try:
            parse(raw)
        except MessageError as exc:
            assert exc.field


@pytest.fixture(scope="module")
def http_app(tmp_path_factory):
    """A real workspace with one ingested dataset, the app's handlers and a fake Durable extension."""
    from azure.durable_functions.models.utils import http_utils

    from durable_harness import FakeDurableExtension, app_functions
    from shared.runs import pipeline
    from shared.settings import Settings
    from shared.data.synthetic import write_panel

    root = tmp_path_factory.mktemp("props-ws")
    raw = root / "lake" / "raw"
    raw.mkdir(parents=True)
    write_panel(raw / "sales.csv", partitions=3, periods=40, seed=5)
    ws = pipeline.Workspace.open(root, settings=Settings(workdir=root), overrides={"runner.progress": False})
    pipeline.ingest(ws, "raw/sales.csv")
    loop = asyncio.new_event_loop()
    fake = FakeDurableExtension()
    mp = pytest.MonkeyPatch()
    mp.setenv("MM_WORKDIR", str(root))
    mp.setenv("MM_LAKE_BACKEND", "local")
    yield loop, fake, app_functions()
    mp.undo()
    fake.close()
    loop.run_until_complete(http_utils._close_session())
    loop.close()


HTTP_BODIES = st.one_of(
    st.fixed_dictionaries({}, optional={"dataset": st.sampled_from(["raw/sales.csv", "raw/../sales.csv", "x"]) | JSON,
                                        "dataset_id": JSON, "partitions": JSON | st.just("all"),
                                        "options": OPTIONS | JSON, "request_id": JSON,
                                        "run_id": JSON, "min_accuracy": JSON, "horizon": JSON, "data": JSON}),
    JSON,
)


@settings(FAST, max_examples=40 * SCALE, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["start_training_run", "start_promotion_run", "start_scoring_run"]), HTTP_BODIES)
def test_http_starts_answer_2xx_or_400_never_500(http_app, name, body):
    import azure.functions as func

    loop, fake, functions = http_app
    request = func.HttpRequest("POST", "https://app/api/x", headers={"Content-Type": "application/json"},
                               route_params={}, body=json.dumps(body).encode())
    function = functions[name].get_user_function()
    response = loop.run_until_complete(function(client=fake.client_json(), req=request))
    event(f"{name} {response.status_code}")
    assert response.status_code in (200, 202, 400, 404, 409), (response.status_code, response.get_body()[:300])
    if response.status_code >= 400:
        out = json.loads(response.get_body())
        assert out.get("error") and "Traceback" not in out["error"]


def test_http_errors_show_no_server_paths(http_app, tmp_path_factory):
    import azure.functions as func

    loop, fake, functions = http_app
    request = func.HttpRequest("POST", "https://app/api/promote", headers={"Content-Type": "application/json"},
                               route_params={}, body=b"{}")
    response = loop.run_until_complete(functions["start_promotion_run"].get_user_function()(
        client=fake.client_json(), req=request))
    assert response.status_code == 400
    assert str(tmp_path_factory.getbasetemp()) not in response.get_body().decode()


# -- real-time predict bodies --------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    """A Predictor over a real trained and promoted workdir (the same one every front end uses)."""
    from shared.runs.pipeline import run_all
    from shared.serving import ServingOptions, open_predictor
    from shared.data.synthetic import write_panel
    from shared.runs.workspace import Workspace

    root = tmp_path_factory.mktemp("props-serve")
    write_panel(root / "p.csv", partitions=3, periods=70, freq="W", seed=6)
    ws = Workspace.open(root / "w", overrides={"runner.progress": False, "runner.workers": 1,
                                               "forecast.test_periods": 6}, remember=False)
    run_all(ws, root / "p.csv", min_accuracy=0.0, progress=False)
    keys = [r.keys for r in ws.dev.find(latest_only=True)]
    predictor = open_predictor(ws, ServingOptions(max_rows=50, max_body_bytes=1 << 16, check_interval_ms=0))
    yield predictor, keys, ws.root
    predictor.close()


PREDICT_DATES = st.one_of(st.dates(min_value=pd.Timestamp("1500-01-01").date()).map(str),
                          st.sampled_from(["2024-06-02", "2026-01-04", "9999-12-31", "0001-01-01", "", "soon"]),
                          st.integers(-(2**63), 2**63), JSON)
PREDICT_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 5e-324,
                           "1e400", "NaN", "", None, True]), st.integers(-(2**70), 2**70), JSON)


@st.composite
def predict_bodies(draw, keys):
    body = {}
    if draw(st.integers(0, 9)):
        body["keys"] = draw(st.sampled_from(keys) | st.dictionaries(st.sampled_from(["store", "item", "x"]),
                                                                    JSON, max_size=3) | JSON)
    if draw(st.booleans()):
        body["rows"] = draw(st.lists(st.fixed_dictionaries({"date": PREDICT_DATES}, optional={
            "price": PREDICT_VALUES, "promo": PREDICT_VALUES, "other": JSON}), max_size=6) | JSON)
    if draw(st.integers(0, 2)) == 0:
        body["horizon"] = draw(st.integers(-5, 10**6) | JSON)
    return body


@settings(FAST, max_examples=60 * SCALE)
@given(st.data())
def test_predict_bodies_answer_200_or_4xx_never_500_quickly_and_without_paths(predictor, data):
    import time as _time

    serving, keys, root = predictor
    body = data.draw(predict_bodies(keys))
    raw = json.dumps(body, allow_nan=True).encode() if data.draw(st.booleans()) else body
    started = _time.perf_counter()
    response = serving.handle(raw)
    assert _time.perf_counter() - started < 5
    event(f"predict {response.status}")
    assert response.status in (200, 400, 404, 413), response.body
    text = response.json_bytes().decode()  # always valid JSON: no NaN, no infinity
    assert str(root) not in text and "Traceback" not in text
    if response.status >= 400:
        assert response.body["error"] and response.body.get("field") or response.status == 404
