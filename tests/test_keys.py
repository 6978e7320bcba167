"""Partition ids: stable, safe for paths and SQL, the same whatever the source's types."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from shared.keys import partition_id, partition_ids


def test_ids_are_safe_and_never_contain_the_raw_values():
    pid = partition_id(["../../etc/passwd", "x'; DROP TABLE predictions; --"])
    assert re.fullmatch(r"p[0-9a-f]{20}", pid)


def test_the_same_key_read_as_int_float_or_text_gives_the_same_id():
    assert partition_id([7, "A"]) == partition_id([7.0, "A"]) == partition_id(["7", "A"])
    assert partition_id([1, 2]) != partition_id([2, 1])
    assert partition_id(["a,b", "c"]) != partition_id(["a", "b,c"])


def test_null_keys_are_refused():
    with pytest.raises(ValueError, match="null"):
        partition_id([None, "x"])


def test_vectorised_ids_equal_the_scalar_ones_row_by_row():
    frame = pd.DataFrame({"store": ["S1", "S2", "S1", "S3"], "item": [1, 1, 1, 2]})
    ids = partition_ids(frame, ["store", "item"])
    assert list(ids) == [partition_id(r) for r in frame.itertuples(index=False, name=None)]
    assert ids.iloc[0] == ids.iloc[2] and ids.nunique() == 3
