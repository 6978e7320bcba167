"""The backends of a workspace, chosen in one place from the deployment settings.

Three interfaces, each with a local implementation (the default) and an Azure one:

============  ===================================  ==============================================
interface     local                                Azure (settings)
============  ===================================  ==============================================
``Lake``      :class:`shared.lake.LocalLake`        :class:`shared.azureml.blob_lake.BlobLake`
              (``<workdir>/lake``)                  (``MM_LAKE_BACKEND=blob``)
``Registry``  :class:`shared.registries.registry.ModelRegistry`  :class:`shared.azureml.registry.AzureMLRegistry`
              (``<workdir>/registry/{dev,prod}``)   (``MM_REGISTRY_BACKEND=azureml``)
``Compute``   :class:`LocalCompute` (process pool,  :class:`AzureMLCompute` (one parallel job per
              runs a group inside ``submit``)       group, polled; ``MM_COMPUTE_BACKEND=azureml``)
============  ===================================  ==============================================

Each backend is found by name in one table, :data:`BACKENDS` (interface, name) -> factory; an
unknown name is refused naming the known ones. This module is the only one outside
``shared/azureml/`` that imports the Azure backends, and only inside the factory that opens one: a
local workspace never imports ``azure.ai.ml`` nor ``azure.storage.blob``.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Protocol

from shared import layout
from shared.runs.compute import BackendError, JobHandle, check_kind
from shared.lake import Lake, LakeError, LocalLake
from shared.runs.local_compute import LocalCompute
from shared.locking import fenced

if TYPE_CHECKING:  # pragma: no cover
    from shared.registries.registry import ModelRecord
    from shared.runs.workspace import Workspace

LOCAL = "local"
AZUREML = "azureml"
BLOB = "blob"


class Registry(Protocol):
    """A model registry (dev or prod): our own index, O(1) "the model of this partition". Every
    method a caller uses is here (no ``hasattr`` or ``TypeError`` probing)."""

    name: str

    def register_many(self, items: Iterable[tuple[Any, Any]]) -> list["ModelRecord"]: ...
    def copy_many(self, source: Any, records: Iterable["ModelRecord"]) -> list["ModelRecord"]: ...
    def latest(self, partition_id: str) -> "ModelRecord | None": ...
    def latest_many(self, partition_ids: Iterable[str]) -> dict[str, "ModelRecord"]: ...
    def get(self, partition_id: str, version: int) -> "ModelRecord | None": ...
    def by_run(self, run_id: str, partition_id: str) -> "ModelRecord | None": ...
    def find(self, tags: Mapping[str, str] | None = None, limit: int | None = None,
             run_id: str | None = None, latest_only: bool = False,
             include_global: bool = False) -> list["ModelRecord"]: ...
    def count(self) -> int: ...
    packages: tuple[str, ...]  # extra estimator packages its models may be built from

    def load(self, record: "ModelRecord", packages: Iterable[str] | None = None) -> Any: ...
    def verify(self, record: "ModelRecord") -> None: ...
    def seal(self) -> int: ...
    def index_version(self) -> int: ...
    def refresh(self, force: bool = False) -> bool: ...
    def folder(self) -> Path: ...
    @property
    def index_path(self) -> Path: ...
    def close(self) -> None: ...


class Compute(Protocol):
    """Where a group of mini-batch files is trained or scored, and a source ingested
    (:mod:`shared.runs.local_compute`, :mod:`shared.azureml.jobs`)."""

    name: str

    def submit(self, ws: "Workspace", kind: str, run_id: str, group_index: int,
               batch_paths: list[str]) -> JobHandle: ...
    def pin_scoring(self, ws: "Workspace", score_id: str, groups: list[list[str]], cfg: Any) -> None: ...
    def status(self, ws: "Workspace", job_id: str, run_id: str | None = None) -> JobHandle: ...
    def ingest(self, ws: "Workspace", source: str, key: str | None = None) -> JobHandle: ...
    def ingest_status(self, ws: "Workspace", job_id: str) -> JobHandle: ...


class AzureMLCompute:
    """One Azure ML parallel job per group (:mod:`shared.azureml.jobs`), polled by the monitor; one
    command job per ingestion (:mod:`shared.azureml.ingest_job`)."""

    name = AZUREML

    def submit(self, ws: "Workspace", kind: str, run_id: str, group_index: int,
               batch_paths: list[str]) -> JobHandle:
        check_kind(kind)
        from shared.azureml.jobs import submit_parallel_job

        return submit_parallel_job(ws, kind, run_id, group_index, batch_paths)

    def pin_scoring(self, ws: "Workspace", score_id: str, groups: list[list[str]], cfg: Any) -> None:
        """Every group's registry slices, written when the scoring run is planned (one snapshot)."""
        from shared.azureml.jobs import pin_scoring

        pin_scoring(ws, score_id, groups, cfg)

    def status(self, ws: "Workspace", job_id: str, run_id: str | None = None) -> JobHandle:
        from shared.azureml.jobs import parallel_job_status

        return parallel_job_status(ws, job_id)

    def ingest(self, ws: "Workspace", source: str, key: str | None = None) -> JobHandle:
        from shared.azureml.ingest_job import submit_ingest_job

        return submit_ingest_job(ws, source, key)

    def ingest_status(self, ws: "Workspace", job_id: str) -> JobHandle:
        from shared.azureml.ingest_job import ingest_job_status

        return ingest_job_status(ws, job_id)


