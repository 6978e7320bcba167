"""The SQL schema of the result store: tables, views and the DDL of each dialect.

One definition serves SQLite, PostgreSQL and SQL Server; the dialects differ only in column
types, identifier quoting and the upsert statement. Columns are typed for the tools that read
them (Power BI, Excel, SQL clients): the data's time column is DATE (daily or coarser), TIMESTAMP
(below a day) or BIGINT (integer periods); our own instants (``scored_at``...) are TIMESTAMP; a
key column whose values are all plain integers is BIGINT, any other key TEXT.

SQLite has no date type: there the declared type names the meaning (``DATE``, ``TIMESTAMP``, which
its ODBC driver and Python's ``detect_types`` honour) and the values stay ISO text, so that rows
written by every release compare and sort alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pandas as pd

from shared.config import CHOICES
from shared.errors import ManyModelsError
from shared.keys import PARTITION_ID
from shared.data.timegrid import period_freq

DIALECTS = CHOICES["store.dialect"]
TABLES = ("predictions", "forecast_history", "model_metrics", "promotions", "backtests", "runs", "actuals",
          "effects")
VIEWS = ("predictions_latest", "series_summary")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN_INTEGER = re.compile(r"^-?(0|[1-9][0-9]{0,17})$")  # no leading zeros: "007" is a code, not a number


class StoreError(ManyModelsError, ValueError):
    """The store cannot accept a load or a query (bad column, schema mismatch, missing setting)."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # text | key | int | real | time (the data's time column) | stamp (an instant, UTC)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


@dataclass(frozen=True)
class SqlTypes:
    """What the data's columns hold: the time column's kind and which key columns are integers."""

    time: str = "date"  # date | timestamp | int
    int_keys: frozenset[str] = field(default_factory=frozenset)


def check_identifier(name: str) -> str:
    """Only plain identifiers are ever quoted into SQL text; anything else is refused."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or len(name) > 100:
        raise StoreError(f"column name {name!r} is not a plain SQL identifier (letters, digits, underscore)")
    return name


def time_kind(freq: str) -> str:
    """``int`` for integer periods, ``timestamp`` below a day, ``date`` for daily or coarser data."""
    if freq == "int":
        return "int"
    p = pd.Period("2020-01-01", freq=period_freq(freq))
    return "timestamp" if (p.end_time - p.start_time) < pd.Timedelta(hours=23) else "date"


def plain_integer(value: object) -> bool:
    """7 or "7" or "-12", never "007", "7.5" or "7e3": a key value that is a number, not a code."""
    return bool(_PLAIN_INTEGER.match(str(value)))


def integer_keys(values: Mapping[str, Sequence[object]]) -> frozenset[str]:
    """The key columns whose every value is a plain integer (:func:`plain_integer`)."""
    out = set()
    for name, column in values.items():
        series = pd.Series(column)
        if len(series) and (pd.api.types.is_integer_dtype(series.dtype) or series.map(plain_integer).all()):
            out.add(name)
    return frozenset(out)


# Columns added after the first release, per table: an older store gains them on open.
ADDED_COLUMNS = {"predictions": ("source", "lower", "upper"), "backtests": ("global_forecast",)}


def build_schema(keys: Sequence[str], time_column: str) -> dict[str, Table]:
    """Every table for a data spec: key and time columns appear under their own names."""
    for name in (*keys, time_column):
        check_identifier(name)
    key_cols = tuple(Column(k, "key") for k in keys)
    time = Column(time_column, "time")

    def table(name: str, head: tuple[Column, ...], tail: list[tuple[str, str]], key: tuple[str, ...]) -> Table:
        cols = head + tuple(Column(n, kind) for n, kind in tail)
        names = [c.name for c in cols]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise StoreError(f"table {name}: data column(s) {clash} clash with the store's own column names; "
                             "rename them in the data spec")
        return Table(name, cols, key)

    pid = (Column(PARTITION_ID, "text"),)
    forecast = [("prediction", "real"), ("model", "text"), ("model_version", "int"), ("run_id", "text"),
                (PARTITION_ID, "text"), ("is_fallback", "int"), ("score_id", "text"), ("scored_at", "stamp"),
                ("source", "text"), ("lower", "real"), ("upper", "real")]
    return {
        # the newest forecast of each (partition, period), whichever scoring wrote it
        "predictions": table("predictions", key_cols + (time,), forecast, (PARTITION_ID, time_column)),
        # every forecast ever loaded, by vintage (score id): what did we forecast for week 40 a month ago?
        "forecast_history": table("forecast_history", key_cols + (time,), forecast,
                                  (PARTITION_ID, time_column, "score_id")),
        "model_metrics": table("model_metrics", pid + key_cols, [
            ("run_id", "text"), ("model", "text"), ("model_version", "int"), ("status", "text"),
            ("reason", "text"), ("wape", "real"), ("mape", "real"), ("rmse", "real"), ("accuracy", "real"),
            ("baseline_wape", "real"), ("n_observed", "int"), ("fit_seconds", "real"), ("registry", "text"),
        ], (PARTITION_ID, "run_id")),
        "promotions": table("promotions", pid + key_cols, [
            ("run_id", "text"), ("decision", "text"), ("reason", "text"), ("metric", "text"), ("value", "real"),
            ("threshold", "real"), ("champion_value", "real"), ("prod_version", "int"), ("decided_at", "stamp"),
        ], (PARTITION_ID, "run_id")),
        "backtests": table("backtests", pid + key_cols + (time,), [
            ("actual", "real"), ("prediction", "real"), ("baseline", "real"), ("run_id", "text"),
            ("global_forecast", "real"),
        ], (PARTITION_ID, "run_id", time_column)),
        "runs": Table("runs", (Column("run_id", "text"), Column("stage", "text"), Column("started_at", "stamp"),
                                Column("finished_at", "stamp"), Column("seconds", "real"), Column("counts", "text")),
                      ("run_id", "stage")),
        # observed history before the forecast origin (a season and the test window), for charts
        "actuals": table("actuals", pid + key_cols + (time,), [("actual", "real"), ("run_id", "text")],
                         (PARTITION_ID, time_column)),
        # what each trained model says about its covariates: price elasticity, promotion lift
        "effects": table("effects", pid + key_cols, [
            ("run_id", "text"), ("model", "text"), ("covariate", "text"), ("measure", "text"), ("value", "real"),
        ], (PARTITION_ID, "run_id", "covariate", "measure")),
    }


# -- dialects -----------------------------------------------------------------------------------
def quote(name: str, dialect: str) -> str:
    check_identifier(name)
    return f"[{name}]" if dialect == "mssql" else f'"{name}"'


_TIME_TYPES = {
    "date": {"sqlite": "DATE", "postgresql": "DATE", "mssql": "DATE"},
    "timestamp": {"sqlite": "TIMESTAMP", "postgresql": "TIMESTAMP", "mssql": "DATETIME2"},
}


def value_kind(col: Column, types: SqlTypes) -> str:
    """What a column holds once the data's types are known: text, int, real, date or timestamp."""
    if col.kind == "time":
        return types.time
    if col.kind == "stamp":
        return "timestamp"
    if col.kind == "key":
        return "int" if col.name in types.int_keys else "text"
    return col.kind


