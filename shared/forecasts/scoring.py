"""Batch scoring: per partition, find the production model by its index entry and predict.

Two kinds of request, both written by :func:`prepare_scoring` as mini-batch files under
``scoring/<score_id>/batches/`` (whole partitions per file, like a prepared dataset):

- **a scoring file** — rows of key columns, time and covariates (no target). Exactly those rows
  are predicted. Rows of partitions the training data never saw are kept and reported with the
  status ``no_model``, never dropped silently.
- **no file (horizon mode)** — one request row per partition of the dataset's manifest, asking
  for the next ``forecast.horizon`` periods after the partition's last observed period. Known
  covariates are carried forward from the last observed row (the model bundle does that), which
  is what "known in advance" degrades to when nobody tells us the future prices and promotions.

:func:`score_frame` scores one mini-batch: production model first; without one, along
the scoring chain (``[scoring] chain``), the partition's latest development model answers when it
beat its own baseline, then the run's global model, then the baseline; the rows say which in
``source`` and are marked ``is_fallback = 1``. A partition that fails is
reported with its reason while the others go on.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from shared.config import CHOICES, ProjectConfig, chain_reads_dev
from shared.models.global_model import GLOBAL_ID, GlobalModelError, needs_global
from shared.keys import PARTITION_ID, canonical_value, partition_ids
from shared import layout
from shared.lake import Lake, check_path, write_parquet
from shared.data.partitioning import pack_batches
from shared.registries.registry_records import RegistryError
from shared.data.timegrid import PERIOD, to_periods
from shared.data.validation import DataValidationError, example_rows, parse_numeric, parse_time

SCORING = "scoring"
HORIZON = "_horizon"  # > 0: "the next N periods" request row; 0: an explicit row to predict
KNOWN = "_known"  # False: the partition is not in the dataset the models were trained on
OUTPUT_META = ("prediction", "lower", "upper", "model", "model_version", "run_id", PARTITION_ID, "is_fallback",
               "source")
STATUSES = ("scored", "fallback", "no_model", "failed")
# What loading a stored artifact may raise when the file is damaged, missing or refused (the
# registries' own errors: a digest mismatch, a missing file; or the unpickling of bytes without one).
_LOAD_ERRORS: tuple[type[BaseException], ...] = (RegistryError, OSError, pickle.UnpicklingError, EOFError)


def scoring_root(score_id: str) -> str:
    return check_path(f"{SCORING}/{score_id}")


def prediction_columns(cfg: ProjectConfig) -> list[str]:
    """The columns of every predictions frame, in order: keys, time, then the model's identity."""
    return [*cfg.data.keys, cfg.data.time, *OUTPUT_META]


