"""The SQL result store: predictions, metrics, promotion decisions, backtests and run timings.

Predictions are served from SQL (Synapse / Azure SQL in Azure, a local SQLite file by default), so
dashboards and downstream systems can query them with plain SQL: the partition key columns and the
time column appear under their own names. Every load is an upsert on the table's natural key, run
in one transaction with ``executemany``: a rerun after a crash, or a duplicate event, never
duplicates rows.

One schema definition serves every backend; the dialects differ only in column types, identifier
quoting and the upsert statement (``ON CONFLICT`` for SQLite and PostgreSQL, ``MERGE`` for SQL
Server). Column names come from the configuration and are checked to be plain identifiers before
they are quoted into SQL; values are always bound as parameters.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from shared.config import ProjectConfig
from shared.errors import ManyModelsError
from shared.keys import PARTITION_ID, canonical_value
from shared.timegrid import period_freq

DIALECTS = ("sqlite", "postgresql", "mssql")
TABLES = ("predictions", "model_metrics", "promotions", "backtests", "runs")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHUNK_ROWS = 50_000  # rows per executemany call: bounds driver memory, one transaction still


class StoreError(ManyModelsError, ValueError):
    """The store cannot accept a load or a query (bad column, schema mismatch, missing setting)."""


# -- schema -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # text | key (canonical text of a key value) | int | real | time (ISO text or INTEGER)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def check_identifier(name: str) -> str:
    """Only plain identifiers are ever quoted into SQL text; anything else is refused."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or len(name) > 100:
        raise StoreError(f"column name {name!r} is not a plain SQL identifier (letters, digits, underscore)")
    return name


# Columns added after the first release, per table: an older store gains them on open.
ADDED_COLUMNS = {"predictions": ("source", "lower", "upper"), "backtests": ("global_forecast",)}


def build_schema(keys: Sequence[str], time_column: str) -> dict[str, Table]:
    """The five tables for a data spec: key and time columns appear under their own names."""
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
    return {
        "predictions": table("predictions", key_cols + (time,), [
            ("prediction", "real"), ("model", "text"), ("model_version", "int"), ("run_id", "text"),
            (PARTITION_ID, "text"), ("is_fallback", "int"), ("score_id", "text"), ("scored_at", "text"),
            ("source", "text"), ("lower", "real"), ("upper", "real"),
        ], (PARTITION_ID, time_column)),
        "model_metrics": table("model_metrics", pid + key_cols, [
            ("run_id", "text"), ("model", "text"), ("model_version", "int"), ("status", "text"),
            ("reason", "text"), ("wape", "real"), ("mape", "real"), ("rmse", "real"), ("accuracy", "real"),
            ("baseline_wape", "real"), ("n_observed", "int"), ("fit_seconds", "real"), ("registry", "text"),
        ], (PARTITION_ID, "run_id")),
        "promotions": table("promotions", pid + key_cols, [
            ("run_id", "text"), ("decision", "text"), ("reason", "text"), ("metric", "text"), ("value", "real"),
            ("threshold", "real"), ("champion_value", "real"), ("prod_version", "int"), ("decided_at", "text"),
        ], (PARTITION_ID, "run_id")),
        "backtests": table("backtests", pid + key_cols + (time,), [
            ("actual", "real"), ("prediction", "real"), ("baseline", "real"), ("run_id", "text"),
            ("global_forecast", "real"),
        ], (PARTITION_ID, "run_id", time_column)),
        "runs": Table("runs", (Column("run_id", "text"), Column("stage", "text"), Column("started_at", "text"),
                                Column("finished_at", "text"), Column("seconds", "real"), Column("counts", "text")),
                      ("run_id", "stage")),
    }


# -- dialects -----------------------------------------------------------------------------------
def quote(name: str, dialect: str) -> str:
    check_identifier(name)
    return f"[{name}]" if dialect == "mssql" else f'"{name}"'


def column_type(col: Column, dialect: str, int_time: bool, in_key: bool) -> str:
    kind = {"time": "int" if int_time else "text", "key": "text"}.get(col.kind, col.kind)
    if kind == "int":
        return "BIGINT" if dialect in ("postgresql", "mssql") else "INTEGER"
    if kind == "real":
        return {"sqlite": "REAL", "postgresql": "DOUBLE PRECISION", "mssql": "FLOAT"}[dialect]
    if dialect == "mssql":  # an index key cannot be NVARCHAR(MAX)
        return "NVARCHAR(200)" if in_key else "NVARCHAR(MAX)"
    return "TEXT"


