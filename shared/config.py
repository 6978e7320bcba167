"""The project configuration: one TOML file, overridable by CLI flags, remembered by a workdir.

Every stage reads its options from a :class:`ProjectConfig`; nothing reads flags or files on its
own. Defaults match the synthetic generator's column names, so a generated panel needs no config;
covariates are none unless named (its ``price`` and ``promo`` are used when asked for).
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from shared import bounds
from shared.models.candidate_kinds import CANDIDATE_NAME, candidate_names, default_candidates
from shared.errors import ManyModelsError
from shared.models.metric_names import ERROR_METRICS, METRICS
from shared.trust import DEFAULT_ESTIMATOR_PACKAGES, UntrustedCodeError, check_estimator_packages, check_estimator_path

CONFIG_FILE_NAME = "manymodels.toml"


class ConfigError(ManyModelsError, ValueError):
    """A configuration value is missing or invalid; the message names the field."""


@dataclass
class DataSpec:
    """Which columns hold the partition keys, the time, the target and the covariates."""

    keys: list[str] = field(default_factory=lambda: ["store", "item"])
    time: str = "date"
    target: str = "sales"
    covariates: list[str] = field(default_factory=list)  # none unless asked: a column is never used unseen
    freq: str = "W"  # a pandas offset alias (D, W, MS, M, Q, H ...) or "int" for integer periods
    # an IANA zone (e.g. "Europe/Berlin") that daily and coarser times with a UTC offset are converted
    # to; None: the local date as written (docs/configuration.md, "Time zones")
    timezone: str | None = None
    # how text times are written: a strptime format ("%d.%m.%Y"); None: inferred from the first values
    time_format: str | None = None
    dayfirst: bool = False  # "03/04/2024" is 3 April (when no time_format says so)


@dataclass
class ValidationPolicy:
    """What ingestion does with each kind of bad row. Every choice is counted in the report."""

    null_keys: str = "error"  # error | drop
    null_target: str = "drop"  # drop | zero | error
    negative_target: str = "clip"  # clip | drop | keep | error
    duplicates: str = "sum"  # sum | last | error  (rows sharing partition and period)
    # rows repeating an earlier row exactly (keys, time, target, covariates): a double load, refused
    exact_duplicates: str = "error"  # error | drop | merge (merge: as validation.duplicates says)
    gaps: str = "auto"  # auto | zero | interpolate | keep  (missing periods inside a series; auto: zeros only
    # in a series that records zeros itself, and never where a null target was dropped)
    null_covariates: str = "ffill"  # ffill | zero | error


@dataclass
class ForecastSpec:
    """The forecasting problem: how far ahead, and which windows evaluate a model."""

    horizon: int = 12
    test_periods: int = 12
    validation_periods: int = 24  # two horizons: a 12-period window let one noisy quarter pick the model
    season_length: int | None = None  # None: derived from freq (W=52, D=7, M=12, Q=4, H=24)
    min_train_periods: int = 26  # fewer observed periods before the validation folds: baseline only
    min_periods: int = 4  # fewer observed periods in all: skipped
    interval_level: float = 0.80  # central prediction interval (lower, upper) of every forecast row


@dataclass
class CandidateSpec:
    """An extra candidate model: a scikit-learn regressor of an allowed package, by dotted path
    and parameters. Only the project file names one (never a message: see MESSAGE_OVERRIDES)."""

    name: str
    estimator: str
    params: dict[str, Any] = field(default_factory=dict)
    log_target: bool = False


@dataclass
class TrainingSpec:
    """Which candidate models compete on the validation window, and the selection metric."""

    candidates: list[str] = field(default_factory=default_candidates)  # shared.models.candidate_kinds
    extra_candidates: list[CandidateSpec] = field(default_factory=list)
    # packages whose regressors extra_candidates may name (shared.trust); never the standard library
    estimator_packages: list[str] = field(default_factory=lambda: list(DEFAULT_ESTIMATOR_PACKAGES))
    selection_metric: str = "wape"
    seed: int = 42
    folds: int = 2  # rolling-origin validation windows the candidates are scored on
    # a partition keeps its own best candidate over the batch's best only when it wins its folds by
    # more than this share (selection on a few dozen points is noisy; see shared.models.training.choose)
    selection_margin: float = 0.10
    ensemble: bool = True  # the mean of the two best candidates competes too
    # the test window's forecasts of every candidate are evidence for the choice too (the most recent
    # window; 2 folds alone picked by chance on data we had not tuned on): the promotion metric then
    # reads a window the choice saw
    select_on_test: bool = True
    global_max_rows: int = 1_000_000  # rows the global model is fitted on (sampled: partitions, then whole periods)
    # each trained model's price elasticity and promotion lift (shared.models.effects; SQL table effects):
    # about 2 ms a partition with two covariates, ~9 % of a local-models training
    effects: bool = True
    # observed periods before the test window loaded into SQL (table actuals, the report's charts):
    # a season, at most this many per partition; 0 loads none
    history_periods: int = 52


@dataclass
class RunnerSpec:
    """The parallel engine: local process pool or Azure ML parallel job, same contract."""

    workers: int = 2  # 0 = one per CPU
    mini_batch_size: int = 1  # files per run(mini_batch) call, as in an Azure ML parallel job
    rows_per_file: int = 20_000  # mini-batch files hold at most about this many rows (small data: fewer, see partitioning.file_rows)
    retries: int = 2  # retries of a mini-batch whose run() raised or whose worker died
    progress: bool = True


@dataclass
class PromotionRules:
    """Business rules a trained model must pass before it reaches the production registry."""

    metric: str = "accuracy"
    min_value: float = 0.80
    higher_is_better: bool = True
    must_beat_champion: bool = True
    min_history: int = 26  # observed periods a partition needs before its model may be promoted
    fallback: str = "baseline"  # baseline | none: how partitions with no production model are scored


DEFAULT_CHAIN = ("production", "unpromoted", "global", "baseline")
# "latest": the partition's latest trained model whatever its backtests (to judge a candidate alone)
SCORING_SOURCES = (*DEFAULT_CHAIN, "latest")


def chain_reads_dev(chain: Sequence[str]) -> bool:
    """Does a scoring chain open the development registry? Every source but ``production`` reads it."""
    return any(source != "production" for source in chain)
# The prepared dataset's manifest columns (shared.data.partitioning) and the registry's standard tags
# (shared.registries.registry.STANDARD_TAGS) sit beside the key columns: a key may not take their names.
MANIFEST_COLUMNS = ("n_rows", "n_observed", "first_period", "last_period", "last_time", "fingerprint", "batch")
RESERVED_KEY_NAMES = (*MANIFEST_COLUMNS, "run_id", "model_type", "status", "version", "name")


@dataclass
class ScoringSpec:
    """Where each partition's forecast comes from, in order of preference (the fallback chain).

    ``production`` the promoted model; ``unpromoted`` the partition's latest trained model when it
    beat its own baseline on the test window; ``global`` the run's global model; ``baseline`` the
    moving average; ``latest`` (not in the default) the partition's latest trained model whatever
    its backtests. The first source that can answer does; every row records which one did.
    """

    chain: list[str] = field(default_factory=lambda: list(DEFAULT_CHAIN))
    # bounded work: a scoring row (or horizon) may reach at most this many periods past the end of
    # training (the serving default MM_SERVING_MAX_HORIZON is the same 520)
    max_distance: int = 520


@dataclass
class StoreSpec:
    """The SQL result store: a local SQLite file by default, or any database through ODBC."""

    backend: str = "sqlite"  # sqlite | odbc
    sqlite_file: str = "results.sqlite"  # relative to the workdir
    odbc_connection_setting: str = "MM_SQL_CONNECTION"  # env var holding the ODBC connection string
    dialect: str = "sqlite"  # sqlite | postgresql | mssql (Azure SQL / Synapse)


@dataclass
class IngestSpec:
    """Ingestion's memory bound: inputs larger than fit in ``memory_mb`` stream through bucket files."""

    memory_mb: int = 2048  # peak memory of ingestion (all its processes), whatever the input's size
    workers: int = 0  # processes validating buckets in parallel; 0 = one per CPU
    # how a CSV file is written (shared.data.ingest.csv_options): the field delimiter ("auto": sniffed
    # from the header among , ; tab |), the decimal mark, the thousands separator, the text encoding
    delimiter: str = "auto"
    decimal: str = "."
    thousands: str | None = None
    encoding: str = "utf-8"


