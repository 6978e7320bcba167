"""The DataFrame API: :class:`ManyModels` runs the pipeline of the ``manymodels`` command on frames.

Why a class over a workdir rather than models in memory: what a fit produces is what the CLI
produces (datasets, two registries, the SQL store, the report), so a notebook's models can be
promoted, scored again, served (``manymodels serve --workdir``) or inspected with the CLI later.
Without a workdir a temporary one is used and removed by :meth:`ManyModels.close`.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

NIXTLA = ("unique_id", "ds", "y")  # statsforecast's and mlforecast's long format


class ManyModels:
    """Fit one model per series of a long DataFrame, forecast to a DataFrame.

    ``keys``/``time``/``target``: the columns naming a series, its period and the value to
    forecast (default: Nixtla's ``unique_id``/``ds``/``y`` when the frame has them). ``covariates``:
    columns known in advance (none unless given). ``freq``: a pandas alias (``"W"``, ``"D"``,
    ``"MS"``, ``"h"``) or ``"int"`` for integer periods; ``freq``, ``horizon`` and the rest default to
    the workdir's remembered settings, else the project defaults (weekly, 12 periods). ``config``: any further settings as
    dotted keys (``{"training.candidates": ["naive", "global_ar"]}``) or a TOML file path.
    """

    def __init__(self, *, keys: Iterable[str] | str | None = None, time: str | None = None,
                 target: str | None = None, covariates: Iterable[str] = (), freq: str | None = None,
                 horizon: int | None = None, season_length: int | None = None, workdir: str | Path | None = None,
                 config: Mapping[str, Any] | str | Path | None = None, workers: int | None = None) -> None:
        self._columns = (None if keys is None else ([keys] if isinstance(keys, str) else list(keys)), time, target)
        self._covariates = [covariates] if isinstance(covariates, str) else list(covariates)
        self._settings: dict[str, Any] = {"data.freq": freq, "forecast.horizon": horizon,
                                          "forecast.season_length": season_length}
        if workers is not None:
            self._settings["runner.workers"] = int(workers)
        self._config_path: Path | None = None
        if isinstance(config, (str, Path)):
            self._config_path = Path(config)
        elif config:
            self._settings.update(dict(config))
        self._temporary = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="manymodels-")) if workdir is None else Path(workdir)
        self.run_id: str | None = None
        self.dataset_id: str | None = None
        self.summary: dict[str, Any] = {}
        self._key_types: dict[str, Any] = {}

    # -- fitting and forecasting ------------------------------------------------------------

    def fit(self, df: Any) -> "ManyModels":
        """Ingest the frame, train every series' candidates, register and promote (``manymodels
        run`` without the scoring); bad rows are repaired or refused as the CLI does."""
        from shared.runs import pipeline

        frame = self._frame(df, "fit")
        keys, time, target = self._resolve(frame)
        missing = [c for c in (*keys, time, target, *self._covariates) if c not in frame.columns]
        if missing:
            raise ValueError(f"fit: the frame has no column(s) {missing}; it has {list(frame.columns)}")
        self._key_types = {k: frame[k].dtype for k in keys}
        source = self._write(frame, "fit")
        with self._open("fit") as ws:
            ingested = pipeline.ingest(ws, source)
            plan, _, registered = pipeline.train(ws, ingested.dataset_id, progress=False)
            promoted = pipeline.promote(ws, plan.run_id)
            ws.remember_config()
        self.dataset_id, self.run_id = ingested.dataset_id, plan.run_id
        self.summary = {"dataset_id": ingested.dataset_id, "run_id": plan.run_id, "rows": ingested.rows,
                        "partitions": ingested.partitions, "repairs": ingested.report.get("repairs", {}),
                        "trained": registered.trained + registered.baseline_only, "failed": registered.failed,
                        "skipped": registered.skipped, "promoted": promoted.promoted}
        return self

    def forecast(self, h: int | None = None, future: Any = None) -> pd.DataFrame:
        """Forecasts as a DataFrame: the key columns, the time column, ``prediction``, the 80 %
        interval (``lower``, ``upper``), ``source`` (production, unpromoted, global or baseline)
        and the model. ``future``: rows to forecast with their covariates (needed when the models
        use covariates); else the next ``h`` periods (default: the horizon)."""
        from shared.runs import pipeline

        if self.run_id is None and not (self.workdir / "manymodels.toml").is_file():
            raise RuntimeError("forecast: nothing is fitted in this workdir yet; call fit(df) first")
        if future is not None and h is not None:
            raise ValueError("forecast: give h or future rows, not both")
        data = None if future is None else self._write(self._frame(future, "future"), "future")
        with self._open("forecast") as ws:
            plan, _ = pipeline.score(ws, data=data, horizon=h, progress=False)
        out = self._table("forecast_history", "score_id = ?", (plan.score_id,), sort_time=True)
        keys, time, _ = self._columns
        first = [c for c in (*(keys or ()), time, "prediction", "lower", "upper", "source", "model", "model_version")
                 if c in out.columns]
        return out[first + [c for c in out.columns if c not in first]]

    # -- evaluation tables -------------------------------------------------------------------

    def metrics(self) -> pd.DataFrame:
        """Per series and run: the chosen model, its test-window WAPE/MAPE/RMSE, the baseline's, status."""
        return self._table("model_metrics")

    def backtests(self) -> pd.DataFrame:
        """Per series and test-window period: actual, the model's and the baseline's forecasts."""
        return self._table("backtests", sort_time=True)

    def promotions(self) -> pd.DataFrame:
        """Per series and run: promoted or rejected, against what, and why."""
        return self._table("promotions")

    def series(self) -> pd.DataFrame:
        """Per series: the model serving it, its source, accuracy, and the last promotion decision."""
        return self._table("series_summary")

    def effects(self) -> pd.DataFrame:
        """Per series and run: price elasticity and promotion lift, where the model uses the covariate."""
        return self._table("effects")

    def history(self) -> pd.DataFrame:
        """Every forecast made in this workdir, by vintage (``score_id``, ``scored_at``)."""
        return self._table("forecast_history", sort_time=True)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the workdir when it is a temporary one (a given workdir is kept)."""
        if self._temporary:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ManyModels":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        keys, time, target = self._columns
        return (f"ManyModels(keys={keys}, time={time!r}, target={target!r}, workdir={str(self.workdir)!r}, "
                f"run_id={self.run_id!r})")

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _frame(df: Any, what: str) -> pd.DataFrame:
        if hasattr(df, "to_pandas") and not isinstance(df, pd.DataFrame):  # polars, pyarrow
            df = df.to_pandas()
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"{what}: expected a pandas (or polars) DataFrame, got {type(df).__name__}")
        if df.empty:
            raise ValueError(f"{what}: the frame has no rows")
        return df.reset_index(drop=True) if not isinstance(df.index, pd.RangeIndex) else df

    def _resolve(self, frame: pd.DataFrame) -> tuple[list[str], str, str]:
        keys, time, target = self._columns
        if keys is None and time is None and target is None and all(c in frame.columns for c in NIXTLA):
            keys, time, target = [NIXTLA[0]], NIXTLA[1], NIXTLA[2]
        unnamed = [name for name, value in (("keys", keys), ("time", time), ("target", target)) if not value]
        if unnamed:
            raise ValueError(f"fit: name the {', '.join(unnamed)} column(s) (ManyModels(keys=..., time=..., "
                             f"target=...)), or give a frame with Nixtla's columns {list(NIXTLA)}")
        self._columns = (list(keys), time, target)
        self._settings.update({"data.keys": list(keys), "data.time": time, "data.target": target,
                               "data.covariates": list(self._covariates)})
        return list(keys), time, target

    def _write(self, frame: pd.DataFrame, what: str) -> Path:
        """The frame as Parquet inside the workdir (named by its content: a refit of the same frame
        is the same file, and ingestion recognises the same dataset)."""
        folder = self.workdir / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()
                                + ",".join(map(str, frame.columns)).encode()).hexdigest()[:16]
        path = folder / f"{what}-{digest}.parquet"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            frame.to_parquet(tmp, index=False)
            tmp.replace(path)
        return path

    def _open(self, what: str) -> Any:
        from contextlib import contextmanager

        from shared.runs.backends import writer_lease
        from shared.runs.workspace import Workspace

        @contextmanager
        def opened() -> Any:
            self.workdir.mkdir(parents=True, exist_ok=True)
            overrides = {k: v for k, v in self._settings.items() if v is not None}
            ws = Workspace.open(self.workdir, overrides=overrides, config_path=self._config_path, remember=False)
            with writer_lease(ws, f"python api {what}"):
                yield ws

        return opened()

    def _table(self, name: str, where: str = "", params: tuple = (), sort_time: bool = False) -> pd.DataFrame:
        from shared.config import load_config
        from shared.results.result_store import open_store

        remembered = self.workdir / "manymodels.toml"
        cfg = load_config(remembered if remembered.is_file() else None)
        with open_store(cfg, self.workdir) as store:
            frame = store.query(f"SELECT * FROM {name}" + (f" WHERE {where}" if where else ""), params)
        return self._typed(frame, cfg, sort_time)

    def _typed(self, frame: pd.DataFrame, cfg: Any, sort_time: bool) -> pd.DataFrame:
        """Keys back in the fitted frame's types, times as timestamps (SQLite stores text)."""
        for key, dtype in self._key_types.items():
            if key in frame.columns and pd.api.types.is_numeric_dtype(dtype):
                frame[key] = pd.to_numeric(frame[key]).astype(dtype)
        time = cfg.data.time
        if time in frame.columns:
            if cfg.data.freq == "int":
                frame[time] = pd.to_numeric(frame[time]).astype("int64")
            else:
                frame[time] = pd.to_datetime(frame[time])
        order = [*[k for k in cfg.data.keys if k in frame.columns], *([time] if sort_time and time in frame.columns else [])]
        return frame.sort_values(order, kind="stable", ignore_index=True) if order else frame
