"""The model registry on Azure: our own index in the lake, one Azure ML model asset per run.

Why not one Azure ML asset per partition. Registering a model is a PUT on Azure Resource Manager
plus the SDK's own look-ups (2-3 requests per model with its path already in a datastore; 5-7
when the SDK uploads the file), and the model list has no tag filter: "the model of partition X"
would be a scan of tens of thousands of versions, paged and throttled. At 10,000 partitions a run
that is 20,000-70,000 management requests to register and as many to promote, against
subscription write limits of the order of 10-20 writes per second and Azure ML's own throttling:
tens of minutes to hours of 429s per run. So the unit Azure ML sees is the **run**: one model
version (``<asset name>:<run id>-<batch digest>``) whose folder holds that run's per-partition
artifacts and ``models.jsonl`` (every model's partition keys, run id, fingerprint, metrics and
tags). "Find the model for partition X" is answered by our index, exactly as locally.

The index and the artifacts live in a registry folder of the lake with the layout of the local
:class:`shared.registries.registry.ModelRegistry` (``index.sqlite``, ``artifacts/<pid>/v<n>.pkl``), so
a scoring job or the online endpoint reads it with the same code as on a laptop. This class keeps
a local working copy (a ``ModelRegistry`` in a cache folder), pulls the index when the folder's
``HEAD`` changes, downloads artifacts on demand, and pushes writes back: artifacts, then the
index, then ``HEAD`` last (the commit point), then the Azure ML asset of the batch.

Writers of one registry must be serialised (one registration per run, one promotion at a time);
a write that finds ``HEAD`` moved since it pulled raises :class:`RegistryConflictError` and can be
retried (every write is idempotent by (run id, partition)).
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from shared.azureml.client import AzureMLSettings, RetryPolicy, call_with_retry
from shared import layout
from shared.lake import LakeError, atomic_write_bytes
from shared.registries.registry import ModelRecord, ModelRegistry, RegistryError

DEV_PREFIX = layout.registry_dir("dev")
PROD_PREFIX = layout.registry_dir("prod")
INDEX_FILE = layout.REGISTRY_INDEX
HEAD_FILE = "HEAD"
MANIFEST_FILE = "models.jsonl"


class RegistryConflictError(RegistryError):
    """Another writer changed the registry between our pull and our push; retry the operation."""


@dataclass
class AssetBatch:
    """The models one write registered for one run: what becomes one Azure ML model version."""

    registry: str
    run_id: str
    version: str
    folder: str  # lake path of the staged folder (artifacts + models.jsonl)
    records: list[ModelRecord]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return (f"manymodels {self.registry}: {len(self.records)} per-partition models of run {self.run_id}; "
                f"their keys, metrics and tags are in {MANIFEST_FILE}")


class AssetPublisher(Protocol):
    def publish(self, batch: AssetBatch) -> str:
        """Make sure the batch exists as a model version; return its id (``name:version``)."""
        ...


class WorkspaceAssetPublisher:
    """Registers a batch as one model version in a workspace, by reference to its datastore folder.

    No upload: the files are already in the lake, so the asset is one PUT. Idempotent: an
    existing version is left as it is (asset versions are immutable).
    """

    def __init__(self, client: Any, aml: AzureMLSettings, asset_name: str | None = None,
                 datastore: str | None = None, retry: RetryPolicy | None = None) -> None:
        self.client = client
        self.aml = aml
        self.asset_name = asset_name or aml.asset_name
        self.datastore = datastore
        self.retry = retry

    def uri(self, batch: AssetBatch) -> str:
        return self.aml.lake_uri(batch.folder, folder=True, datastore=self.datastore)

    def publish(self, batch: AssetBatch) -> str:
        from azure.ai.ml.entities import Model
        from azure.core.exceptions import ResourceNotFoundError

        name = self.asset_name
        try:
            call_with_retry(lambda: self.client.models.get(name=name, version=batch.version),
                            f"get model {name}:{batch.version}", self.retry)
            return f"{name}:{batch.version}"
        except ResourceNotFoundError:
            pass
        model = Model(name=name, version=batch.version, path=self.uri(batch), type="custom_model",
                      description=batch.description, tags=dict(batch.tags),
                      properties={"manifest": MANIFEST_FILE, "models": str(len(batch.records))})
        call_with_retry(lambda: self.client.models.create_or_update(model),
                        f"register model {name}:{batch.version}", self.retry)
        return f"{name}:{batch.version}"


class AzureMLRegistry:
    """The interface of :class:`shared.registries.registry.ModelRegistry`, backed by a lake folder + Azure ML.

    ``publisher=None`` makes a read-only registry (the online endpoint, scoring). The production
    registry accepts only copies (:meth:`copy_many`, which promotion uses): training can never
    register into it directly.
    """

    def __init__(self, name: str, lake: Any, cache_dir: Path | str, publisher: AssetPublisher | None = None,
                 prefix: str | None = None, refresh_seconds: float = 30.0, workers: int = 16,
                 keep_artifacts: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.lake = lake
        self.prefix = prefix or (DEV_PREFIX if name == "dev" else PROD_PREFIX)
        self.publisher = publisher
        self.refresh_seconds = refresh_seconds
        self.workers = workers
        self.keep_artifacts = keep_artifacts
        self._clock = clock
        self._lock = threading.RLock()
        self._checked_at: float | None = None
        self.local = ModelRegistry(Path(cache_dir) / _safe(self.prefix), name, working_copy=True)
        self.published: list[str] = []  # asset ids made or confirmed by this object's writes

    def __repr__(self) -> str:
        return f"AzureMLRegistry({self.name!r}, {self.lake.uri}/{self.prefix})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("AzureMLRegistry holds clients; give worker processes the registry folder instead")

    @property
    def root(self) -> Path:
        """The local working copy (index + the artifacts fetched so far)."""
        return self.local.root

    @property
    def index_path(self) -> Path:
        """The working copy's index: the lake's as of the last pull (:meth:`refresh`)."""
        return self.local.index_path

    # -- synchronisation -----------------------------------------------------------------------
    def _remote(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _remote_head(self) -> str | None:
        try:
            return self.lake.read_bytes(self._remote(HEAD_FILE)).decode("utf-8")
        except LakeError:
            return None

    @property
    def _local_head_file(self) -> Path:
        return self.local.root / HEAD_FILE

    def _local_head(self) -> str | None:
        try:
            return self._local_head_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def refresh(self, force: bool = False) -> bool:
        """Pull the index if the lake's HEAD moved; at most one HEAD read per ``refresh_seconds``.

        Returns True when a new index was pulled. This is the cheap check a model cache relies on
        to notice a newly promoted version.
        """
        with self._lock:
            now = self._clock()
            if not force and self._checked_at is not None and now - self._checked_at < self.refresh_seconds:
                return False
            remote = self._remote_head()
            self._checked_at = now
            if remote is None or remote == self._local_head():
                return False
            data = self.lake.read_bytes(self._remote(INDEX_FILE))
            self._replace_index(data, remote)
            return True

    def _replace_index(self, data: bytes, head: str) -> None:
        root = self.local.root
        self.local.close()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-index-", dir=root)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        for suffix in ("-wal", "-shm"):
            (root / f"{INDEX_FILE}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, root / INDEX_FILE)
        _atomic_text(self._local_head_file, head)

    def _snapshot_index(self, renamed: Mapping[tuple[str, int], str] | None = None) -> bytes:
        """A consistent single-file copy of the index (WAL content included), via SQLite's backup
        API, with the artifact paths of ``renamed`` (partition, version) rewritten."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-snap-", dir=self.local.root)
        os.close(fd)
        source = sqlite3.connect(self.local.root / INDEX_FILE)
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
            if renamed:
                target.executemany("UPDATE models SET artifact = ? WHERE partition_id = ? AND version = ?",
                                   [(path, pid, version) for (pid, version), path in renamed.items()])
                target.commit()
        finally:
            target.close()
            source.close()
        try:
            return Path(tmp).read_bytes()
        finally:
            Path(tmp).unlink(missing_ok=True)

    def ensure_local(self, records: Iterable[ModelRecord]) -> None:
        """Download the artifacts of ``records`` that the working copy does not have yet."""
        # a pack holds many records' models: fetched once for all of them
        owners: dict[str, list[str]] = {}
        for r in records:
            if not (self.local.root / r.artifact).is_file():
                owners.setdefault(r.artifact, []).append(f"{r.partition_id} v{r.version}")
        missing = sorted(owners)
        if not missing:
            return

        def fetch(artifact: str) -> None:
            try:
                data = self.lake.read_bytes(self._remote(artifact))
            except LakeError as exc:
                raise RegistryError(f"artifact {artifact} of model(s) {', '.join(owners[artifact][:5])} of the "
                                    f"{self.name} registry cannot be read from the lake: {exc}") from exc
            atomic_write_bytes(self.local.root / artifact, data)

        self._parallel(fetch, missing)

    def materialize(self, latest_only: bool = True) -> Path:
        """Download the artifacts a local process will read (every partition's newest by default)
        and return the working copy's root: a plain registry folder for the local entry scripts."""
        self.refresh(force=True)
        with self._lock:
            records = self.local.find(latest_only=latest_only)
        self.ensure_local(records)
        return self.local.root

    def _parallel(self, task: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """``task`` over ``items`` on the registry's threads; its results in the items' order."""
        if len(items) == 1 or self.workers <= 1:
            return [task(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            return list(pool.map(task, items))  # re-raises the first failure

    # -- reading (the ModelRegistry interface) ----------------------------------------------------
    def latest(self, partition_id: str) -> ModelRecord | None:
        self.refresh()
        with self._lock:
            return self.local.latest(partition_id)

    def latest_many(self, partition_ids: Iterable[str]) -> dict[str, ModelRecord]:
        self.refresh()
        with self._lock:
            return self.local.latest_many(partition_ids)

    def get(self, partition_id: str, version: int) -> ModelRecord | None:
        self.refresh()
        with self._lock:
            return self.local.get(partition_id, version)

    def by_run(self, run_id: str, partition_id: str) -> ModelRecord | None:
        self.refresh()
        with self._lock:
            return self.local.by_run(run_id, partition_id)

    def find(self, tags: Mapping[str, str] | None = None, limit: int | None = None,
             run_id: str | None = None, latest_only: bool = False,
             include_global: bool = False) -> list[ModelRecord]:
        self.refresh()
        with self._lock:
            return self.local.find(tags, limit=limit, run_id=run_id, latest_only=latest_only,
                                   include_global=include_global)

    def count(self) -> int:
        self.refresh()
        with self._lock:
            return self.local.count()

    def index_version(self) -> int:
        self.refresh()
        with self._lock:
            return self.local.index_version()

    @property
    def packages(self) -> tuple[str, ...]:
        """The project's extra estimator packages (see :attr:`ModelRegistry.packages`)."""
        return self.local.packages

    @packages.setter
    def packages(self, value: tuple[str, ...]) -> None:
        self.local.packages = tuple(value)

    def load(self, record: ModelRecord, packages: Iterable[str] | None = None) -> Any:
        """Read a record's artifact with the one loader: a model in a pack this process has not
        downloaded is read as its byte range from the lake (one ranged read, not the whole pack:
        the online endpoint's first request for a partition fetches that model alone); a whole
        file is downloaded first, as before. Either way its bytes are checked against the index's
        digest before anything is unpickled."""
        with self._lock:
            stored = self.local.get(record.partition_id, record.version)
        if stored is not None and stored.packed and not (self.local.root / stored.artifact).is_file():
            try:
                data = self.lake.read_range(self._remote(stored.artifact), stored.byte_offset, stored.byte_length)
            except LakeError as exc:
                raise RegistryError(f"artifact {stored.artifact} of model {stored.partition_id} v{stored.version} "
                                    f"of the {self.name} registry cannot be read from the lake: {exc}") from exc
            return self.local.load_bytes(stored, data, packages)
        self.ensure_local([record])
        return self.local.load(record, packages)

    def artifact_path(self, record: ModelRecord) -> Path:
        self.ensure_local([record])
        return self.local.artifact_path(record)

    def verify(self, record: ModelRecord) -> None:
        """Raise if :meth:`load` would refuse the record's artifact (downloaded first)."""
        self.ensure_local([record])
        self.local.verify(record)

    # every record is pushed with its digest: there is nothing to seal
    sealable = False

    def seal(self) -> int:
        raise RegistryError(f"{self!r} records every model's SHA-256 when it is pushed: nothing to seal")

    def folder(self) -> Path:
        """A plain registry folder for local entry scripts: the working copy, materialised."""
        return self.materialize()

    def close(self) -> None:
        self.local.close()

    # -- writing ------------------------------------------------------------------------------
    def register_many(self, items: Iterable[tuple[ModelRecord | Mapping[str, Any], Path | str | bytes]]
                      ) -> list[ModelRecord]:
        """Register trained models (dev only); one Azure ML model version per run in the batch."""
        if self.name == "prod":
            raise RegistryError("the production registry is written only by promotion (copy_many); "
                                "training never registers into it")
        items = list(items)
        keys = [_key_of(record) for record, _ in items]
        return self._write(keys, lambda: self.local.register_many(items))

    def copy_from(self, source: Any, record: ModelRecord) -> ModelRecord:
        return self.copy_many(source, [record])[0]

    def copy_many(self, source: Any, records: Iterable[ModelRecord]) -> list[ModelRecord]:
        """Copy models from another registry (an AzureMLRegistry or a local ModelRegistry)."""
        records = list(records)
        if isinstance(source, AzureMLRegistry):
            source.ensure_local(records)
            source_local = source.local
        else:
            source_local = source
        keys = [(r.run_id, r.partition_id) for r in records]
        return self._write(keys, lambda: self.local.copy_many(source_local, records))

    def _write(self, keys: list[tuple[str, str]],
               apply: Callable[[], list[ModelRecord]]) -> list[ModelRecord]:
        if self.publisher is None:
            raise RegistryError(f"{self!r} is read-only (no Azure ML publisher)")
        if not keys:
            return []
        with self._lock:
            self.refresh(force=True)
            base_head = self._remote_head()
            existed = {k for k in keys if self.local.by_run(*k) is not None}
            before = self.local.index_version()
            try:
                out = apply()
                if self.local.index_version() != before:
                    fresh = [r for r in out if (r.run_id, r.partition_id) not in existed]
                    self._push(fresh, base_head)
                    # the pushed index names artifacts by content: hand back the records as stored
                    out = [self.local.get(r.partition_id, r.version) or r for r in out]
            except BaseException:
                self._discard_local()  # never let the working copy run ahead of the lake
                raise
            for run_id, batch in _by_run(out).items():
                self._publish(run_id, batch)
            if not self.keep_artifacts:
                for artifact in {record.artifact for record in out}:
                    (self.local.root / artifact).unlink(missing_ok=True)
            return out

    def _push(self, fresh: list[ModelRecord], base_head: str | None) -> None:
        """Artifacts, then the index, then HEAD: readers see all of a write or none of it.

        In the lake an artifact file (a pack of many models, or a whole-file model of an earlier
        release) is named by its content (``<name>-<sha256[:12]>.<ext>``), so two writers that
        numbered the same version never overwrite each other's file; the index we upload points at
        those names, and the working copy adopts it. A write uploads one file per pack, not per
        model. A HEAD that moved since our pull (checked before and after the uploads) aborts the
        write before the index is replaced.
        """
        self._check_head(base_head)

        def upload(artifact: str) -> tuple[str, str]:
            """Read a file once: named by its digest, then uploaded under that name."""
            data = (self.local.root / artifact).read_bytes()
            stem, dot, ext = artifact.rpartition(".")
            digest = hashlib.sha256(data).hexdigest()[:12]
            target = f"{stem}-{digest}.{ext}" if dot else f"{artifact}-{digest}"
            self.lake.write_bytes(self._remote(target), data)
            return artifact, target

        # working-copy artifact -> its content-named path in the lake
        files = dict(self._parallel(upload, sorted({record.artifact for record in fresh})))
        renamed = {(r.partition_id, r.version): files[r.artifact] for r in fresh}
        self._check_head(base_head)
        snapshot = self._snapshot_index(renamed)
        self.lake.write_bytes(self._remote(INDEX_FILE), snapshot)
        head = json.dumps({"changes": self.local.index_version(), "writer": uuid.uuid4().hex,
                           "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self.lake.write_bytes(self._remote(HEAD_FILE), head.encode("utf-8"))
        for artifact, target in files.items():  # the working copy takes the lake's names, then its index
            os.replace(self.local.root / artifact, self.local.root / target)
        self._replace_index(snapshot, head)

    def _check_head(self, base_head: str | None) -> None:
        if self._remote_head() != base_head:
            raise RegistryConflictError(f"{self!r} was changed by another writer; retry the operation")

    def _discard_local(self) -> None:
        """Forget the working copy's index; the next read or write pulls the lake's again."""
        root = self.local.root
        self.local.close()
        for name in (INDEX_FILE, f"{INDEX_FILE}-wal", f"{INDEX_FILE}-shm", HEAD_FILE):
            (root / name).unlink(missing_ok=True)
        self._checked_at = None

    def _publish(self, run_id: str, records: list[ModelRecord]) -> None:
        """Stage the run's batch folder (unless already staged) and make its model version."""
        records = sorted(records, key=lambda r: r.partition_id)
        listing = "\n".join(f"{r.partition_id}:{r.version}" for r in records)
        digest = hashlib.sha256(listing.encode()).hexdigest()
        version = f"{run_id}-{digest[:8]}"
        folder = self._remote(f"assets/{version}")
        tags = _asset_tags(self.name, run_id, records, self.local.index_version())
        batch = AssetBatch(self.name, run_id, version, folder, records, tags)
        if not self.lake.exists(f"{folder}/{MANIFEST_FILE}"):
            self.ensure_local(records)
            # the asset holds the run's packs (a pack file, or a whole-file model of an earlier
            # release, each once) and the manifest says which byte range of which file is whose
            files = {a: a.rsplit("/", 1)[-1] for a in sorted({r.artifact for r in records})}

            def stage(artifact: str) -> None:
                self.lake.write_bytes(f"{folder}/{files[artifact]}", (self.local.root / artifact).read_bytes())

            self._parallel(stage, sorted(files))
            manifest = "".join(json.dumps({**r.to_row(), "asset_file": files[r.artifact]},
                                          default=float) + "\n" for r in records)
            self.lake.write_bytes(f"{folder}/{MANIFEST_FILE}", manifest.encode("utf-8"))
        self.published.append(self.publisher.publish(batch))


# -- helpers -----------------------------------------------------------------------------------------
def _key_of(record: ModelRecord | Mapping[str, Any]) -> tuple[str, str]:
    raw = record.to_row() if isinstance(record, ModelRecord) else record
    if not raw.get("run_id") or not raw.get("partition_id"):
        raise RegistryError(f"a model record needs 'run_id' and 'partition_id'; got keys {sorted(raw)}")
    return str(raw["run_id"]), str(raw["partition_id"])


def _by_run(records: list[ModelRecord]) -> dict[str, list[ModelRecord]]:
    out: dict[str, list[ModelRecord]] = {}
    for record in records:
        out.setdefault(record.run_id, []).append(record)
    return out


def _asset_tags(registry: str, run_id: str, records: list[ModelRecord], index_version: int) -> dict[str, str]:
    """Run-level tags: what a person browsing Azure ML needs; per-model detail is in models.jsonl."""
    tags = {"manymodels_registry": registry, "run_id": run_id, "models": str(len(records)),
            "index_version": str(index_version)}
    keys = next((r.tags.get("partition_keys") for r in records if r.tags.get("partition_keys")), None)
    if keys:
        tags["partition_keys"] = keys
    fingerprint = hashlib.sha256("\n".join(f"{r.partition_id}:{r.fingerprint}" for r in records).encode())
    tags["fingerprint"] = fingerprint.hexdigest()[:16]
    for label, values in (("model_types", [r.model_type for r in records]),
                          ("statuses", [r.status for r in records])):
        counts: dict[str, int] = {}
        for value in values:
            counts[value] = counts.get(value, 0) + 1
        tags[label] = ",".join(f"{k}:{counts[k]}" for k in sorted(counts))
    for metric in ("accuracy", "wape"):
        values = [float(r.metrics[metric]) for r in records
                  if isinstance(r.metrics.get(metric), (int, float))
                  and r.metrics[metric] == r.metrics[metric]]  # not NaN
        if values:
            tags[f"{metric}_median"] = f"{statistics.median(values):.4f}"
    sources = {r.tags.get("source_registry") for r in records if r.tags.get("source_registry")}
    if sources:
        tags["source_registry"] = ",".join(sorted(sources))
    return tags


def _safe(prefix: str) -> str:
    return prefix.replace("/", "-")




def _atomic_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))
