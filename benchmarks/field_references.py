"""The field's own forecasting libraries as references for `benchmarks/accuracy.py` (issue 17).

Every reference is run from its library, not re-implemented here:

* statsforecast (Nixtla): ``Naive``, ``SeasonalNaive``, ``WindowAverage`` (mean of the last k),
  ``AutoETS``, ``AutoARIMA`` (with the data set's covariates as exogenous regressors when it has
  any: positive non-flag covariates such as prices enter as logs, i.e. regression with ARIMA
  errors on log price) and, on intermittent data (a quarter or more zeros), ``CrostonOptimized``
  and ``TSB``;
* mlforecast (Nixtla) with LightGBM: one global model over all series, lags 1..min(season, 7) and
  the season, rolling means of the last value, calendar features for dated data, the covariates as
  dynamic features, each series standardised (``LocalStandardScaler``), forecast recursively.

Each function takes the training rows and the held-out rows (covariates given, target removed)
and returns one prediction per held-out row, in the held-out rows' order: a series' k-th held-out
row gets the k-th forecast step, so gaps in a calendar cannot misalign anything.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

UID, DS, Y = "unique_id", "ds", "y"


def series_labels(frame: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    out = frame[keys[0]].astype(str)
    for key in keys[1:]:
        out = out + "\x1f" + frame[key].astype(str)
    return out


def sf_freq(freq: str) -> Any:
    """statsforecast/mlforecast frequency: 1 for integer periods, else the pandas alias."""
    if freq == "int":
        return 1
    return {"W": "W-SUN", "M": "ME", "h": "h", "H": "h"}.get(freq, freq)


def exog_transforms(train: pd.DataFrame, covariates: Sequence[str]) -> dict[str, str]:
    """'log' for strictly positive non-flag covariates (prices), 'raw' otherwise."""
    out = {}
    for cov in covariates:
        values = pd.to_numeric(train[cov].astype("float64"), errors="coerce").dropna()
        binary = bool(len(values)) and set(np.unique(values)) <= {0.0, 1.0}
        out[cov] = "log" if (len(values) and not binary and (values > 0).all()) else "raw"
    return out


def long_frames(train: pd.DataFrame, future: pd.DataFrame, keys: Sequence[str], time_col: str, target: str,
                covariates: Sequence[str], freq: str) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, str]:
    """Nixtla's long format (unique_id, ds, y, exog) for the training rows, the future exog frame
    on the grid the libraries forecast on (the next h periods of each series), each held-out
    row's forecast step (1-based), and the frequency the libraries are to use ("int" where the
    dates are not on one regular calendar)."""
    tr = pd.DataFrame({UID: series_labels(train, keys).to_numpy(), DS: train[time_col].to_numpy(),
                       Y: pd.to_numeric(train[target], errors="coerce").astype("float64").to_numpy()})
    transforms = exog_transforms(train, covariates)
    for i, cov in enumerate(covariates):
        x = pd.to_numeric(train[cov].astype("float64"), errors="coerce").to_numpy()
        tr[f"x{i}"] = np.log(np.clip(x, 1e-9, None)) if transforms[cov] == "log" else x
    tr = tr.sort_values([UID, DS], kind="stable").reset_index(drop=True)
    if freq != "int" and not on_grid(tr, freq):
        # the libraries need one regular calendar (M4 weekly mixes Fridays and Wednesdays between
        # series): number each series' periods instead
        tr[DS] = tr.groupby(UID).cumcount().astype("int64") + 1
        freq = "int"
    # the libraries need a value for every row: forward-fill covariates within a series
    xs = [f"x{i}" for i in range(len(covariates))]
    if xs:
        tr[xs] = tr.groupby(UID)[xs].ffill().fillna(0.0)
    tr[Y] = tr.groupby(UID)[Y].transform(lambda s: s.interpolate(limit_direction="both")).fillna(0.0)
    fut_ids = series_labels(future, keys).to_numpy()
    order = pd.DataFrame({UID: fut_ids, "t": future[time_col].to_numpy(), "row": np.arange(len(future))})
    order = order.sort_values([UID, "t"], kind="stable")
    order["step"] = order.groupby(UID).cumcount() + 1
    steps = np.empty(len(future), dtype=np.int64)
    steps[order["row"].to_numpy()] = order["step"].to_numpy()
    h = int(steps.max()) if len(steps) else 0
    # future exog on the libraries' grid: the k-th step of a series takes its k-th held-out row's values
    last = tr.groupby(UID)[DS].max()
    fx = pd.DataFrame({UID: np.repeat(last.index.to_numpy(), h), "step": np.tile(np.arange(1, h + 1), len(last))})
    if freq == "int":
        fx[DS] = np.repeat(last.to_numpy(), h) + fx["step"].to_numpy()
    else:
        offset = pd.tseries.frequencies.to_offset(sf_freq(freq))
        fx[DS] = [ts + k * offset for ts, k in zip(np.repeat(pd.DatetimeIndex(last.to_numpy()), h), fx["step"])]
    if xs:
        held = pd.DataFrame({UID: fut_ids, "step": steps})
        for i, cov in enumerate(covariates):
            x = pd.to_numeric(future[cov].astype("float64"), errors="coerce").to_numpy()
            held[f"x{i}"] = np.log(np.clip(x, 1e-9, None)) if transforms[cov] == "log" else x
        fx = fx.merge(held, on=[UID, "step"], how="left")
        fx[xs] = fx.groupby(UID)[xs].ffill()
        lastx = tr.groupby(UID)[xs].last()
        for x in xs:
            fx[x] = fx[x].fillna(fx[UID].map(lastx[x]))
    return tr, fx, steps, freq


def on_grid(tr: pd.DataFrame, freq: str) -> bool:
    """Does every series step exactly one ``freq`` period from row to row?"""
    offset = pd.tseries.frequencies.to_offset(sf_freq(freq))
    ds = pd.DatetimeIndex(tr[DS])
    same = (tr[UID].to_numpy()[1:] == tr[UID].to_numpy()[:-1])
    expected = (ds[:-1] + offset).asi8
    return bool(np.all(ds.asi8[1:][same] == expected[same]))


def _by_step(fc: pd.DataFrame, column: str, future_ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
    fc = fc.sort_values([UID, DS], kind="stable").copy()
    fc["step"] = fc.groupby(UID).cumcount() + 1
    table = fc.set_index([UID, "step"])[column]
    idx = pd.MultiIndex.from_arrays([future_ids, steps])
    return np.clip(table.reindex(idx).to_numpy(dtype="float64"), 0.0, None)


def statsforecast_references(train: pd.DataFrame, future: pd.DataFrame, keys: Sequence[str], time_col: str,
                             target: str, covariates: Sequence[str], freq: str, season: int,
                             intermittent: bool) -> dict[str, tuple[np.ndarray, float]]:
    """name -> (predictions for the held-out rows, wall seconds), every model from statsforecast."""
    from statsforecast import StatsForecast
    from statsforecast.models import (TSB, AutoARIMA, AutoETS, CrostonOptimized, Naive, SeasonalNaive,
                                      WindowAverage)

    tr, fx, steps, freq = long_frames(train, future, keys, time_col, target, covariates, freq)
    ids = series_labels(future, keys).to_numpy()
    h = int(steps.max())
    season = max(int(season), 1)
    xs = [c for c in tr.columns if c.startswith("x")]
    plain = tr[[UID, DS, Y]]
    models: dict[str, Any] = {"naive": Naive(), "mean of last 4": WindowAverage(window_size=4)}
    if season > 1:
        models["seasonal naive"] = SeasonalNaive(season_length=season)
    # ETS cannot take a season longer than 24 (statsforecast's own rule); weekly data: non-seasonal
    models["AutoETS"] = AutoETS(season_length=season if 1 < season <= 24 else 1)
    if intermittent:
        models["CrostonOptimized"] = CrostonOptimized()
        models["TSB"] = TSB(alpha_d=0.2, alpha_p=0.2)
    out: dict[str, tuple[np.ndarray, float]] = {}
    for name, model in models.items():
        began = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a series too short for a model (AutoETS refuses "tiny datasets") gets the naive forecast,
            # as statsforecast's own fallback_model does it
            fc = StatsForecast(models=[model], freq=sf_freq(freq), n_jobs=1,
                               fallback_model=Naive()).forecast(df=plain, h=h)
        column = [c for c in fc.columns if c not in (UID, DS)][0]
        out[name] = (_by_step(fc.reset_index() if UID not in fc.columns else fc, column, ids, steps),
                     time.perf_counter() - began)
    # AutoARIMA: seasonal when the season is short enough to estimate, exogenous covariates if any
    began = time.perf_counter()
    arima = AutoARIMA(season_length=season if 1 < season <= 24 else 1)
    label = "AutoARIMA + covariates" if xs else "AutoARIMA"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sf = StatsForecast(models=[arima], freq=sf_freq(freq), n_jobs=1, fallback_model=Naive())
        try:
            fc = (sf.forecast(df=tr[[UID, DS, Y, *xs]], h=h, X_df=fx[[UID, DS, *xs]]) if xs
                  else sf.forecast(df=plain, h=h))
        except ValueError:  # "No suitable ARIMA model found": a covariate collinear in some series
            fc = sf.forecast(df=plain, h=h)
            label = "AutoARIMA (covariates refused)"
    out[label] = (_by_step(fc, "AutoARIMA", ids, steps), time.perf_counter() - began)
    return out


def mlforecast_lightgbm(train: pd.DataFrame, future: pd.DataFrame, keys: Sequence[str], time_col: str,
                        target: str, covariates: Sequence[str], freq: str, season: int,
                        seed: int = 0) -> tuple[np.ndarray, float]:
    """One global LightGBM over all series with mlforecast (lags, rolling means, calendar, covariates)."""
    import lightgbm as lgb
    from mlforecast import MLForecast
    from mlforecast.lag_transforms import RollingMean
    from mlforecast.target_transforms import LocalStandardScaler

    began = time.perf_counter()
    tr, fx, steps, freq = long_frames(train, future, keys, time_col, target, covariates, freq)
    ids = series_labels(future, keys).to_numpy()
    h = int(steps.max())
    season = max(int(season), 1)
    lags = sorted(set(range(1, min(season, 7) + 1)) | ({season} if season > 1 else set()))
    date_features: list[str] = []
    if freq != "int":
        base = freq.lstrip("0123456789").split("-")[0].upper()
        date_features = {"H": ["hour", "dayofweek"], "D": ["dayofweek", "month"], "B": ["dayofweek", "month"],
                         "W": ["month"], "MS": ["month"], "M": ["month"], "ME": ["month"]}.get(base, [])
    # a series shorter than the longest lag would leave no training row: keep the lags it allows
    shortest = int(tr.groupby(UID).size().min())
    lags = [k for k in lags if k < max(shortest - 1, 2)] or [1]
    model = lgb.LGBMRegressor(n_estimators=300, learning_rate=0.05, num_leaves=31, min_child_samples=10,
                              subsample=0.8, subsample_freq=1, colsample_bytree=0.8, random_state=seed,
                              n_jobs=1, verbose=-1)
    mlf = MLForecast(models={"lgbm": model}, freq=sf_freq(freq), lags=lags,
                     lag_transforms={1: [RollingMean(window_size=min(4, max(shortest - 2, 1)))]},
                     date_features=date_features, target_transforms=[LocalStandardScaler()], num_threads=1)
    xs = [c for c in tr.columns if c.startswith("x")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlf.fit(tr[[UID, DS, Y, *xs]], static_features=[])
        fc = mlf.predict(h, X_df=fx[[UID, DS, *xs]] if xs else None)
    return _by_step(fc, "lgbm", ids, steps), time.perf_counter() - began


def field_references(train: pd.DataFrame, future: pd.DataFrame, keys: Sequence[str], time_col: str,
                     target: str, covariates: Sequence[str], freq: str, season: int, seed: int = 0,
                     intermittent: bool | None = None) -> dict[str, tuple[np.ndarray, float]]:
    """Every reference of the benchmark on one hold-out: name -> (predictions, wall seconds)."""
    if intermittent is None:
        y = pd.to_numeric(train[target], errors="coerce")
        intermittent = bool((y == 0).mean() >= 0.25)
    out = statsforecast_references(train, future, keys, time_col, target, covariates, freq, season, intermittent)
    out["mlforecast LightGBM"] = mlforecast_lightgbm(train, future, keys, time_col, target, covariates, freq,
                                                     season, seed)
    return out


Reference = Callable[..., Mapping[str, tuple[np.ndarray, float]]]
