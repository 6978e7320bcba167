"""The model cache: on-demand loads, single-flight under threads and asyncio, LRU eviction by bytes
and by count, failures never cached, new versions picked up through the index counter."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from shared.config import load_config
from shared.forecasts.model_cache import (
    MEMORY_OVERHEAD,
    CachedModel,
    ModelCache,
    ModelLoadError,
    ModelNotFoundError,
    object_size,
)
from shared.registries.registry import ModelRegistry
from shared.data.synthetic import generate_panel
from shared.models.training import train_batch
from shared.data.validation import validate
from registry_tools import damage_model


@pytest.fixture(scope="module")
def bundles() -> dict[str, bytes]:
    """Six real trained bundles (pickled as the training entry script writes them), by partition id."""
    cfg = load_config(None)
    frame = pd.concat(list(generate_panel(partitions=6, periods=104, seed=1)), ignore_index=True)
    validated, _ = validate(frame, cfg)
    results = train_batch(validated, cfg)
    assert all(r.bundle is not None for r in results)
    return {r.partition_id: pickle.dumps(r.bundle, protocol=pickle.HIGHEST_PROTOCOL) for r in results}


def _register(registry: ModelRegistry, bundles: dict[str, bytes], run_id: str, ids=None) -> dict[str, object]:
    ids = list(bundles) if ids is None else ids
    items = [({"partition_id": pid, "run_id": run_id, "model_name": "test"}, bundles[pid]) for pid in ids]
    return {rec.partition_id: rec for rec in registry.register_many(items)}


@pytest.fixture()
def registries(tmp_path: Path, bundles) -> tuple[ModelRegistry, ModelRegistry]:
    dev = ModelRegistry(tmp_path / "dev", "dev")
    prod = ModelRegistry(tmp_path / "prod", "prod")
    _register(dev, bundles, "r-dev")
    ids = sorted(bundles)
    _register(prod, bundles, "r1", ids[:4])  # the last two partitions have no production model
    return prod, dev


class GatedRegistry(ModelRegistry):
    """A real registry whose loads wait for a signal, so a test can hold a load in flight."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(root, name)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def load(self, record):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(10), "the test never released the load"
        return super().load(record)


def test_a_model_is_loaded_on_first_use_and_served_from_memory_after(registries):
    prod, dev = registries
    pid = sorted(prod.find(latest_only=True), key=lambda r: r.partition_id)[0].partition_id
    cache = ModelCache(prod, dev)
    first = cache.lookup(pid)
    second = cache.lookup(pid)
    assert not first.hit and second.hit
    assert second.model is first.model
    model = first.model
    assert isinstance(model, CachedModel)
    assert (model.partition_id, model.version, model.run_id, model.registry) == (pid, 1, "r1", "prod")
    assert not model.is_fallback and model.model == "test"
    assert model.bundle.predict(horizon=2)["prediction"].notna().all()
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["loads"], stats["entries"]) == (1, 1, 1, 1)
    assert stats["bytes_held"] == model.size > 0
    assert 0 < stats["load_seconds_max"] <= stats["load_seconds_total"]


def test_memory_size_counts_more_than_the_pickle_and_file_size_is_the_artifact(registries):
    prod, dev = registries
    pid = prod.find(latest_only=True)[0].partition_id
    by_memory = ModelCache(prod, dev).get(pid)
    by_file = ModelCache(prod, dev, size_by="file").get(pid)
    assert by_file.size == by_file.record.byte_length == len(prod.raw_bytes(by_file.record))  # its range of the pack
    assert by_memory.size > by_file.size
    walked = object_size(by_memory.bundle) * MEMORY_OVERHEAD
    assert abs(walked - by_memory.size) < 0.01 * by_memory.size


def test_concurrent_threads_asking_for_a_cold_model_share_one_load(tmp_path, bundles):
    prod = GatedRegistry(tmp_path / "prod", "prod")
    pid = next(iter(bundles))
    _register(prod, bundles, "r1", [pid])
    cache = ModelCache(prod, None, fallback="none")
    start = threading.Barrier(16)
    results: list = []

    def ask():
        start.wait()
        results.append(cache.lookup(pid))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    assert prod.entered.wait(10)
    time.sleep(0.5)  # every other thread is now waiting on the load in flight
    prod.release.set()
    for t in threads:
        t.join(10)
    assert prod.calls == 1
    assert len(results) == 16 and len({id(r.model) for r in results}) == 1
    stats = cache.stats()
    assert (stats["loads"], stats["misses"], stats["hits"]) == (1, 16, 0)


