"""Read raw source data into one long data frame: CSV, Parquet (file or folder), Excel (.xlsx), or
SQL over ODBC.

Ingestion only reads; it does not judge the data (that is :mod:`shared.data.validation`). It keeps key
columns of CSV files as text, so keys such as ``"007"`` survive, and it turns every failure into an
:class:`IngestError` that names the source, because the caller (CLI, Function, pipeline) must be
able to tell the user which input was unreadable.
"""

from __future__ import annotations

import decimal
import gzip
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.dataset as pads

from shared.config import ProjectConfig
from shared.errors import ManyModelsError
from shared.data.validation import check_arrow_types

ODBC_PREFIX = "odbc:"
FETCH_ROWS = 50_000  # rows per cursor.fetchmany: bounded Python-object overhead per step
_SECRET = re.compile(
    r"((?:PWD|PASSWORD|ACCOUNTKEY|SHAREDACCESSSIGNATURE)\s*=\s*)(\{[^}]*\}|[^;]*)", re.IGNORECASE
)


class IngestError(ManyModelsError, ValueError):
    """A source could not be read; the message names the source (with secrets redacted)."""


def describe_source(source: str | Path) -> str:
    """The source as it may appear in messages and logs: ODBC passwords and keys redacted."""
    text = str(source)
    return _SECRET.sub(r"\1***", text) if text.lower().startswith(ODBC_PREFIX) else text


def read_source(source: str | Path, cfg: ProjectConfig, query: str | None = None) -> pd.DataFrame:
    """Read a ``.csv`` / ``.parquet`` file, a folder of Parquet files, or ``odbc:<connection string>``.

    For ODBC, ``query`` is the SQL to run; rows are fetched in chunks of ``FETCH_ROWS``.
    """
    if isinstance(source, str) and source.lower().startswith(ODBC_PREFIX):
        return _read_odbc(source[len(ODBC_PREFIX) :], query, source)
    if query is not None:
        raise IngestError(f"source {describe_source(source)}: a query is only used with an 'odbc:' source")
    path, kind = file_kind(source)
    if kind == "folder":
        return _read_parquet_folder(path, cfg)
    if kind == "parquet":
        return _read_parquet(path, cfg)
    if kind == "xlsx":
        return _read_xlsx(path, cfg)
    return _read_csv(path, cfg)


def file_kind(source: str | Path) -> tuple[Path, str]:
    """A file source's path and kind: ``parquet``, ``folder`` (of Parquet files), ``csv`` or ``xlsx``."""
    path = Path(source)
    if not path.exists():
        raise IngestError(f"source not found: {path}")
    if path.is_dir():
        return path, "folder"
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".parquet":
        return path, "parquet"
    if path.suffix.lower() == ".csv" or suffixes in (".csv.gz", ".csv.zip", ".csv.bz2", ".csv.xz"):
        return path, "csv"
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        return path, "xlsx"
    raise IngestError(
        f"source {path}: unsupported file type {path.suffix!r}; use .csv, .parquet, .xlsx, a folder of "
        f"Parquet files, or 'odbc:<connection string>' with a query"
        + ("; save an .xls workbook as .xlsx (or CSV) first" if path.suffix.lower() == ".xls" else "")
    )


def iter_batches(path: Path, kind: str, cfg: ProjectConfig, batch_rows: int) -> Iterator[pa.Table | pd.DataFrame]:
    """The source in order, ``batch_rows`` rows at a time (Arrow tables; CSV: pandas chunks, read by
    the same parser as :func:`read_source`), with the same errors as ``read_source``."""
    if kind == "csv":
        try:
            options = csv_options(path, cfg)
            key_types = _csv_key_types(path, cfg, options)
            with pd.read_csv(path, dtype=key_types, keep_default_na=True, chunksize=batch_rows, **options) as chunks:
                yield from chunks
        except pd.errors.EmptyDataError as exc:
            raise IngestError(f"source {path}: the CSV file is empty (no header row)") from exc
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
            raise IngestError(f"source {path}: not a readable CSV file: {exc}") from exc
        return
    if kind == "xlsx":  # a worksheet (at most 1,048,576 rows) is read whole, then handed out in slices
        frame = _read_xlsx(path, cfg)
        for start in range(0, len(frame), batch_rows):
            yield frame.iloc[start:start + batch_rows]
        return
    what = "not a readable Parquet file" if kind == "parquet" else "the Parquet files cannot be read as one table"
    try:
        dataset = _parquet_dataset(path, kind)
        check_arrow_types(dataset.schema, cfg.data)
        if kind == "parquet":
            # one file: its row groups one at a time, as the consumer asks. The dataset scanner
            # decodes ahead on its own threads: with a slower consumer (bucketing) it held the
            # whole file decoded (440 MB of Arrow memory for 8 M rows), so memory grew with the input
            batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        else:  # a folder (hive partition columns): the scanner, serial, reading ahead little
            batches = dataset.scanner(batch_size=batch_rows, batch_readahead=1, fragment_readahead=1,
                                      use_threads=False).to_batches()
        for batch in batches:
            if batch.num_rows:
                yield pa.Table.from_batches([batch]).replace_schema_metadata(dataset.schema.metadata)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"source {path}: {what}: {exc}") from exc