# Every option with a fixed set of values, each set defined once: validate() checks against it and
# the message-override table (MESSAGE_OVERRIDES) offers the same values.
CHOICES: dict[str, tuple[str, ...]] = {
    "validation.null_keys": ("error", "drop"),
    "validation.null_target": ("drop", "zero", "error"),
    "validation.negative_target": ("clip", "drop", "keep", "error"),
    "validation.duplicates": ("sum", "last", "error"),
    "validation.exact_duplicates": ("error", "drop", "merge"),
    "validation.gaps": ("auto", "zero", "interpolate", "keep"),
    "validation.null_covariates": ("ffill", "zero", "error"),
    "training.selection_metric": ERROR_METRICS,
    "promotion.metric": METRICS,
    "promotion.fallback": ("baseline", "none"),
    "store.backend": ("sqlite", "odbc"),
    "store.dialect": ("sqlite", "postgresql", "mssql"),
    "ingest.decimal": (".", ","),
}


@dataclass
class ProjectConfig:
    data: DataSpec = field(default_factory=DataSpec)
    validation: ValidationPolicy = field(default_factory=ValidationPolicy)
    forecast: ForecastSpec = field(default_factory=ForecastSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    runner: RunnerSpec = field(default_factory=RunnerSpec)
    promotion: PromotionRules = field(default_factory=PromotionRules)
    scoring: ScoringSpec = field(default_factory=ScoringSpec)
    store: StoreSpec = field(default_factory=StoreSpec)
    ingest: IngestSpec = field(default_factory=IngestSpec)

    # -- derived values -------------------------------------------------------------------
    @property
    def scoring_chain(self) -> list[str]:
        """The sources scoring tries, in order (``promotion.fallback = none``: production only)."""
        if self.promotion.fallback == "none":
            return ["production"]
        return list(self.scoring.chain)

    @property
    def scoring_reads_dev(self) -> bool:
        """Does scoring open the development registry? (:func:`chain_reads_dev` of the chain.)"""
        return chain_reads_dev(self.scoring_chain)

    @property
    def season_length(self) -> int:
        if self.forecast.season_length:
            return self.forecast.season_length
        return default_season_length(self.data.freq)

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ProjectConfig":
        cfg = cls()
        for section_name, value in raw.items():
            if not hasattr(cfg, section_name) or section_name.startswith("_"):
                raise ConfigError(f"unknown config section [{section_name}]")
            if not isinstance(value, Mapping):
                raise ConfigError(f"config section [{section_name}] must be a table")
            _apply(getattr(cfg, section_name), value, section_name)
        cfg.validate()
        return cfg

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_toml(), encoding="utf-8")
        tmp.replace(path)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ProjectConfig":
        """A copy with dotted overrides applied, e.g. {"data.keys": ["store"], "forecast.horizon": 8}.

        None values are ignored, so CLI flags that were not given change nothing.
        """
        raw = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, name = dotted.partition(".")
            if not name:
                raise ConfigError(f"override {dotted!r} must be 'section.field'")
            raw.setdefault(section, {})[name] = value
        return ProjectConfig.from_dict(raw)

    def validate(self) -> None:
        d, f, p = self.data, self.forecast, self.promotion
        if not d.keys:
            raise ConfigError("data.keys: at least one partition key column is required")
        if len(set(d.keys)) != len(d.keys):
            raise ConfigError(f"data.keys: duplicate column in {d.keys}")
        named = [*d.keys, d.time, d.target, *d.covariates]
        clash = sorted({c for c in named if named.count(c) > 1})
        if clash:
            raise ConfigError(f"data: column(s) {clash} named in more than one role")
        if any(c.startswith("_") or c == "partition_id" for c in named):
            raise ConfigError("data: column names starting with '_' and 'partition_id' are reserved")
        reserved = sorted(set(d.keys) & set(RESERVED_KEY_NAMES))
        if reserved:
            raise ConfigError(f"data.keys: {reserved} name columns of the dataset manifest or the model "
                              f"registry's standard tags; rename the key column(s) (reserved: "
                              f"{list(RESERVED_KEY_NAMES)})")
        check_freq(d.freq)
        check_timezone(d.timezone)
        check_csv_options(self.ingest, d)
        self._validate_bounds()
        for name in CHOICES:
            if name.startswith("validation."):
                _one_of(name, getattr(self.validation, name.partition(".")[2]))
        self._validate_extra_candidates()
        known = set(candidate_names()) | {c.name for c in self.training.extra_candidates}
        unknown = [c for c in self.training.candidates if c not in known]
        if unknown:
            raise ConfigError(f"training.candidates: unknown candidate(s) {unknown}; known: {sorted(known)}")
        _one_of("training.selection_metric", self.training.selection_metric)
        if int(f.horizon) > int(self.scoring.max_distance):
            raise ConfigError(f"forecast.horizon {f.horizon} is beyond scoring.max_distance "
                              f"{self.scoring.max_distance} periods after the end of training; ask for "
                              "fewer periods, or raise scoring.max_distance in the project file")
        chain = list(self.scoring.chain)
        bad = [c for c in chain if c not in SCORING_SOURCES]
        if bad or not chain or len(set(chain)) != len(chain):
            raise ConfigError(f"scoring.chain: {chain!r} must be distinct sources out of {list(SCORING_SOURCES)}")
        _one_of("promotion.metric", p.metric)
        _one_of("promotion.fallback", p.fallback)
        _one_of("store.backend", self.store.backend)
        _one_of("store.dialect", self.store.dialect)

    def _validate_bounds(self) -> None:
        """Every number of the config within its bound of :data:`shared.bounds.BOUNDS`, and finite:
        a NaN threshold would pass every comparison's test for 'not worse' (``0.0 >= nan`` is False,
        and so is ``0.0 < nan``), a million folds or workers would spin for minutes."""
        for name in bounds.BOUNDS:
            section, _, field_name = name.partition(".")
            spec = getattr(self, section, None) if field_name else None
            if spec is None or not hasattr(spec, field_name):
                continue  # not a config setting (a message's group_size, a key's length...)
            value = getattr(spec, field_name)
            if value is None and name == "forecast.season_length":
                continue  # derived from data.freq
            try:
                bounds.check(name, value)
            except bounds.BoundsError as exc:
                raise ConfigError(str(exc)) from exc

    def _validate_extra_candidates(self) -> None:
        """Names are plain words; estimators are public dotted paths under an allowed package
        (checked without importing anything); params are data (TOML values), never objects."""
        packages = self.training.estimator_packages
        try:
            check_estimator_packages(packages)
        except UntrustedCodeError as exc:
            raise ConfigError(str(exc)) from exc
        for i, extra in enumerate(self.training.extra_candidates):
            where = f"training.extra_candidates[{i}]"
            if not isinstance(extra.name, str) or not CANDIDATE_NAME.match(extra.name):
                raise ConfigError(f"{where}.name: {extra.name!r} must be a word of letters, digits, '_' "
                                  "or '-' (at most 64 characters)")
            try:
                check_estimator_path(extra.estimator, packages, f"{where}.estimator")
            except UntrustedCodeError as exc:
                raise ConfigError(str(exc)) from exc
            if not isinstance(extra.params, Mapping) or not _is_data(extra.params):
                raise ConfigError(f"{where}.params must be a table of plain values (numbers, strings, "
                                  "booleans, lists and tables of them)")
            if not isinstance(extra.log_target, bool):
                raise ConfigError(f"{where}.log_target must be true or false")


