"""A seeded synthetic retail panel: the fixture of the test suite and the demo's data set.

Every random draw is a counter-based hash of ``(seed, stream, entity, period)`` instead of a
stateful generator, so the panel is identical for a seed whatever the chunk size, chunks can be
generated independently (40 million rows stream through in bounded memory), and everything is
vectorised numpy.

The demand model is the classic retail one, in log space::

    log mean = level + trend * years + seasonality(day of year)
               + elasticity * log(price / base price) + lift * promo
    sales    = mean * lognormal noise (sd ~ 0.12)

with store and item effects shared across partitions, quarterly regular-price changes and promo
discounts (so the price elasticity is identifiable), about 10 % intermittent-demand series (mostly
zeros), about 1 % of rows missing inside series, and a few short series that start late.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shared.config import offset_alias

COLUMNS = ("store", "item", "date", "sales", "price", "promo")

NOISE_SD = 0.12
INTERMITTENT_SHARE = 0.10
SHORT_SHARE = 0.02
MISSING_SHARE = 0.01
MAX_CHUNK_ROWS = 2_000_000  # long series shrink chunks below chunk_partitions: memory stays bounded
PRICE_BLOCK = 13  # regular prices change at most once per block of periods (a quarter of weeks)

# one stream id per independent random quantity
(
    _S_STORE_LEVEL,
    _S_ITEM_LEVEL,
    _S_LEVEL,
    _S_TREND,
    _S_AMP1,
    _S_AMP2,
    _S_PHASE1,
    _S_PHASE2,
    _S_ITEM_ELAST,
    _S_ELAST,
    _S_PRICE,
    _S_STORE_PRICE,
    _S_PRICE_PATH,
    _S_PROMO_RATE,
    _S_PROMO,
    _S_DISCOUNT,
    _S_LIFT,
    _S_NOISE,
    _S_INTERMITTENT,
    _S_OCCUR_RATE,
    _S_OCCUR,
    _S_SHORT,
    _S_SHORT_LEN,
    _S_MISSING,
) = range(1, 25)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


ROW_GROUP_ROWS = 256 * 1024  # rows per Parquet row group of a generated file

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 values."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, stream: int, a: np.ndarray, b: np.ndarray | int = 0) -> np.ndarray:
    """Uniform (0, 1) draws that depend only on (seed, stream, a, b): chunking cannot change them."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        key = _mix(key ^ np.uint64(stream))
        a64 = np.asarray(a).astype(np.uint64)
        b64 = np.asarray(b).astype(np.uint64)
        h = _mix(_mix(key ^ a64) ^ _mix(b64 + _GOLDEN))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2.0**53)