class LocalRegistries:
    """The dev and prod registries as folders under the workdir (``registry/{dev,prod}``)."""

    def open(self, ws: "Workspace") -> tuple[Registry, Registry]:
        from shared.registries.registry import ModelRegistry

        return (ModelRegistry(ws.root / layout.registry_dir("dev"), "dev"),
                ModelRegistry(ws.root / layout.registry_dir("prod"), "prod"))

    def exists(self, ws: "Workspace", name: str) -> bool:
        """Whether registry ``name`` was ever written, asked without creating it."""
        return (ws.root / layout.registry_index(name)).is_file()


class AzureMLRegistries:
    """The registries in the lake, published to Azure ML (:mod:`shared.azureml.registry`)."""

    def open(self, ws: "Workspace") -> tuple[Registry, Registry]:
        return open_azureml_registries(ws)

    def exists(self, ws: "Workspace", name: str) -> bool:
        return True  # it answers on first use


def _setting(settings: Any, name: str) -> str:
    return getattr(settings, name, LOCAL) if settings is not None else LOCAL


def lake_backend(settings: Any) -> str:
    return _setting(settings, "lake_backend")


def registry_backend(settings: Any) -> str:
    return _setting(settings, "registry_backend")


def compute_backend(settings: Any) -> str:
    return _setting(settings, "compute_backend")


# -- the table -----------------------------------------------------------------------------------------
def _local_lake(settings: Any, root: Path | str | None) -> Lake:
    return LocalLake(Path(root if root is not None else settings.workdir) / "lake")


def _blob_lake(settings: Any, root: Path | str | None) -> Lake:
    """The blob account: the ``LakeStorage`` connection string, or its ``__blobServiceUri`` with an identity."""
    from shared.azureml.blob_lake import BlobLake

    if settings.lake_connection_string:
        return BlobLake.from_connection_string(settings.lake_connection_string)
    if settings.lake_blob_service_uri:
        return BlobLake.from_account_url(
            settings.lake_blob_service_uri,
            managed_identity_client_id=settings.lake_client_id,
            use_managed_identity=(settings.lake_credential or "").lower() == "managedidentity",
        )
    raise LakeError("the blob lake needs LakeStorage or LakeStorage__blobServiceUri")


BACKENDS: dict[tuple[str, str], Callable[..., Any]] = {
    ("lake", LOCAL): _local_lake,
    ("lake", BLOB): _blob_lake,
    ("registry", LOCAL): LocalRegistries,
    ("registry", AZUREML): AzureMLRegistries,
    ("compute", LOCAL): LocalCompute,
    ("compute", AZUREML): AzureMLCompute,
}


def backend(interface: str, name: str) -> Callable[..., Any]:
    """The factory of backend ``name`` for ``interface`` (lake, registry, compute)."""
    try:
        return BACKENDS[(interface, name)]
    except KeyError:
        known = sorted(n for i, n in BACKENDS if i == interface)
        raise BackendError(f"unknown {interface} backend {name!r}; one of {known}") from None


def open_lake(settings: Any, root: Path | str | None = None) -> Lake:
    """The lake the settings describe: ``<root>/lake`` when local (root: the workdir), else the blob account."""
    return backend("lake", lake_backend(settings))(settings, root)


def open_prod_lake(aml: Any, lake: Lake, credential: Any = None) -> Lake:
    """The storage of the Azure ML production registry: its own account when configured, else the lake."""
    if not aml.prod_storage_url:
        return lake
    from shared.azureml.blob_lake import BlobLake

    return BlobLake.from_account_url(aml.prod_storage_url, credential=credential,
                                     managed_identity_client_id=aml.client_id)


# -- one writer ----------------------------------------------------------------------------------
WRITER_WAIT_SECONDS = 120.0  # how long a writer waits for another before its retryable refusal
WRITER_LEASE_SECONDS = 60  # a blob lease's period: a dead holder's lease ends this long after its last renewal


