"""Issue 12, written as the attacks and faults they are: code through a message, code through a
model file, copies that share damage, and data that used to crash or hang ingestion.

Messages go through the app's real handlers (the worker's Service Bus message type, an HTTP
request) with the real Durable client against a fake extension on 127.0.0.1; model files are real
registries on disk holding the real ForecastBundles of release 0.1; data goes through the CLI.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import azure.functions as func
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from registry_tools import damage_model
from azure.functions.servicebus import ServiceBusMessage as WorkerServiceBusMessage

from durable_harness import FakeDurableExtension, app_functions
from shared.config import ConfigError, ProjectConfig, load_config
from shared.registries.registry import ArtifactIntegrityError, ModelRecord, ModelRegistry, RegistryError
from shared.trust import UntrustedCodeError, estimator_class
from shared.data.validation import DataValidationError, validate

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "artifacts-v0.1"
BUNDLES = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))["bundles"]
ATTACK = [{"name": "x", "estimator": "subprocess.Popen", "params": {"args": "id>PWNED", "shell": True}}]


class Payload:
    """Unpickling this creates the file it names: the proof that a model file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# -- 1. code execution through a message ------------------------------------------------------
@pytest.fixture
def app_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_WORKDIR", str(tmp_path / "ws"))
    monkeypatch.setenv("MM_LAKE_BACKEND", "local")
    monkeypatch.chdir(tmp_path)  # where "id>PWNED" would write
    return tmp_path


@pytest.fixture
def durable():
    from azure.durable_functions.models.utils import http_utils

    loop = asyncio.new_event_loop()
    fake = FakeDurableExtension()
    yield loop, fake
    fake.close()
    loop.run_until_complete(http_utils._close_session())
    loop.close()


def call(durable, name: str, **kwargs):
    loop, fake = durable
    function = app_functions()[name].get_user_function()
    return loop.run_until_complete(function(client=fake.client_json(), **kwargs))


def servicebus(body: dict | bytes) -> WorkerServiceBusMessage:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return WorkerServiceBusMessage(body=data, message_id="attack-1", delivery_count=1,
                                   application_properties={}, user_properties={},
                                   content_type="application/json")


def test_a_retrain_message_naming_code_is_dead_lettered_and_runs_nothing(app_env, durable, caplog):
    from function_app.messages import MessageError

    body = {"type": "retrain", "partitions": "all",
            "options": {"config": {"training.extra_candidates": ATTACK, "training.candidates": ["x"]}}}
    with caplog.at_level(logging.INFO, logger="manymodels.functions"), pytest.raises(MessageError) as caught:
        call(durable, "on_upstream_message", message=servicebus(body))
    assert caught.value.field == "options.config"
    assert "training.extra_candidates" in caught.value.reason and "not an option a message may set" in caught.value.reason
    assert "upstream message rejected" in caplog.text
    assert durable[1].starts == [] and not (app_env / "PWNED").exists()


def test_an_http_start_naming_code_gets_400_and_runs_nothing(app_env, durable):
    body = {"options": {"config": {"training.extra_candidates": ATTACK}}}
    request = func.HttpRequest("POST", "https://app/api/train", headers={"Content-Type": "application/json"},
                               route_params={}, body=json.dumps(body).encode())
    response = call(durable, "start_training_run", req=request)
    assert response.status_code == 400
    out = json.loads(response.get_body())
    assert out["field"] == "options.config" and "training.extra_candidates" in out["error"]
    assert durable[1].starts == [] and not (app_env / "PWNED").exists()


@pytest.mark.parametrize("config, words", [
    ({"training.estimator_packages": ["subprocess"]}, "not an option a message may set"),
    ({"data.keys": ["store"]}, "not an option a message may set"),
    ({"store.sqlite_file": "/etc/cron.d/x"}, "not an option a message may set"),
    ({"runner.workers": 10_000}, "not an option a message may set"),
    ({"forecast.horizon": 10**9}, "forecast.horizon: 1000000000 is out of bounds: must be a whole number from 1 to"),
    ({"forecast.horizon": {"$gt": 1}}, "forecast.horizon"),
    ({"training.candidates": ["baseline", {"estimator": "os.system"}]}, "training.candidates"),
    ({"promotion.min_value": "1; DROP TABLE"}, "promotion.min_value"),
    ({"training.ensemble": "yes"}, "training.ensemble: must be true or false"),
    ({"forecast": {"horizon": 3}}, "not an option a message may set"),
])
def test_message_config_is_data_from_an_allow_list(config, words):
    from function_app.messages import MessageError, parse_train_request

    with pytest.raises(MessageError) as caught:
        parse_train_request({"options": {"config": config}})
    assert caught.value.field == "options.config" and words in caught.value.reason


