"""The serving side of the model cache: its limits and the request limits, from ``MM_SERVING_*``.

The cache itself is :class:`shared.forecasts.model_cache.ModelCache` (bounded by bytes and count, LRU,
single-flight loads, version pick-up), shared with batch scoring's fallback chain; this module
only says how big it is and what a request may ask, and builds it over a workspace's registries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from shared.forecasts.model_cache import ModelCache


@dataclass(frozen=True)
class ServingOptions:
    """Limits and cache settings; :meth:`from_env` reads the ``MM_SERVING_*`` variables."""

    cache_mb: float = 512.0
    cache_models: int = 20_000
    check_interval_ms: float = 1000.0
    size_by: str = "memory"
    load_workers: int = 2
    max_body_bytes: int = 1 << 20
    max_rows: int = 1000
    max_horizon: int = 520
    # bounded work per request: a row at most this many periods after the model's last period
    # (0: the same as max_horizon), and a time budget for one request's lookup and forecast
    max_distance: int = 0
    request_seconds: float = 10.0
    forecast_workers: int = 4
    # connections (``manymodels serve``; the Functions host has its own): open at most this many,
    # closing the oldest idle one to make room; a request's headers, and then its body, must
    # arrive within read_seconds; an idle keep-alive connection is closed after keep_alive_seconds
    max_connections: int = 2000
    read_seconds: float = 10.0
    keep_alive_seconds: float = 5.0

    ENV = {
        "cache_mb": "MM_SERVING_CACHE_MB",
        "cache_models": "MM_SERVING_CACHE_MODELS",
        "check_interval_ms": "MM_SERVING_CHECK_MS",
        "size_by": "MM_SERVING_SIZE_BY",
        "load_workers": "MM_SERVING_LOAD_WORKERS",
        "max_body_bytes": "MM_SERVING_MAX_BODY_BYTES",
        "max_rows": "MM_SERVING_MAX_ROWS",
        "max_horizon": "MM_SERVING_MAX_HORIZON",
        "max_distance": "MM_SERVING_MAX_DISTANCE",
        "request_seconds": "MM_SERVING_REQUEST_SECONDS",
        "forecast_workers": "MM_SERVING_FORECAST_WORKERS",
        "max_connections": "MM_SERVING_MAX_CONNECTIONS",
        "read_seconds": "MM_SERVING_READ_SECONDS",
        "keep_alive_seconds": "MM_SERVING_KEEP_ALIVE_SECONDS",
    }

    @property
    def distance_limit(self) -> int:
        """How far past a model's last period a request row may lie."""
        return int(self.max_distance) if self.max_distance > 0 else int(self.max_horizon)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServingOptions":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in cls.ENV.items():
            raw = (env.get(var) or "").strip()
            if not raw:
                continue
            kind = type(getattr(cls, name))
            try:
                values[name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        out = cls(**values)
        for name in ("max_body_bytes", "max_rows", "max_horizon", "forecast_workers", "load_workers",
                     "max_connections"):
            if int(getattr(out, name)) < 1:
                raise ValueError(f"{cls.ENV[name]} must be >= 1, got {getattr(out, name)}")
        for name in ("request_seconds", "read_seconds", "keep_alive_seconds"):
            if not 0 < float(getattr(out, name)) <= 3600:  # also refuses nan
                raise ValueError(f"{cls.ENV[name]} must be in (0, 3600], got {getattr(out, name)}")
        if not 0 <= float(out.cache_mb) <= 1 << 30:
            raise ValueError(f"MM_SERVING_CACHE_MB must be in [0, {1 << 30}], got {out.cache_mb}")
        return out

    def make_cache(self, prod: Any, dev: Any | None, fallback: str | list[str]) -> ModelCache:
        return ModelCache(
            prod,
            dev,
            fallback=fallback,
            max_bytes=int(self.cache_mb * 2**20),
            max_entries=self.cache_models,
            check_interval_ms=self.check_interval_ms,
            size_by=self.size_by,
            load_workers=self.load_workers,
        )



def open_cache(workspace: Any, options: ServingOptions) -> ModelCache:
    """A cache over a workspace's production registry (and its dev registry when the scoring chain
    goes beyond production)."""
    chain = workspace.config.scoring_chain
    dev = workspace.dev if chain != ["production"] else None
    return options.make_cache(workspace.prod, dev, chain)
