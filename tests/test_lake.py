"""The local lake: atomic writes, safe paths, Parquet round trips."""
from __future__ import annotations

import pandas as pd
import pytest

from shared.lake import LakeError, LocalLake, read_parquet, write_parquet


def test_write_read_list_delete(tmp_path):
    lake = LocalLake(tmp_path)
    lake.write_bytes("runs/r1/a.txt", b"one")
    lake.write_bytes("runs/r1/b/c.txt", b"two")
    assert lake.read_bytes("runs/r1/a.txt") == b"one"
    assert lake.list("runs/r1") == ["runs/r1/a.txt", "runs/r1/b/c.txt"]
    assert lake.list("runs/none") == []
    lake.delete("runs/r1/a.txt")
    assert not lake.exists("runs/r1/a.txt")
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "runs/../../x", "runs/a b", "runs/é", ""])
def test_unsafe_paths_are_refused(tmp_path, path):
    with pytest.raises(LakeError):
        LocalLake(tmp_path).write_bytes(path, b"x")


def test_parquet_round_trip_and_missing_file(tmp_path):
    lake = LocalLake(tmp_path)
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    write_parquet(lake, "prepared/d1/f.parquet", frame)
    pd.testing.assert_frame_equal(read_parquet(lake, "prepared/d1/f.parquet"), frame, check_dtype=False)
    with pytest.raises(LakeError, match="no such file"):
        read_parquet(lake, "prepared/d1/missing.parquet")


def test_a_local_lake_has_every_capability_of_the_protocol(tmp_path) -> None:
    """Callers never probe with hasattr: a file's version, size, byte ranges, copy state, lease."""
    lake = LocalLake(tmp_path)
    lake.write_bytes("raw/a.csv", b"0123456789")
    version = lake.etag("raw/a.csv")
    assert version.startswith("local-") and lake.size("raw/a.csv") == 10
    assert lake.read_range("raw/a.csv", 3, 4) == b"3456"
    assert lake.copy_pending("raw/a.csv") is False and lake.shared_writers is False
    assert lake.writer_lease("me", 0, 60) is None  # one machine: the workdir's lock covers it
    lake.write_bytes("raw/a.csv", b"01234567890")
    assert lake.etag("raw/a.csv") != version
    for ask in (lake.etag, lake.size, lake.copy_pending):
        with pytest.raises(LakeError, match="no such file in the lake: raw/missing.csv"):
            ask("raw/missing.csv")