def estimate_rows(path: Path, kind: str) -> int:
    """Rows in a file source: exact for Parquet (metadata), from the size of the first lines for CSV."""
    if kind == "xlsx":
        return _xlsx_rows(path)
    if kind == "csv":
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
        lines = max(1, head.count(b"\n") - 1)
        size = path.stat().st_size
        if "".join(path.suffixes[-2:]).lower() != ".csv":
            size *= 5  # compressed CSV: a rough expansion ratio
        return int(size / max(1.0, len(head) / lines)) if len(head) else 0
    try:
        return int(_parquet_dataset(path, kind).count_rows())
    except (pa.ArrowException, OSError, IngestError):
        return 0


def table_to_pandas(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as :func:`read_source` returns Parquet data (dictionaries decoded)."""
    return _plain(table.to_pandas())


SNIFFED = ",;\t|"  # the delimiters ingest.delimiter = "auto" chooses among


def csv_options(path: Path, cfg: ProjectConfig) -> dict[str, Any]:
    """``pandas.read_csv`` options for the file: the configured delimiter (or the one its header
    uses, among ``SNIFFED``), decimal mark, thousands separator and encoding (``[ingest]``)."""
    spec = cfg.ingest
    sep = spec.delimiter
    if sep == "auto":
        sep = sniff_delimiter(path, spec.encoding)
    options: dict[str, Any] = {"sep": sep, "decimal": spec.decimal, "encoding": spec.encoding}
    if spec.thousands:
        options["thousands"] = spec.thousands
    return options


def sniff_delimiter(path: Path, encoding: str = "utf-8") -> str:
    """The delimiter of a CSV file's header line: the candidate it holds most often outside quotes
    (',' when it holds none: a one-column file). The header is read, not guessed from data rows,
    whose decimal commas would mislead."""
    opener = gzip.open if "".join(path.suffixes[-2:]).lower() == ".csv.gz" else open
    try:
        with opener(path, "rt", encoding=encoding, errors="replace", newline="") as fh:
            header = fh.readline()
    except OSError:
        return ","
    outside, quoted = [], False
    for char in header:
        if char == '"':
            quoted = not quoted
        elif not quoted:
            outside.append(char)
    counts = {sep: outside.count(sep) for sep in SNIFFED}
    best = max(counts, key=lambda sep: (counts[sep], -SNIFFED.index(sep)))
    return best if counts[best] else ","


def _csv_key_types(path: Path, cfg: ProjectConfig, options: dict[str, Any] | None = None) -> dict[str, type]:
    """The key (and text time) columns' types for pandas; refuses a header that names a column twice (pandas would
    rename the second ``price`` to ``price.1`` and one of the two would be dropped unseen)."""
    options = options if options is not None else csv_options(path, cfg)
    head = {"sep": options["sep"], "encoding": options["encoding"]}
    names = [str(v) for v in pd.read_csv(path, nrows=1, header=None, dtype=str, **head).iloc[0].tolist()] \
        if path.stat().st_size else []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise IngestError(f"source {path.name}: the header names the column {name!r} more than once "
                              f"(columns: {names}); rename or remove one of them")
        seen.add(name)
    header = pd.read_csv(path, nrows=0, **head).columns
    types = {k: str for k in cfg.data.keys if k in header}
    if cfg.data.freq != "int" and cfg.data.time in header:  # text times stay text: a thousands separator
        types[cfg.data.time] = str                          # would read 03.04.2024 as 3042024
    return types


def _parquet_dataset(path: Path, kind: str) -> pads.Dataset:
    if kind == "parquet":
        return pads.dataset(path, format="parquet")
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        found = sorted({p.suffix or p.name for p in path.rglob("*") if p.is_file()})
        raise IngestError(f"source {path}: the folder holds no .parquet files (found: {found or 'nothing'})")
    return pads.dataset(
        [str(f) for f in files],
        format="parquet",
        partitioning=pads.HivePartitioning.discover(infer_dictionary=False),
        partition_base_dir=str(path),
    )


def _read_csv(path: Path, cfg: ProjectConfig) -> pd.DataFrame:
    try:
        options = csv_options(path, cfg)
        key_types = _csv_key_types(path, cfg, options)
        return pd.read_csv(path, dtype=key_types, keep_default_na=True, **options)
    except pd.errors.EmptyDataError as exc:
        raise IngestError(f"source {path}: the CSV file is empty (no header row)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise IngestError(f"source {path}: not a readable CSV file: {exc}") from exc


def _read_xlsx(path: Path, cfg: ProjectConfig) -> pd.DataFrame:
    """The workbook's first worksheet (openpyxl): a header row, then one row per record. Cells keep
    their types (dates are dates); key columns are read as text, as from CSV, so "007" stays "007"."""
    try:
        header = pd.read_excel(path, sheet_name=0, nrows=0, engine="openpyxl").columns
        text = {k: str for k in cfg.data.keys if k in header}
        return pd.read_excel(path, sheet_name=0, dtype=text, engine="openpyxl")
    except ImportError as exc:
        raise IngestError(f"source {path}: reading .xlsx needs openpyxl (pip install openpyxl)") from exc
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise IngestError(f"source {path}: not a readable .xlsx workbook: {exc}") from exc


def _xlsx_rows(path: Path) -> int:
    """Rows of the first worksheet as its dimensions say (read-only mode reads no cells)."""
    try:
        from openpyxl import load_workbook

        book = load_workbook(path, read_only=True)
        try:
            return max(0, int(book.worksheets[0].max_row or 0) - 1)
        finally:
            book.close()
    except Exception:  # noqa: BLE001 - an estimate only: read_source reports what is wrong
        return 0


def _read_parquet(path: Path, cfg: ProjectConfig) -> pd.DataFrame:
    try:
        dataset = _parquet_dataset(path, "parquet")
        check_arrow_types(dataset.schema, cfg.data)  # before pandas tries (and fails) to convert them
        return _plain(dataset.to_table().to_pandas())
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"source {path}: not a readable Parquet file: {exc}") from exc


def _read_parquet_folder(path: Path, cfg: ProjectConfig) -> pd.DataFrame:
    """All Parquet files below a folder as one table; hive folders (``store=S01/``) become columns."""
    try:
        dataset = _parquet_dataset(path, "folder")
        check_arrow_types(dataset.schema, cfg.data)
        return _plain(dataset.to_table().to_pandas())
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"source {path}: the Parquet files cannot be read as one table: {exc}") from exc


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Categorical columns (Parquet dictionaries) back to their values: keys compare as read."""
    for name in frame.columns:
        if isinstance(frame[name].dtype, pd.CategoricalDtype):
            frame[name] = frame[name].astype(frame[name].cat.categories.dtype)
    return frame