def _is_data(value: Any, depth: int = 0) -> bool:
    """A TOML/JSON value: scalars, and lists and tables of them (nesting bounded)."""
    if depth > 8:
        return False
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_data(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_data(v, depth + 1) for k, v in value.items())
    return False


# -- what a message may override -----------------------------------------------------------------
@dataclass(frozen=True)
class OverrideRule:
    """The type and range of one option a message or HTTP body may set."""

    kind: str  # int | float | bool | choice | names
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind in ("int", "float"):
            word = "a whole number" if self.kind == "int" else "a number"
            return f"{word} from {self.low:g} to {self.high:g}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        return ("a list of candidate names" if not self.choices
                else f"a list of distinct names out of {list(self.choices)}")


def _bounded(name: str) -> OverrideRule:
    """A number option with its range from the one table of bounds (:data:`shared.bounds.BOUNDS`)."""
    bound = bounds.limit(name)
    return OverrideRule("int" if bound.integer else "float", bound.low, bound.high)


def _choice(name: str) -> OverrideRule:
    """A fixed-choice option with its values from the one table of choices (:data:`CHOICES`)."""
    return OverrideRule("choice", choices=CHOICES[name])


_BOOL = OverrideRule("bool")
# Messages and HTTP bodies carry data, never code: they may choose among the candidates the
# operator configured and set numeric, boolean and fixed-choice options. Column names, frequency,
# extra candidates, estimator packages, runner, store and ingest settings come only from the
# project file (and the operator's CLI flags).
MESSAGE_OVERRIDES: dict[str, OverrideRule] = {
    "forecast.horizon": _bounded("forecast.horizon"),
    "forecast.test_periods": _bounded("forecast.test_periods"),
    "forecast.validation_periods": _bounded("forecast.validation_periods"),
    "forecast.season_length": _bounded("forecast.season_length"),
    "forecast.min_train_periods": _bounded("forecast.min_train_periods"),
    "forecast.min_periods": _bounded("forecast.min_periods"),
    "forecast.interval_level": _bounded("forecast.interval_level"),
    "training.candidates": OverrideRule("names"),
    "training.selection_metric": _choice("training.selection_metric"),
    "training.seed": _bounded("training.seed"),
    "training.folds": _bounded("training.folds"),
    "training.selection_margin": _bounded("training.selection_margin"),
    "training.ensemble": _BOOL,
    "training.select_on_test": _BOOL,
    "training.global_max_rows": _bounded("training.global_max_rows"),
    "training.effects": _BOOL,
    "training.history_periods": _bounded("training.history_periods"),
    "promotion.metric": _choice("promotion.metric"),
    "promotion.min_value": _bounded("promotion.min_value"),
    "promotion.higher_is_better": _BOOL,
    "promotion.must_beat_champion": _BOOL,
    "promotion.min_history": _bounded("promotion.min_history"),
    "promotion.fallback": _choice("promotion.fallback"),
    "validation.null_keys": _choice("validation.null_keys"),
    "validation.null_target": _choice("validation.null_target"),
    "validation.negative_target": _choice("validation.negative_target"),
    "validation.duplicates": _choice("validation.duplicates"),
    "validation.gaps": _choice("validation.gaps"),
    "validation.null_covariates": _choice("validation.null_covariates"),
    "scoring.chain": OverrideRule("names", choices=SCORING_SOURCES),
}


