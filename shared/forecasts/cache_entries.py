"""What the model cache (:mod:`shared.forecasts.model_cache`) hands out and counts: a loaded entry
(:class:`CachedModel`), a lookup's answer, the cache's counters, its two errors, and how an
entry's size is measured (:func:`object_size`, times ``MEMORY_OVERHEAD``; see the cache's
docstring for the measurements). Every name is also importable from :mod:`shared.forecasts.model_cache`.
"""

from __future__ import annotations

import gc
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.config import CHOICES
from shared.errors import ManyModelsError

FALLBACKS = CHOICES["promotion.fallback"]
SIZE_METHODS = ("memory", "file")
MEMORY_OVERHEAD = 1.22  # resident bytes per walked byte of a loaded bundle (see the module docstring)
MAX_WALK_OBJECTS = 500_000  # object_size stops counting there (a bundle has a few thousand objects)
_NOT_OWNED = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
)


class ModelNotFoundError(ManyModelsError, LookupError):
    """No model serves this partition: no production model, and no fallback allowed or available."""

    def __init__(self, partition_id: str, reason: str) -> None:
        super().__init__(f"partition {partition_id}: {reason}")
        self.partition_id = partition_id
        self.reason = reason


class ModelLoadError(ManyModelsError, RuntimeError):
    """A registered model could not be loaded (missing or corrupted artifact, wrong object)."""

    def __init__(self, partition_id: str, version: int, registry: str, reason: str) -> None:
        super().__init__(
            f"model of partition {partition_id} (v{version}, {registry} registry) failed to load: {reason}"
        )
        self.partition_id = partition_id
        self.version = version
        self.registry = registry
        self.reason = reason


@dataclass(frozen=True)
class CachedModel:
    """A loaded model and where it came from; ``memo`` holds results derived from it (e.g. a
    horizon forecast), dropped with the entry."""

    partition_id: str
    bundle: Any
    record: Any  # shared.registries.registry.ModelRecord
    registry: str  # "prod" | "dev"
    is_fallback: bool
    size: int
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    source: str = "production"  # the scoring chain's source: production | unpromoted | latest | global | baseline
    kind: str = "model"  # what the bundle forecasts with: its model, its baseline, or the global model

    @property
    def model(self) -> str:
        """The model's name as batch scoring reports it: ``baseline`` or ``global`` for those sources."""
        if self.kind in ("baseline", "global"):
            return self.kind
        return str(self.record.model_type)

    @property
    def version(self) -> int:
        return int(self.record.version)

    @property
    def run_id(self) -> str:
        return str(self.record.run_id)


@dataclass(frozen=True)
class Lookup:
    """A cache answer: the model, and whether it was served without loading (``hit``)."""

    model: CachedModel
    hit: bool


@dataclass
class CacheStats:
    """Counters since the cache was made (``bytes_held`` and ``entries`` are current values).

    ``hits`` were answered without a load (revalidations of an unchanged version included),
    ``misses`` waited for a load (their own or a concurrent caller's), ``loads`` were performed.
    """

    hits: int = 0
    misses: int = 0
    not_found: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    revalidations: int = 0
    reloads: int = 0
    index_checks: int = 0
    index_changes: int = 0
    index_check_failures: int = 0
    load_seconds_total: float = 0.0
    load_seconds_max: float = 0.0
    bytes_held: int = 0
    entries: int = 0



def object_size(obj: Any, limit: int = MAX_WALK_OBJECTS) -> int:
    """Bytes held by an object graph: ``sys.getsizeof`` of every object reachable from ``obj``,
    each once, with numpy arrays' buffers (a view's base included). Classes, modules and functions
    are shared by every model and not counted."""
    seen: set[int] = set()
    stack = [obj]
    total = 0
    while stack and len(seen) < limit:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _NOT_OWNED):
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, np.ndarray):
            if item.base is not None:
                stack.append(item.base)
            if item.dtype.hasobject:
                stack.extend(item.ravel().tolist())
            continue
        stack.extend(gc.get_referents(item))
    return total