# -- preparing the requests ---------------------------------------------------------------------
def prepare_scoring(lake: Lake, cfg: ProjectConfig, dataset: Any, frame: pd.DataFrame | None, score_id: str,
                    rows_per_file: int | None = None) -> list[str]:
    """Write the scoring requests as mini-batch files; return their lake paths.

    ``dataset`` is a :class:`~shared.data.partitioning.PreparedDataset` (only its ``manifest`` is read).
    Idempotent: ``scoring.json`` is written last, and a score id that has one is returned as is.
    """
    root = scoring_root(score_id)
    done = f"{root}/scoring.json"
    if lake.exists(done):
        meta = json.loads(lake.read_bytes(done).decode("utf-8"))
        return [layout.scoring_batch(score_id, name) for name in meta["batches"]]
    manifest = dataset.manifest
    if frame is None:
        requests = horizon_requests(manifest, cfg)
        mode = "horizon"
    else:
        requests = scoring_requests(frame, cfg)
        check_distances(requests, manifest, cfg, frame.reset_index(drop=True))
        mode = "rows"
    known = set(manifest[PARTITION_ID])
    requests[KNOWN] = requests[PARTITION_ID].isin(known).to_numpy()
    requests = requests.sort_values([PARTITION_ID, PERIOD], kind="stable").reset_index(drop=True)
    ids = requests[PARTITION_ID].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.array([], dtype=np.int64)
    sizes = np.diff(np.r_[starts, len(ids)])
    # a horizon request is one row that becomes `horizon` predictions: weigh it as such
    weights = np.where(requests[HORIZON].to_numpy()[starts] > 0, cfg.forecast.horizon, sizes) if len(ids) else sizes
    batch_of = pack_batches(weights, int(rows_per_file or cfg.runner.rows_per_file)) if len(ids) else weights
    names: list[str] = []
    bounds = np.r_[starts, len(ids)]
    for b in range(int(batch_of.max()) + 1 if len(ids) else 0):
        parts = np.flatnonzero(batch_of == b)
        lo, hi = bounds[parts[0]], bounds[parts[-1] + 1]
        name = f"batch-{b:05d}.parquet"
        write_parquet(lake, layout.scoring_batch(score_id, name), requests.iloc[lo:hi].reset_index(drop=True))
        names.append(name)
    unknown = sorted(set(ids) - known)
    write_parquet(lake, layout.scoring_partitions(score_id), pd.DataFrame(
        {"batch": np.asarray(names, dtype=object)[batch_of.astype(np.int64)] if names else np.array([], dtype=object),
         PARTITION_ID: ids[starts].astype(str)}))
    meta = {"score_id": score_id, "mode": mode, "horizon": cfg.forecast.horizon, "rows": int(len(requests)),
            "partitions": int(len(starts)), "unknown_partitions": len(unknown),
            "unknown_examples": unknown[:5], "batches": names}
    lake.write_bytes(done, json.dumps(meta, indent=2).encode("utf-8"))
    return [layout.scoring_batch(score_id, name) for name in names]


def horizon_requests(manifest: pd.DataFrame, cfg: ProjectConfig) -> pd.DataFrame:
    """One request row per partition: predict the next ``forecast.horizon`` periods."""
    spec = cfg.data
    n = len(manifest)
    # no time stamp: the model derives the next periods from its own last observed period
    time = (pd.Series(pd.array([pd.NA] * n, dtype="Int64")) if spec.freq == "int"
            else pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns]"))
    return pd.DataFrame({
        PARTITION_ID: manifest[PARTITION_ID].astype(str).to_numpy(),
        **{k: manifest[k].astype(str).to_numpy() for k in spec.keys},
        spec.time: time.to_numpy(),
        PERIOD: manifest["last_period"].astype("int64").to_numpy() + 1,
        **{c: np.full(n, np.nan) for c in spec.covariates},
        HORIZON: np.full(n, int(cfg.forecast.horizon), dtype="int64"),
        KNOWN: np.ones(n, dtype=bool),
    })


def scoring_requests(frame: pd.DataFrame, cfg: ProjectConfig) -> pd.DataFrame:
    """Check a scoring file and turn it into request rows (partition id, period, float covariates).

    Raises :class:`~shared.data.validation.DataValidationError` naming the column for missing
    columns, null keys, unparseable times, non-numeric covariates and duplicate rows.
    """
    spec = cfg.data
    if len(frame) == 0:
        raise DataValidationError(None, "the scoring file has no rows")
    needed = [*spec.keys, spec.time, *spec.covariates]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        roles = {**{k: "key" for k in spec.keys}, spec.time: "time", **{c: "covariate" for c in spec.covariates}}
        named = ", ".join(f"{c!r} ({roles[c]})" for c in missing)
        raise DataValidationError(missing if len(missing) > 1 else missing[0],
                                  f"the scoring file lacks column(s) {named}; it needs the key columns, the "
                                  f"time column and the covariates; available: {list(map(str, frame.columns))}")
    source = frame.reset_index(drop=True)
    for key in spec.keys:
        nulls = source[key].isna().to_numpy()
        if nulls.any():
            raise DataValidationError(key, "partition key is null in the scoring file",
                                      example_rows(source, np.flatnonzero(nulls)), int(nulls.sum()))
    times = parse_time(source[spec.time], source, spec)
    out = pd.DataFrame({
        PARTITION_ID: partition_ids(source, spec.keys).to_numpy(),
        **{k: _canonical(source[k]) for k in spec.keys},
        spec.time: times.to_numpy(),
        PERIOD: to_periods(times, spec.freq),
    })
    for cov in spec.covariates:
        out[cov] = parse_numeric(source[cov], source, cov, "covariate")
    out[HORIZON] = np.zeros(len(out), dtype="int64")
    dup = out.duplicated([PARTITION_ID, PERIOD], keep=False).to_numpy()
    if dup.any():
        raise DataValidationError([*spec.keys, spec.time], "the scoring file asks for the same partition and "
                                  "period more than once", example_rows(source, np.flatnonzero(dup)), int(dup.sum()))
    return _fill_covariates(out, source, cfg)