def check_message_overrides(overrides: Any) -> dict[str, Any]:
    """Config overrides from a message or an HTTP body, checked as data against MESSAGE_OVERRIDES.

    Raises :class:`ConfigError` naming the first offending key (``key: reason``); returns a plain
    copy. Whether the values fit the project (a candidate name it knows, say) is checked after,
    by :meth:`ProjectConfig.with_overrides`.
    """
    if not isinstance(overrides, Mapping):
        raise ConfigError('must be an object of dotted overrides, e.g. {"forecast.horizon": 8}')
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        rule = MESSAGE_OVERRIDES.get(key) if isinstance(key, str) else None
        if rule is None:
            raise ConfigError(f"{str(key)[:100]!r}: not an option a message may set; allowed: "
                              f"{sorted(MESSAGE_OVERRIDES)} (columns, candidates' estimators and "
                              "engine settings come only from the project file)")
        if value is None:
            continue
        if not _fits(rule, value):
            if key in bounds.BOUNDS:  # a number: the table's own words (value, bound, what it counts)
                try:
                    bounds.check(key, value)
                except bounds.BoundsError as exc:
                    raise ConfigError(str(exc)) from exc
            raise ConfigError(f"{key}: must be {rule.describe()}, got {_short(value)}")
        out[key] = list(value) if isinstance(value, list) else value
    return out