def create_table_sql(table: Table, dialect: str, int_time: bool) -> str:
    """Idempotent DDL: creating a table that exists is a no-op in every dialect."""
    q = lambda n: quote(n, dialect)  # noqa: E731
    cols = ", ".join(
        f"{q(c.name)} {column_type(c, dialect, int_time, c.name in table.key)}"
        + (" NOT NULL" if c.name in table.key else "")
        for c in table.columns
    )
    body = f"{cols}, PRIMARY KEY ({', '.join(q(k) for k in table.key)})"
    if dialect == "mssql":
        return (f"IF OBJECT_ID(N'{table.name}', N'U') IS NULL "
                f"CREATE TABLE {q(table.name)} ({body})")
    return f"CREATE TABLE IF NOT EXISTS {q(table.name)} ({body})"


def upsert_sql(table: Table, dialect: str, int_time: bool = False) -> str:
    """One parametrised statement per row; executemany runs it over the whole load.

    SQL Server's MERGE reads its row from ``SELECT CAST(? AS type) ...``: the casts give the
    driver the parameter types it cannot infer from a bare select list.
    """
    q = lambda n: quote(n, dialect)  # noqa: E731
    names = table.names
    rest = [n for n in names if n not in table.key]
    if dialect == "mssql":
        src = ", ".join(f"CAST(? AS {column_type(c, dialect, int_time, c.name in table.key)}) AS {q(c.name)}"
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


# -- value conversion ---------------------------------------------------------------------------
def time_format(freq: str) -> str | None:
    """ISO date for daily or coarser data, date and time below a day; None for integer periods.

    Chosen by frequency, not by the values, so the same time always has the same text (the key).
    """
    if freq == "int":
        return None
    p = pd.Period("2020-01-01", freq=period_freq(freq))
    return "%Y-%m-%dT%H:%M:%S" if (p.end_time - p.start_time) < pd.Timedelta(hours=23) else "%Y-%m-%d"


def _column_values(series: pd.Series, kind: str, fmt: str | None, name: str) -> list[Any]:
    """A column as a list of plain Python values (None for missing) ready for a driver."""
    if kind == "time":
        if fmt is None:
            values = pd.to_numeric(series, errors="coerce")
            if values.isna().any():
                raise StoreError(f"column {name!r}: integer periods expected, found {series[values.isna()].iloc[0]!r}")
            return values.astype("int64").tolist()
        times = pd.to_datetime(series, errors="coerce") if not pd.api.types.is_datetime64_any_dtype(series) else series
        if times.isna().any():
            raise StoreError(f"column {name!r}: unparseable time {series[times.isna()].iloc[0]!r}")
        return times.dt.strftime(fmt).tolist()
    if kind == "real":
        arr = pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        arr = np.where(np.isfinite(arr), arr, np.nan).astype(object)
        arr[pd.isna(arr)] = None
        return arr.tolist()
    missing = series.isna().to_numpy()
    if kind == "int":
        arr = pd.to_numeric(series, errors="coerce")
        missing = arr.isna().to_numpy()
        values = arr.fillna(0).astype("int64").to_numpy().astype(object)
    elif kind == "key":  # 7, 7.0 and "7" are one key value; canonicalised once per distinct value
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        lookup = np.array([canonical_value(v) for v in uniques] + [None], dtype=object)
        values = lookup[codes]
    else:
        values = series.astype(str).to_numpy(dtype=object)
    values[missing] = None
    return values.tolist()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _as_utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _pick(row: Mapping[str, Any], *names: str, nested: tuple[str, str] | None = None) -> Any:
    for n in names:
        if row.get(n) is not None:
            return row[n]
    if nested is not None:
        inner = row.get(nested[0])
        if isinstance(inner, Mapping):
            return inner.get(nested[1])
    return None


# -- the store ----------------------------------------------------------------------------------
class ResultStore:
    """Shared logic of every backend: schema creation, upserts, queries.

    Subclasses only open the connection and say which dialect and executemany options to use.
    """

    dialect: str = "sqlite"
    fast_executemany: bool = False

    def __init__(self, keys: Sequence[str] = ("store", "item"), time_column: str = "date", freq: str = "W") -> None:
        self.keys = list(keys)
        self.time_column = time_column
        self.freq = freq
        self.tables = build_schema(self.keys, time_column)
        self._time_format = time_format(freq)
        self._conn: Any = None

    # backend hooks
    def _connect(self) -> Any:
        raise StoreError(f"{type(self).__name__} has no connection; use SQLiteStore or OdbcStore")

    def _begin(self, conn: Any) -> None:
        """Start a transaction (pyodbc is in one already; sqlite3 in autocommit mode needs BEGIN)."""

    def describe(self) -> str:
        raise StoreError(f"{type(self).__name__} has no location")

    # connection and schema
    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = self._connect()
            self._ensure_schema()
        return self._conn

    def _ensure_schema(self) -> None:
        conn = self._conn
        cur = conn.cursor()
        self._begin(conn)
        try:
            for table in self.tables.values():
                cur.execute(create_table_sql(table, self.dialect, self._time_format is None))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        for table in self.tables.values():
            cur.execute(f"SELECT * FROM {quote(table.name, self.dialect)} WHERE 1 = 0")
            found = [d[0] for d in cur.description]
            found = self._add_new_columns(cur, table, found)
            if [c.lower() for c in found] != [c.lower() for c in table.names]:
                raise StoreError(
                    f"{self.describe()}: table {table.name} has columns {found}, but this configuration "
                    f"expects {table.names} (the data spec changed?); use a new store or drop the table")
        cur.close()

    def _add_new_columns(self, cur: Any, table: Table, found: list[str]) -> list[str]:
        """Stores made by earlier releases lack the columns added since: add them (NULL for old rows)."""
        names = [c.lower() for c in table.names]
        have = [c.lower() for c in found]
        if have == names or names[:len(have)] != have:
            return found
        missing = [c for c in table.columns[len(have):] if c.name in ADDED_COLUMNS.get(table.name, ())]
        if len(missing) != len(names) - len(have):
            return found
        conn = self._conn
        self._begin(conn)
        try:
            for col in missing:
                sql_type = column_type(col, self.dialect, self._time_format is None, in_key=False)
                cur.execute(f"ALTER TABLE {quote(table.name, self.dialect)} ADD {quote(col.name, self.dialect)} "
                            f"{sql_type}")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return [*found, *(c.name for c in missing)]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # loading
    def _upsert(self, table_name: str, frame: pd.DataFrame) -> int:
        """Upsert a frame holding (a subset of) the table's columns; missing optional ones are NULL."""
        table = self.tables[table_name]
        missing = [k for k in table.key if k not in frame.columns]
        if missing:
            raise StoreError(f"{table_name}: rows lack the key column(s) {missing}")
        if frame.empty:
            return 0
        frame = frame.drop_duplicates(subset=list(table.key), keep="last")  # one statement per key
        columns = []
        for col in table.columns:
            if col.name in frame.columns:
                columns.append(_column_values(frame[col.name], col.kind, self._time_format, col.name))
            else:
                columns.append([None] * len(frame))
        for k, col in zip(table.names, columns):
            if k in table.key and any(v is None for v in col):
                raise StoreError(f"{table_name}: key column {k!r} has missing values")
        rows = list(zip(*columns))
        conn = self.conn
        cur = conn.cursor()
        if self.fast_executemany:
            cur.fast_executemany = True
        sql = upsert_sql(table, self.dialect, self._time_format is None)
        self._begin(conn)
        try:
            for start in range(0, len(rows), _CHUNK_ROWS):
                cur.executemany(sql, rows[start:start + _CHUNK_ROWS])
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            cur.close()
        return len(rows)

    def upsert_predictions(self, frame: pd.DataFrame) -> int:
        """Predictions keyed by (partition_id, time); ``scored_at`` defaults to now."""
        if "scored_at" not in frame.columns and not frame.empty:
            frame = frame.assign(scored_at=_utc_now())
        return self._upsert("predictions", frame)

    def upsert_backtests(self, frame: pd.DataFrame) -> int:
        """Test-window forecasts vs actuals, keyed by (partition_id, run_id, time)."""
        return self._upsert("backtests", frame)

    def upsert_metrics(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """One row per (partition, run).

        Accepts ``TrainResult.to_row()``-like dicts: keys as a ``keys`` dict or as columns, the
        model as ``model`` or ``model_name``, metrics flat or in a ``metrics`` dict, the baseline's
        WAPE as ``baseline_wape`` or in ``baseline_metrics``.
        """
        out = []
        for row in rows:
            rec = {PARTITION_ID: row.get(PARTITION_ID), "run_id": row.get("run_id"),
                   "model": _pick(row, "model", "model_name"), "model_version": _pick(row, "model_version", "version"),
                   "status": row.get("status"), "reason": row.get("reason"),
                   "baseline_wape": _pick(row, "baseline_wape", nested=("baseline_metrics", "wape")),
                   "n_observed": row.get("n_observed"), "fit_seconds": row.get("fit_seconds"),
                   "registry": row.get("registry")}
            for m in ("wape", "mape", "rmse", "accuracy"):
                rec[m] = _pick(row, m, nested=("metrics", m))
            rec.update(self._keys_of(row))
            out.append(rec)
        return self._upsert("model_metrics", self._frame(out, "model_metrics"))

    def upsert_promotions(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """One decision per (partition, run); accepts ``Decision.to_row()`` dicts."""
        out = []
        for row in rows:
            rec = {n: row.get(n) for n in ("partition_id", "run_id", "decision", "reason", "metric", "value",
                                           "threshold", "champion_value", "prod_version")}
            rec["decided_at"] = row.get("decided_at") or _utc_now()
            rec.update(self._keys_of(row))
            out.append(rec)
        return self._upsert("promotions", self._frame(out, "promotions"))

    def record_run(self, run_id: str, stage: str, started_at: Any, seconds: float,
                   counts: Mapping[str, Any] | None = None) -> None:
        """Timing of one pipeline stage; ``started_at`` is a datetime, epoch seconds or ISO text."""
        start = _as_utc(started_at)
        row = {"run_id": run_id, "stage": stage, "started_at": start.isoformat(timespec="seconds"),
               "finished_at": (start + timedelta(seconds=float(seconds))).isoformat(timespec="seconds"),
               "seconds": float(seconds), "counts": json.dumps(dict(counts or {}), sort_keys=True, default=str)}
        self._upsert("runs", pd.DataFrame([row]))

    def _keys_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        nested = row.get("keys") if isinstance(row.get("keys"), Mapping) else {}
        return {k: row.get(k, nested.get(k)) for k in self.keys}

    def _frame(self, records: list[dict[str, Any]], table: str) -> pd.DataFrame:
        return pd.DataFrame(records, columns=self.tables[table].names) if records else \
            pd.DataFrame(columns=self.tables[table].names)

    # reading
    def query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run a read query with bound parameters (``?`` markers) and return a frame."""
        cur = self.conn.cursor()
        try:
            if params:
                cur.execute(sql, list(params))
            else:
                cur.execute(sql)
            columns = [d[0] for d in cur.description]
            rows = cur.fetchall()
        finally:
            cur.close()
        return pd.DataFrame.from_records([tuple(r) for r in rows], columns=columns)

    def count(self, table: str) -> int:
        if table not in self.tables:
            raise StoreError(f"unknown table {table!r}; tables: {list(self.tables)}")
        return int(self.query(f"SELECT COUNT(*) AS n FROM {quote(table, self.dialect)}")["n"].iloc[0])


class SQLiteStore(ResultStore):
    """The local default: one SQLite file (WAL mode), readable with Python's ``sqlite3``."""

    dialect = "sqlite"

    def __init__(self, path: Path | str, keys: Sequence[str] = ("store", "item"), time_column: str = "date",
                 freq: str = "W") -> None:
        super().__init__(keys, time_column, freq)
        self.path = Path(path)

    def describe(self) -> str:
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=60)  # explicit BEGIN/COMMIT
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:  # "file is not a database": name the file and the fix
            conn.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise
            raise StoreError(
                f"the SQL store {self.path} is damaged ({exc}): restore it from a backup, or move it aside "
                f"(mv {self.path} {self.path}.damaged) and rerun `manymodels promote` and `manymodels score`, "
                "which record the promotions and load the predictions again") from exc
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")


class OdbcStore(ResultStore):
    """Any database reachable through ODBC: Azure SQL / Synapse (mssql), PostgreSQL, SQLite."""

    def __init__(self, connection_string: str, dialect: str, keys: Sequence[str] = ("store", "item"),
                 time_column: str = "date", freq: str = "W") -> None:
        if dialect not in DIALECTS:
            raise StoreError(f"dialect {dialect!r} is not one of {list(DIALECTS)}")
        super().__init__(keys, time_column, freq)
        self.connection_string = connection_string
        self.dialect = dialect
        # Parameter arrays are for Microsoft's driver only; the SQLite ODBC driver crashes with them.
        self.fast_executemany = dialect == "mssql"

    def describe(self) -> str:
        # Never echo the connection string: it may hold a password.
        return f"ODBC store ({self.dialect})"

    def _connect(self) -> Any:
        import pyodbc

        try:
            return pyodbc.connect(self.connection_string, autocommit=False)
        except pyodbc.Error as exc:
            raise StoreError(f"{self.describe()}: cannot connect: {exc}") from exc


def open_store(cfg: ProjectConfig, workdir: Path) -> ResultStore:
    """The configured store: ``results.sqlite`` in the workdir, or ODBC from an environment setting."""
    spec, data = cfg.store, cfg.data
    if spec.backend == "sqlite":
        return SQLiteStore(Path(workdir) / spec.sqlite_file, data.keys, data.time, data.freq)
    conn_str = os.environ.get(spec.odbc_connection_setting)
    if not conn_str:
        raise StoreError(f"store.backend is 'odbc' but the environment variable "
                         f"{spec.odbc_connection_setting} (store.odbc_connection_setting) is not set")
    return OdbcStore(conn_str, spec.dialect, data.keys, data.time, data.freq)

