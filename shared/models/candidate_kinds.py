"""Every candidate name, defined once: how it is built, whether it is pooled, whether it runs by default.

The config checks ``training.candidates`` against this table and training builds each candidate
through it, so adding a candidate is one entry here, or one :func:`register_candidate` call from
anywhere (a plug-in module, a test). Why a module of its own: the config must import without the
models (scikit-learn and scipy take two seconds). A builder is handed the module of the model
classes (:mod:`shared.models.candidates`, which calls it) rather than importing it: that module imports
this table, and an import back would close a circle at run time.

A candidate registered at run time exists in the processes that registered it: training workers
forked from them (the local pool on Linux) inherit it; spawned ones and Azure ML jobs need the
registering module imported by the entry script too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

# (shared.models.candidates, ProjectConfig, FeatureSpec) -> an unfitted estimator
Builder = Callable[[ModuleType, Any, Any], Any]
# what a candidate name may look like (config files, messages and extra candidates alike)
CANDIDATE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
RESERVED = ("ensemble",)  # added by training itself (the mean of the two best), never configured


@dataclass(frozen=True)
class CandidateKind:
    """One candidate: its builder, or none when pooled (fitted once per run over every partition
    by :mod:`shared.models.training`, seen by each partition through a view)."""

    name: str
    build: Builder | None
    default: bool = False  # in training.candidates unless the project names its own

    @property
    def pooled(self) -> bool:
        return self.build is None


def register_candidate(name: str, build: Builder, *, default: bool = False) -> CandidateKind:
    """Make ``name`` a candidate the config accepts and training builds with
    ``build(models, cfg, spec)`` (``models``: the module :mod:`shared.models.candidates`).

    A name is registered once (a second registration would silently change what an existing
    project trains); pooled candidates need training's own machinery and are not registered here.
    """
    if not isinstance(name, str) or not CANDIDATE_NAME.match(name) or name in RESERVED:
        raise ValueError(f"candidate name {name!r} must be a word of letters, digits, '_' or '-' "
                         f"(at most 64 characters), not {list(RESERVED)}")
    if name in CANDIDATES:
        raise ValueError(f"candidate {name!r} is already registered")
    if not callable(build):
        raise ValueError(f"candidate {name!r}: build must be callable as build(models, cfg, spec)")
    kind = CandidateKind(name, build, default)
    CANDIDATES[name] = kind
    return kind


def candidate_names() -> list[str]:
    """Every registered candidate, in table order."""
    return list(CANDIDATES)


def default_candidates() -> list[str]:
    """The candidates a project trains when it names none, in table order."""
    return [k.name for k in CANDIDATES.values() if k.default]


def pooled_candidates() -> tuple[str, ...]:
    """The candidates fitted once per run over every partition."""
    return tuple(k.name for k in CANDIDATES.values() if k.pooled)


def find_candidate(name: str) -> CandidateKind | None:
    return CANDIDATES.get(name)


# -- the built-in candidates (shared.models.candidates describes each model) -----------------------------
def _seasonal_naive(m: ModuleType, cfg: Any, spec: Any) -> Any:
    from shared.models.local_models import SeasonalNaive  # below both modules: no circle

    return SeasonalNaive(spec)


def _statsforecast(kind: str) -> Builder:
    def build(m: ModuleType, cfg: Any, spec: Any) -> Any:
        from shared.models.local_models import StatsForecaster

        return StatsForecaster(spec, kind=kind)
    return build


# Table order is the order of the default candidates (ties in selection go to the earlier one).
CANDIDATES: dict[str, CandidateKind] = {kind.name: kind for kind in (
    CandidateKind("baseline", lambda m, cfg, spec: m.MovingAverageBaseline(), default=True),
    CandidateKind("naive", lambda m, cfg, spec: m.MovingAverageBaseline(window=1), default=True),
    CandidateKind("snaive", _seasonal_naive, default=True),
    CandidateKind("theta", _statsforecast("theta"), default=True),
    CandidateKind("loglinear", lambda m, cfg, spec: m.LogLinearForecaster(spec), default=True),
    CandidateKind("loglm", lambda m, cfg, spec: m.LogLinearCovariates(spec), default=True),
    CandidateKind("global", None, default=True),
    CandidateKind("global_ar", None, default=True),
    CandidateKind("gbm", lambda m, cfg, spec: m.BoostedTreesForecaster(spec, random_state=int(cfg.training.seed))),
    CandidateKind("ets", _statsforecast("ets")),
    CandidateKind("croston", _statsforecast("croston")),
    CandidateKind("tsb", _statsforecast("tsb")),
)}