@contextmanager
def writer_lease(ws: "Workspace", holder: str, wait: float | None = None,
                 duration: int | None = None) -> Iterator[Any]:
    """Hold the workspace's one-writer lock while the body changes shared state (issue 12).

    One API for every lake: on a lake several machines write (``shared_writers``), the lake's own
    cross-machine lease (``writer_lease``; a shared lake without one is refused). On a blob lake
    that is :class:`shared.azureml.blob_lake.LakeLease` (a Blob lease on ``runs/.manymodels-writer``,
    ``duration`` seconds, renewed while held: every Functions instance and every process sharing
    the lake sees it). On a local lake it is the workdir's
    :class:`shared.locking.WorkdirLock` — or nothing more when this thread holds that lock already
    (the CLI holds it for its whole command, and a second ``flock`` in one process would wait for
    the first). ``holder`` names who writes ("plan_training_run of orchestration ingest-ab12..."), as
    the refusal shows it to a contending writer, which waits up to ``wait`` seconds (default
    :data:`WRITER_WAIT_SECONDS`) and then gets a :class:`shared.locking.WorkdirLockedError` (on a
    blob lake its retryable subclass ``LakeLeasedError``) naming the holder; the same error leaves
    the body if the lease was lost while it ran (see ``LakeLease.check``), so an idempotent stage is
    retried under a fresh lease. Yields the lock held (None when the caller's own lock covers it).
    """
    wait = WRITER_WAIT_SECONDS if wait is None else float(wait)
    if ws.lake.shared_writers:
        lease = ws.lake.writer_lease(holder, wait, WRITER_LEASE_SECONDS if duration is None else duration)
        if lease is None:
            raise BackendError(
                f"the lake {ws.lake.uri} is shared by several machines but has no cross-machine writer "
                "lease: its writers could interleave. Give its Lake class writer_lease() (as BlobLake's "
                "Blob lease), or use it from one machine only as a local lake")
        with lease:
            with fenced(lease.fence):  # each lake or SQL write first checks the lease is still ours
                yield lease
            lease.check()  # lost mid-way (a stall past the period): fail, so the stage is retried
        return
    from shared.locking import WorkdirLock, held_here

    if held_here(ws.root):
        yield None
        return
    with WorkdirLock(ws.root, holder, wait=wait) as lock:
        yield lock


# -- the registries ----------------------------------------------------------------------------------
def open_registries(ws: "Workspace") -> tuple[Registry, Registry]:
    """The dev and prod registries of a workspace: folders under the workdir, or Azure ML's; their
    models may be built from the project's estimator packages (``training.estimator_packages``)."""
    registries = backend("registry", registry_backend(ws.settings))().open(ws)
    for registry in registries:
        registry.packages = tuple(ws.config.training.estimator_packages)
    return registries


def open_azureml_registries(ws: "Workspace", backend: Any = None, keep_artifacts: bool = False
                            ) -> tuple[Registry, Registry]:
    """The Azure ML dev and prod registries (``backend``: an
    :class:`shared.azureml.client.AzureMLBackend`, else the workspace's own, made from its settings)."""
    from shared.azureml.client import AzureMLBackend
    from shared.azureml.promotion import production_publisher
    from shared.azureml.registry import AzureMLRegistry, WorkspaceAssetPublisher

    backend = backend or AzureMLBackend.for_workspace(ws)
    aml = backend.aml
    cache = ws.local_dir(".cache", "azureml-registry")
    dev = AzureMLRegistry(
        "dev", ws.lake, cache, keep_artifacts=keep_artifacts,
        publisher=WorkspaceAssetPublisher(backend.client("dev"), aml, retry=backend.retry))
    prod_lake = open_prod_lake(aml, ws.lake, credential=backend.credential)
    prod = AzureMLRegistry("prod", prod_lake, cache, publisher=production_publisher(backend),
                           keep_artifacts=keep_artifacts)
    return dev, prod


def registry_exists(ws: "Workspace", name: str) -> bool:
    """Whether registry ``name`` was ever written, asked without creating it (an Azure ML registry
    is assumed to exist: it answers on first use)."""
    return backend("registry", registry_backend(ws.settings))().exists(ws, name)


# -- compute -------------------------------------------------------------------------------------------
def open_compute(settings: Any) -> Compute:
    return backend("compute", compute_backend(settings))()


def submit_ingest(ws: "Workspace", source: str, key: str | None = None) -> JobHandle:
    """Ingest a lake source where the compute backend runs work; a handle, never data.

    Local: the pipeline's own streaming ingestion runs here, inside the call (as a local group runs
    inside ``submit``), and the handle comes back completed with the small result. Azure ML: a
    command job (:mod:`shared.azureml.ingest_job`) runs the same code on the cluster; the handle
    is queued and :func:`ingest_status` polls it. ``key`` (the orchestration instance) names the
    job, so a redelivered submit finds the job it already made.
    """
    return ws.compute.ingest(ws, source, key)


def ingest_status(ws: "Workspace", job_id: str) -> JobHandle:
    """The state of an ingestion job (Azure ML); a local ingestion finished inside its submit."""
    return ws.compute.ingest_status(ws, job_id)
