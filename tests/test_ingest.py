"""Reading sources: CSV, Parquet files and folders, and SQL through a real ODBC driver."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.data import ingest
from shared.config import ProjectConfig
from shared.data.ingest import IngestError, read_source
from shared.data.synthetic import generate_panel, write_panel
from shared.data.validation import validate

CFG = ProjectConfig()


@pytest.fixture(scope="module")
def small_panel() -> pd.DataFrame:
    return pd.concat(generate_panel(partitions=12, periods=20, seed=9), ignore_index=True)


def test_reads_a_generated_csv_and_parquet_file_to_the_same_values(tmp_path):
    write_panel(tmp_path / "p.csv", partitions=10, periods=15, seed=1)
    write_panel(tmp_path / "p.parquet", partitions=10, periods=15, seed=1)
    from_csv = read_source(tmp_path / "p.csv", CFG)
    from_parquet = read_source(str(tmp_path / "p.parquet"), CFG)
    assert (
        list(from_csv.columns)
        == list(from_parquet.columns)
        == ["store", "item", "date", "sales", "price", "promo"]
    )
    assert len(from_csv) == len(from_parquet) > 0
    np.testing.assert_array_equal(from_csv["sales"], from_parquet["sales"])
    assert (pd.to_datetime(from_csv["date"]) == from_parquet["date"]).all()


def test_csv_key_columns_stay_text_so_leading_zeros_survive(tmp_path):
    path = tmp_path / "zips.csv"
    path.write_text("store,item,date,sales,price,promo\n007,0042,2023-01-01,5,1.5,0\n", encoding="utf-8")
    frame = read_source(path, CFG)
    assert frame.loc[0, "store"] == "007" and frame.loc[0, "item"] == "0042"
    assert frame["sales"].dtype.kind in "if"  # only the keys are forced to text


def test_reads_a_folder_of_parquet_files_including_hive_partition_folders(tmp_path, small_panel):
    plain = tmp_path / "plain"
    plain.mkdir()
    half = len(small_panel) // 2
    small_panel.iloc[:half].to_parquet(plain / "part-0.parquet", index=False)
    small_panel.iloc[half:].to_parquet(plain / "part-1.parquet", index=False)
    back = read_source(plain, CFG)
    assert len(back) == len(small_panel)
    np.testing.assert_array_equal(np.sort(back["sales"].to_numpy()), np.sort(small_panel["sales"].to_numpy()))

    hive = tmp_path / "hive"
    pq.write_to_dataset(
        pa.Table.from_pandas(small_panel, preserve_index=False), hive, partition_cols=["store"]
    )
    back = read_source(hive, CFG)
    assert len(back) == len(small_panel)
    assert set(back["store"]) == set(small_panel["store"])
    assert not isinstance(back["store"].dtype, pd.CategoricalDtype)


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(IngestError, match="source not found: .*nowhere.csv"):
        read_source(tmp_path / "nowhere.csv", CFG)


def test_unknown_suffix_names_the_source_and_the_supported_kinds(tmp_path):
    path = tmp_path / "sales.xls"
    path.write_bytes(b"an old Excel workbook")
    with pytest.raises(
        IngestError, match=r"sales\.xls: unsupported file type '\.xls'; use \.csv, \.parquet, \.xlsx.*save an \.xls"
    ):
        read_source(path, CFG)


def test_an_xlsx_workbook_reads_as_its_csv_does_in_memory_and_streamed(tmp_path, capsys):
    """Excel's first worksheet (openpyxl): keys as text ("007" survives), dates as dates; the same
    dataset as the CSV of the same rows, whichever ingestion path reads it."""
    from shared.cli import main
    from shared.lake import LocalLake
    from shared.data.streaming import StreamPlan, ingest_source

    frame = next(generate_panel(partitions=3, periods=12, seed=2)).assign(store="007")
    frame.to_excel(book := tmp_path / "sales.xlsx", index=False)
    frame.to_csv(text := tmp_path / "sales.csv", index=False)
    back = read_source(book, CFG)
    assert list(back.columns) == list(frame.columns) and (back["store"] == "007").all()
    assert pd.api.types.is_datetime64_any_dtype(back["date"]) and len(back) == len(frame)
    plan = StreamPlan(batch_rows=7, buckets=4, part_rows=10, workers=1, worker_mb=64)
    ids = {ingest_source(LocalLake(tmp_path / f"lake-{path.suffix}-{stream}"), path, CFG, stream=stream,
                         plan=plan if stream else None, tmp_root=tmp_path)[0].dataset_id
           for path in (book, text) for stream in (False, True)}
    assert len(ids) == 1
    assert main(["ingest", "--data", str(book), "--workdir", str(tmp_path / "mm"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["partitions"] == 3
    (broken := tmp_path / "broken.xlsx").write_bytes(b"not a workbook")
    with pytest.raises(IngestError, match=r"broken\.xlsx: not a readable \.xlsx workbook"):
        read_source(broken, CFG)


def test_corrupt_parquet_empty_csv_and_folder_without_parquet_are_errors_naming_the_source(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(IngestError, match=r"bad\.parquet: not a readable Parquet file"):
        read_source(bad, CFG)
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(IngestError, match=r"empty\.csv: the CSV file is empty"):
        read_source(empty, CFG)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(
        IngestError, match=r"folder: the folder holds no \.parquet files \(found: \['\.txt'\]\)"
    ):
        read_source(folder, CFG)


def test_a_query_without_an_odbc_source_is_refused(tmp_path, small_panel):
    small_panel.to_parquet(tmp_path / "p.parquet", index=False)
    with pytest.raises(IngestError, match="only used with an 'odbc:' source"):
        read_source(tmp_path / "p.parquet", CFG, query="select 1")


# -- ODBC, through unixODBC and the SQLite3 driver, against a real database file -------------------


def _require_sqlite_odbc() -> None:
    pyodbc = pytest.importorskip("pyodbc")
    if "SQLite3" not in pyodbc.drivers():
        pytest.skip(
            "the SQLite3 ODBC driver is not installed (Debian: apt-get install unixodbc libsqliteodbc)"
        )


@pytest.fixture()
def sales_db(tmp_path, small_panel):
    _require_sqlite_odbc()
    path = tmp_path / "source.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "create table sales (store text, item text, date text, sales real, price real, promo integer)"
        )
        rows = small_panel.assign(date=small_panel["date"].dt.strftime("%Y-%m-%d")).itertuples(
            index=False, name=None
        )
        conn.executemany("insert into sales values (?, ?, ?, ?, ?, ?)", list(rows))
    return path


@pytest.mark.odbc
def test_reads_a_sql_query_over_odbc_in_chunks_and_validates(sales_db, small_panel, monkeypatch):
    monkeypatch.setattr(ingest, "FETCH_ROWS", 17)  # several fetchmany rounds
    frame = read_source(
        f"odbc:Driver=SQLite3;Database={sales_db}",
        CFG,
        query="select store, item, date, sales, price, promo from sales order by store, item, date",
    )
    assert len(frame) == len(small_panel)
    assert list(frame.columns) == ["store", "item", "date", "sales", "price", "promo"]
    np.testing.assert_allclose(frame["sales"].to_numpy(dtype=float), small_panel["sales"].to_numpy())
    validated, report = validate(frame, CFG)
    assert report.partitions == 12
    assert pd.api.types.is_datetime64_any_dtype(validated["date"])


@pytest.mark.odbc
def test_odbc_query_returning_no_rows_gives_an_empty_frame_with_columns(sales_db):
    frame = read_source(
        f"odbc:Driver=SQLite3;Database={sales_db}", CFG, query="select * from sales where 1 = 0"
    )
    assert len(frame) == 0 and "sales" in frame.columns


@pytest.mark.odbc
def test_bad_odbc_query_names_the_source_with_the_password_redacted(sales_db):
    source = f"odbc:Driver=SQLite3;Database={sales_db};PWD=hunter2"
    with pytest.raises(IngestError) as caught:
        read_source(source, CFG, query="select * from no_such_table")
    message = str(caught.value)
    assert "query failed" in message and "no_such_table" in message
    assert f"Database={sales_db}" in message and "PWD=***" in message and "hunter2" not in message


@pytest.mark.odbc
def test_odbc_source_without_a_query_or_with_an_unknown_driver_is_an_ingest_error(sales_db):
    with pytest.raises(IngestError, match="needs a SQL query"):
        read_source(f"odbc:Driver=SQLite3;Database={sales_db}", CFG)
    with pytest.raises(IngestError, match="cannot connect"):
        read_source("odbc:Driver=NoSuchDriver;Database=x", CFG, query="select 1")


# -- time zones: one rule for offsets in every format (issue 18) ------------------------------------
# Daily (and coarser) data keeps the local calendar date as written with its offset, whatever the
# format; ``data.timezone`` names a zone to convert to instead. Berlin moved to summer time on
# 2024-03-31 at 02:00: midnight that day is still +01:00, the next is +02:00.

BERLIN_DAYS = pd.Series(pd.date_range("2024-03-28", "2024-04-03", freq="D", tz="Europe/Berlin"))
DAILY = ProjectConfig().with_overrides({"data.freq": "D", "data.covariates": [], "validation.gaps": "keep"})


def _zoned_frame(times: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({"store": "S1", "item": "I1", "date": times,
                         "sales": np.arange(1.0, len(times) + 1.0)})


def _write(tmp_path, frame: pd.DataFrame, fmt: str):
    """The same rows as a CSV (offsets in the text, as pandas writes them) or a Parquet file
    (a tz-aware timestamp column, as pyarrow stores it)."""
    path = tmp_path / f"zoned.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def _ingested(tmp_path, path, cfg: ProjectConfig, stream: bool) -> tuple[pd.DataFrame, dict]:
    from shared.lake import LocalLake
    from shared.data.streaming import StreamPlan, ingest_source

    root = tmp_path / f"lake-{path.suffix[1:]}-{stream}"
    plan = StreamPlan(batch_rows=3, buckets=4, part_rows=2, workers=1, worker_mb=64) if stream else None
    _, report = ingest_source(LocalLake(root), path, cfg, stream=stream, plan=plan, tmp_root=tmp_path)
    out = pd.concat(pd.read_parquet(p) for p in sorted(root.rglob("batch-*.parquet")))
    return out.sort_values(cfg.data.time).reset_index(drop=True), report.counts


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_daily_times_with_offsets_keep_their_local_dates_in_csv_and_parquet(tmp_path, fmt, stream):
    frame = _zoned_frame(BERLIN_DAYS)
    assert frame["date"].dt.strftime("%z").nunique() == 2  # the offsets change inside the data
    out, counts = _ingested(tmp_path, _write(tmp_path, frame, fmt), DAILY, stream)
    assert [d.date().isoformat() for d in out["date"]] == [f"2024-{d}" for d in (
        "03-28", "03-29", "03-30", "03-31", "04-01", "04-02", "04-03")]
    assert out["sales"].tolist() == frame["sales"].tolist()  # nothing merged, nothing invented
    assert counts == {}
    assert not isinstance(out["date"].dtype, pd.DatetimeTZDtype)  # plain dates, as before


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_named_timezone_converts_daily_times_with_offsets_in_every_format(tmp_path, fmt):
    cfg = DAILY.with_overrides({"data.timezone": "America/New_York"})
    frame = _zoned_frame(BERLIN_DAYS)
    out, counts = _ingested(tmp_path, _write(tmp_path, frame, fmt), cfg, stream=False)
    # Berlin midnight is the evening before in New York
    assert out["date"].dt.date.astype(str).tolist()[:2] == ["2024-03-27", "2024-03-28"]
    assert out["sales"].tolist() == frame["sales"].tolist() and counts == {}


def test_a_time_column_mixing_offsets_and_plain_times_is_refused_naming_rows(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("store,item,date,sales\nS1,I1,2024-03-28T00:00:00+01:00,1\nS1,I1,2024-03-29T00:00:00,2\n",
                    encoding="utf-8")
    from shared.data.validation import DataValidationError

    with pytest.raises(DataValidationError, match="offset") as caught:
        validate(read_source(path, DAILY), DAILY)
    assert caught.value.column == "date" and list(caught.value.examples.index) == [1]


def test_the_timezone_is_an_iana_name_and_an_unknown_one_is_a_config_error():
    from shared.config import ConfigError

    assert DAILY.with_overrides({"data.timezone": "Europe/Berlin"}).data.timezone == "Europe/Berlin"
    with pytest.raises(ConfigError, match="data.timezone: 'Mars/Olympus' is not a time zone"):
        DAILY.with_overrides({"data.timezone": "Mars/Olympus"})


@pytest.mark.odbc
def test_odbc_times_with_offsets_follow_the_same_rule_as_files(tmp_path):
    _require_sqlite_odbc()
    path = tmp_path / "zoned.sqlite"
    frame = _zoned_frame(BERLIN_DAYS)
    with sqlite3.connect(path) as conn:
        conn.execute("create table sales (store text, item text, date text, sales real)")
        conn.executemany("insert into sales values (?, ?, ?, ?)",
                         list(frame.assign(date=frame["date"].map(pd.Timestamp.isoformat)).itertuples(
                             index=False, name=None)))
    read = read_source(f"odbc:Driver=SQLite3;Database={path}", DAILY, query="select * from sales")
    out, report = validate(read, DAILY)
    assert out["date"].dt.date.astype(str).tolist()[2:5] == ["2024-03-30", "2024-03-31", "2024-04-01"]
    assert out["sales"].tolist() == frame["sales"].tolist() and report.counts == {}


# -- issue 18: a broken prepared dataset is detected and rewritten by the next ingest ---------------
@pytest.mark.parametrize("damage", ["truncate", "delete_manifest_tail"])
def test_reingesting_rewrites_a_truncated_prepared_file(tmp_path, capsys, damage):
    from pathlib import Path

    from shared.cli import main

    write_panel(tmp_path / "sales.csv", partitions=6, periods=60, seed=4)
    work = tmp_path / "w"
    flags = ["--workdir", str(work), "--no-progress", "--workers", "1", "--rows-per-file", "100"]
    assert main(["ingest", "--data", str(tmp_path / "sales.csv"), *flags]) == 0
    dataset = (work / "lake" / "prepared" / "LATEST").read_text().strip()
    root = work / "lake" / "prepared" / dataset
    victim = sorted((root / "batches").glob("*.parquet"))[0] if damage == "truncate" else root / "manifest.parquet"
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])  # a real truncated write
    capsys.readouterr()
    assert main(["ingest", "--data", str(tmp_path / "sales.csv"), *flags]) == 0
    out = capsys.readouterr().out
    assert "already ingested" not in out and "rewrote" in out and Path(victim).name in out, out
    assert victim.read_bytes() == original  # the same content as the first ingest wrote
    assert main(["train", "--workdir", str(work), "--no-progress", "--workers", "1"]) == 0


# -- CSV files as the real world writes them (issue 19, item 4) ------------------------------------

EUROPEAN = """Filiale;Artikel;Datum;Absatz;Preis
F01;A1;03.04.2024;1.234,5;2,49
F01;A1;10.04.2024;1.100,0;2,49
F02;A1;03.04.2024;87,25;2,99
"""


def _cfg(**overrides) -> ProjectConfig:
    base = {"data.keys": ["Filiale", "Artikel"], "data.time": "Datum", "data.target": "Absatz",
            "data.covariates": ["Preis"], "data.freq": "W-WED"}
    cfg = ProjectConfig().with_overrides({**base, **overrides})
    cfg.validate()
    return cfg


def test_a_semicolon_csv_with_decimal_commas_and_day_first_dates_reads_with_its_options(tmp_path):
    path = tmp_path / "absatz.csv"
    path.write_text(EUROPEAN, encoding="utf-8")
    cfg = _cfg(**{"ingest.decimal": ",", "ingest.thousands": ".", "data.time_format": "%d.%m.%Y"})
    frame = read_source(path, cfg)
    assert list(frame.columns) == ["Filiale", "Artikel", "Datum", "Absatz", "Preis"]  # ';' sniffed
    assert frame["Absatz"].tolist() == [1234.5, 1100.0, 87.25] and frame["Preis"].tolist() == [2.49, 2.49, 2.99]
    validated, _ = validate(frame, cfg)
    assert sorted(pd.to_datetime(validated["Datum"]).dt.strftime("%Y-%m-%d").unique()) == ["2024-04-03", "2024-04-10"]


def test_day_first_dates_without_a_format(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text("store,date,sales\nS1,13/01/2024,5\nS1,20/01/2024,6\nS1,03/02/2024,7\n", encoding="utf-8")
    cfg = ProjectConfig().with_overrides({"data.keys": ["store"], "data.covariates": [], "data.freq": "W-SAT",
                                          "data.dayfirst": True})
    validated, _ = validate(read_source(path, cfg), cfg)
    assert pd.to_datetime(validated["date"]).dt.month.tolist() == [1, 1, 2]  # 03/02 is 3 February


def test_numbers_with_thousands_separators_are_refused_naming_the_option_then_read_with_it(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text('store,date,sales\nS1,2024-01-05,"24,924.50"\nS1,2024-01-12,"1,002.00"\n', encoding="utf-8")
    cfg = ProjectConfig().with_overrides({"data.keys": ["store"], "data.covariates": [], "data.freq": "W-FRI"})
    with pytest.raises(Exception, match=r"--thousands ','"):
        validate(read_source(path, cfg), cfg)
    cfg = cfg.with_overrides({"ingest.thousands": ","})
    validated, _ = validate(read_source(path, cfg), cfg)
    assert validated["sales"].tolist() == [24924.5, 1002.0]


def test_a_text_time_that_is_not_a_date_names_the_format_setting(tmp_path):
    path = tmp_path / "absatz.csv"
    # the first date reads either way; pandas guesses month first, and then 17.04.2024 is no date
    path.write_text(EUROPEAN.replace("10.04.2024", "17.04.2024"), encoding="utf-8")
    cfg = _cfg(**{"ingest.decimal": ",", "ingest.thousands": "."})
    with pytest.raises(Exception, match="time_format"):
        validate(read_source(path, cfg), cfg)


def test_a_latin1_file_reads_with_its_encoding(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_bytes("store,date,sales\nMünchen,2024-01-05,3\nMünchen,2024-01-12,4\n".encode("latin-1"))
    cfg = ProjectConfig().with_overrides({"data.keys": ["store"], "data.covariates": [], "data.freq": "W-FRI"})
    with pytest.raises(IngestError, match="not a readable CSV"):
        read_source(path, cfg)
    frame = read_source(path, cfg.with_overrides({"ingest.encoding": "latin-1"}))
    assert frame["store"].tolist() == ["München", "München"]


@pytest.mark.parametrize("setting, value, words", [
    ("ingest.decimal", ";", "ingest.decimal"),
    ("ingest.delimiter", ",,", "ingest.delimiter"),
    ("ingest.encoding", "klingon", "ingest.encoding"),
    ("data.time_format", "dd.mm.yyyy", "strptime"),
])
def test_impossible_reading_options_are_refused_naming_the_setting(setting, value, words):
    with pytest.raises(Exception, match=words):
        ProjectConfig().with_overrides({setting: value}).validate()


def test_the_cli_reads_such_a_file_with_its_flags(tmp_path, capsys):
    from shared.cli import main

    path = tmp_path / "absatz.csv"
    path.write_text(EUROPEAN, encoding="utf-8")
    code = main(["ingest", "--data", str(path), "--workdir", str(tmp_path / "mm"), "--keys", "Filiale,Artikel",
                 "--time", "Datum", "--target", "Absatz", "--covariates", "Preis", "--freq", "W-WED",
                 "--decimal", ",", "--thousands", ".", "--time-format", "%d.%m.%Y", "--json", "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0, out
    assert json.loads(out)["rows"] == 3