def column_type(col: Column, dialect: str, types: SqlTypes, in_key: bool) -> str:
    kind = value_kind(col, types)
    if kind in _TIME_TYPES:
        return _TIME_TYPES[kind][dialect]
    if kind == "int":
        return "BIGINT" if dialect in ("postgresql", "mssql") else "INTEGER"
    if kind == "real":
        return {"sqlite": "REAL", "postgresql": "DOUBLE PRECISION", "mssql": "FLOAT"}[dialect]
    if dialect == "mssql":  # an index key cannot be NVARCHAR(MAX)
        return "NVARCHAR(200)" if in_key else "NVARCHAR(MAX)"
    return "TEXT"


def create_table_sql(table: Table, dialect: str, types: SqlTypes) -> str:
    """Idempotent DDL: creating a table that exists is a no-op in every dialect."""
    q = lambda n: quote(n, dialect)  # noqa: E731
    cols = ", ".join(
        f"{q(c.name)} {column_type(c, dialect, types, c.name in table.key)}"
        + (" NOT NULL" if c.name in table.key else "")
        for c in table.columns
    )
    body = f"{cols}, PRIMARY KEY ({', '.join(q(k) for k in table.key)})"
    if dialect == "mssql":
        return (f"IF OBJECT_ID(N'{table.name}', N'U') IS NULL "
                f"CREATE TABLE {q(table.name)} ({body})")
    return f"CREATE TABLE IF NOT EXISTS {q(table.name)} ({body})"


