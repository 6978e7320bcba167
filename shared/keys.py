"""Partition identity: safe ids derived from key values, never the raw values themselves.

A partition id is a short hash of the canonical key values, so it is safe in file names, blob
names, SQL identifiers' values and URLs whatever the keys contain (slashes, quotes, unicode).
The manifest maps ids back to key values.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

PARTITION_ID = "partition_id"


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