def test_concurrent_tasks_share_one_load_and_the_event_loop_keeps_running(tmp_path, bundles):
    prod = GatedRegistry(tmp_path / "prod", "prod")
    cold, warm = sorted(bundles)[:2]
    _register(prod, bundles, "r1", [cold, warm])
    cache = ModelCache(prod, None, fallback="none")
    prod.release.set()
    cache.get(warm)  # one model already cached
    prod.release.clear()
    prod.calls = 0
    prod.entered.clear()

    async def scenario():
        tasks = [asyncio.create_task(cache.alookup(cold)) for _ in range(16)]
        await asyncio.to_thread(prod.entered.wait, 10)
        ticks = 0
        for _ in range(5):  # the loop is free while the load is held: timers fire, hits answer
            await asyncio.sleep(0.02)
            ticks += 1
        hit = await cache.alookup(warm)
        prod.release.set()
        return ticks, hit, await asyncio.gather(*tasks)

    ticks, hit, results = asyncio.run(scenario())
    assert ticks == 5 and hit.hit
    assert prod.calls == 1
    assert len({id(r.model) for r in results}) == 1 and not any(r.hit for r in results)
    assert cache.stats()["loads"] == 2  # the warm one, then the cold one once
    cache.close()


def test_a_cancelled_waiter_does_not_cancel_the_load_for_the_others(tmp_path, bundles):
    prod = GatedRegistry(tmp_path / "prod", "prod")
    pid = next(iter(bundles))
    _register(prod, bundles, "r1", [pid])
    cache = ModelCache(prod, None, fallback="none")

    async def scenario():
        quitter = asyncio.create_task(cache.alookup(pid))
        stayer = asyncio.create_task(cache.alookup(pid))
        await asyncio.to_thread(prod.entered.wait, 10)
        quitter.cancel()
        prod.release.set()
        return await stayer, await asyncio.gather(quitter, return_exceptions=True)

    kept, (cancelled,) = asyncio.run(scenario())
    assert isinstance(cancelled, asyncio.CancelledError)
    assert kept.model.partition_id == pid and pid in cache
    cache.close()


def test_least_recently_used_models_are_evicted_under_the_byte_cap(registries):
    prod, dev = registries
    ids = sorted(r.partition_id for r in prod.find(latest_only=True))
    sizes = {pid: ModelCache(prod, dev).get(pid).size for pid in ids}
    cap = sizes[ids[0]] + sizes[ids[2]] + sizes[ids[1]] // 2  # three never fit, two always do
    cache = ModelCache(prod, dev, max_bytes=cap)
    cache.get(ids[0])
    cache.get(ids[1])
    cache.get(ids[0])  # now ids[1] is the least recently used
    cache.get(ids[2])
    assert ids[0] in cache and ids[2] in cache and ids[1] not in cache
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["bytes_held"] <= cap
    held = {pid: cache.get(pid).size for pid in (ids[0], ids[2])}
    assert stats["bytes_held"] == sum(held.values())
    for pid in ids:
        cache.get(pid)
        assert cache.stats()["bytes_held"] <= max(cap, sizes[pid])


def test_the_entry_count_is_capped_too(registries):
    prod, dev = registries
    ids = sorted(r.partition_id for r in prod.find(latest_only=True))
    cache = ModelCache(prod, dev, max_entries=2)
    for pid in ids:
        cache.get(pid)
    assert len(cache) == 2 and set(ids[-2:]) == {pid for pid in ids if pid in cache}
    assert cache.stats()["evictions"] == len(ids) - 2


def test_a_model_that_fails_to_load_is_not_cached_and_others_are_unaffected(registries):
    prod, dev = registries
    broken, fine = sorted(r.partition_id for r in prod.find(latest_only=True))[:2]
    record = prod.latest(broken)
    path = prod.artifact_path(record)
    good_bytes = path.read_bytes()
    damage_model(prod, record)  # its bytes in the pack: the models beside it stay loadable
    cache = ModelCache(prod, dev)
    for attempt in (1, 2):  # not cached: every request tries again
        with pytest.raises(ModelLoadError) as info:
            cache.get(broken)
        assert info.value.partition_id == broken and info.value.version == 1
        assert "ArtifactIntegrityError" in info.value.reason and broken in str(info.value)  # refused unread
        assert broken not in cache and cache.stats()["load_failures"] == attempt
    assert cache.get(fine).partition_id == fine
    path.write_bytes(good_bytes)  # repaired: the next request loads it
    assert cache.get(broken).version == 1
    assert cache.stats()["entries"] == 2


