"""The SQL result store: one schema, upserts that never duplicate, on every backend we can run.

Backends under test: the native SQLite file, the same SQLite file through unixODBC and Debian's
SQLite3 ODBC driver, and a real PostgreSQL server started on 127.0.0.1 through its ODBC driver.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.results.sql_schema import integer_keys
from shared.results.result_store import (
    OdbcStore,
    SQLiteStore,
    SqlTypes,
    StoreError,
    build_schema,
    create_table_sql,
    open_store,
    upsert_sql,
)


def _odbc_drivers() -> list[str]:
    try:
        import pyodbc
    except ImportError:
        return []
    return pyodbc.drivers()


# -- a real PostgreSQL server for the session, if the binaries and the ODBC driver are here --------
def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_dsn():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    if "PostgreSQL Unicode" not in _odbc_drivers():
        pytest.skip("the PostgreSQL ODBC driver (Debian package odbc-postgresql) is not installed")
    # PostgreSQL refuses to run as root: run it as the 'postgres' user then, in a folder it owns.
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="mm-pg-"))
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root and 'runuser' is missing to start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, user="postgres")
    port = _free_port()
    data = base / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w",
                    "-o", f"-h 127.0.0.1 -p {port} -k {base} -F", "start"], check=True, capture_output=True)
    try:
        yield f"Driver=PostgreSQL Unicode;Server=127.0.0.1;Port={port};Database=postgres;Uid=postgres;"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


_pg_db_counter = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "odbc-sqlite", "odbc-postgresql"])
def make_store(request, tmp_path):
    """A factory of stores on one fresh database, so a test can reopen it with another config."""
    kind = request.param
    opened = []
    if kind == "sqlite":
        def factory(keys=("store", "item"), time_column="date", freq="W", int_keys=()):
            return SQLiteStore(tmp_path / "results.sqlite", keys, time_column, freq, int_keys)
    elif kind == "odbc-sqlite":
        if "SQLite3" not in _odbc_drivers():
            pytest.skip("the SQLite3 ODBC driver (Debian packages unixodbc + libsqliteodbc) is not installed")

        def factory(keys=("store", "item"), time_column="date", freq="W", int_keys=()):
            return OdbcStore(f"Driver=SQLite3;Database={tmp_path / 'results.sqlite'}", "sqlite",
                             keys, time_column, freq, int_keys)
    else:
        base_dsn = request.getfixturevalue("postgres_dsn")
        import pyodbc

        db = f"mm_test_{next(_pg_db_counter)}_{os.getpid()}"
        admin = pyodbc.connect(base_dsn, autocommit=True)
        admin.execute(f"CREATE DATABASE {db}")
        admin.close()
        dsn = base_dsn.replace("Database=postgres", f"Database={db}")

        def factory(keys=("store", "item"), time_column="date", freq="W", int_keys=()):
            return OdbcStore(dsn, "postgresql", keys, time_column, freq, int_keys)

    def tracked(*args, **kwargs):
        store = factory(*args, **kwargs)
        opened.append(store)
        return store

    tracked.kind = kind
    yield tracked
    for store in opened:
        store.close()


def predictions(n_partitions=3, horizon=4, value=1.0, run_id="r1"):
    rows = []
    for p in range(n_partitions):
        for h in range(horizon):
            rows.append({"store": f"s{p}", "item": p, "date": pd.Timestamp("2024-01-07") + pd.Timedelta(weeks=h),
                         "prediction": value + p + h / 10, "model": "gbm", "model_version": 1,
                         "run_id": run_id, "partition_id": f"p{p}", "is_fallback": 0, "score_id": "sc1"})
    return pd.DataFrame(rows)


# -- behaviour shared by every backend ------------------------------------------------------------
def test_predictions_upsert_never_duplicates_and_keeps_the_latest_values(make_store):
    store = make_store()
    assert store.upsert_predictions(predictions(value=1.0)) == 12
    assert store.upsert_predictions(predictions(value=5.0)) == 12
    assert store.count("predictions") == 12
    got = store.query('SELECT "store", "item", "date", prediction, model_version, is_fallback '
                      'FROM predictions WHERE partition_id = ? ORDER BY "date"', ["p1"])
    assert got["store"].tolist() == ["s1"] * 4
    assert got["item"].tolist() == ["1"] * 4  # key values stored as canonical text
    # a typed DATE: date objects through ODBC, ISO text from Python's sqlite3 (no date type there)
    assert [str(d) for d in got["date"]] == ["2024-01-07", "2024-01-14", "2024-01-21", "2024-01-28"]
    assert got["prediction"].tolist() == pytest.approx([6.0, 6.1, 6.2, 6.3])
    assert got["model_version"].tolist() == [1] * 4


def test_all_tables_exist_with_key_and_time_columns_under_their_own_names(make_store):
    store = make_store()
    for table in ("predictions", "forecast_history", "model_metrics", "promotions", "backtests", "runs",
                  "actuals", "effects"):
        assert store.count(table) == 0
    cols = store.query("SELECT * FROM predictions WHERE 1 = 0").columns.tolist()
    assert cols == ["store", "item", "date", "prediction", "model", "model_version", "run_id",
                    "partition_id", "is_fallback", "score_id", "scored_at", "source", "lower", "upper"]
    assert {"store", "item", "date"} <= set(store.query("SELECT * FROM backtests WHERE 1 = 0").columns)


def test_a_store_from_an_earlier_release_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)  # the predictions table as release 0.1 created it
    conn.execute("CREATE TABLE predictions (store TEXT, item TEXT, date TEXT, prediction REAL, model TEXT, "
                 "model_version INTEGER, run_id TEXT, partition_id TEXT, is_fallback INTEGER, score_id TEXT, "
                 "scored_at TEXT, PRIMARY KEY (partition_id, date))")
    conn.execute("INSERT INTO predictions VALUES ('s', 'i', '2025-01-05', 1.5, 'gbm', 1, 'r', 'p1', 0, 's1', 'now')")
    conn.commit()
    conn.close()
    store = SQLiteStore(path, keys=["store", "item"], time_column="date", freq="W")
    rows = store.query("SELECT prediction, source, lower, upper FROM predictions")
    assert rows["prediction"].tolist() == [1.5] and rows["source"].isna().all() and rows["lower"].isna().all()
    store.close()


def test_metrics_accept_train_result_rows_and_upsert_per_partition_and_run(make_store):
    store = make_store()
    row = {"partition_id": "p0", "keys": {"store": "s0", "item": "7"}, "status": "trained", "reason": None,
           "model_name": "gbm", "metrics": {"wape": 0.2, "mape": 0.25, "rmse": 3.0, "accuracy": 0.75},
           "baseline_metrics": {"wape": 0.4}, "n_observed": 150, "fit_seconds": 0.05, "run_id": "r1",
           "model_version": 3, "registry": "dev"}
    failed = {"partition_id": "p1", "keys": {"store": "s1", "item": "8"}, "status": "failed",
              "reason": "ValueError: boom", "model_name": None, "metrics": {}, "baseline_metrics": {},
              "n_observed": 3, "fit_seconds": 0.0, "run_id": "r1"}
    store.upsert_metrics([row, failed])
    store.upsert_metrics([{**row, "metrics": {**row["metrics"], "wape": 0.1}}])
    got = store.query("SELECT * FROM model_metrics ORDER BY partition_id")
    assert len(got) == 2
    first = got.iloc[0]
    assert (first["store"], first["item"], first["model"], first["status"]) == ("s0", "7", "gbm", "trained")
    assert first["wape"] == pytest.approx(0.1) and first["baseline_wape"] == pytest.approx(0.4)
    assert first["accuracy"] == pytest.approx(0.75) and first["model_version"] == 3
    assert got.iloc[1]["reason"] == "ValueError: boom" and pd.isna(got.iloc[1]["wape"])
    store.upsert_metrics([{**row, "run_id": "r2"}])  # a new run is a new row
    assert store.count("model_metrics") == 3


def test_promotions_backtests_and_runs_are_upserts_too(make_store):
    store = make_store()
    decision = {"partition_id": "p0", "keys": {"store": "s0", "item": "1"}, "run_id": "r1",
                "decision": "rejected", "reason": "accuracy 0.70 < 0.80", "metric": "accuracy", "value": 0.7,
                "threshold": 0.8, "champion_value": None, "prod_version": None}
    store.upsert_promotions([decision])
    store.upsert_promotions([{**decision, "decision": "promoted", "reason": "ok", "prod_version": 1}])
    got = store.query("SELECT decision, reason, prod_version, decided_at, store FROM promotions")
    assert got.to_dict("records")[0] | {"decided_at": None} == {
        "decision": "promoted", "reason": "ok", "prod_version": 1, "decided_at": None, "store": "s0"}
    assert got["decided_at"].iloc[0]  # defaulted to the time of the load

    bt = pd.DataFrame({"partition_id": "p0", "store": "s0", "item": "1", "run_id": "r1",
                       "date": pd.date_range("2023-10-01", periods=5, freq="W"),
                       "actual": [1.0, 2, 3, 4, 5], "prediction": [1.5, 2, 2.5, 4, 6]})
    store.upsert_backtests(bt)
    store.upsert_backtests(bt.assign(prediction=0.0))
    got = store.query("SELECT * FROM backtests")
    assert len(got) == 5 and got["prediction"].eq(0.0).all() and got["baseline"].isna().all()

    store.record_run("r1", "train", time.time() - 10, 9.5, {"trained": 3, "failed": 1})
    store.record_run("r1", "train", time.time() - 10, 8.0, {"trained": 4, "failed": 0})
    store.record_run("r1", "score", "2024-05-01T10:00:00", 2.0, {})
    runs = store.query("SELECT * FROM runs ORDER BY stage")
    assert runs["stage"].tolist() == ["score", "train"]
    assert json.loads(runs["counts"].iloc[1]) == {"failed": 0, "trained": 4}
    assert pd.Timestamp(runs["finished_at"].iloc[0]).replace(tzinfo=None) == pd.Timestamp("2024-05-01T10:00:02")


def test_key_values_are_bound_never_spliced_into_sql(make_store):
    store = make_store()
    evil = "x'); DROP TABLE predictions; --"
    frame = predictions(1, 2).assign(store=evil)
    store.upsert_predictions(frame)
    got = store.query('SELECT "store" FROM predictions WHERE "store" = ?', [evil])
    assert got["store"].tolist() == [evil, evil]


def test_integer_periods_are_stored_as_integers(make_store):
    store = make_store(keys=("well",), time_column="week", freq="int")
    frame = pd.DataFrame({"well": ["w1"] * 3, "week": [201, 202, 203], "prediction": [1.0, 2.0, 3.0],
                          "partition_id": "p1", "model": "baseline", "model_version": 1, "run_id": "r",
                          "is_fallback": 1})
    store.upsert_predictions(frame)
    store.upsert_predictions(frame)
    got = store.query('SELECT "week" FROM predictions WHERE "week" > ? ORDER BY "week"', [201])
    assert got["week"].tolist() == [202, 203]


def test_a_store_opened_with_other_columns_refuses_with_a_clear_error(make_store):
    make_store().upsert_predictions(predictions())
    with pytest.raises(StoreError, match="table predictions has columns .*expects"):
        make_store(keys=("region",)).count("predictions")


def test_a_bad_load_writes_nothing(make_store):
    store = make_store()
    store.upsert_predictions(predictions(value=1.0))
    bad = predictions(value=9.0).astype({"date": object})
    bad.loc[5, "date"] = "not a date"
    with pytest.raises(StoreError, match="'date'.*not a date"):
        store.upsert_predictions(bad)
    with pytest.raises(StoreError, match="key column"):
        store.upsert_predictions(predictions().drop(columns=["partition_id"]))
    got = store.query("SELECT prediction FROM predictions ORDER BY partition_id, \"date\"")
    assert len(got) == 12 and got["prediction"].max() < 9


# -- SQLite specifics ------------------------------------------------------------------------------
def test_open_store_default_is_a_sqlite_file_readable_with_python_sqlite3(tmp_path):
    store = open_store(ProjectConfig(), tmp_path)
    store.upsert_predictions(predictions())
    store.close()
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute('SELECT "store", "item", "date", prediction, model, model_version, run_id '
                            "FROM predictions ORDER BY partition_id, \"date\" LIMIT 1").fetchall()
    assert rows == [("s0", "0", "2024-01-07", 1.0, "gbm", 1, "r1")]


def test_odbc_and_native_sqlite_share_one_schema(tmp_path):
    if "SQLite3" not in _odbc_drivers():
        pytest.skip("the SQLite3 ODBC driver (Debian packages unixodbc + libsqliteodbc) is not installed")
    path = tmp_path / "results.sqlite"
    with OdbcStore(f"Driver=SQLite3;Database={path}", "sqlite") as via_odbc:
        via_odbc.upsert_predictions(predictions(value=1.0))
    with SQLiteStore(path) as native:  # same columns: no schema-mismatch error, upsert hits the same keys
        native.upsert_predictions(predictions(value=2.0))
        assert native.count("predictions") == 12


def test_hundred_thousand_predictions_load_in_one_statement_per_chunk_not_per_row(tmp_path):
    n_part, horizon = 8_334, 12
    frame = pd.DataFrame({
        "store": np.repeat(np.arange(n_part) % 50, horizon).astype(str),
        "item": np.repeat(np.arange(n_part), horizon),
        "date": np.tile(pd.date_range("2024-01-07", periods=horizon, freq="W").to_numpy(), n_part),
        "prediction": np.random.default_rng(0).random(n_part * horizon),
        "model": "gbm", "model_version": 1, "run_id": "r1",
        "partition_id": np.repeat([f"p{i}" for i in range(n_part)], horizon), "is_fallback": 0,
    })
    with SQLiteStore(tmp_path / "results.sqlite") as store:
        started = time.perf_counter()
        store.upsert_predictions(frame)
        store.upsert_predictions(frame)
        seconds = (time.perf_counter() - started) / 2
        assert store.count("predictions") == n_part * horizon
    # ~1.5 s for both tables on an idle 2-core machine; a row-by-row load would take minutes
    assert seconds < 15.0, f"{seconds:.2f} s per 100k-row upsert"


def test_open_store_odbc_reads_the_connection_string_from_the_named_setting(tmp_path, monkeypatch):
    cfg = ProjectConfig().with_overrides({"store.backend": "odbc", "store.odbc_connection_setting": "MM_TEST_SQL"})
    monkeypatch.delenv("MM_TEST_SQL", raising=False)
    with pytest.raises(StoreError, match="MM_TEST_SQL"):
        open_store(cfg, tmp_path)
    monkeypatch.setenv("MM_TEST_SQL", f"Driver=SQLite3;Database={tmp_path / 'x.sqlite'}")
    store = open_store(cfg, tmp_path)
    assert isinstance(store, OdbcStore) and store.dialect == "sqlite" and not store.fast_executemany
    assert "Database" not in store.describe()  # connection strings may hold secrets


# -- identifiers and dialects ----------------------------------------------------------------------
@pytest.mark.parametrize("keys, time_column, message", [
    (["store; DROP TABLE x"], "date", "not a plain SQL identifier"),
    (["store"], 'date"', "not a plain SQL identifier"),
    (["model"], "date", "clash with the store's own column names"),
    (["store"], "run_id", "clash"),
])
def test_column_names_must_be_plain_identifiers_that_do_not_clash(keys, time_column, message):
    with pytest.raises(StoreError, match=message):
        build_schema(keys, time_column)


def test_mssql_uses_merge_bracket_quoting_indexable_keys_and_fast_executemany():
    table = build_schema(["store", "item"], "date")["predictions"]
    types = SqlTypes(time="date", int_keys=frozenset({"item"}))
    sql = upsert_sql(table, "mssql", types)
    assert sql.startswith("MERGE INTO [predictions] WITH (HOLDLOCK) AS tgt USING "
                          "(SELECT CAST(? AS NVARCHAR(MAX)) AS [store], CAST(? AS BIGINT) AS [item]")
    assert "CAST(? AS DATE) AS [date]" in sql and "CAST(? AS FLOAT) AS [prediction]" in sql
    assert "CAST(? AS DATETIME2) AS [scored_at]" in sql
    assert "CAST(? AS BIGINT) AS [date]" in upsert_sql(build_schema(["store"], "date")["predictions"], "mssql",
                                                       SqlTypes(time="int"))
    assert "CAST(? AS DATETIME2) AS [date]" in upsert_sql(table, "mssql", SqlTypes(time="timestamp"))
    assert "ON tgt.[partition_id] = src.[partition_id] AND tgt.[date] = src.[date]" in sql
    assert sql.count("?") == len(table.columns)
    ddl = create_table_sql(table, "mssql", types)
    assert "[date] DATE NOT NULL" in ddl and "[store] NVARCHAR(MAX)" in ddl and "[item] BIGINT" in ddl
    assert ddl.startswith("IF OBJECT_ID(N'predictions', N'U') IS NULL CREATE TABLE")
    assert OdbcStore("Driver=x", "mssql").fast_executemany
    assert not OdbcStore("Driver=x", "postgresql").fast_executemany
    with pytest.raises(StoreError, match="dialect"):
        OdbcStore("Driver=x", "oracle")


def test_a_load_that_fails_inside_the_database_is_rolled_back_as_a_whole(tmp_path):
    with SQLiteStore(tmp_path / "results.sqlite") as store:
        store.upsert_predictions(predictions(value=1.0))
        store.conn.execute("CREATE TRIGGER refuse BEFORE UPDATE ON predictions WHEN NEW.prediction > 100 "
                           "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        frame = predictions(value=50.0)
        frame.loc[len(frame) - 1, "prediction"] = 500.0  # the last row fails after the others were written
        with pytest.raises(sqlite3.IntegrityError, match="refused"):
            store.upsert_predictions(frame)
        assert store.query("SELECT MAX(prediction) AS m FROM predictions")["m"].iloc[0] < 10


# -- BI-ready outputs: vintages, the latest forecast, per-series summary, typed columns ------------
def _vintage(score_id, scored_at, horizon, value):
    return predictions(n_partitions=2, horizon=horizon, value=value).assign(score_id=score_id, scored_at=scored_at)


def test_every_vintage_is_kept_and_predictions_latest_holds_only_the_newest_forecast(make_store):
    store = make_store()
    store.upsert_predictions(_vintage("s-old", "2024-01-01T08:00:00.000+00:00", horizon=8, value=1.0))
    store.upsert_predictions(_vintage("s-new", "2024-01-08T08:00:00.000+00:00", horizon=4, value=5.0))
    store.upsert_predictions(_vintage("s-new", "2024-01-08T08:00:00.000+00:00", horizon=4, value=5.0))  # rerun
    history = store.query("SELECT score_id, COUNT(*) AS n FROM forecast_history GROUP BY score_id ORDER BY score_id")
    assert dict(zip(history["score_id"], history["n"])) == {"s-new": 8, "s-old": 16}
    # the plain table mixes vintages (periods 5-8 still from the old run); the view does not
    assert store.count("predictions") == 16
    latest = store.query('SELECT partition_id, "date", prediction, score_id FROM predictions_latest')
    assert len(latest) == 8 and set(latest["score_id"]) == {"s-new"}
    assert not latest.duplicated(["partition_id", "date"]).any()
    assert latest["prediction"].min() >= 5.0
    # what did we forecast for a period a week ago? the old vintage answers
    old = store.query('SELECT prediction FROM forecast_history WHERE score_id = ? AND partition_id = ? '
                      'ORDER BY "date"', ["s-old", "p0"])
    assert old["prediction"].tolist() == pytest.approx([1.0 + h / 10 for h in range(8)])


def test_a_partition_scored_alone_later_moves_only_its_own_latest_rows(make_store):
    store = make_store()
    store.upsert_predictions(_vintage("s1", "2024-01-01T08:00:00.000+00:00", horizon=4, value=1.0))
    only_p1 = _vintage("s2", "2024-01-02T08:00:00.000+00:00", horizon=4, value=9.0).query("partition_id == 'p1'")
    store.upsert_predictions(only_p1)
    latest = store.query("SELECT partition_id, score_id FROM predictions_latest").drop_duplicates()
    assert sorted(map(tuple, latest.to_numpy())) == [("p0", "s1"), ("p1", "s2")]


def test_series_summary_says_model_source_accuracy_and_last_promotion_per_series(make_store):
    store = make_store()
    store.upsert_predictions(predictions(n_partitions=2, horizon=3).assign(source="production"))
    store.upsert_metrics([{"partition_id": "p0", "keys": {"store": "s0", "item": "0"}, "run_id": "r1",
                           "status": "trained", "model_name": "gbm", "metrics": {"wape": 0.2, "accuracy": 0.8},
                           "baseline_metrics": {"wape": 0.3}}])
    for when, decision, reason in (("2024-01-01T00:00:00+00:00", "rejected", "accuracy 0.70 < 0.75"),
                                   ("2024-02-01T00:00:00+00:00", "promoted", "accuracy 0.80 >= 0.75")):
        store.upsert_promotions([{"partition_id": "p0", "keys": {"store": "s0", "item": "0"},
                                  "run_id": f"r-{decision}", "decision": decision, "reason": reason,
                                  "decided_at": when}])
    got = store.query("SELECT * FROM series_summary ORDER BY partition_id")
    assert got["partition_id"].tolist() == ["p0", "p1"] and got["periods"].tolist() == [3, 3]
    first = got.iloc[0]
    assert (first["model"], first["source"], first["last_decision"]) == ("gbm", "production", "promoted")
    assert first["wape"] == pytest.approx(0.2) and first["accuracy"] == pytest.approx(0.8)
    assert first["last_decision_reason"] == "accuracy 0.80 >= 0.75"
    assert first["total_prediction"] == pytest.approx(3 * 1.0 + 0.3)
    assert pd.isna(got.iloc[1]["wape"]) and pd.isna(got.iloc[1]["last_decision"])  # no metrics, no decision


def _declared_types(store, table):
    if isinstance(store, SQLiteStore) or store.dialect == "sqlite":
        rows = store.query(f"SELECT name, type FROM pragma_table_info('{table}')")
        return {r["name"]: r["type"].upper() for _, r in rows.iterrows()}
    rows = store.query("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?",
                       [table])
    return {r["column_name"]: r["data_type"].upper() for _, r in rows.iterrows()}


@pytest.mark.parametrize("freq, expected", [("W", "DATE"), ("h", "TIMESTAMP")])
def test_dates_and_integer_keys_are_typed_columns(make_store, freq, expected):
    store = make_store(int_keys=["item"], freq=freq)
    frame = predictions(n_partitions=2, horizon=2)
    if freq == "h":
        frame["date"] = pd.Timestamp("2024-01-07 10:00") + pd.to_timedelta(np.tile([0, 1], 2), unit="h")
    store.upsert_predictions(frame)
    types = _declared_types(store, "predictions")
    assert types["date"].startswith(expected) and types["scored_at"].startswith("TIMESTAMP")
    assert types["item"] in ("INTEGER", "BIGINT") and types["store"] == "TEXT"
    got = store.query('SELECT "item", "date" FROM predictions_latest WHERE "item" = ? ORDER BY "date"', [1])
    assert got["item"].tolist() == [1, 1]  # an integer again, filterable as one
    assert pd.Timestamp(str(got["date"].iloc[0])) == pd.Timestamp(frame["date"].iloc[2])


def test_a_non_integer_key_for_an_integer_key_column_is_refused_by_name(make_store):
    store = make_store(int_keys=["item"])
    store.upsert_predictions(predictions())
    with pytest.raises(StoreError, match="key column 'item' holds integers.*'007'"):
        store.upsert_predictions(predictions().assign(item="007"))


def test_integer_keys_are_asked_for_only_when_the_tables_are_made(tmp_path):
    asked = []

    def int_keys():
        asked.append(1)
        return ["item"]

    with SQLiteStore(tmp_path / "r.sqlite", int_keys=int_keys) as store:
        store.upsert_predictions(predictions())
    with SQLiteStore(tmp_path / "r.sqlite", int_keys=int_keys) as store:
        assert store.count("predictions") == 12
    assert asked == [1]
    assert integer_keys({"a": ["1", "22", "-3"], "b": ["1", "007"], "c": [1.5], "d": np.array([4, 5])}) == \
        frozenset({"a", "d"})


def test_actuals_and_effects_are_upserts(make_store):
    store = make_store()
    actual = pd.DataFrame({"partition_id": "p0", "store": "s0", "item": "0", "run_id": "r1",
                           "date": pd.date_range("2023-10-01", periods=4, freq="W"), "actual": [1.0, 2, 3, 4]})
    store.upsert_actuals(actual)
    store.upsert_actuals(actual.assign(actual=7.0))
    assert store.query("SELECT actual FROM actuals")["actual"].tolist() == [7.0] * 4
    effect = {"partition_id": "p0", "keys": {"store": "s0", "item": "0"}, "run_id": "r1", "model": "loglm",
              "covariate": "price", "measure": "elasticity", "value": -1.8}
    store.upsert_effects([effect, {**effect, "covariate": "promo", "measure": "lift", "value": 0.35}])
    store.upsert_effects([{**effect, "value": -1.5}])
    got = store.query("SELECT covariate, measure, value FROM effects ORDER BY covariate")
    assert got.to_dict("records") == [{"covariate": "price", "measure": "elasticity", "value": -1.5},
                                      {"covariate": "promo", "measure": "lift", "value": 0.35}]