def _read_odbc(connection: str, query: str | None, source: str) -> pd.DataFrame:
    shown = describe_source(source)
    if not query or not query.strip():
        raise IngestError(f"source {shown}: an ODBC source needs a SQL query")
    try:
        import pyodbc
    except ImportError as exc:  # the package is a runtime dependency; its native library may be missing
        raise IngestError(f"source {shown}: pyodbc is not usable on this machine: {exc}") from exc
    try:
        conn = pyodbc.connect(connection, autocommit=True)
    except pyodbc.Error as exc:
        raise IngestError(f"source {shown}: cannot connect: {_odbc_message(exc)}") from exc
    try:
        cursor = conn.cursor()
        cursor.execute(query)
        if cursor.description is None:
            raise IngestError(f"source {shown}: the query returned no result set: {query}")
        columns = [d[0] for d in cursor.description]
        chunks = []
        while True:
            rows = cursor.fetchmany(FETCH_ROWS)
            if not rows:
                break
            chunks.append(pd.DataFrame.from_records([tuple(r) for r in rows], columns=columns))
    except pyodbc.Error as exc:
        raise IngestError(f"source {shown}: query failed: {_odbc_message(exc)}; query: {query}") from exc
    finally:
        conn.close()
    if not chunks:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return _numeric_decimals(pd.concat(chunks, ignore_index=True))


def _numeric_decimals(frame: pd.DataFrame) -> pd.DataFrame:
    """SQL DECIMAL/NUMERIC arrive as Python Decimals; models want floats."""
    for name in frame.columns:
        col = frame[name]
        if col.dtype == object:
            sample = col.dropna()
            if len(sample) and all(isinstance(v, decimal.Decimal) for v in sample.iloc[:100]):
                try:
                    frame[name] = col.astype("float64")
                except (TypeError, ValueError):
                    pass  # a mixed column stays as read; validation names it if it must be numeric
    return frame


def _odbc_message(exc: Any) -> str:
    args = getattr(exc, "args", ())
    return str(args[-1]) if args else str(exc)
