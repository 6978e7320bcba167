"""The real-time request contract: a request body in, a checked :class:`PredictRequest` out.

A request names one partition by its key values (or its id) and asks for rows or a horizon::

    {"keys": {"store": "S001", "item": "I0001"},
     "rows": [{"date": "2025-01-05", "price": 3.2, "promo": 0}, ...]}
    {"keys": {"store": "S001", "item": "I0001"}, "horizon": 4}

(``"partition_id": "p..."`` may replace ``keys``; with neither rows nor horizon the trained
``forecast.horizon`` is used). Rows are parsed as a scoring file's rows are (the helpers of
:mod:`shared.data.validation`, the same null-covariate policy), so a request predicts exactly what batch
scoring predicts for the same rows. Key values are checked by :func:`shared.keys.partition_of`, the
one check every front end uses.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from shared.bounds import limit
from shared.config import ProjectConfig
from shared.keys import PARTITION_ID, PartitionKeyError, encodable, is_partition_id, partition_of
from shared.serving.cache import ServingOptions
from shared.serving.errors import BadRequest, PayloadTooLarge
from shared.data.timegrid import to_periods
from shared.data.validation import DataValidationError, parse_numeric, parse_time

REQUEST_FIELDS = ("keys", PARTITION_ID, "rows", "horizon")
TIME_MEMO_SIZE = 4096  # parsed time columns kept (requests keep asking for the same next weeks)
# |covariate| above this is refused (400 naming the row): the shared bounds table's entry. Beyond it
# float64 arithmetic in a model's features overflows or cancels (1e308 once answered 0.0).
COVARIATE_MAX_ABS = float(limit("covariate_magnitude").high)
# a JSON escape of a UTF-16 surrogate: only a body holding one can decode to a lone surrogate
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass(frozen=True)
class RequestRows:
    """Explicit rows to predict: periods, the time stamps to answer with, covariates (rows x covariates)."""

    periods: np.ndarray
    times: list[Any]
    covariates: np.ndarray

    def __len__(self) -> int:
        return len(self.periods)


@dataclass(frozen=True)
class PredictRequest:
    """A parsed, checked request: the partition, and either request rows or a horizon."""

    partition_id: str
    keys: dict[str, str]
    rows: RequestRows | None = None
    horizon: int | None = None

    @property
    def periods(self) -> int:
        return len(self.rows) if self.rows is not None else int(self.horizon or 0)


@dataclass
class ServingResponse:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def json_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), allow_nan=False).encode("utf-8")



class RequestParser:
    """Checks request bodies against a project config's columns and the serving limits."""

    def __init__(self, config: ProjectConfig, options: ServingOptions | None = None) -> None:
        self.config = config
        self.options = options or ServingOptions()
        self._lock = threading.Lock()
        self._time_memo: dict[tuple[Any, ...], tuple[np.ndarray, list[Any]]] = {}

    def parse(self, body: bytes | str | Mapping[str, Any]) -> PredictRequest:
        """Check a request body; raises BadRequest naming the field, or PayloadTooLarge."""
        data = self._load_json(body) if not isinstance(body, Mapping) else dict(body)
        if isinstance(body, Mapping):
            _check_strings(data)
        unknown = [k for k in data if k not in REQUEST_FIELDS]
        if unknown:
            raise BadRequest(
                f"unknown field {unknown[0]!r}; a request has {list(REQUEST_FIELDS)}", unknown[0]
            )
        pid, keys = self._partition(data)
        rows, horizon = data.get("rows"), data.get("horizon")
        if rows is not None and horizon is not None:
            raise BadRequest("give 'rows' or 'horizon', not both", "horizon")
        if rows is not None:
            return PredictRequest(pid, keys, rows=self._rows(rows))
        if horizon is None:
            horizon = self.config.forecast.horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise BadRequest(f"'horizon' must be a whole number >= 1, got {horizon!r}", "horizon")
        if horizon > self.options.max_horizon:
            raise BadRequest(
                f"'horizon' must be at most {self.options.max_horizon}, got {horizon}", "horizon"
            )
        return PredictRequest(pid, keys, horizon=int(horizon))

    def _load_json(self, body: bytes | str) -> dict[str, Any]:
        if len(body) > self.options.max_body_bytes:
            raise PayloadTooLarge(
                f"the body has {len(body)} bytes; the limit is {self.options.max_body_bytes}",
                "body",
                limit=self.options.max_body_bytes,
            )
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}", "body") from exc
        except RecursionError as exc:
            raise BadRequest("the body is nested too deeply", "body") from exc
        if not isinstance(data, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(data).__name__}", "body")
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        utf8 = b"\x00" not in raw[:4]  # else UTF-16 or -32 (json.loads detects them): always walk
        if not utf8 or _SURROGATE_ESCAPE.search(raw) or (isinstance(body, str) and not encodable(body)):
            _check_strings(data)  # only then: the usual body pays one regex scan
        return data

    def _partition(self, data: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
        names = self.config.data.keys
        if "keys" in data and PARTITION_ID in data:
            raise BadRequest("give 'keys' or 'partition_id', not both", PARTITION_ID)
        if PARTITION_ID in data:
            pid = data[PARTITION_ID]
            if not is_partition_id(pid):
                raise BadRequest(
                    f"'partition_id' must look like 'p' + 20 hex digits, got {pid!r}", PARTITION_ID
                )
            return pid, {}
        keys = data.get("keys")
        if keys is None:
            raise BadRequest(f"'keys' is required: an object with the partition key values {names}", "keys")
        try:
            return partition_of(names, keys)
        except PartitionKeyError as exc:
            raise BadRequest(exc.message, f"keys.{exc.key}" if exc.key else "keys") from exc

    def _rows(self, rows: Any) -> RequestRows:
        """Check the rows and parse them as a scoring file's rows would be (same helpers, same policy)."""
        spec = self.config.data
        if not isinstance(rows, list) or not rows:
            raise BadRequest("'rows' must be a non-empty list of objects", "rows")
        if len(rows) > self.options.max_rows:
            raise PayloadTooLarge(
                f"{len(rows)} rows; the limit is {self.options.max_rows} per request",
                "rows",
                limit=self.options.max_rows,
            )
        allowed = {spec.time, *spec.covariates}
        times: list[Any] = []
        values: list[list[Any]] = [[] for _ in spec.covariates]
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise BadRequest(f"each row must be an object, got {type(row).__name__}", f"rows[{i}]")
            for name in row:
                if name not in allowed:
                    raise BadRequest(
                        f"unknown field {name!r}; a row has {spec.time!r} and the covariates "
                        f"{spec.covariates}",
                        f"rows[{i}].{name}",
                    )
            when = row.get(spec.time)
            if when is None or isinstance(when, (bool, dict, list, float)):
                raise BadRequest(
                    f"{spec.time!r} is required: "
                    + ("an integer period" if spec.freq == "int" else "a date string"),
                    f"rows[{i}].{spec.time}",
                )
            times.append(when)
            for j, cov in enumerate(spec.covariates):
                value = row.get(cov)
                if isinstance(value, (dict, list)):
                    raise BadRequest(
                        f"covariate {cov!r} must be a number, a boolean or null", f"rows[{i}].{cov}"
                    )
                values[j].append(value)
        periods, texts = self._times(tuple(times))
        if len(set(periods.tolist())) != len(periods):
            again = int(np.flatnonzero(pd.Series(periods).duplicated().to_numpy())[0])
            raise BadRequest(
                f"rows[{again}] asks for the same period as an earlier row", f"rows[{again}].{spec.time}"
            )
        covariates = np.empty((len(rows), len(spec.covariates)), dtype=np.float64)
        for j, cov in enumerate(spec.covariates):
            covariates[:, j] = self._covariate(values[j], cov)
        return RequestRows(periods=periods, times=texts, covariates=covariates)

    def _times(self, values: tuple[Any, ...]) -> tuple[np.ndarray, list[Any]]:
        """Periods and response time stamps of a time column, parsed as a scoring file's (whole column,
        so one format for all) and remembered: the same dates come back in request after request."""
        known = self._time_memo.get(values)
        if known is not None:
            return known
        spec = self.config.data
        source = pd.DataFrame({spec.time: list(values)})
        try:
            parsed = parse_time(source[spec.time], source, spec)
        except DataValidationError as exc:
            raise BadRequest(exc.rule, _row_field(exc)) from exc
        result = (to_periods(parsed, spec.freq), format_times(parsed, spec.freq))
        with self._lock:
            if len(self._time_memo) >= TIME_MEMO_SIZE:
                self._time_memo.clear()
            self._time_memo[values] = result
        return result

    def _covariate(self, values: list[Any], name: str) -> np.ndarray:
        """float64 values as :func:`shared.data.validation.parse_numeric` gives them, JSON numbers directly;
        nulls by the ingestion policy (``validation.null_covariates``), as batch scoring does."""
        if all(v is None or type(v) in (int, float, bool) for v in values):
            try:
                out = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
            except OverflowError as exc:
                raise BadRequest(f"covariate {name!r} is too large", f"rows.{name}") from exc
        else:  # text: the scoring file's own parser decides what is a number
            source = pd.DataFrame({name: values})
            try:
                out = parse_numeric(source[name], source, name, "covariate")
            except DataValidationError as exc:
                raise BadRequest(exc.rule, _row_field(exc)) from exc
        infinite = np.flatnonzero(np.isinf(out))
        if len(infinite):
            raise BadRequest("covariate is infinite", f"rows[{int(infinite[0])}].{name}")
        with np.errstate(invalid="ignore"):
            huge = np.flatnonzero(np.abs(out) > COVARIATE_MAX_ABS)
        if len(huge):
            i = int(huge[0])
            raise BadRequest(
                f"covariate {name!r} is {out[i]:g}: its magnitude must be at most {COVARIATE_MAX_ABS:g}",
                f"rows[{i}].{name}",
            )
        nulls = np.flatnonzero(np.isnan(out))
        policy = self.config.validation.null_covariates
        if len(nulls) and policy == "error":
            raise BadRequest(
                "covariate is null (validation.null_covariates=error)", f"rows[{int(nulls[0])}].{name}"
            )
        if len(nulls) and policy == "zero":
            out[nulls] = 0.0
        return out  # ffill: the model carries the previous value forward


def format_times(times: pd.Series | np.ndarray, freq: str) -> list[Any]:
    """Time stamps as a response gives them: integer periods, dates, or ISO date-times."""
    if freq == "int":
        return [int(t) for t in times.tolist()]
    stamps = pd.DatetimeIndex(times)
    if (stamps == stamps.normalize()).all():
        return stamps.strftime("%Y-%m-%d").tolist()
    return [t.isoformat() for t in stamps]


def _check_strings(data: Mapping[str, Any]) -> None:
    try:
        _refuse_lone_surrogates(data)
    except RecursionError as exc:
        raise BadRequest("the body is nested too deeply", "body") from exc


def _refuse_lone_surrogates(value: Any, where: str = "body") -> None:
    """BadRequest naming the first string (or object key) holding a lone UTF-16 surrogate: JSON lets
    ``"\\ud800"`` through, but no key, date or number can be made of it (UTF-8 cannot encode it)."""
    if isinstance(value, str):
        if not encodable(value):
            raise BadRequest(
                f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
                "not a valid character", where)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and not encodable(key):
                raise BadRequest(
                    f"a field name in {where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                    "escape): not a valid character", where)
            _refuse_lone_surrogates(item, key if where == "body" else f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{where}[{i}]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _row_field(exc: DataValidationError) -> str:
    column = exc.column if isinstance(exc.column, str) else "rows"
    if len(exc.examples):
        return f"rows[{int(exc.examples.index[0])}].{column}"
    return f"rows.{column}"
