"""A bounded, thread- and asyncio-safe cache of loaded production models for real-time scoring.

Why: there are too many models to preload (10,000 partitions would exhaust a container), so a
partition's model is loaded on its first request and kept while it is used; the least recently
used models are evicted when the cache holds more than ``max_bytes`` or ``max_entries``.

Rules:

- **Resolution** is the registry's O(1) ``latest(partition_id)`` (the production registry). With
  ``fallback="baseline"`` a partition without a production model gets its latest development model,
  asked for its naive baseline (``is_fallback``), exactly as batch scoring does.
- **Single-flight**: concurrent requests for the same cold partition share one load (a per-key
  future); the first caller loads, the others wait for its result or its error.
- **New versions** are noticed without a reload per request: at most every ``check_interval_ms``
  one caller reads the registry's ``index_version()`` (a change counter bumped by every write).
  When it moved, cached entries become *stale*; a stale entry is re-resolved only when its
  partition is asked for again: same version -> kept (a revalidation), new version -> loaded.
  A production entry depends on the production index only; a fallback entry on both.
- **Failures**: a model that cannot be loaded raises :class:`ModelLoadError` (with the reason)
  for every caller waiting on that load, and nothing is cached, so the next request retries; other
  partitions are unaffected. No model at all raises :class:`ModelNotFoundError`.
- **Size** of an entry: by default the loaded object's own memory (:func:`object_size`: a walk of its
  object graph counting numpy buffers) times ``MEMORY_OVERHEAD``, the allocator's share on top
  (measured on our bundles: 312 MB of RSS growth for 256 MB of walked objects, with 6,500 models
  cached and 3,500 evicted; flat under churn). The artifact file is a poor proxy: 1,000 loaded
  models took 61 MB of RSS for 18 MB of files (a gradient-boosted bundle is ~190 KB in memory for
  a 64 KB pickle). The walk costs ~0.3 ms per load. ``size_by="file"`` uses the artifact's size
  instead (cheaper, under-counts ~3x), so ``max_bytes`` bounds resident memory only by memory size.
- **Async**: :meth:`ModelCache.aget` never blocks the event loop: a fresh entry is returned
  inline (a dict lookup); loads run on the cache's own small thread pool (waiters await the
  shared future) and index checks on a thread of their own, without holding up the request.

The newest entry is never evicted by its own insertion, so a single model larger than
``max_bytes`` is still served (and evicted by the next load).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from shared.forecasts.cache_entries import (
    FALLBACKS, MEMORY_OVERHEAD, SIZE_METHODS, CachedModel, CacheStats, Lookup, ModelLoadError,
    ModelNotFoundError, object_size,
)
from shared.config import DEFAULT_CHAIN, SCORING_SOURCES, chain_reads_dev
from shared.models.global_model import GlobalModelError
from shared.forecasts.scoring import GlobalModels, pick_source

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    model: CachedModel
    prod_index: int | None
    dev_index: int | None


class ModelCache:
    """Production models by partition id, loaded on demand, LRU-evicted by bytes and by count.

    ``prod`` and ``dev`` are model registries (``latest``, ``load``, ``index_version``,
    ``artifact_path``, ``name``): :class:`shared.registries.registry.ModelRegistry` or the Azure ML one.
    ``clock`` (seconds, monotonic) is a parameter so tests can move time.
    """

    def __init__(
        self,
        prod: Any,
        dev: Any | None = None,
        fallback: str = "baseline",
        max_bytes: int = 512 * 2**20,
        max_entries: int = 100_000,
        check_interval_ms: float = 1000.0,
        size_by: str = "memory",
        load_workers: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(fallback, str):
            if fallback not in FALLBACKS:
                raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
            chain = ["production"] if fallback == "none" else list(DEFAULT_CHAIN)
        else:
            chain = list(fallback)
            if not chain or chain[0] != "production" and "production" in chain[1:]:
                raise ValueError(f"a scoring chain lists sources out of {SCORING_SOURCES}, got {chain!r}")
        if size_by not in SIZE_METHODS:
            raise ValueError(f"size_by must be one of {SIZE_METHODS}, got {size_by!r}")
        if max_bytes < 1 or max_entries < 1:
            raise ValueError(f"max_bytes and max_entries must be >= 1, got {max_bytes}, {max_entries}")
        if check_interval_ms < 0 or load_workers < 1:
            raise ValueError("check_interval_ms must be >= 0 and load_workers >= 1")
        self.prod = prod
        self.dev = dev
        self.chain = chain
        self.fallback = "none" if chain == ["production"] else "baseline"
        self._globals = GlobalModels(prod, dev)  # loaded once per process, shared by every bundle
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self.check_interval_ms = float(check_interval_ms)
        self.size_by = size_by
        self.load_workers = int(load_workers)
        self._clock = clock
        self._lock = threading.Lock()  # guards everything below; never held during I/O
        self._check_lock = threading.Lock()  # one index check at a time
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._flights: dict[str, Future] = {}
        self._stats = CacheStats()
        self._prod_index: int | None = None
        self._dev_index: int | None = None
        self._checked_at: float | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._check_executor: ThreadPoolExecutor | None = None
        self._check_future: Future | None = None

    def __repr__(self) -> str:
        return (
            f"ModelCache({self.prod!r}, entries={len(self)}, max_bytes={self.max_bytes}, "
            f"max_entries={self.max_entries})"
        )

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, partition_id: object) -> bool:
        return partition_id in self._slots

    @property
    def uses_dev(self) -> bool:
        return self.dev is not None and chain_reads_dev(self.chain)

    # -- public API ------------------------------------------------------------------------------
    def get(self, partition_id: str) -> CachedModel:
        """The partition's model, loading it if needed (blocks the calling thread)."""
        return self.lookup(partition_id).model

    async def aget(self, partition_id: str) -> CachedModel:
        """:meth:`get` for asyncio: never blocks the event loop on I/O."""
        return (await self.alookup(partition_id)).model

    def lookup(self, partition_id: str) -> Lookup:
        """The model and whether it was a hit. Raises ModelNotFoundError / ModelLoadError."""
        if self._index_check_due():
            self._check_index()
        future, owner, hit = self._claim(partition_id)
        if hit is not None:
            return hit
        if owner:
            self._fill(partition_id, future)
        model, loaded = future.result()
        return self._count(model, loaded)

    async def alookup(self, partition_id: str) -> Lookup:
        """:meth:`lookup` for asyncio: I/O on the cache's threads, waiters share one future.

        A due index check runs on its own thread while this request goes on with what the cache
        knows (only the very first check is awaited): a hit never waits for the registry."""
        if self._index_check_due():
            check = self._schedule_check()
            if self._prod_index is None:
                await asyncio.wrap_future(check)
        future, owner, hit = self._claim(partition_id)
        if hit is not None:
            return hit
        if owner:
            self._pool().submit(self._fill, partition_id, future)
        model, loaded = await asyncio.wrap_future(future)
        return self._count(model, loaded)

    def stats(self) -> dict[str, Any]:
        """The counters plus the limits, as a JSON-able dict."""
        with self._lock:
            out = dict(vars(self._stats))
        out.update(
            max_bytes=self.max_bytes,
            max_entries=self.max_entries,
            size_by=self.size_by,
            check_interval_ms=self.check_interval_ms,
            prod_index=self._prod_index,
            dev_index=self._dev_index,
            fallback=self.fallback,
        )
        return out

    def close(self) -> None:
        """Stop the loader threads (pending loads finish first)."""
        with self._lock:
            executors = [self._executor, self._check_executor]
            self._executor = self._check_executor = None
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=True)

    # -- freshness ------------------------------------------------------------------------------
    def _index_check_due(self) -> bool:
        checked = self._checked_at
        return checked is None or (self._clock() - checked) * 1000.0 >= self.check_interval_ms

    def _check_index(self) -> None:
        """One caller reads the change counters; the others go on with what they know."""
        if not self._check_lock.acquire(blocking=False):
            return
        try:
            if not self._index_check_due():
                return
            started = self._clock()
            try:
                prod_index = int(self.prod.index_version())
                dev_index = int(self.dev.index_version()) if self.uses_dev else None
            except Exception as exc:  # an unreachable index must not stop serving what is cached
                logger.warning("model cache: registry index check failed, serving cached entries: %s", exc)
                with self._lock:
                    self._stats.index_check_failures += 1
                    if self._prod_index is not None:  # retry after the interval, not on every request
                        self._checked_at = started
                if self._prod_index is None:
                    raise
                return
            with self._lock:
                self._stats.index_checks += 1
                if self._prod_index is not None and (prod_index, dev_index) != (
                    self._prod_index,
                    self._dev_index,
                ):
                    self._stats.index_changes += 1
                self._prod_index, self._dev_index = prod_index, dev_index
                self._checked_at = started
        finally:
            self._check_lock.release()

    def _fresh(self, slot: _Slot) -> bool:
        if slot.prod_index != self._prod_index:
            return False
        return not slot.model.is_fallback or slot.dev_index == self._dev_index

    # -- single flight --------------------------------------------------------------------------
    def _claim(self, partition_id: str) -> tuple[Future | None, bool, Lookup | None]:
        """A hit, or the future of the partition's load and whether this caller must run it."""
        with self._lock:
            slot = self._slots.get(partition_id)
            if slot is not None and self._fresh(slot):
                self._slots.move_to_end(partition_id)
                self._stats.hits += 1
                return None, False, Lookup(slot.model, True)
            future = self._flights.get(partition_id)
            if future is not None:
                return future, False, None
            future = Future()
            future.set_running_or_notify_cancel()  # a cancelled waiter can never cancel the load
            self._flights[partition_id] = future
            return future, True, None

    def _count(self, model: CachedModel, loaded: bool) -> Lookup:
        with self._lock:
            if loaded:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
        return Lookup(model, not loaded)

    def _fill(self, partition_id: str, future: Future) -> None:
        """Resolve, load and insert one partition's model; always completes ``future``."""
        try:
            future.set_result(self._resolve_and_load(partition_id))
        except BaseException as exc:
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                self._flights.pop(partition_id, None)

    def _resolve_and_load(self, partition_id: str) -> tuple[CachedModel, bool]:
        with self._lock:
            prod_index, dev_index = self._prod_index, self._dev_index
            stale = self._slots.get(partition_id)
        try:
            record, registry, source, kind = self._resolve(partition_id)
            is_fallback = source != "production"
        except ModelNotFoundError:
            with self._lock:
                self._stats.not_found += 1
                self._drop(partition_id)
            raise
        if (
            stale is not None
            and stale.model.version == int(record.version)
            and stale.model.registry == registry.name
            and stale.model.source == source
        ):
            with self._lock:  # same model as before the index moved: keep it
                stale.prod_index, stale.dev_index = prod_index, dev_index
                if partition_id in self._slots:
                    self._slots.move_to_end(partition_id)
                self._stats.revalidations += 1
            return stale.model, False
        started = time.perf_counter()
        try:
            bundle = registry.load(record)
            if not callable(getattr(bundle, "predict", None)):
                raise TypeError(f"the artifact holds a {type(bundle).__name__}, not a forecast bundle")
            size = self._size_of(bundle, registry, record)  # before binding: the global model is shared
            try:  # only a forecast that needs the global model depends on it (GlobalModels.bind)
                bound = self._globals.bind(bundle, kind) if hasattr(bundle, "global_run_id") else True
            except GlobalModelError:
                if kind != "global":
                    raise  # this partition's own model needs it: its reason names the artifact
                bound = False
            if kind == "global" and (not bound or getattr(bundle, "global_view", None) is None):
                if "baseline" not in self.chain:
                    raise LookupError("the global model of its run is not available")
                source, kind = "baseline", "baseline"  # the chain's next step on the same bundle
            elif not bound:
                raise LookupError(f"the global model of run {bundle.global_run_id} is not in the registry")
        except Exception as exc:  # reported to every waiter; nothing is cached
            with self._lock:
                self._stats.load_failures += 1
                self._drop(partition_id)
            raise ModelLoadError(
                partition_id, int(record.version), registry.name, f"{type(exc).__name__}: {exc}"
            ) from exc
        seconds = time.perf_counter() - started
        model = CachedModel(
            partition_id=partition_id,
            bundle=bundle,
            record=record,
            registry=registry.name,
            is_fallback=is_fallback,
            size=size,
            source=source,
            kind=kind,
        )
        with self._lock:
            self._stats.loads += 1
            self._stats.reloads += stale is not None
            self._stats.load_seconds_total += seconds
            self._stats.load_seconds_max = max(self._stats.load_seconds_max, seconds)
            self._drop(partition_id)
            self._slots[partition_id] = _Slot(model, prod_index, dev_index)
            self._stats.bytes_held += size
            self._evict()
            self._stats.entries = len(self._slots)
        return model, True

    def _resolve(self, partition_id: str) -> tuple[Any, Any, str, str]:
        """(record, registry, source, kind) of the first source of the chain that can answer."""
        champion = self.prod.latest(partition_id) if "production" in self.chain else None
        latest = None
        if self.uses_dev:
            latest = self.dev.latest(partition_id)
        for source in self.chain:
            pick = pick_source(source, champion, latest, self.prod, self.dev)
            if pick is not None:
                record, registry, kind = pick
                return record, registry, source, kind
        if self.chain == ["production"]:
            raise ModelNotFoundError(partition_id, "no production model (the scoring chain has no fallback)")
        if self.dev is None:
            raise ModelNotFoundError(
                partition_id, "no production model, and no development registry for the fallbacks"
            )
        raise ModelNotFoundError(partition_id, "no production model and no development model")

    def _size_of(self, bundle: Any, registry: Any, record: Any) -> int:
        if self.size_by == "file":  # the model's own bytes: its range of a pack, or its whole file
            packed = getattr(record, "byte_length", -1)
            return int(packed) if packed >= 0 else int(registry.artifact_path(record).stat().st_size)
        return int(object_size(bundle) * MEMORY_OVERHEAD)

    # -- eviction (lock held) ----------------------------------------------------------------------
    def _drop(self, partition_id: str) -> None:
        slot = self._slots.pop(partition_id, None)
        if slot is not None:
            self._stats.bytes_held -= slot.model.size
            self._stats.entries = len(self._slots)

    def _evict(self) -> None:
        """Least recently used first, never the newest entry."""
        while len(self._slots) > 1 and (
            self._stats.bytes_held > self.max_bytes or len(self._slots) > self.max_entries
        ):
            _, slot = self._slots.popitem(last=False)
            self._stats.bytes_held -= slot.model.size
            self._stats.evictions += 1

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.load_workers, thread_name_prefix="model-cache")
            return self._executor

    def _schedule_check(self) -> Future:
        """The index check in flight, or a new one on the checker thread."""
        checker = self._checker()
        with self._lock:
            if self._check_future is None or self._check_future.done():
                self._check_future = checker.submit(self._check_index)
            return self._check_future

    def _checker(self) -> ThreadPoolExecutor:
        """One thread for index checks, so a check never queues behind loads (nor loads behind it)."""
        with self._lock:
            if self._check_executor is None:
                self._check_executor = ThreadPoolExecutor(1, thread_name_prefix="model-cache-index")
            return self._check_executor
