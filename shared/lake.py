"""The data lake: a small interface over a local folder (default) or Azure Blob / ADLS Gen2.

Paths are POSIX strings relative to the lake root whose first segment is the container
(``prepared/<dataset>/batches/batch-00000.parquet``). Writes are atomic: a reader never sees a
half-written file, so a crashed run can be rerun safely.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shared import bounds
from shared import layout
from shared.errors import ManyModelsError

CONTAINERS = ("raw", "prepared", "runs", "scoring", "predictions")
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._=-]+$")


class LakeError(ManyModelsError, ValueError):
    """A lake path is invalid or a file is missing."""


def check_path(path: str) -> str:
    """Reject absolute paths, '..', odd characters and lengths no store takes (a 5,000-character name
    reached the file system as an OSError): lake paths are built by us, never raw input."""
    try:
        bounds.check_length("lake_path_length", path, "lake path")
        for part in path.split("/"):
            if part:
                bounds.check_length("lake_segment_length", part, "lake path segment")
    except bounds.BoundsError as exc:
        raise LakeError(str(exc)) from exc
    p = PurePosixPath(path)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        raise LakeError(f"invalid lake path {path!r}")
    bad = [part for part in p.parts if not _SAFE_SEGMENT.match(part)]
    if bad:
        raise LakeError(f"invalid lake path {path!r}: segment {bad[0]!r} has characters outside [A-Za-z0-9._=-]")
    return str(p)


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temp file in the same folder, then rename: readers see all or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path, data: bytes) -> None:
    atomic_write(target, lambda fh: fh.write(data))


class Lake(Protocol):
    """Every capability a caller uses, on every lake (no ``hasattr`` probing): files by path, a
    file's version and size, byte ranges (sampling a large raw file reads its head or footer only),
    whether a server-side copy into it is still running, and ``local_path`` (None: no local file).
    ``shared_writers`` says whether several machines may write it; such a lake must provide a
    cross-machine writer lease (:func:`shared.runs.backends.writer_lease`)."""

    shared_writers: bool

    def read_bytes(self, path: str) -> bytes: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...
    def exists(self, path: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, path: str) -> None: ...
    def local_path(self, path: str) -> Path | None: ...
    def etag(self, path: str) -> str: ...
    def size(self, path: str) -> int: ...
    def read_range(self, path: str, offset: int, length: int) -> bytes: ...
    def copy_pending(self, path: str) -> bool: ...
    def writer_lease(self, holder: str, wait: float, duration: int) -> Any: ...
    @property
    def uri(self) -> str: ...


class LocalLake:
    """The lake as a local folder, one sub-folder per container. One machine writes it (its
    writers exclude each other with the workdir's lock)."""

    shared_writers = False

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _full(self, path: str) -> Path:
        return self.root / check_path(path)

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._full(path).read_bytes()
        except FileNotFoundError as exc:
            raise LakeError(f"no such file in the lake: {path}") from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        atomic_write_bytes(self._full(path), data)

    def exists(self, path: str) -> bool:
        return self._full(path).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._full(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(PurePosixPath(p.relative_to(self.root).as_posix()))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, path: str) -> None:
        self._full(path).unlink(missing_ok=True)

    def local_path(self, path: str) -> Path:
        return self._full(path)

    def _stat(self, path: str) -> os.stat_result:
        try:
            return self._full(path).stat()
        except FileNotFoundError as exc:
            raise LakeError(f"no such file in the lake: {path}") from exc

    def etag(self, path: str) -> str:
        """A file's version: its modification time and size (a rewrite changes it)."""
        stat = self._stat(path)
        return f"local-{stat.st_mtime_ns}-{stat.st_size}"

    def size(self, path: str) -> int:
        return int(self._stat(path).st_size)

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        try:
            with open(self._full(path), "rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        except FileNotFoundError as exc:
            raise LakeError(f"no such file in the lake: {path}") from exc

    def copy_pending(self, path: str) -> bool:
        """A local file is written whole (atomic rename): never a copy in flight."""
        self._stat(path)
        return False

    def writer_lease(self, holder: str, wait: float, duration: int) -> None:
        """None: one machine writes a local lake; its writers take the workdir's lock instead."""
        return None


def folder_parts(lake: Lake, folder: str) -> list[str]:
    """The Parquet part files of a folder dataset (Spark's ``part-*``), sorted; none under a hidden or
    temporary sub-folder (``_temporary/``, ``.spark-staging``) and no marker (``_SUCCESS``)."""
    prefix = folder.rstrip("/") + "/"
    return sorted(p for p in lake.list(prefix) if p.startswith(prefix) and p.lower().endswith(".parquet")
                  and not any(part.startswith(("_", ".")) for part in p[len(prefix):].split("/")))


def write_parquet(lake: Lake, path: str, frame: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    lake.write_bytes(path, sink.getvalue())


def read_parquet(lake: Lake, path: str, columns: list[str] | None = None) -> pd.DataFrame:
    local = lake.local_path(path)
    if local is not None and not local.is_file():
        raise LakeError(f"no such file in the lake: {path}")
    try:
        source = local if local is not None else io.BytesIO(lake.read_bytes(path))
        table = pq.read_table(source, columns=columns)
    except pa.ArrowInvalid as exc:  # a truncated or overwritten file: name it and how to rewrite it
        raise LakeError(damaged_file_message(path, exc)) from exc
    return table.to_pandas()


def damaged_file_message(path: str, exc: BaseException) -> str:
    """What a lake file that cannot be read as Parquet means, and how to get it written again."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    fix = ("rerun `manymodels ingest` with the same data: it detects the broken dataset and rewrites it"
           if path.startswith(f"{layout.PREPARED}/") else "rerun the command that wrote it")
    return f"the lake file {path} is damaged (truncated or overwritten?): {first}; {fix}"


def iter_lines(lake: Lake, path: str) -> Iterator[str]:
    if not lake.exists(path):
        return iter(())
    return iter(lake.read_bytes(path).decode("utf-8").splitlines())