def check_distances(requests: pd.DataFrame, manifest: pd.DataFrame, cfg: ProjectConfig,
                    source: pd.DataFrame) -> None:
    """Bounded work: every row of a known partition lies after the end of its training data, and at
    most ``scoring.max_distance`` periods after it (forecasting walks every period up to a row).
    Raises :class:`DataValidationError` naming the time column and the first offending rows."""
    last = manifest.set_index(PARTITION_ID)["last_period"].astype("int64")
    ends = requests[PARTITION_ID].map(last).to_numpy(dtype="float64")  # NaN: a partition never trained
    periods = requests[PERIOD].to_numpy(dtype="float64")
    known = ~np.isnan(ends)
    early = np.flatnonzero(known & (periods <= ends))
    if len(early):
        raise DataValidationError(cfg.data.time, "scoring rows must lie after the end of their partition's "
                                  "training data (a forecast is for periods not yet observed); "
                                  f"first such row: {int(early[0])}",
                                  example_rows(source, early), int(len(early)))
    limit = int(cfg.scoring.max_distance)
    far = np.flatnonzero(known & (periods - ends > limit))
    if len(far):
        raise DataValidationError(cfg.data.time, f"scoring rows may lie at most scoring.max_distance={limit} "
                                  f"periods after the end of their partition's training data; first such "
                                  f"row: {int(far[0])}", example_rows(source, far), int(len(far)))


def _canonical(values: pd.Series) -> np.ndarray:
    codes, uniques = pd.factorize(values)
    return np.array([canonical_value(v) for v in uniques], dtype=object)[codes]


def _fill_covariates(out: pd.DataFrame, source: pd.DataFrame, cfg: ProjectConfig) -> pd.DataFrame:
    """Null covariates by the ingestion policy (``validation.null_covariates``).

    ``error`` refuses them, ``zero`` sets 0, ``ffill`` leaves them null: the model carries the
    previous value forward, from its own history for a partition's first requested rows.
    """
    policy = cfg.validation.null_covariates
    for cov in cfg.data.covariates:
        nulls = out[cov].isna().to_numpy()
        if not nulls.any() or policy == "ffill":
            continue
        if policy == "error":
            raise DataValidationError(cov, "covariate is null in the scoring file (validation.null_covariates=error)",
                                      example_rows(source, np.flatnonzero(nulls)), int(nulls.sum()))
        out[cov] = out[cov].fillna(0.0)
    return out