def test_a_non_model_artifact_is_a_load_error(registries, tmp_path):
    prod, dev = registries
    pid = sorted(r.partition_id for r in prod.find(latest_only=True))[0]
    # registered as it is (its digest recorded), so it gets past the integrity check to the type check
    prod.register_many([({"partition_id": pid, "run_id": "r-not-a-bundle"}, pickle.dumps({"just": "a dict"}))])
    with pytest.raises(ModelLoadError, match="not a forecast bundle"):
        ModelCache(prod, dev).get(pid)


def test_a_partition_without_production_model_falls_back_to_the_dev_baseline(registries):
    prod, dev = registries
    pid = sorted(r.partition_id for r in dev.find(latest_only=True))[-1]
    assert prod.latest(pid) is None
    model = ModelCache(prod, dev).get(pid)
    assert model.is_fallback and model.model == "baseline" and model.registry == "dev"
    with pytest.raises(ModelNotFoundError, match="no fallback"):
        ModelCache(prod, dev, fallback="none").get(pid)
    cache = ModelCache(prod, dev)
    with pytest.raises(ModelNotFoundError) as info:
        cache.get("p" + "0" * 20)
    assert info.value.partition_id == "p" + "0" * 20
    assert cache.stats()["not_found"] == 1 and len(cache) == 0


def test_a_newly_promoted_version_is_picked_up_after_the_check_interval(registries, bundles):
    prod, dev = registries
    ids = sorted(r.partition_id for r in prod.find(latest_only=True))
    now = [0.0]
    cache = ModelCache(prod, dev, check_interval_ms=500, clock=lambda: now[0])
    first = cache.get(ids[0])
    other = cache.get(ids[1])
    _register(prod, bundles, "r2", [ids[0]])  # version 2 of the first partition
    assert cache.get(ids[0]) is first  # within the interval: no index read at all
    checks = cache.stats()["index_checks"]
    now[0] += 0.6
    newer = cache.get(ids[0])
    assert (newer.version, newer.run_id) == (2, "r2")
    assert cache.get(ids[1]) is other  # same version: revalidated, not reloaded
    stats = cache.stats()
    assert stats["index_checks"] == checks + 1 and stats["index_changes"] == 1
    assert (stats["loads"], stats["reloads"], stats["revalidations"]) == (3, 1, 1)
    assert stats["entries"] == 2


def test_a_fallback_becomes_the_production_model_once_promoted(registries, bundles):
    prod, dev = registries
    pid = sorted(r.partition_id for r in dev.find(latest_only=True))[-1]
    cache = ModelCache(prod, dev, check_interval_ms=0)
    assert cache.get(pid).is_fallback
    prod.copy_from(dev, dev.latest(pid))
    promoted = cache.get(pid)
    assert not promoted.is_fallback and promoted.registry == "prod" and promoted.model == "test"


def test_invalid_settings_are_refused(registries):
    prod, dev = registries
    with pytest.raises(ValueError, match="fallback"):
        ModelCache(prod, dev, fallback="newest")
    with pytest.raises(ValueError, match="size_by"):
        ModelCache(prod, dev, size_by="guess")
    with pytest.raises(ValueError, match="max_bytes"):
        ModelCache(prod, dev, max_bytes=0)


class SlowIndexRegistry(ModelRegistry):
    """A real registry whose change counter can be held, as a remote index read might be slow."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(root, name)
        self.hold = threading.Event()
        self.hold.set()
        self.reading = threading.Event()

    def index_version(self) -> int:
        self.reading.set()
        assert self.hold.wait(10)
        return super().index_version()


def test_a_cached_model_is_served_while_an_index_check_is_slow(tmp_path, bundles):
    prod = SlowIndexRegistry(tmp_path / "prod", "prod")
    pid = next(iter(bundles))
    _register(prod, bundles, "r1", [pid])
    now = [0.0]
    cache = ModelCache(prod, None, fallback="none", check_interval_ms=100, clock=lambda: now[0])

    async def scenario():
        await cache.alookup(pid)  # the first check is awaited: nothing is known before it
        prod.hold.clear()
        prod.reading.clear()
        now[0] += 1.0  # a check is due, and it will hang
        started = time.perf_counter()
        hit = await cache.alookup(pid)
        answered = time.perf_counter() - started
        assert await asyncio.to_thread(prod.reading.wait, 10)  # the check did start, on its own thread
        prod.hold.set()
        return hit, answered

    hit, answered = asyncio.run(scenario())
    assert hit.hit and answered < 1.0
    cache.close()
    assert cache.stats()["index_checks"] == 2