def upsert_sql(table: Table, dialect: str, types: SqlTypes) -> str:
    """One parametrised statement per row; executemany runs it over the whole load.

    SQL Server's MERGE reads its row from ``SELECT CAST(? AS type) ...``: the casts give the
    driver the parameter types it cannot infer from a bare select list.
    """
    q = lambda n: quote(n, dialect)  # noqa: E731
    names = table.names
    rest = [n for n in names if n not in table.key]
    if dialect == "mssql":
        src = ", ".join(f"CAST(? AS {column_type(c, dialect, types, c.name in table.key)}) AS {q(c.name)}"
                        for c in table.columns)
        on = " AND ".join(f"tgt.{q(k)} = src.{q(k)}" for k in table.key)
        sets = ", ".join(f"tgt.{q(n)} = src.{q(n)}" for n in rest)
        return (f"MERGE INTO {q(table.name)} WITH (HOLDLOCK) AS tgt USING (SELECT {src}) AS src ON {on} "
                f"WHEN MATCHED THEN UPDATE SET {sets} "
                f"WHEN NOT MATCHED THEN INSERT ({', '.join(q(n) for n in names)}) "
                f"VALUES ({', '.join(f'src.{q(n)}' for n in names)});")
    sets = ", ".join(f"{q(n)} = excluded.{q(n)}" for n in rest)
    return (f"INSERT INTO {q(table.name)} ({', '.join(q(n) for n in names)}) "
            f"VALUES ({', '.join('?' for _ in names)}) "
            f"ON CONFLICT ({', '.join(q(k) for k in table.key)}) DO UPDATE SET {sets}")


# -- views: what BI tools read ------------------------------------------------------------------
def view_sql(name: str, tables: Mapping[str, Table], keys: Sequence[str], time_column: str,
             dialect: str) -> str:
    """The SELECT behind a view, in SQL every dialect runs (window functions, no LIMIT/TOP)."""
    q = lambda n: quote(n, dialect)  # noqa: E731
    if name == "predictions_latest":
        # the newest vintage of each partition: periods an older, longer forecast left behind are not in it
        cols = ", ".join(q(c) for c in tables["forecast_history"].names)
        return (f"SELECT {cols} FROM (SELECT h.*, DENSE_RANK() OVER (PARTITION BY h.{q(PARTITION_ID)} "
                f"ORDER BY h.{q('scored_at')} DESC, h.{q('score_id')} DESC) AS vintage_rank "
                f"FROM {q('forecast_history')} h) ranked WHERE vintage_rank = 1")
    if name == "series_summary":
        key_list = ", ".join(q(k) for k in keys)
        served = (f"SELECT {q(PARTITION_ID)}, {key_list}, MIN({q('model')}) AS model, "
                  f"MIN({q('model_version')}) AS model_version, MIN({q('source')}) AS source, "
                  f"MIN({q('run_id')}) AS run_id, MIN({q('score_id')}) AS score_id, "
                  f"MAX({q('scored_at')}) AS scored_at, COUNT(*) AS periods, "
                  f"MIN({q(time_column)}) AS first_period, MAX({q(time_column)}) AS last_period, "
                  f"SUM({q('prediction')}) AS total_prediction, MAX({q('is_fallback')}) AS is_fallback "
                  f"FROM {q('predictions_latest')} GROUP BY {q(PARTITION_ID)}, {key_list}")
        decided = (f"SELECT {q(PARTITION_ID)}, {q('decision')}, {q('reason')}, {q('decided_at')}, "
                   f"ROW_NUMBER() OVER (PARTITION BY {q(PARTITION_ID)} ORDER BY {q('decided_at')} DESC, "
                   f"{q('run_id')} DESC) AS newest FROM {q('promotions')}")
        head = ", ".join(f"p.{q(c)}" for c in (PARTITION_ID, *keys, "model", "model_version", "source",
                                                 "is_fallback", "run_id", "score_id", "scored_at", "periods",
                                                 "first_period", "last_period", "total_prediction"))
        return (f"SELECT {head}, m.{q('wape')} AS wape, m.{q('accuracy')} AS accuracy, "
                f"m.{q('baseline_wape')} AS baseline_wape, m.{q('status')} AS training_status, "
                f"m.{q('reason')} AS training_reason, d.{q('decision')} AS last_decision, "
                f"d.{q('reason')} AS last_decision_reason, d.{q('decided_at')} AS last_decided_at "
                f"FROM ({served}) p "
                f"LEFT JOIN {q('model_metrics')} m ON m.{q(PARTITION_ID)} = p.{q(PARTITION_ID)} "
                f"AND m.{q('run_id')} = p.{q('run_id')} "
                f"LEFT JOIN ({decided}) d ON d.{q(PARTITION_ID)} = p.{q(PARTITION_ID)} AND d.newest = 1")
    raise StoreError(f"unknown view {name!r}; views: {list(VIEWS)}")


def exists_sql(dialect: str, kind: str) -> str:
    """A query with one ``?`` (a name) that returns a row when that table or view exists."""
    if dialect == "sqlite":
        return f"SELECT name FROM sqlite_master WHERE type = '{'view' if kind == 'view' else 'table'}' AND name = ?"
    return (f"SELECT table_name FROM information_schema.{'views' if kind == 'view' else 'tables'} "
            "WHERE table_name = ?")
