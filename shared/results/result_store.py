"""The SQL result store: predictions and their history, metrics, promotion decisions, backtests,
observed history, covariate effects and run timings.

Predictions are served from SQL (Synapse / Azure SQL in Azure, a local SQLite file by default), so
dashboards and downstream systems can query them with plain SQL: the partition key columns and the
time column appear under their own names, typed (:mod:`shared.results.sql_schema`). Every load is an upsert
on the table's natural key, run in one transaction with ``executemany``: a rerun after a crash, or
a duplicate event, never duplicates rows. Forecasts also land in ``forecast_history`` by vintage,
never overwritten; the views ``predictions_latest`` and ``series_summary`` are what BI tools read.
Values are always bound as parameters.
"""
from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from shared.config import ProjectConfig
from shared.keys import PARTITION_ID, canonical_value
from shared.locking import check_fences

from shared.results.sql_schema import (
    ADDED_COLUMNS, DIALECTS, VIEWS, Column, SqlTypes, StoreError, Table, build_schema, column_type,
    create_table_sql, plain_integer, quote, time_kind, upsert_sql, value_kind, exists_sql, view_sql,
)

IntKeys = Union[Iterable[str], Callable[[], Iterable[str]]]
_CHUNK_ROWS = 50_000  # rows per executemany call: bounds driver memory, one transaction still


# -- value conversion ---------------------------------------------------------------------------
# a time's text in SQLite, by the frequency, not the values: the same time always has the same text (the key)
_TEXT_FORMAT = {"date": "%Y-%m-%d", "timestamp": "%Y-%m-%dT%H:%M:%S"}


def _times(series: pd.Series, name: str) -> pd.Series:
    times = series if pd.api.types.is_datetime64_any_dtype(series) else pd.to_datetime(series, errors="coerce")
    if times.isna().any():
        raise StoreError(f"column {name!r}: unparseable time {series[times.isna()].iloc[0]!r}")
    return times


def _stamps(series: pd.Series, name: str) -> list[Any]:
    """Instants (ISO text with an offset, or datetimes) as naive UTC datetimes; None stays None."""
    missing = series.isna().to_numpy()
    parsed = pd.to_datetime(series.where(~missing, None), errors="coerce", utc=True, format="mixed")
    bad = parsed.isna().to_numpy() & ~missing
    if bad.any():
        raise StoreError(f"column {name!r}: unparseable time stamp {series[bad].iloc[0]!r}")
    return [None if gone else t.to_pydatetime() for gone, t in zip(missing, parsed.dt.tz_localize(None))]


def _column_values(series: pd.Series, col: Column, types: SqlTypes, dialect: str) -> list[Any]:
    """A column as a list of plain Python values (None for missing) ready for a driver.

    Dates and instants go to PostgreSQL and SQL Server as ``date``/``datetime`` objects (typed
    columns); to SQLite as ISO text, as every release wrote them."""
    kind, name = value_kind(col, types), col.name
    if col.kind == "time" and kind == "int":
        values = pd.to_numeric(series, errors="coerce")
        if values.isna().any():
            raise StoreError(f"column {name!r}: integer periods expected, found {series[values.isna()].iloc[0]!r}")
        return values.astype("int64").tolist()
    if col.kind == "time":
        times = _times(series, name)
        if dialect == "sqlite":
            return times.dt.strftime(_TEXT_FORMAT[kind]).tolist()
        return list(times.dt.date) if kind == "date" else [t.to_pydatetime() for t in times]
    if col.kind == "stamp":
        if dialect == "sqlite":
            missing = series.isna().to_numpy()
            values = series.astype(str).to_numpy(dtype=object)
            values[missing] = None
            return values.tolist()
        return _stamps(series, name)
    if kind == "real":
        arr = pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        arr = np.where(np.isfinite(arr), arr, np.nan).astype(object)
        arr[pd.isna(arr)] = None
        return arr.tolist()
    missing = series.isna().to_numpy()
    if col.kind == "key":  # 7, 7.0 and "7" are one key value; canonicalised once per distinct value
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        canonical = [canonical_value(v) for v in uniques]
        if kind == "int":
            wrong = [v for v in canonical if not plain_integer(v)]
            if wrong:
                raise StoreError(f"key column {name!r} holds integers in this store, but a row has {wrong[0]!r}; "
                                 "load it into a new store (its key columns are typed when it is created)")
            canonical = [int(v) for v in canonical]
        values = np.array(canonical + [None], dtype=object)[codes]
    elif kind == "int":
        arr = pd.to_numeric(series, errors="coerce")
        missing = arr.isna().to_numpy()
        values = arr.fillna(0).astype("int64").to_numpy().astype(object)
    else:
        values = series.astype(str).to_numpy(dtype=object)
    values[missing] = None
    return values.tolist()


