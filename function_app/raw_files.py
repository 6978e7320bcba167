"""A quick check of a new raw file before any run starts: the core's reader and validation on a sample.

Only the head of a CSV file, or the first rows of a Parquet file, are read (through ranged reads on
a blob lake), so a bad upload is refused in a second with the core's own message — missing
columns, unparseable times or targets, null keys — while the full validation still runs in the
ingest activity. A sample can miss a problem further down the file (the ingest activity then
catches it); what it does flag — a missing column, an unparseable value — is in the file.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.data.ingest import IngestError, read_source
from shared.lake import Lake, LakeError, folder_parts
from shared.data.validation import DataValidationError, validate

SAMPLE_BYTES = 1 << 20  # the head of a CSV file that is checked (about 20,000 rows)
SAMPLE_ROWS = 5_000  # rows of the first row group of a Parquet file that are checked


class Rejected(Exception):
    """A raw file that cannot be ingested; the message is the reason, naming the file."""


class NotReady(Exception):
    """A raw file that is not complete yet (a copy into the lake still running): try again later.

    Transient, unlike :class:`Rejected`: a lake event raises it so Event Grid redelivers the event,
    an HTTP start answers 503 with ``Retry-After``."""


def file_version(lake: Lake, path: str) -> str:
    """The version of a lake file: the blob's ETag, or a local file's modification time and size."""
    try:
        return lake.etag(path)
    except LakeError as exc:
        raise Rejected(str(exc)) from exc


def check_raw_folder(lake: Lake, folder: str, cfg: Any) -> None:
    """A folder dataset (part files and a completion marker, ``_SUCCESS`` or a named manifest): it has
    Parquet parts, none still being copied, and the first one's sample validates (all parts share one
    schema, as Spark writes them)."""
    parts = folder_parts(lake, folder)
    if not parts:
        raise Rejected(f"{folder}: no Parquet part files beside its completion marker (a folder dataset is read "
                       "as Parquet; write CSV as one file, or the folder as Parquet)")
    pending = [p for p in parts if lake.copy_pending(p)]
    if pending:
        raise NotReady(f"{folder}: a copy into {pending[0]} is still running (copy status pending)")
    check_raw_file(lake, parts[0], cfg)


def check_raw_file(lake: Lake, path: str, cfg: Any, size: int | None = None) -> None:
    """Read a sample with the core's reader and validate it; Rejected with the reason if it fails,
    NotReady while a copy into the file is still running."""
    try:
        pending = lake.copy_pending(path)
    except LakeError as exc:
        raise Rejected(str(exc)) from exc
    if pending:
        raise NotReady(f"{path}: a copy into the lake is still running (copy status pending)")
    if size == 0:
        raise Rejected(f"{path}: the file is empty")
    suffix = PurePosixPath(path).suffix.lower()
    tmp = tempfile.mkdtemp(prefix="mm-sample-")
    sample = Path(tmp) / f"sample{suffix}"
    try:
        with _open(lake, path) as handle:
            if suffix == ".csv":
                head = handle.read(SAMPLE_BYTES + 1)
                if not head.strip():
                    raise Rejected(f"{path}: the file is empty")
                if len(head) > SAMPLE_BYTES:
                    head = head[: head.rfind(b"\n", 0, SAMPLE_BYTES) + 1]
                sample.write_bytes(head)
            else:
                parquet = pq.ParquetFile(handle)
                batch = next(parquet.iter_batches(batch_size=SAMPLE_ROWS), None)
                table = (
                    pa.Table.from_batches([batch])
                    if batch is not None
                    else parquet.schema_arrow.empty_table()
                )
                pq.write_table(table, sample)
            frame = read_source(sample, cfg)
            validate(frame, cfg)
    except (IngestError, DataValidationError) as exc:
        raise Rejected(f"{path}: {exc}".replace(str(sample), path)) from exc
    except pa.ArrowInvalid as exc:
        raise Rejected(f"{path}: not a readable Parquet file: {exc}") from exc
    except LakeError as exc:
        raise Rejected(str(exc)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open(lake: Lake, path: str) -> io.BufferedIOBase:
    """A seekable reader over a lake file that fetches only the byte ranges it is asked for."""
    local = lake.local_path(path)
    if local is not None:
        if not local.is_file():
            raise LakeError(f"no such file in the lake: {path}")
        return open(local, "rb")
    return io.BufferedReader(_RangeReader(lake, path, lake.size(path)), buffer_size=256 * 1024)


class _RangeReader(io.RawIOBase):
    """Random access to a blob through ranged reads (Parquet reads the footer first)."""

    def __init__(self, lake: Any, path: str, size: int) -> None:
        self.lake, self.path, self.size, self.pos = lake, path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        length = min(len(buffer), self.size - self.pos)
        if length <= 0:
            return 0
        data = self.lake.read_range(self.path, self.pos, length)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)