# -- scoring ------------------------------------------------------------------------------------
class GlobalModels:
    """The global models bundles need, loaded once per process and kept (one per run, small).

    Looked up in the registry the bundle came from first, then in the other one (a production
    bundle's global model is copied to production with it; a development one stays in dev).

    Blast radius: a global model that cannot be loaded (its artifact changed or corrupted since
    registration, missing, unreadable) is remembered with its reason (:attr:`failures`) and
    disables only the forecasts that need it: a bundle whose own model is the global model, or
    an ensemble with it, and the ``global`` source. A bundle's own self-contained model and its
    baseline never depend on it (:meth:`bind`).
    """

    def __init__(self, prod: Any, dev: Any | None) -> None:
        self.prod, self.dev = prod, dev
        self._loaded: dict[str, Any] = {}
        self._versions: dict[str, tuple[int, str]] = {}
        self.failures: dict[str, str] = {}  # run id -> why its global model cannot be loaded

    def get(self, run_id: str) -> Any | None:
        """The run's global model; None when no registry has it or it cannot be loaded (then
        :attr:`failures` says why)."""
        if run_id in self._loaded:
            return self._loaded[run_id]
        model = None
        for registry in (self.prod, self.dev):
            if registry is None:
                continue
            record = registry.by_run(run_id, GLOBAL_ID)
            if record is not None:
                try:
                    model = registry.load(record)
                except _LOAD_ERRORS as exc:  # remembered and reported by every forecast that needs it
                    self.failures[run_id] = (f"global model {GLOBAL_ID} v{record.version} of run {run_id} "
                                             f"({getattr(registry, 'name', '?')} registry) cannot be loaded: "
                                             f"{type(exc).__name__}: {exc}")[:600]
                    break
                self._versions[run_id] = (int(record.version), record.run_id)
                break
        self._loaded[run_id] = model
        return model

    def version(self, run_id: str) -> tuple[int, str] | None:
        return self._versions.get(run_id)

    def bind(self, bundle: Any, kind: str = "model") -> bool:
        """Attach the global model a bundle needs to forecast with ``kind`` (``model``,
        ``global`` or ``baseline``); False when it needs one that is not in any registry.

        Raises :class:`~shared.models.global_model.GlobalModelError` naming the artifact and the reason
        when the forecast needs a global model that exists but cannot be loaded; a forecast that
        does not need it (the baseline, a self-contained model) goes on without it.
        """
        run_id = getattr(bundle, "global_run_id", None)
        if not run_id:
            return True
        model = self.get(run_id)
        if model is not None:
            bundle.bind_global(model)
            return True
        needed = kind == "global" or (kind == "model" and needs_global(getattr(bundle, "estimator", None)))
        if not needed:
            return True
        if run_id in self.failures:
            raise GlobalModelError(self.failures[run_id])
        return False


def _wape_pair(metrics: Mapping[str, Any], mine_key: str, base_key: str) -> tuple[float, float] | None:
    """Two stored WAPEs as numbers, or None when either is missing, not a number, or NaN."""
    mine, base = metrics.get(mine_key), metrics.get(base_key)
    try:
        mine, base = float(mine), float(base)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(mine) or math.isnan(base) else (mine, base)


# the evidence "did the model beat its baseline" is read from, most robust first: backtests with
# errors capped at the series' outlier scale (one wild value cannot decide it), every backtest
# window plainly (older records), the test window alone (oldest records)
BASELINE_EVIDENCE = (("robust_backtest_wape", "baseline_robust_backtest_wape"),
                     ("backtest_wape", "baseline_backtest_wape"), ("wape", "baseline_wape"))


def _versus_baseline(metrics: Mapping[str, Any],
                     evidence: Sequence[tuple[str, str]] = BASELINE_EVIDENCE) -> tuple[float, float] | None:
    """The first (model, baseline) WAPE pair a record has, most robust first; None without one."""
    for model_key, base_key in evidence:
        if metrics.get(model_key) is not None and metrics.get(base_key) is not None:
            return _wape_pair(metrics, model_key, base_key)
    return None


def beats_baseline(record: Any) -> bool:
    """Did a trained model beat its own moving-average baseline on its backtests?

    Over every backtest window (the validation folds and the test window), errors capped at the
    series' outlier scale (:func:`shared.models.metrics.robust_wape`); older records fall back to the
    plain backtest WAPE, then to the test window.
    """
    if record is None or record.status != "trained":
        return False
    pair = _versus_baseline(record.metrics)
    return pair is not None and pair[0] < pair[1]


def lost_to_baseline(record: Any) -> bool:
    """Did a model's own backtests show it worse than its baseline? (Then the chain passes it by.)"""
    if record is None or record.status != "trained":
        return False
    pair = _versus_baseline(record.metrics)
    return pair is not None and pair[0] > pair[1]