def _fits(rule: OverrideRule, value: Any) -> bool:
    import math

    if rule.kind == "bool":
        return isinstance(value, bool)
    if rule.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and rule.low <= value <= rule.high
    if rule.kind == "float":
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and rule.low <= value <= rule.high)
    if rule.kind == "choice":
        return isinstance(value, str) and value in rule.choices
    if not isinstance(value, list) or not 1 <= len(value) <= 20 or len(set(map(str, value))) != len(value):
        return False
    if not all(isinstance(v, str) and CANDIDATE_NAME.match(v) for v in value):
        return False
    return not rule.choices or all(v in rule.choices for v in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


SEASON_BY_FREQ = {"D": 7, "B": 5, "W": 52, "M": 12, "MS": 12, "ME": 12, "Q": 4, "QS": 4, "QE": 4,
                  "Y": 1, "YS": 1, "YE": 1, "A": 1, "AS": 1, "H": 24, "h": 24}


# Aliases older pandas accepted and current pandas renamed; users and their configs still write them.
LEGACY_FREQ = {"M": "ME", "Q": "QE", "Y": "YE", "A": "YE", "H": "h", "T": "min", "S": "s"}


def offset_alias(freq: str) -> str:
    """The alias the installed pandas accepts for an offset (M -> ME on pandas >= 2.2, say)."""
    import pandas as pd

    try:
        pd.tseries.frequencies.to_offset(freq)
        return freq
    except ValueError:
        pass
    head = freq.lstrip("0123456789")
    count = freq[: len(freq) - len(head)]
    base, dash, anchor = head.partition("-")
    if base in LEGACY_FREQ:
        candidate = count + LEGACY_FREQ[base] + dash + anchor
        pd.tseries.frequencies.to_offset(candidate)
        return candidate
    raise ValueError(freq)


def check_freq(freq: str) -> None:
    if freq == "int":
        return
    try:
        offset_alias(freq)
    except ValueError as exc:
        raise ConfigError(f"data.freq: {freq!r} is not a pandas offset alias (D, W, MS, M, Q...) or 'int'") from exc


def check_csv_options(ingest: Any, data: Any) -> None:
    """The CSV options are single characters that a reader can tell apart, in a known encoding."""
    import codecs

    if ingest.delimiter != "auto" and (not isinstance(ingest.delimiter, str) or len(ingest.delimiter) != 1
                                       or ingest.delimiter in ('"', "\n", "\r")):
        raise ConfigError(f"ingest.delimiter {ingest.delimiter!r}: one character (',' ';' '\\t' '|'...) "
                          "or 'auto' (sniffed from the header)")
    _one_of("ingest.decimal", ingest.decimal)
    if ingest.thousands is not None and (ingest.thousands not in {",", ".", " ", "'", "_"}
                                         or ingest.thousands == ingest.decimal):
        raise ConfigError(f"ingest.thousands {ingest.thousands!r}: one of ',' '.' ' ' \"'\" '_', "
                          f"not the decimal mark {ingest.decimal!r}")
    if ingest.delimiter != "auto" and ingest.delimiter in (ingest.decimal, ingest.thousands):
        raise ConfigError(f"ingest.delimiter {ingest.delimiter!r} is also the decimal mark or thousands "
                          "separator: a reader could not tell fields apart")
    try:
        codecs.lookup(str(ingest.encoding))
    except LookupError as exc:
        raise ConfigError(f"ingest.encoding {ingest.encoding!r} is not a known text encoding "
                          "(utf-8, latin-1, cp1252...)") from exc
    if data.time_format is not None and "%" not in str(data.time_format):
        raise ConfigError(f"data.time_format {data.time_format!r} is not a strptime format (e.g. '%d.%m.%Y')")


def check_timezone(zone: str | None) -> None:
    import pandas as pd

    if zone is None:
        return
    if not isinstance(zone, str) or not zone.strip():
        raise ConfigError(f"data.timezone must be a time zone name, got {zone!r}")
    try:
        pd.Timestamp("2000-01-01", tz=zone)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"data.timezone: {zone!r} is not a time zone; use an IANA name such as "
                          "'Europe/Berlin' or 'UTC'") from exc


