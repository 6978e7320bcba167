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


# -- the one check of key values from outside ----------------------------------------------------------
def test_partition_of_gives_the_id_and_canonical_values_of_a_key_object() -> None:
    from shared.keys import partition_of

    pid, keys = partition_of(["store", "item"], {"item": 7.0, "store": "S1"})
    assert pid == partition_id(["S1", 7]) and keys == {"store": "S1", "item": "7"}


@pytest.mark.parametrize("keys, field, text", [
    ({"store": "S1"}, "item", "missing key column(s) ['item']"),
    ({"store": "S1", "item": None}, "item", "must be a string or a number"),
    ({"store": "S1", "item": float("nan")}, "item", "must be a string or a number"),
    ({"store": ["S1"], "item": "I1"}, "store", "must be a string or a number"),
    ({"store": "S1", "item": "I1", "colour": "red"}, "colour", "unknown key column(s) ['colour']"),
    (["S1", "I1"], None, "must be an object"),
    ({"store": "S" * 1025, "item": "I1"}, "store", "1,025 characters; at most 1,024"),  # issue 18: as ingestion
    ({"store": "S1", "item": "\ud800"}, "item", "not valid unicode"),  # a JSON "\ud800" escape
])
def test_partition_of_names_the_key_column_at_fault(keys, field, text) -> None:
    from shared.keys import PartitionKeyError, partition_of

    with pytest.raises(PartitionKeyError) as caught:
        partition_of(["store", "item"], keys)
    assert caught.value.key == field and text in caught.value.message


def test_is_partition_id_accepts_only_the_hash_form() -> None:
    from shared.keys import is_partition_id

    assert is_partition_id(partition_id(["S1", "I1"]))
    assert not any(is_partition_id(v) for v in ("p123", "P" + "0" * 20, "p" + "g" * 20, None, 7))