def _normal(seed: int, stream: int, a: np.ndarray, b: np.ndarray | int = 0) -> np.ndarray:
    """Standard normal draws by Box-Muller over two independent hashed uniforms."""
    u1 = _uniform(seed, stream, a, b)
    u2 = _uniform(seed, stream + 1000, a, b)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _layout(partitions: int) -> tuple[int, int]:
    """Stores x items close to a square grid, e.g. 10,000 partitions = 100 stores x 100 items."""
    n_stores = max(1, int(math.sqrt(partitions)))
    n_items = -(-partitions // n_stores)
    return n_stores, n_items


def time_axis(periods: int, freq: str, start: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The panel's time values, each period's position in the year (0..1) and years elapsed.

    Integer periods are read as weeks, so they carry the same yearly pattern as weekly dates.
    """
    if freq == "int":
        steps = np.arange(1, periods + 1, dtype=np.int64)
        return steps, ((steps - 1) % 52) / 52.0, (steps - 1) / 52.0
    dates = pd.date_range(start=start, periods=periods, freq=offset_alias(freq))
    year_pos = (dates.day_of_year.to_numpy() - 1 + dates.hour.to_numpy() / 24.0) / 365.25
    elapsed = (dates - dates[0]) / pd.Timedelta(days=365.25)
    return dates.to_numpy(), year_pos, np.asarray(elapsed, dtype=np.float64)


def _chunk(
    p0: int,
    p1: int,
    periods: int,
    seed: int,
    axis: tuple[np.ndarray, np.ndarray, np.ndarray],
    layout: tuple[int, int],
    intermittent_share: float = INTERMITTENT_SHARE,
) -> pd.DataFrame:
    """Rows of partitions p0..p1-1, all periods, minus the missing ones; vectorised over rows."""
    times, year_pos, elapsed = axis
    n_stores, n_items = layout
    part = np.arange(p0, p1, dtype=np.int64)
    store, item = part // n_items, part % n_items

    # -- per-partition parameters (store and item effects are shared across partitions) ---------
    level = (
        math.log(40.0)
        + 0.3 * _normal(seed, _S_STORE_LEVEL, store)
        + 0.6 * _normal(seed, _S_ITEM_LEVEL, item)
        + 0.3 * _normal(seed, _S_LEVEL, part)
    )
    trend = 0.03 + 0.08 * _normal(seed, _S_TREND, part)  # log growth per year
    amp1 = 0.15 + 0.30 * _uniform(seed, _S_AMP1, item)
    amp2 = 0.10 * _uniform(seed, _S_AMP2, part)
    phase1 = 2 * np.pi * _uniform(seed, _S_PHASE1, item)
    phase2 = 2 * np.pi * _uniform(seed, _S_PHASE2, part)
    elasticity = np.clip(
        -1.5 + 0.3 * _normal(seed, _S_ITEM_ELAST, item) + 0.1 * _normal(seed, _S_ELAST, part), -3.0, -0.3
    )
    base_price = (1.0 + 19.0 * _uniform(seed, _S_PRICE, item)) * np.exp(
        0.05 * _normal(seed, _S_STORE_PRICE, store)
    )
    promo_rate = 0.05 + 0.15 * _uniform(seed, _S_PROMO_RATE, part)
    discount = 0.10 + 0.20 * _uniform(seed, _S_DISCOUNT, part)
    lift = 0.10 + 0.30 * _uniform(seed, _S_LIFT, part)
    intermittent = _uniform(seed, _S_INTERMITTENT, part) < intermittent_share
    occur_rate = 0.15 + 0.35 * _uniform(seed, _S_OCCUR_RATE, part)
    short = (_uniform(seed, _S_SHORT, part) < SHORT_SHARE) & ~intermittent
    short_len = 2 + np.floor(_uniform(seed, _S_SHORT_LEN, part) * max(1, periods // 3 - 1)).astype(np.int64)
    first = np.where(short, np.maximum(0, periods - short_len), 0)
    level = np.where(intermittent, math.log(2.0) + 0.5 * _normal(seed, _S_LEVEL, part), level)

    # -- per-row quantities --------------------------------------------------------------------
    n = len(part)
    r_part = np.repeat(np.arange(n), periods)  # local partition index of each row
    t = np.tile(np.arange(periods, dtype=np.int64), n)
    g = part[r_part]  # global partition index
    years, pos = elapsed[t], year_pos[t]

    promo = (_uniform(seed, _S_PROMO, g, t) < promo_rate[r_part]).astype(np.int64)
    regular = np.exp(0.07 * _normal(seed, _S_PRICE_PATH, g, t // PRICE_BLOCK))
    price = np.round(base_price[r_part] * regular * (1.0 - discount[r_part] * promo), 2)
    price = np.maximum(price, 0.01)
    log_mean = (
        level[r_part]
        + trend[r_part] * years
        + amp1[r_part] * np.sin(2 * np.pi * pos + phase1[r_part])
        + amp2[r_part] * np.sin(4 * np.pi * pos + phase2[r_part])
        + elasticity[r_part] * np.log(price / base_price[r_part])
        + lift[r_part] * promo
    )
    noise = _normal(seed, _S_NOISE, g, t)
    sales = np.round(np.exp(log_mean + NOISE_SD * noise - NOISE_SD**2 / 2), 2)
    # intermittent demand: a sale happens in a fraction of periods, sized to keep the mean level
    occurs = _uniform(seed, _S_OCCUR, g, t) < occur_rate[r_part]
    lumpy = np.maximum(1.0, np.round(np.exp(log_mean + 0.5 * noise) / occur_rate[r_part]))
    sales = np.where(intermittent[r_part], np.where(occurs, lumpy, 0.0), sales)

    # -- which rows exist: late starts, and ~1 % missing inside each series ----------------------
    inside = (t > first[r_part]) & (t < periods - 1)
    keep = (t >= first[r_part]) & ~(inside & (_uniform(seed, _S_MISSING, g, t) < MISSING_SHARE))

    n_stores_width = max(3, len(str(n_stores)))  # the panel's widths, not the chunk's: labels agree
    n_items_width = max(4, len(str(n_items)))
    s0 = int(store[0])
    store_labels = pa.array([f"S{s + 1:0{n_stores_width}d}" for s in range(s0, int(store[-1]) + 1)])
    item_labels = pa.array([f"I{i + 1:0{n_items_width}d}" for i in range(n_items)])
    rows = r_part[keep]
    return pd.DataFrame(
        {
            # one Python string per store / item, then an arrow take per row
            "store": store_labels.take(pa.array(store[rows] - s0)).to_pandas(),
            "item": item_labels.take(pa.array(item[rows])).to_pandas(),
            "date": times[t[keep]],
            "sales": sales[keep],
            "price": price[keep],
            "promo": promo[keep],
        }
    )


def generate_panel(
    partitions: int = 500,
    periods: int = 156,
    freq: str = "W",
    seed: int = 0,
    start: str = "2022-01-02",
    chunk_partitions: int = 2000,
    intermittent_share: float = INTERMITTENT_SHARE,
) -> Iterator[pd.DataFrame]:
    """Yield the panel in chunks of whole partitions, sorted by store, item, date.

    A chunk holds ``chunk_partitions`` partitions, fewer if that would exceed ``MAX_CHUNK_ROWS``.

    ``freq="int"`` gives integer periods 1..T in the ``date`` column. The same seed gives the same
    rows whatever ``chunk_partitions`` is. ``intermittent_share``: the share of intermittent-demand
    series (mostly zeros; 0.10 by default, 0.8 for a count panel such as slow movers).
    """
    if partitions < 1 or periods < 1 or chunk_partitions < 1:
        raise ValueError("partitions, periods and chunk_partitions must be >= 1")
    if not 0.0 <= float(intermittent_share) <= 1.0:
        raise ValueError(f"intermittent_share must lie in [0, 1], got {intermittent_share!r}")
    axis = time_axis(periods, freq, start)
    layout = _layout(partitions)
    step = max(1, min(chunk_partitions, MAX_CHUNK_ROWS // periods))
    for p0 in range(0, partitions, step):
        yield _chunk(p0, min(partitions, p0 + step), periods, seed, axis, layout, float(intermittent_share))


def write_panel(
    path: str | Path,
    partitions: int = 500,
    periods: int = 156,
    freq: str = "W",
    seed: int = 0,
    start: str = "2022-01-02",
    chunk_partitions: int = 2000,
    intermittent_share: float = INTERMITTENT_SHARE,
) -> dict[str, Any]:
    """Stream a generated panel to Parquet (one row group per chunk) or CSV, chosen by suffix.

    The file appears atomically (temp file + rename), so a reader never sees half a panel.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"write_panel: unsupported suffix {path.suffix!r} for {path}; use .parquet or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rows = chunks = 0
    first_time = last_time = None
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    writer: pq.ParquetWriter | pacsv.CSVWriter | None = None
    try:
        for frame in generate_panel(partitions, periods, freq, seed, start, chunk_partitions, intermittent_share):
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if suffix == ".csv" and freq != "int" and _all_midnight(frame["date"]):
                table = table.set_column(2, "date", table.column("date").cast(pa.date32()))
            if writer is None:
                writer = (
                    pq.ParquetWriter(tmp_name, table.schema, compression="zstd")
                    if suffix == ".parquet"
                    else pacsv.CSVWriter(
                        tmp_name, table.schema, write_options=pacsv.WriteOptions(quoting_style="needed")
                    )
                )
            if suffix == ".parquet":
                # row groups of a common size (readers decode a whole row group at a time: one
                # chunk of 2 M rows as one group made every reader hold 500 MB for it)
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            else:
                writer.write_table(table)
            rows += len(frame)
            chunks += 1
            if len(frame):
                lo, hi = frame["date"].min(), frame["date"].max()
                first_time = lo if first_time is None else min(first_time, lo)
                last_time = hi if last_time is None else max(last_time, hi)
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp_name, path)
    finally:
        if writer is not None:
            writer.close()
        Path(tmp_name).unlink(missing_ok=True)
    return {
        "path": str(path),
        "format": suffix.lstrip("."),
        "rows": rows,
        "partitions": partitions,
        "periods": periods,
        "freq": freq,
        "seed": seed,
        "chunks": chunks,
        "first_time": str(first_time),
        "last_time": str(last_time),
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - began, 3),
    }


def _all_midnight(times: pd.Series) -> bool:
    return bool((times == times.dt.normalize()).all())