def test_allowed_message_options_still_work_and_candidates_must_be_configured():
    from function_app.messages import parse_train_request

    request = parse_train_request({"options": {"config": {"forecast.horizon": 8, "training.folds": 3,
                                                          "training.candidates": ["baseline", "loglinear"]}}})
    cfg = ProjectConfig().with_overrides(request.options.config)
    assert cfg.forecast.horizon == 8 and cfg.training.candidates == ["baseline", "loglinear"]
    unknown = parse_train_request({"options": {"config": {"training.candidates": ["rf"]}}})
    with pytest.raises(ConfigError, match="unknown candidate"):  # not configured by the operator
        ProjectConfig().with_overrides(unknown.options.config)


@pytest.mark.parametrize("body, words", [
    (b"[" * 100_000, "nested too deeply"),
    (b'{"type": "retrain", "partitions": "all", "options": {"group_size": NaN}}', "not a JSON number"),
    (b'{"type": "score", "horizon": Infinity}', "not a JSON number"),
    (b"{" + b" " * (2 << 20) + b"}", "larger than"),
])
def test_hostile_json_bodies_are_message_errors(body, words):
    from function_app.messages import MessageError, parse_upstream_message

    with pytest.raises(MessageError, match=words):
        parse_upstream_message(body)


def test_the_project_file_names_only_regressors_of_allowed_packages(tmp_path):
    project = tmp_path / "mm.toml"
    project.write_text('[[training.extra_candidates]]\nname = "x"\nestimator = "subprocess.Popen"\n'
                       'params = { args = "id>PWNED", shell = true }\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="subprocess.Popen.*not under an allowed package"):
        load_config(project)
    project.write_text('[training]\nestimator_packages = ["os"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="standard-library"):
        load_config(project)
    project.write_text('[[training.extra_candidates]]\nname = "x"\nestimator = "sklearn.utils._testing.x"\n',
                       encoding="utf-8")
    with pytest.raises(ConfigError, match="public names"):
        load_config(project)
    ok = tmp_path / "ok.toml"
    ok.write_text('[[training.extra_candidates]]\nname = "rf"\nestimator = "sklearn.ensemble.RandomForestRegressor"\n',
                  encoding="utf-8")
    assert load_config(ok).training.extra_candidates[0].name == "rf"


@pytest.mark.parametrize("path, words", [
    ("subprocess.Popen", "not under an allowed package"),
    ("sklearn.datasets.dump_svmlight_file", "not a scikit-learn regressor class"),  # writes files when called
    ("lightgbm.Booster", "not a scikit-learn regressor class"),  # reads a model file when called
    ("sklearn.preprocessing.StandardScaler", "not a scikit-learn regressor class"),
    ("sklearn.linear_model.NoSuch", "cannot import"),
])
def test_estimator_classes_are_checked_before_anything_is_called(path, words):
    with pytest.raises(UntrustedCodeError, match=words):
        estimator_class(path)


def test_allowed_regressors_resolve():
    from sklearn.linear_model import Ridge

    assert estimator_class("sklearn.linear_model.Ridge") is Ridge
    assert estimator_class("lightgbm.LGBMRegressor").__name__ == "LGBMRegressor"


# -- 2. code execution through a model file; independent production copies -------------------
@pytest.fixture
def registries(tmp_path):
    """dev holds the four release-0.1 bundles; prod holds promoted copies of them."""
    dev = ModelRegistry(tmp_path / "registry" / "dev", "dev")
    prod = ModelRegistry(tmp_path / "registry" / "prod", "prod")
    records = dev.register_many(  # the four bundles share one partition: give each its own id
        ({"partition_id": f"p{i:020d}", "run_id": f"r-{case}", "keys": {"store": f"S{i}", "item": "I1"},
          "model_name": info["model_name"], "status": info["status"]}, FIXTURES / info["artifact"])
        for i, (case, info) in enumerate(sorted(BUNDLES.items())))
    prod.copy_many(dev, records)
    yield dev, prod
    dev.close()
    prod.close()


def test_a_pickle_dropped_over_a_production_model_is_refused_unread(tmp_path, registries):
    from shared.forecasts.model_cache import ModelCache, ModelLoadError

    dev, prod = registries
    victim, other = sorted(r.partition_id for r in prod.find(latest_only=True))[:2]
    marker = tmp_path / "PWNED"
    damage_model(prod, prod.latest(victim), pickle.dumps(Payload(marker)))  # over its bytes in the pack

    cache = ModelCache(prod, dev)  # what the server builds at start
    with pytest.raises(ModelLoadError) as caught:
        cache.get(victim)
    assert "does not match the SHA-256" in str(caught.value) and victim in str(caught.value)
    assert cache.get(other).partition_id == other  # the partition fails alone
    with pytest.raises(ArtifactIntegrityError):
        prod.load(prod.latest(victim))
    assert not marker.exists()


def test_a_file_the_index_does_not_name_is_never_loaded(tmp_path, registries):
    _, prod = registries
    pid = prod.find(latest_only=True)[0].partition_id
    marker = tmp_path / "PWNED"
    planted = prod.root / "artifacts" / pid / "v2.pkl"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(pickle.dumps(Payload(marker)))
    assert prod.latest(pid).version == 1  # the index decides what exists
    forged = ModelRecord(pid, 2, "mm-x", "gbm", "r-x", "", artifact=f"artifacts/{pid}/v2.pkl",
                         sha256="0" * 64)
    with pytest.raises(ArtifactIntegrityError, match="not in its index"):
        prod.load(forged)
    escaped = ModelRecord(pid, 1, "mm-x", "gbm", "r-x", "", artifact="../../../etc/passwd")
    assert prod.load(escaped) is not None  # the index's own record (and path) is what is read
    assert not marker.exists()


def test_production_dev_and_run_copies_are_independent_files(tmp_path, registries):
    dev, prod = registries
    run_file = FIXTURES / "gbm.pkl"
    pid = dev.find(tags={"model_type": "gbm"})[0].partition_id
    dev_path, prod_path = dev.artifact_path(dev.latest(pid)), prod.artifact_path(prod.latest(pid))
    inodes = {os.stat(p).st_ino for p in (run_file, dev_path, prod_path)}
    assert len(inodes) == 3 and all(os.stat(p).st_nlink == 1 for p in (dev_path, prod_path))
    with open(dev_path, "r+b") as fh:  # corrupt the dev copy in place (its range of the dev pack)
        fh.seek(dev.latest(pid).byte_offset + 100)
        fh.write(b"\x00" * 64)
    with pytest.raises(ArtifactIntegrityError):
        dev.load(dev.latest(pid))
    assert prod.load(prod.latest(pid)).model_name == "gbm"  # production and its fallback are untouched
    with pytest.raises(ArtifactIntegrityError, match="changed after it was written"):
        ModelRegistry(tmp_path / "prod2", "prod").copy_many(dev, [dev.latest(pid)])  # never promote it


def legacy_registry(root: Path) -> ModelRegistry:
    """A registry as release 0.1 left it: a file per model (``artifacts/<pid>/v<n>.pkl``), no
    digest column, no byte ranges, schema 1."""
    reg = ModelRegistry(root, "dev")
    records = reg.register_many(({"partition_id": f"p{i:020d}", "run_id": f"r-{case}"}, FIXTURES / info["artifact"])
                                for i, (case, info) in enumerate(sorted(BUNDLES.items())))
    files = []
    for rec in records:
        path = root / "artifacts" / rec.partition_id / f"v{rec.version}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(reg.raw_bytes(rec))
        files.append((f"artifacts/{rec.partition_id}/v{rec.version}.pkl", rec.partition_id))
    reg.close()
    with sqlite3.connect(root / "index.sqlite") as conn:
        conn.executemany("UPDATE models SET artifact = ? WHERE partition_id = ?", files)
        for column in ("sha256", "byte_offset", "byte_length"):
            conn.execute(f"ALTER TABLE models DROP COLUMN {column}")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
        conn.execute("UPDATE models SET created_at = '2024-01-01T00:00:00+00:00'")
    for pack in (root / "artifacts" / "packs").iterdir():
        pack.unlink()
    return ModelRegistry(root, "dev")


def test_an_old_registry_loads_with_a_warning_then_is_sealed(tmp_path, caplog):
    reg = legacy_registry(tmp_path / "old")
    records = reg.find()
    assert records and all(r.sha256 == "" for r in records)
    with caplog.at_level(logging.WARNING, logger="manymodels.registry"):
        assert type(reg.load(records[0])).__name__ == "ForecastBundle"
    assert "predates artifact digests" in caplog.text
    promoted = ModelRegistry(tmp_path / "prod", "prod").copy_many(reg, records)
    assert all(len(r.sha256) == 64 for r in promoted)  # promotion records what it copied
    assert all(not r.packed for r in records)  # whole files, read as before packs
    assert reg.seal() == len(records) and reg.seal() == 0
    reg.artifact_path(records[0]).write_bytes(b"tampered after sealing")
    with pytest.raises(ArtifactIntegrityError):
        reg.load(records[0])


def test_a_record_without_digest_made_after_the_upgrade_is_refused(tmp_path):
    reg = legacy_registry(tmp_path / "old")
    rec = reg.find()[0]
    with sqlite3.connect(reg.root / "index.sqlite") as conn:  # e.g. an old release writing to it
        conn.execute("UPDATE models SET created_at = '2999-01-01T00:00:00+00:00' WHERE partition_id = ?",
                     (rec.partition_id,))
    with pytest.raises(ArtifactIntegrityError, match="no recorded SHA-256"):
        reg.load(rec)


# -- 8. data that used to crash or hang ingestion ---------------------------------------------
def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def small_panel(days: int = 28) -> pd.DataFrame:
    return pd.DataFrame({"store": "S1", "item": "I1", "date": pd.date_range("2020-01-01", periods=days, freq="D"),
                         "sales": 1.0, "price": 1.0, "promo": 0})


@pytest.mark.parametrize("kind", ["far-csv", "old-csv", "far-parquet", "nested-parquet", "nested-key", "sparse-int"])
def test_hostile_data_is_a_clear_exit_2(tmp_path, kind):
    frame = small_panel()
    args = []
    if kind in ("far-csv", "old-csv"):
        frame["date"] = frame["date"].dt.strftime("%Y-%m-%d")
        frame.loc[3, "date"] = "9999-12-31" if kind == "far-csv" else "1500-01-01"
        frame.to_csv(data := tmp_path / "in.csv", index=False)
        words = "date outside the supported range"
    elif kind == "far-parquet":
        import datetime as dt

        table = pa.Table.from_pandas(frame, preserve_index=False)
        dates = [d.date() for d in frame["date"]]
        dates[3] = dt.date(9999, 12, 31)
        table = table.set_column(table.schema.get_field_index("date"), "date", pa.array(dates, pa.date32()))
        pq.write_table(table, data := tmp_path / "in.parquet")
        words = "date outside the supported range"
    elif kind in ("nested-parquet", "nested-key"):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        column, values = ("price", [[1.0]] * len(frame)) if kind == "nested-parquet" else ("store", [{"a": 1}] * len(frame))
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
        pq.write_table(table, data := tmp_path / "in.parquet")
        words = f"column '{column}': nested values"
        args = ["--covariates", "price,promo"]
    else:
        frame["date"] = [1, 500_000, 100_000_000] + list(range(100_000_001, 100_000_026))
        frame.to_csv(data := tmp_path / "in.csv", index=False)
        args = ["--freq", "int"]
        words = "too sparse to fill the gaps"
    out = cli("ingest", "--data", str(data), "--workdir", str(tmp_path / "ws"), *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr


def test_nested_columns_are_refused_on_the_streaming_path_too(tmp_path):
    from shared.lake import LocalLake
    from shared.data.streaming import StreamPlan, ingest_source

    frame = small_panel()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.set_column(table.schema.get_field_index("store"), "store", pa.array([{"a": 1}] * len(frame)))
    pq.write_table(table, data := tmp_path / "in.parquet")
    plan = StreamPlan(batch_rows=8, buckets=16, part_rows=10, workers=1, worker_mb=64)
    with pytest.raises(DataValidationError, match="column 'store': nested values"):
        ingest_source(LocalLake(tmp_path / "lake"), data, ProjectConfig(), stream=True, plan=plan)


def test_daily_data_read_as_weekly_reports_its_repairs_and_warns():
    frame = pd.concat([small_panel(178).assign(item=f"I{i}") for i in range(1)], ignore_index=True)
    out, report = validate(frame, ProjectConfig())
    assert report.input_rows == 178 and report.output_rows == len(out) < 30
    assert report.repairs()["merged_duplicates"] == 178 - report.output_rows
    [warning] = report.warnings(freq="W")
    assert "merged" in warning and "freq='W'" in warning and "data.freq" in warning
    assert any(line.startswith("warning: ") for line in report.summary_lines())


def test_key_columns_named_like_manifest_columns_or_standard_tags_are_config_errors():
    for name in ("batch", "n_rows", "version", "status"):
        with pytest.raises(ConfigError, match="data.keys"):
            ProjectConfig().with_overrides({"data.keys": ["store", name]})


def test_registry_errors_are_user_errors():
    assert issubclass(ArtifactIntegrityError, RegistryError)
    from shared.errors import ManyModelsError

    assert issubclass(UntrustedCodeError, ManyModelsError)


def test_null_keys_in_batches_typed_differently_give_the_in_memory_error_when_streamed(tmp_path):
    """Found by the property campaign: a covariate read as numbers in one scan batch and as text
    in another broke the streamed null-key examples (Arrow could not merge them)."""
    from shared.lake import LocalLake
    from shared.data.streaming import StreamPlan, ingest_source

    n = 17
    frame = pd.DataFrame({"store": ["S1"] * n, "item": ["S1"] * n, "date": ["2020-01-05"] * n,
                          "sales": [0.0] * n, "price": [0.0] * n}).astype({"price": object})
    frame.loc[4, "price"], frame.loc[9, "price"] = None, "x"
    frame.loc[6, "store"], frame.loc[13, "item"] = None, None
    frame.to_csv(data := tmp_path / "in.csv", index=False)
    cfg = ProjectConfig().with_overrides({"data.covariates": ["price"], "data.freq": "D"})
    messages = []
    for stream in (False, True):
        plan = StreamPlan(batch_rows=7, buckets=16, part_rows=5, workers=1, worker_mb=64) if stream else None
        with pytest.raises(DataValidationError, match="partition key is null") as caught:
            ingest_source(LocalLake(tmp_path / f"lake-{stream}"), data, cfg, stream=stream, plan=plan)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


def test_candidates_resolve_estimators_through_the_allow_list_before_calling_anything(tmp_path, monkeypatch):
    """Case 1 at the last line of defence: even a config that skipped validation (an old run's saved
    config, a hand-made ProjectConfig) cannot make training call subprocess.Popen."""
    from shared.models.candidates import CandidateError, SklearnForecaster, check_candidates, resolve_estimator
    from shared.config import CandidateSpec

    monkeypatch.chdir(tmp_path)
    cfg = ProjectConfig()
    cfg.training.extra_candidates = [CandidateSpec("x", "subprocess.Popen", {"args": "touch PWNED", "shell": True})]
    cfg.training.candidates = ["baseline", "x"]
    with pytest.raises(CandidateError, match="not under an allowed package"):
        check_candidates(cfg)
    with pytest.raises(CandidateError, match="not under an allowed package"):
        SklearnForecaster("subprocess.Popen", {"args": "touch PWNED", "shell": True}).fit([[1.0]], [1.0])
    with pytest.raises(CandidateError, match="not a scikit-learn regressor"):
        resolve_estimator("sklearn.preprocessing.StandardScaler")
    assert not (tmp_path / "PWNED").exists()
    assert resolve_estimator("sklearn.linear_model.Lasso", {"alpha": 0.1}).alpha == 0.1


def test_a_model_file_changed_between_the_worker_and_registration_is_refused(tmp_path):
    """Case 2 one step earlier: the training worker records each artifact's SHA-256 in its row and
    the global model's beside it; a file replaced in the run folder before registration (or before
    a training worker unpickles the global model) is refused unread."""
    from shared import layout
    from shared.runs.pipeline import plan_training, register_run, train_global, train_group
    from shared.registries.registration import result_rows
    from shared.trust import DigestMismatchError
    from shared.runs.workspace import Workspace
    from shared.data.synthetic import write_panel

    write_panel(tmp_path / "p.csv", partitions=3, periods=70, freq="W", seed=1)
    ws = Workspace.open(tmp_path / "w", overrides={"runner.workers": 1, "runner.progress": False,
                                                   "forecast.test_periods": 6}, remember=False)
    from shared.runs.pipeline import ingest

    ingest(ws, tmp_path / "p.csv")
    plan = plan_training(ws)
    train_global(ws, plan.run_id)
    marker = tmp_path / "PWNED"
    global_file = ws.lake.local_path(layout.global_model(plan.run_id))
    good_global = global_file.read_bytes()
    global_file.write_bytes(pickle.dumps(Payload(marker)))
    from shared.runs.runner import RunnerError

    with pytest.raises(RunnerError, match="does not match the SHA-256 its writer recorded"):
        train_group(ws, plan.run_id, plan.groups[0])  # the workers' init() refuses it
    assert not marker.exists()
    global_file.write_bytes(good_global)
    train_group(ws, plan.run_id, plan.groups[0])
    rows = result_rows(ws.lake, layout.run_results(plan.run_id))
    assert all(len(r["sha256"]) == 64 for r in rows if r.get("artifact"))
    victim = next(r for r in rows if r.get("artifact"))
    pack = ws.lake.local_path(f"{layout.run_models(plan.run_id)}/{victim['artifact']}")
    planted = pickle.dumps(Payload(marker))
    with open(pack, "r+b") as fh:  # over the victim's bytes in its chunk's pack, same length
        fh.seek(victim["byte_offset"])
        fh.write((planted + b"\0" * victim["byte_length"])[:victim["byte_length"]])
    with pytest.raises(ArtifactIntegrityError):
        register_run(ws, plan.run_id)
    global_file.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DigestMismatchError):
        from shared.registries.registration import global_record

        global_record(ws.lake, plan.run_id, rows)
    assert not marker.exists() and ws.dev.count() == 0


# -- issue 18: a key value or a covariate no store or model can use is refused at ingestion -------
@pytest.mark.parametrize("kind, fmt", [("long-key", "csv"), ("long-key", "parquet"), ("huge-covariate", "csv")])
def test_a_key_too_long_or_a_covariate_too_large_is_exit_2_naming_the_column_and_the_bound(tmp_path, kind, fmt):
    """A 50 MB key value used to hold the workdir lock for minutes at 11 GB (the report's charts); a
    covariate of 1e300 overflows every feature built from it."""
    frame = small_panel()
    if kind == "long-key":
        frame["store"] = frame["store"].astype(object)
        frame.loc[5:, "store"] = "S" * 5000
        column, words = "store", ["5,000 characters", "1,024"]
    else:
        frame.loc[4, "price"] = 1e300
        column, words = "price", ["1e+15", "absolute value"]
    data = tmp_path / f"in.{fmt}"
    frame.to_csv(data, index=False) if fmt == "csv" else frame.to_parquet(data, index=False)
    out = cli("ingest", "--data", str(data), "--workdir", str(tmp_path / "ws"), "--freq", "D",
              "--covariates", "price,promo", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"column '{column}'" in out.stderr and all(w in out.stderr for w in words), out.stderr
    assert "S" * 200 not in out.stderr and "Traceback" not in out.stderr  # the value is quoted by its start only
    assert not list((tmp_path / "ws" / "lake").glob("prepared/*/dataset.json"))


def test_a_key_too_long_is_refused_on_the_streaming_path_too(tmp_path):
    from shared.lake import LocalLake
    from shared.data.streaming import StreamPlan, ingest_source

    frame = small_panel()
    frame["store"] = "S" * 2000
    frame.to_parquet(data := tmp_path / "in.parquet", index=False)
    plan = StreamPlan(batch_rows=8, buckets=16, part_rows=10, workers=1, worker_mb=64)
    with pytest.raises(DataValidationError, match="column 'store': partition key value too long: 2,000 characters"):
        ingest_source(LocalLake(tmp_path / "lake"), data, ProjectConfig(), stream=True, plan=plan)