def default_season_length(freq: str) -> int:
    if freq == "int":
        return 1
    base = freq.split("-")[0]
    base = base.lstrip("0123456789") or base
    return SEASON_BY_FREQ.get(base, 1)


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> ProjectConfig:
    """Read a TOML project file (or the defaults) and apply dotted overrides."""
    cfg = ProjectConfig()
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        cfg = ProjectConfig.from_dict(raw)
    return cfg.with_overrides(overrides or {})


def _apply(target: Any, values: Mapping[str, Any], section: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"unknown config field {section}.{name}; known: {sorted(fields)}")
        setattr(target, name, _coerce(f"{section}.{name}", fields[name], value, getattr(target, name)))


def _coerce(where: str, fld: dataclasses.Field, value: Any, current: Any) -> Any:
    if where == "training.extra_candidates":
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of tables")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, CandidateSpec):
                out.append(item)
                continue
            if not isinstance(item, Mapping) or "name" not in item or "estimator" not in item:
                raise ConfigError(f"{where}[{i}] needs 'name' and 'estimator' (a dotted path)")
            try:
                out.append(CandidateSpec(**item))
            except TypeError as exc:
                raise ConfigError(f"{where}[{i}]: {exc}") from exc
        return out
    if isinstance(current, list) or fld.name in ("keys", "covariates", "candidates", "chain"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of names, got {value!r}")
        return list(value)
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(current, int) or (current is None and fld.name == "season_length"):
        if value is None:
            return None
        try:
            as_float = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from exc
        if isinstance(value, bool) or as_float != int(as_float):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(as_float)
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where} must be a number, got {value!r}") from exc
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _one_of(where: str, value: str) -> None:
    """``value`` is one of the option's values in :data:`CHOICES`."""
    allowed = CHOICES[where]
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {sorted(allowed)}")


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj
