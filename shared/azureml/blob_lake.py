"""The lake on Azure Blob Storage / ADLS Gen2, through the Blob API (``azure-storage-blob``).

The first segment of a lake path is the container (``prepared/<dataset>/...`` lives in the
container ``prepared``), the rest is the blob name, so the layout is the one of
:class:`shared.lake.LocalLake`. The Blob API works on hierarchical-namespace (ADLS Gen2) accounts
too, and it is the API Azurite emulates, so the code tested locally is the code that runs in
Azure. On such accounts folders are listed as empty blobs marked ``hdi_isfolder``; they are
skipped, so listings match the local folder's.

Writes are one ``Put Blob`` (or ``Put Block List`` for large files): the service commits a blob
atomically, so a reader sees the old content or the new one, never a half-written file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient

from shared import layout
from shared.lake import LakeError, check_path
from shared.locking import LockHolder, WorkdirLockedError, check_fences

_log = logging.getLogger(__name__)

_CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
_TRANSFER_CONCURRENCY = 4


class BlobLake:
    """A :class:`shared.lake.Lake` over one storage account: containers are the first path segment.
    Any number of machines write it; they exclude each other with :class:`LakeLease`."""

    shared_writers = True

    def __init__(self, service: BlobServiceClient) -> None:
        self.service = service
        self._known_containers: set[str] = set()

    @classmethod
    def from_connection_string(cls, connection_string: str) -> "BlobLake":
        """For Azurite and development accounts (``UseDevelopmentStorage=true`` works too)."""
        return cls(BlobServiceClient.from_connection_string(connection_string))

    @classmethod
    def from_account_url(
        cls,
        account_url: str,
        credential: Any = None,
        managed_identity_client_id: str | None = None,
        use_managed_identity: bool = False,
    ) -> "BlobLake":
        """Identity-based access, as the Functions host does for ``LakeStorage__blobServiceUri``."""
        if credential is None:
            credential = _credential(managed_identity_client_id, use_managed_identity)
        return cls(BlobServiceClient(account_url=account_url, credential=credential))

    @property
    def uri(self) -> str:
        return self.service.url.rstrip("/")

    def writer_lease(self, holder: str, wait: float, duration: int) -> "LakeLease":
        """The cross-machine one-writer lease of this lake (:class:`LakeLease`), not yet acquired."""
        return LakeLease(self, holder, wait=wait, duration=duration)

    # -- the Lake protocol ---------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        container, name = self._split(path)
        try:
            return (
                self.service.get_blob_client(container, name)
                .download_blob(max_concurrency=_TRANSFER_CONCURRENCY)
                .readall()
            )
        except ResourceNotFoundError as exc:
            raise LakeError(f"no such file in the lake: {path}") from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        check_fences()  # a writer that lost the lake's lease writes nothing
        container, name = self._split(path)
        blob = self.service.get_blob_client(container, name)
        try:
            blob.upload_blob(data, overwrite=True, max_concurrency=_TRANSFER_CONCURRENCY)
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) != "ContainerNotFound":
                raise
            self._create_container(container)
            blob.upload_blob(data, overwrite=True, max_concurrency=_TRANSFER_CONCURRENCY)

    def exists(self, path: str) -> bool:
        container, name = self._split(path)
        try:
            props = self.service.get_blob_client(container, name).get_blob_properties()
        except ResourceNotFoundError:
            return False
        return not _is_folder(props.metadata)

    def list(self, prefix: str) -> list[str]:
        """Every file below a folder prefix (``runs/r1/results``), as full lake paths, sorted."""
        container, name = self._split(prefix, allow_container_only=True)
        starts_with = f"{name.rstrip('/')}/" if name else None
        client: ContainerClient = self.service.get_container_client(container)
        try:
            found = [
                f"{container}/{blob.name}"
                for blob in client.list_blobs(name_starts_with=starts_with, include=["metadata"])
                if not _is_folder(blob.metadata)
            ]
        except ResourceNotFoundError:
            return []
        return sorted(found)

    def delete(self, path: str) -> None:
        check_fences()
        container, name = self._split(path)
        try:
            self.service.get_blob_client(container, name).delete_blob()
        except ResourceNotFoundError:
            return

    def local_path(self, path: str) -> Path | None:
        """Blobs have no local path: callers read bytes (``read_parquet`` does)."""
        check_path(path)
        return None

    # -- extras used by the Functions app --------------------------------------------------------
    def size(self, path: str) -> int:
        container, name = self._split(path)
        try:
            return int(self.service.get_blob_client(container, name).get_blob_properties().size)
        except ResourceNotFoundError as exc:
            raise LakeError(f"no such file in the lake: {path}") from exc

    def etag(self, path: str) -> str:
        """The blob's version tag (the ETag Event Grid reports for it), without quotes."""
        container, name = self._split(path)
        try:
            return str(self.service.get_blob_client(container, name).get_blob_properties().etag).strip('"')
        except ResourceNotFoundError as exc:
            raise LakeError(f"no such file in the lake: {path}") from exc

    def copy_pending(self, path: str) -> bool:
        """Is a server-side copy into this blob still running? On a hierarchical-namespace account
        Event Grid reports ``BlobCreated`` (api ``CopyBlob``) when a copy starts, not when it ends."""
        container, name = self._split(path)
        try:
            copy = self.service.get_blob_client(container, name).get_blob_properties().copy
        except ResourceNotFoundError as exc:
            raise LakeError(f"no such file in the lake: {path}") from exc
        return getattr(copy, "status", None) == "pending"

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Part of a blob, so a trigger can check a file's header without downloading all of it."""
        container, name = self._split(path)
        try:
            return (
                self.service.get_blob_client(container, name)
                .download_blob(offset=offset, length=length)
                .readall()
            )
        except ResourceNotFoundError as exc:
            raise LakeError(f"no such file in the lake: {path}") from exc

    # -- helpers -------------------------------------------------------------------------------
    def _split(self, path: str, allow_container_only: bool = False) -> tuple[str, str]:
        parts = path.split("/", 1)
        if len(parts) == 1 and allow_container_only:
            container, name = parts[0], ""
            check_path(container)
        else:
            check_path(path)
            if len(parts) == 1:
                raise LakeError(f"invalid lake path {path!r}: a file needs a container and a name")
            container, name = parts
        if not _CONTAINER_NAME.match(container):
            raise LakeError(
                f"invalid lake path {path!r}: {container!r} is not a valid container name "
                f"(3-63 lowercase letters, digits and single hyphens)"
            )
        return container, name

    def _create_container(self, container: str) -> None:
        if container in self._known_containers:
            return
        try:
            self.service.create_container(container)
        except ResourceExistsError:
            pass  # created meanwhile by another writer: exactly what we wanted
        self._known_containers.add(container)


def _is_folder(metadata: dict[str, str] | None) -> bool:
    return bool(metadata) and str(metadata.get("hdi_isfolder", "")).lower() == "true"


def _credential(client_id: str | None, use_managed_identity: bool) -> Any:
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if use_managed_identity:
        return ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
    if client_id:
        return DefaultAzureCredential(managed_identity_client_id=client_id)
    return DefaultAzureCredential()


class LakeLeasedError(WorkdirLockedError):
    """Another writer holds the blob lake's lease (:class:`LakeLease`): retryable, since the lease ends
    when its holder finishes or, if the holder died, at most one lease period after its last renewal.
    ``holder`` says who holds it (or None when its description is unreadable)."""

    retryable = True


class LakeLease:
    """One writer per blob lake: the blob lake's counterpart of :class:`shared.locking.WorkdirLock`.

    A Blob lease on ``runs/.manymodels-writer`` (:data:`shared.layout.WRITER_LEASE`), ``duration``
    seconds long (60 by default; the service accepts 15 to 60) and renewed every third of it by a
    daemon thread while held; the holder is described in the blob's metadata (the same JSON as a
    workdir lock file: pid, command, host, start). A second writer polls every ``poll`` seconds for
    up to ``wait`` seconds (0: refuse at once), then gets :class:`LakeLeasedError` (a
    :class:`shared.locking.WorkdirLockedError`) naming the holder. A holder that dies stops
    renewing: its lease expires within ``duration`` seconds, so no stale lock outlives it by more.

    Renewal survives transient errors (it retries at the next tick, well within the period); if the
    lease is lost all the same (the process stalled past the period and another writer took it),
    :attr:`lost` is set and :meth:`check` raises, so a holder can verify it still holds the lease
    before a last write. :meth:`release` is best effort: a lease it cannot release expires.
    """

    PATH = layout.WRITER_LEASE

    def __init__(self, lake: BlobLake, command: str, wait: float = 0.0, duration: int = 60,
                 poll: float = 1.0) -> None:
        if not 15 <= int(duration) <= 60:
            raise LakeError(f"a blob lease lasts 15 to 60 seconds, not {duration}")
        self.lake = lake
        self.command = command
        self.wait = float(wait)
        self.duration = int(duration)
        self.poll = max(0.05, float(poll))
        self.lost = False
        self._lease: Any = None
        self._stop: threading.Event | None = None
        self._renewed_at = 0.0  # monotonic time of the last renewal the service confirmed
        self._renewing = threading.Lock()  # the renewal thread and a fence check never renew at once

    @property
    def held(self) -> bool:
        return self._lease is not None

    def _blob(self) -> Any:
        return self.lake.service.get_blob_client(*self.lake._split(self.PATH))

    def holder(self) -> LockHolder | None:
        """Who holds the lease now, as its blob's metadata says (None: nobody, or unreadable)."""
        try:
            props = self._blob().get_blob_properties()
        except ResourceNotFoundError:
            return None
        if str(getattr(props.lease, "state", "")).lower() != "leased":
            return None
        return LockHolder.parse((props.metadata or {}).get("holder", ""))

    def acquire(self) -> "LakeLease":
        if self._lease is not None:
            return self
        blob = self._blob()
        container = self.lake._split(self.PATH)[0]
        if not self.lake.exists(self.PATH):
            try:
                self.lake._create_container(container)
                blob.upload_blob(b"", overwrite=False)
            except (ResourceExistsError, HttpResponseError):
                pass  # created meanwhile (or leased already): the lease below decides
        deadline = time.monotonic() + self.wait
        while True:
            try:
                lease = blob.acquire_lease(lease_duration=self.duration)
                break
            except HttpResponseError as exc:
                if exc.status_code != 409:  # 409: LeaseAlreadyPresent (anything else is a real error)
                    raise
                if time.monotonic() >= deadline:
                    raise self._refusal(blob) from None
                time.sleep(min(self.poll, max(0.01, deadline - time.monotonic())))
        me = LockHolder(os.getpid(), self.command, socket.gethostname(),
                        datetime.now(timezone.utc).isoformat(timespec="seconds"))
        try:
            blob.set_blob_metadata({"holder": json.dumps(asdict(me))}, lease=lease)
        except BaseException:
            _quietly(lease.release)
            raise
        stop = threading.Event()
        self._lease, self._stop, self.lost = lease, stop, False
        self._renewed_at = time.monotonic()
        threading.Thread(target=self._renew, args=(lease, stop), name="lake-lease", daemon=True).start()
        return self

    def _renew(self, lease: Any, stop: threading.Event) -> None:
        interval = self.duration / 3
        while not stop.wait(interval):
            try:
                with self._renewing:
                    lease.renew()
                    self._renewed_at = time.monotonic()
                interval = self.duration / 3
            except HttpResponseError as exc:
                if exc.status_code in (409, 412):  # another lease id holds the blob: ours is gone
                    self.lost = True
                    _log.warning("lake lease of %r lost: %s", self.command, str(exc).splitlines()[0])
                    return
                interval = min(5.0, self.duration / 6)  # transient (throttled, 5xx): try again soon
            except AzureError:
                interval = min(5.0, self.duration / 6)  # network: the lease still runs; try again soon

    def fence(self) -> None:
        """Before each write of the holder (:func:`shared.locking.check_fences`): raise if the lease is
        not certainly ours. Renewed less than half a period ago, it is (the service keeps a lease a
        whole period after a renewal, and nobody else can take it meanwhile): no request. Older (the
        process stalled, the renewal thread starved): renew now, and a refusal means another writer
        has it, so this write and every later one raise instead of interleaving with its writes."""
        self.check()
        if self._lease is None or time.monotonic() - self._renewed_at < self.duration / 2:
            return
        with self._renewing:
            if time.monotonic() - self._renewed_at < self.duration / 2:
                return  # the renewal thread did it meanwhile
            try:
                self._lease.renew()
                self._renewed_at = time.monotonic()
            except HttpResponseError as exc:
                if exc.status_code in (409, 412):
                    self.lost = True
                    _log.warning("lake lease of %r lost (found before a write): %s", self.command,
                                 str(exc).splitlines()[0])
                else:
                    raise
        self.check()

    def check(self) -> None:
        """Raise :class:`LakeLeasedError` if the lease was lost while held (see the class docstring)."""
        if self.lost:
            raise LakeLeasedError(
                f"'{self.command}' lost the lease of the lake {self.lake.uri} (not renewed within "
                f"{self.duration} s); its writes may interleave with another writer's: retry it", None)

    def _refusal(self, blob: Any) -> LakeLeasedError:
        try:
            raw = (blob.get_blob_properties().metadata or {}).get("holder", "")
        except AzureError:
            raw = ""
        holder = LockHolder.parse(raw)
        who = holder.describe() if holder else "another writer (its description is unreadable)"
        waited = f" after waiting {self.wait:g} s" if self.wait > 0 else ""
        return LakeLeasedError(
            f"the lake {self.lake.uri} is being changed by {who}{waited}; '{self.command}' needs it "
            f"alone: retry when that writer finishes (its lease ends with it, or {self.duration} s after "
            "its last renewal if it died; read-only work and the server run alongside)", holder)

    def release(self) -> None:
        """Give the lease back (best effort: a lease that cannot be released expires by itself)."""
        if self._lease is None:
            return
        lease, self._lease = self._lease, None
        if self._stop is not None:
            self._stop.set()
        _quietly(lambda: self._blob().set_blob_metadata({}, lease=lease))  # no stale description
        _quietly(lease.release)

    def __enter__(self) -> "LakeLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _quietly(action: Any) -> None:
    try:
        action()
    except AzureError as exc:
        _log.warning("lake lease: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
