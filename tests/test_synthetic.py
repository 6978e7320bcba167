"""The synthetic retail panel: deterministic, streamed, realistic enough to learn from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from shared.data.synthetic import generate_panel, write_panel


def panel(**kw) -> pd.DataFrame:
    return pd.concat(generate_panel(**kw), ignore_index=True)


@pytest.fixture(scope="module")
def weekly() -> pd.DataFrame:
    return panel(partitions=400, periods=156, seed=3)


def test_same_seed_gives_the_identical_panel_and_another_seed_a_different_one():
    a = panel(partitions=30, periods=40, seed=11)
    b = panel(partitions=30, periods=40, seed=11)
    c = panel(partitions=30, periods=40, seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["sales"].to_numpy()[:100], c["sales"].to_numpy()[:100])


def test_chunk_size_does_not_change_the_data():
    small_chunks = panel(partitions=45, periods=30, seed=5, chunk_partitions=7)
    one_chunk = panel(partitions=45, periods=30, seed=5, chunk_partitions=1000)
    pd.testing.assert_frame_equal(small_chunks, one_chunk)


def test_panel_streams_in_chunks_of_whole_partitions():
    # 100,000 partitions x 400 periods = 40 million rows: only the first chunk is ever built here
    chunks = generate_panel(partitions=100_000, periods=400, chunk_partitions=50)
    first = next(chunks)
    assert first.groupby(["store", "item"]).ngroups == 50
    assert len(first) <= 50 * 400
    second = next(chunks)
    assert set(zip(first["store"], first["item"])).isdisjoint(zip(second["store"], second["item"]))


def test_columns_types_and_value_ranges(weekly):
    assert list(weekly.columns) == ["store", "item", "date", "sales", "price", "promo"]
    assert weekly["store"].str.match(r"^S\d{3,}$").all()
    assert weekly["item"].str.match(r"^I\d{4,}$").all()
    assert pd.api.types.is_datetime64_any_dtype(weekly["date"])
    assert (weekly["date"].dt.day_name() == "Sunday").all()  # aligned to W (weeks ending Sunday)
    assert weekly["sales"].dtype == np.float64 and (weekly["sales"] >= 0).all()
    assert weekly["price"].dtype == np.float64 and (weekly["price"] > 0).all()
    assert set(weekly["promo"].unique()) == {0, 1}
    assert weekly.groupby(["store", "item"]).ngroups == 400
    assert not weekly.duplicated(["store", "item", "date"]).any()


def test_other_frequencies_align_to_their_period_and_int_gives_integer_periods():
    monthly = panel(partitions=3, periods=24, freq="MS")
    assert (monthly["date"].dt.day == 1).all()
    daily = panel(partitions=3, periods=30, freq="D", start="2023-05-01")
    assert daily["date"].min() == pd.Timestamp("2023-05-01")
    ints = panel(partitions=3, periods=20, freq="int")
    assert ints["date"].dtype == np.int64
    assert ints["date"].min() == 1 and ints["date"].max() == 20


def test_realistic_defects_intermittent_series_gaps_and_short_series(weekly):
    sizes = weekly.groupby(["store", "item"]).size()
    zero_share = weekly.assign(zero=weekly["sales"] == 0).groupby(["store", "item"])["zero"].mean()
    intermittent = (zero_share > 0.3).mean()
    assert 0.05 <= intermittent <= 0.16, intermittent
    short = (sizes < 156 // 2).sum()
    assert 1 <= short <= 25, short
    # rows missing inside full-length series (first and last periods are always present)
    full = sizes[sizes > 156 // 2]
    missing = 1 - full.sum() / (len(full) * 156)
    assert 0.004 <= missing <= 0.02, missing


def test_promotions_lift_sales_and_higher_prices_lower_them(weekly):
    regular = weekly[weekly["sales"] > 0]
    log_sales = np.log(regular["sales"])
    series = regular["store"] + regular["item"]
    centred = log_sales - log_sales.groupby(series).transform("mean")
    log_price = np.log(regular["price"])
    price_centred = log_price - log_price.groupby(series).transform("mean")
    promo_effect = centred[regular["promo"] == 1].mean() - centred[regular["promo"] == 0].mean()
    assert promo_effect > 0.3  # price cut x elasticity plus the promotion's own lift
    slope = np.polyfit(price_centred, centred, 1)[0]
    assert slope < -1.0  # log-log price elasticity around -1.5 (confounded a bit by the lift)


def test_a_model_using_calendar_price_and_promo_clearly_beats_a_moving_average(weekly):
    """The panel must be learnable: a good per-series model beats the naive baseline clearly."""
    horizon, abs_model, abs_base, total = 12, 0.0, 0.0, 0.0
    for _, g in weekly.groupby(["store", "item"]):
        if len(g) < 100 or (g["sales"] == 0).mean() > 0.3:
            continue
        y = g["sales"].to_numpy()
        pos = g["date"].dt.day_of_year.to_numpy() / 365.25
        X = np.c_[
            np.ones(len(g)),
            np.sin(2 * np.pi * pos),
            np.cos(2 * np.pi * pos),
            np.sin(4 * np.pi * pos),
            np.cos(4 * np.pi * pos),
            np.log(g["price"]),
            g["promo"],
            np.arange(len(g)) / 52,
        ]
        train, test = slice(0, len(g) - horizon), slice(len(g) - horizon, None)
        coef = np.linalg.lstsq(X[train], np.log1p(y[train]), rcond=None)[0]
        abs_model += np.abs(np.expm1(X[test] @ coef) - y[test]).sum()
        abs_base += np.abs(y[train][-4:].mean() - y[test]).sum()
        total += y[test].sum()
    wape_model, wape_base = abs_model / total, abs_base / total
    assert wape_model < 0.7 * wape_base, (wape_model, wape_base)


def test_write_panel_parquet_has_one_row_group_per_chunk_and_matches_the_generator(tmp_path):
    path = tmp_path / "panel.parquet"
    stats = write_panel(path, partitions=25, periods=30, seed=4, chunk_partitions=10)
    assert stats["format"] == "parquet" and stats["chunks"] == 3
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3 and meta.num_rows == stats["rows"]
    back = pd.read_parquet(path)
    expected = panel(partitions=25, periods=30, seed=4)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert [p.name for p in tmp_path.iterdir()] == ["panel.parquet"]  # no temp files left


def test_write_panel_csv_reads_back_with_the_same_values(tmp_path):
    path = tmp_path / "panel.csv"
    stats = write_panel(path, partitions=8, periods=20, seed=2)
    back = pd.read_csv(path, parse_dates=["date"])
    expected = panel(partitions=8, periods=20, seed=2)
    assert stats["rows"] == len(back) == len(expected)
    assert back["date"].dt.strftime("%Y-%m-%d").tolist() == expected["date"].dt.strftime("%Y-%m-%d").tolist()
    np.testing.assert_array_equal(back["sales"], expected["sales"])
    np.testing.assert_array_equal(back["price"], expected["price"])
    assert back["store"].tolist() == expected["store"].tolist()


def test_write_panel_refuses_an_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported suffix '\.xlsx'"):
        write_panel(tmp_path / "panel.xlsx", partitions=2, periods=3)
    assert list(tmp_path.iterdir()) == []


def test_long_series_shrink_chunks_so_memory_stays_bounded(monkeypatch):
    from shared.data import synthetic

    monkeypatch.setattr(synthetic, "MAX_CHUNK_ROWS", 100)
    chunks = list(generate_panel(partitions=9, periods=40, chunk_partitions=1000))
    assert [c.groupby(["store", "item"]).ngroups for c in chunks] == [2, 2, 2, 2, 1]


def test_labels_have_one_width_across_chunks_even_past_999_stores():
    # 1,000,001 partitions -> 1,000 stores: S0001 ... S1000 in every chunk, never S999 next to S1000
    chunks = generate_panel(partitions=1_000_001, periods=1, chunk_partitions=400_000)
    stores = pd.concat(c["store"] for c in chunks)
    assert stores.str.len().nunique() == 1 and stores.iloc[0] == "S0001" and stores.iloc[-1] == "S1000"