def _utc_now() -> str:
    """Milliseconds: two scorings in one second still order as they ran (``predictions_latest``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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

    def __init__(self, keys: Sequence[str] = ("store", "item"), time_column: str = "date", freq: str = "W",
                 int_keys: IntKeys = ()) -> None:
        self.keys = list(keys)
        self.time_column = time_column
        self.freq = freq
        self.tables = build_schema(self.keys, time_column)
        # the SQL types of the data's columns; key types only matter when a table is created, so a
        # callable giving them (it may read the lake) is asked only then
        self._int_keys = int_keys
        self.types = SqlTypes(time=time_kind(freq), int_keys=frozenset(() if callable(int_keys) else int_keys))
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
        if callable(self._int_keys) and not self._exists(cur, "predictions", "table"):
            self.types = SqlTypes(self.types.time, frozenset(self._int_keys()) & frozenset(self.keys))
        self._begin(conn)
        try:
            for table in self.tables.values():
                cur.execute(create_table_sql(table, self.dialect, self.types))
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
        self._ensure_views(cur)
        cur.close()

    def _exists(self, cur: Any, name: str, kind: str) -> bool:
        cur.execute(exists_sql(self.dialect, kind), [name])
        return bool(cur.fetchall())

    def _ensure_views(self, cur: Any) -> None:
        """Create the views BI tools read, where missing (a view's text never changes an existing one)."""
        conn = self._conn
        for name in VIEWS:
            if self._exists(cur, name, "view"):
                continue
            body = view_sql(name, self.tables, self.keys, self.time_column, self.dialect)
            self._begin(conn)
            try:
                cur.execute(f"CREATE VIEW {quote(name, self.dialect)} AS {body}")
                conn.commit()
            except BaseException:
                conn.rollback()
                if not self._exists(cur, name, "view"):  # not a concurrent opener that made it first
                    raise

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
                sql_type = column_type(col, self.dialect, self.types, in_key=False)
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
    def _rows(self, table: Table, frame: pd.DataFrame) -> list[tuple[Any, ...]]:
        """A frame's rows as driver values for ``table`` (already one row per key), checked."""
        columns = []
        for col in table.columns:
            if col.name in frame.columns:
                columns.append(_column_values(frame[col.name], col, self.types, self.dialect))
            else:
                columns.append([None] * len(frame))
        for k, col in zip(table.names, columns):
            if k in table.key and any(v is None for v in col):
                raise StoreError(f"{table.name}: key column {k!r} has missing values")
        return list(zip(*columns))

    def _upsert(self, table_name: str, frame: pd.DataFrame, *also: str) -> int:
        """Upsert a frame holding (a subset of) the table's columns; missing optional ones are NULL.

        ``also``: more tables that take the same rows, in the same transaction (a twin table with the
        same columns reuses the converted rows when its key keeps the same rows)."""
        if frame.empty:
            return 0
        check_fences()  # a writer that lost the lake's lease loads nothing
        loads: list[tuple[str, list[tuple[Any, ...]]]] = []
        previous: tuple[tuple[Any, ...], list[tuple[Any, ...]]] | None = None
        for name in (table_name, *also):
            table = self.tables[name]
            missing = [k for k in table.key if k not in frame.columns]
            if missing:
                raise StoreError(f"{name}: rows lack the key column(s) {missing}")
            one = frame.drop_duplicates(subset=list(table.key), keep="last")  # one statement per key
            shape = (tuple(table.names), len(one))
            rows = previous[1] if previous is not None and previous[0] == shape else self._rows(table, one)
            previous = (shape, rows)
            loads.append((upsert_sql(table, self.dialect, self.types), rows))
        conn = self.conn
        cur = conn.cursor()
        if self.fast_executemany:
            cur.fast_executemany = True
        self._begin(conn)
        try:
            for sql, rows in loads:
                for start in range(0, len(rows), _CHUNK_ROWS):
                    cur.executemany(sql, rows[start:start + _CHUNK_ROWS])
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            cur.close()
        return len(loads[0][1])

    def upsert_predictions(self, frame: pd.DataFrame) -> int:
        """Predictions keyed by (partition_id, time), and the same rows into ``forecast_history``
        keyed by vintage as well; ``scored_at`` defaults to now, ``score_id`` to one made of it."""
        if frame.empty:
            return 0
        if "scored_at" not in frame.columns:
            frame = frame.assign(scored_at=_utc_now())
        if "score_id" not in frame.columns or frame["score_id"].isna().any():
            made = "at-" + frame["scored_at"].astype(str)
            frame = frame.assign(score_id=frame["score_id"].fillna(made) if "score_id" in frame else made)
        return self._upsert("predictions", frame, "forecast_history")

    def upsert_actuals(self, frame: pd.DataFrame) -> int:
        """Observed history (partition, time, ``actual``): the newest load of a period wins."""
        return self._upsert("actuals", frame)

    def upsert_effects(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """What trained models say about their covariates, keyed by (partition, run, covariate, measure)."""
        out = []
        for row in rows:
            rec = {n: row.get(n) for n in ("partition_id", "run_id", "model", "covariate", "measure", "value")}
            rec.update(self._keys_of(row))
            out.append(rec)
        return self._upsert("effects", self._frame(out, "effects"))

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
                 freq: str = "W", int_keys: IntKeys = ()) -> None:
        super().__init__(keys, time_column, freq, int_keys)
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
                 time_column: str = "date", freq: str = "W", int_keys: IntKeys = ()) -> None:
        if dialect not in DIALECTS:
            raise StoreError(f"dialect {dialect!r} is not one of {list(DIALECTS)}")
        super().__init__(keys, time_column, freq, int_keys)
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


def open_store(cfg: ProjectConfig, workdir: Path, int_keys: IntKeys = ()) -> ResultStore:
    """The configured store: ``results.sqlite`` in the workdir, or ODBC from an environment setting.

    ``int_keys``: the key columns that hold plain integers (typed BIGINT when the tables are made)."""
    spec, data = cfg.store, cfg.data
    if spec.backend == "sqlite":
        return SQLiteStore(Path(workdir) / spec.sqlite_file, data.keys, data.time, data.freq, int_keys)
    conn_str = os.environ.get(spec.odbc_connection_setting)
    if not conn_str:
        raise StoreError(f"store.backend is 'odbc' but the environment variable "
                         f"{spec.odbc_connection_setting} (store.odbc_connection_setting) is not set")
    return OdbcStore(conn_str, spec.dialect, data.keys, data.time, data.freq, int_keys)