def score_frame(frame: pd.DataFrame, cfg: ProjectConfig, prod: Any, dev: Any | None,
                chain: Sequence[str] | str | None = None,
                global_models: GlobalModels | None = None) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Score the request rows of one mini-batch; return the predictions and one status per partition.

    Each partition is answered by the first source of ``chain`` (default ``cfg.scoring_chain``)
    that can: ``production`` (its promoted model), ``unpromoted`` (its latest trained model, when
    that beat its own baseline), ``global`` (the run's global model on its history), ``baseline``
    (its moving average). Every row says which in ``source`` (``is_fallback`` = not production)
    and carries the ``lower``/``upper`` bounds of that source's prediction interval. Statuses:
    ``scored`` (production), ``fallback`` (another source), ``no_model``, ``failed``.
    """
    if isinstance(chain, str):  # the former ``fallback`` argument: "baseline" | "none"
        if chain not in CHOICES["promotion.fallback"]:
            raise ValueError(f"fallback must be one of {list(CHOICES['promotion.fallback'])}, got {chain!r}")
        chain = ["production"] if chain == "none" else ["production", "baseline"]
    chain = list(chain if chain is not None else cfg.scoring_chain)
    columns = prediction_columns(cfg)
    if len(frame) == 0:
        return pd.DataFrame(columns=columns), []
    models = global_models or GlobalModels(prod, dev)
    frame = frame.sort_values([PARTITION_ID, PERIOD], kind="stable").reset_index(drop=True)
    ids = frame[PARTITION_ID].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    bounds = np.r_[starts, len(ids)]
    order = [str(ids[s]) for s in starts]
    champions = _latest_many(prod, order) if "production" in chain else {}
    needs_dev = dev is not None and chain_reads_dev(chain)
    latest_dev = _latest_many(dev, order) if needs_dev else {}
    # the request rows as arrays, read once: a partition's slice of them costs nothing, where a
    # frame per partition (iloc, assign) cost more than its model's forecast (issue 22)
    requests = _Requests.of(frame, cfg)
    answers = _Answers()
    statuses: list[dict[str, Any]] = []
    for p, (pid, lo, hi) in enumerate(zip(order, bounds[:-1], bounds[1:])):
        keys = {k: str(v[lo]) for k, v in requests.keys.items()}
        status: dict[str, Any] = {PARTITION_ID: pid, "keys": keys, "rows": 0, "model": None,
                                  "model_version": None, "run_id": None, "is_fallback": 0, "source": None,
                                  "reason": ""}
        errors: list[str] = []
        answered = False
        loaded: dict[tuple[str, int], Any] = {}  # several sources may read the same dev bundle
        for source in chain:
            pick = pick_source(source, champions.get(pid), latest_dev.get(pid), prod, dev)
            if pick is None:
                continue
            record, registry, kind = pick
            try:
                key = (str(getattr(registry, "name", id(registry))), int(record.version))
                if key not in loaded:
                    loaded[key] = registry.load(record)
                bundle = loaded[key]
                if not models.bind(bundle, kind) or (kind == "global" and getattr(bundle, "global_view", None) is None):
                    continue  # no global model for this bundle: the next source answers
                predicted = _predict_rows(bundle, requests, lo, hi, kind)
            except Exception as exc:  # one partition's failure is reported; the mini-batch goes on
                errors.append(f"{source}: {type(exc).__name__}: {exc}"[:500])
                continue
            model, version, run_id = _identity(kind, record, bundle, models)
            is_fallback = int(source != "production")
            answers.add(predicted, p, (model, version, run_id, pid, is_fallback, source))
            status.update(status="fallback" if is_fallback else "scored", rows=int(len(predicted[0])),
                          model=model, model_version=version, run_id=run_id, is_fallback=is_fallback,
                          source=source, reason="; ".join(errors))
            answered = True
            break
        if not answered:
            if errors:
                status.update(status="failed", reason="; ".join(errors)[:1000])
            else:
                known = bool(requests.known[lo]) if requests.known is not None else True
                reason = _no_model_reason(chain, dev) if known else "partition not in the training data"
                status.update(status="no_model", reason=reason)
        statuses.append(status)
    return answers.frame(cfg, columns, requests, starts), statuses


@dataclass
class _Requests:
    """One mini-batch's request rows (sorted by partition and period) as arrays."""

    keys: dict[str, np.ndarray]
    periods: np.ndarray
    covariates: dict[str, np.ndarray]  # each of cfg.data.covariates, float64
    horizon: np.ndarray | None  # > 0: "the next N periods"; None: every row explicit
    known: np.ndarray | None

    @classmethod
    def of(cls, frame: pd.DataFrame, cfg: ProjectConfig) -> "_Requests":
        return cls(keys={k: frame[k].to_numpy() for k in cfg.data.keys},
                   periods=frame[PERIOD].to_numpy(dtype="int64"),
                   covariates={c: frame[c].to_numpy(dtype="float64") for c in cfg.data.covariates
                               if c in frame.columns},
                   horizon=frame[HORIZON].to_numpy(dtype="int64") if HORIZON in frame.columns else None,
                   known=frame[KNOWN].to_numpy(dtype=bool) if KNOWN in frame.columns else None)


class _Answers:
    """The answered partitions' forecasts, gathered as arrays and made one frame at the end."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.owner: list[int] = []  # each answer's partition (its index in the mini-batch)
        self.meta: list[tuple[Any, ...]] = []  # (model, version, run_id, partition_id, is_fallback, source)

    def add(self, predicted: tuple[np.ndarray, ...], partition: int, meta: tuple[Any, ...]) -> None:
        self.parts.append(predicted)
        self.owner.append(partition)
        self.meta.append(meta)

    def frame(self, cfg: ProjectConfig, columns: list[str], requests: _Requests,
              starts: np.ndarray) -> pd.DataFrame:
        if not self.parts:
            empty = pd.DataFrame(columns=columns)
            for col, dtype in (("model_version", "int64"), ("is_fallback", "int64"), ("prediction", "float64"),
                               ("lower", "float64"), ("upper", "float64")):
                empty[col] = empty[col].astype(dtype)
            return empty
        counts = np.array([len(p[0]) for p in self.parts], dtype=np.intp)
        first_row = starts[np.asarray(self.owner, dtype=np.intp)]
        out: dict[str, Any] = {}
        for k, values in requests.keys.items():  # the keys as the request rows spell them
            out[k] = np.repeat(np.array([str(v) for v in values[first_row]], dtype=object), counts)
        out[cfg.data.time] = np.concatenate([p[0] for p in self.parts])
        for i, col in enumerate(("prediction", "lower", "upper"), start=1):
            out[col] = np.concatenate([p[i] for p in self.parts]).astype("float64")
        for i, (col, dtype) in enumerate((("model", object), ("model_version", "int64"), ("run_id", object),
                                          (PARTITION_ID, object), ("is_fallback", "int64"), ("source", object))):
            out[col] = np.repeat(np.array([m[i] for m in self.meta], dtype=dtype), counts)
        return pd.DataFrame(out, columns=columns)


def global_may_answer(record: Any) -> bool:
    """May the run's global model answer for this partition? Unless its backtests (the validation
    folds and the test window) showed it worse than the partition's own moving average: then the
    baseline is the better forecast. Records without that evidence (older ones, new series) let it."""
    pair = _versus_baseline(record.metrics if record is not None else {},
                            (("global_robust_backtest_wape", "baseline_robust_backtest_wape"),
                             ("global_backtest_wape", "baseline_backtest_wape")))
    return pair is None or pair[0] < pair[1]


def stale(champion: Any, latest: Any) -> bool:
    """Was the production model trained on older data than the partition's latest development model?
    Then it would forecast from the end of old data ("the next 12 weeks" dated in the past): the
    chain passes it by, and the model trained on the newest data (or a fallback) answers."""
    if champion is None or latest is None:
        return False
    try:
        return int(latest.metrics["last_period"]) > int(champion.metrics["last_period"])
    except (KeyError, TypeError, ValueError):  # records of releases that did not record it
        return False


def pick_source(source: str, champion: Any, latest: Any, prod: Any, dev: Any) -> tuple[Any, Any, str] | None:
    """The (record, registry, forecast kind) a source would answer with, or None."""
    if source == "production":
        usable = champion is not None and not lost_to_baseline(champion) and not stale(champion, latest)
        return (champion, prod, "model") if usable else None
    if latest is None or latest.partition_id == GLOBAL_ID:
        return None
    if source == "unpromoted":
        return (latest, dev, "model") if beats_baseline(latest) else None
    if source == "latest":
        return (latest, dev, "model") if latest.status in ("trained", "baseline_only") else None
    if source == "global":
        return (latest, dev, "global") if global_may_answer(latest) else None
    if source == "baseline":
        return latest, dev, "baseline"
    raise ValueError(f"unknown scoring source {source!r}")


def _identity(kind: str, record: Any, bundle: Any, models: GlobalModels) -> tuple[str, int, str]:
    """The model name, version and run a prediction row names."""
    if kind == "global":
        found = models.version(bundle.global_run_id) if bundle.global_run_id else None
        if found is not None:
            return "global", found[0], found[1]
        return "global", int(record.version), record.run_id
    if kind == "baseline":
        return "baseline", int(record.version), record.run_id
    return str(record.model_type), int(record.version), record.run_id


def score_batch(frame: pd.DataFrame, cfg: ProjectConfig, prod: Any, dev: Any | None,
                chain: Sequence[str] | str | None = None) -> pd.DataFrame:
    """The predictions of :func:`score_frame` alone (the name in docs/internals.md)."""
    return score_frame(frame, cfg, prod, dev, chain)[0]


def _latest_many(registry: Any, ids: Sequence[str]) -> dict[str, Any]:
    if not ids:
        return {}
    if hasattr(registry, "latest_many"):  # one indexed query for the whole mini-batch
        return registry.latest_many(ids)
    found = {pid: registry.latest(pid) for pid in ids}
    return {pid: rec for pid, rec in found.items() if rec is not None}


def _no_model_reason(chain: Sequence[str], dev: Any | None) -> str:
    if list(chain) == ["production"]:
        return "no production model (the scoring chain has no fallback)"
    if dev is None:
        return "no production model and no development registry for the fallbacks"
    return "no production model and no development model for the fallbacks"


def _predict_rows(bundle: Any, requests: _Requests, lo: int, hi: int,
                  kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Predict a partition's request rows ``lo:hi``: ``(times, prediction, lower, upper)``.

    An explicit-rows request must come back with exactly the requested periods, in order.
    """
    horizon = int(requests.horizon[lo]) if requests.horizon is not None else 0
    if horizon > 0:
        start = int(requests.periods[lo])
        if start != bundle.last_period + 1:
            raise ValueError(f"the model was trained on data up to period {bundle.last_period}, but the data now "
                             f"reach period {start - 1}: its next periods would not be the next ones")
        periods, pred = bundle.predict_arrays(horizon=horizon, source=kind)
        pred = np.maximum(np.asarray(pred, dtype=np.float64), 0.0)
        lower, upper = bundle.bounds(periods, pred, kind)
        return bundle.period_times(periods), pred, lower, upper
    wanted = requests.periods[lo:hi]
    missing = [c for c in bundle.covariates if c not in requests.covariates]
    if missing:
        raise ValueError(f"future rows lack covariate column(s) {missing}")
    cov = np.empty((hi - lo, len(bundle.covariates)), dtype=np.float64)
    for j, c in enumerate(bundle.covariates):  # in the model's own order
        cov[:, j] = requests.covariates[c][lo:hi]
    got, pred = bundle.predict_arrays(wanted, cov, source=kind)
    got = np.asarray(got, dtype="int64")
    if len(got) != len(wanted) or not np.array_equal(np.sort(got), np.sort(wanted)):
        raise ValueError(f"the model returned {len(got)} predictions for {len(wanted)} requested periods")
    pred = np.maximum(np.asarray(pred, dtype=np.float64), 0.0)
    lower, upper = bundle.bounds(got, pred, kind)
    position = np.argsort(got, kind="stable")[np.searchsorted(np.sort(got), wanted)]
    values = pred[position]
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"the model returned {bad} non-finite prediction(s)")
    # each row dated by its period's own time stamp (a Saturday of W-FRI data is that week's Friday),
    # so that SQL never holds one period under two dates
    return bundle.period_times(wanted), values, lower[position], upper[position]


def status_line(status: dict[str, Any]) -> str:
    """One JSON line per partition (the entry script's return value): NaN-free, key order stable."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in status.items()}
    return json.dumps(clean, default=str)
