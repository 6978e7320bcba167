"""Partition identity: safe ids derived from key values, never the raw values themselves.

A partition id is a short hash of the canonical key values, so it is safe in file names, blob
names, SQL identifiers' values and URLs whatever the keys contain (slashes, quotes, unicode).
The manifest maps ids back to key values.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from shared.bounds import MAX_KEY_LENGTH
from shared.errors import ManyModelsError

PARTITION_ID = "partition_id"
PARTITION_ID_PATTERN = re.compile(r"^p[0-9a-f]{20}$")


class PartitionKeyError(ManyModelsError, ValueError):
    """Key values that do not name one partition; ``key`` is the key column at fault (if one is)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


def canonical_value(value: Any) -> str:
    """One text form per key value, so 7, 7.0 and '7' read from CSV or Parquet give the same id."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ValueError("a partition key value is null")
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return str(value)


def partition_id(values: Sequence[Any]) -> str:
    text = json.dumps([canonical_value(v) for v in values], ensure_ascii=False, separators=(",", ":"))
    return "p" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def partition_ids(frame: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """Vectorised: one hash per unique key combination, mapped back to rows by group number."""
    grouped = frame.groupby(list(keys), sort=False, dropna=False)
    codes = grouped.ngroup().to_numpy()
    uniq = frame[list(keys)].drop_duplicates()  # same order as ngroup with sort=False
    ids = np.array([partition_id(row) for row in uniq.itertuples(index=False, name=None)], dtype=object)
    return pd.Series(ids[codes] if len(ids) else np.array([], dtype=object), index=frame.index, name=PARTITION_ID)


def key_dict(keys: Sequence[str], values: Sequence[Any]) -> dict[str, str]:
    return {k: canonical_value(v) for k, v in zip(keys, values)}


def describe(keys: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in keys.items())


def encodable(text: str) -> bool:
    """Is the text valid UTF-8 once encoded (no lone surrogate such as a JSON "\\ud800")?"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_partition_id(value: Any) -> bool:
    """``p`` + 20 hex digits: the only form a partition id has (safe in paths, URLs and SQL)."""
    return isinstance(value, str) and PARTITION_ID_PATTERN.match(value) is not None


def partition_of(names: Sequence[str], keys: Any) -> tuple[str, dict[str, str]]:
    """The partition id and canonical key values that a request's key object names.

    The one check of key values from outside (an HTTP request, a queue message, CLI tags): every key
    column present, none unknown, each value a string or a finite number. Raises
    :class:`PartitionKeyError` naming the key column at fault.
    """
    names = list(names)
    if not isinstance(keys, Mapping):
        raise PartitionKeyError(f"the partition keys must be an object with the values of {names}")
    missing = [n for n in names if n not in keys]
    if missing:
        raise PartitionKeyError(f"missing key column(s) {missing}; the partition keys are {names}", missing[0])
    for name in names:
        value = keys[name]
        if value is None or isinstance(value, (dict, list, tuple, set)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise PartitionKeyError(f"partition key {name!r} must be a string or a number, got {value!r}", name)
        if isinstance(value, str) and len(value) > MAX_KEY_LENGTH:  # as ingestion refuses it
            raise PartitionKeyError(f"partition key {name!r}: {len(value):,} characters; at most "
                                    f"{MAX_KEY_LENGTH:,} characters", name)
        if isinstance(value, str) and not encodable(value):
            raise PartitionKeyError(f"partition key {name!r} is not valid unicode (a lone surrogate)", name)
    extra = [k for k in keys if k not in names]
    if extra:
        raise PartitionKeyError(f"unknown key column(s) {extra}; the partition keys are {names}", str(extra[0]))
    values = [keys[n] for n in names]
    return partition_id(values), {n: canonical_value(v) for n, v in zip(names, values)}
