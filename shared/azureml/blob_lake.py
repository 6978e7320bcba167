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

import re
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient

from shared import layout
from shared.lake import LakeError, check_path

_CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
_TRANSFER_CONCURRENCY = 4


class BlobLake:
    """A :class:`shared.lake.Lake` over one storage account: containers are the first path segment."""

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


class LakeLease:
    """One writer per blob lake: the blob lake's counterpart of :class:`shared.locking.WorkdirLock`.

    A 60 s Blob lease on ``runs/.manymodels-writer``, renewed every 20 s by a daemon thread while
    held; the holder is described in the blob's metadata (the same JSON as a workdir lock file). A
    second writer is refused at once (or after ``wait`` seconds) with
    :class:`shared.locking.WorkdirLockedError` naming the holder. A holder that dies stops renewing:
    its lease expires within 60 s, so no stale lock outlives it by more than that.
    """

    PATH = layout.WRITER_LEASE

    def __init__(self, lake: BlobLake, command: str, wait: float = 0.0, duration: int = 60) -> None:
        self.lake = lake
        self.command = command
        self.wait = float(wait)
        self.duration = int(duration)
        self._lease: Any = None
        self._stop: Any = None

    def acquire(self) -> "LakeLease":
        import json
        import os
        import socket
        import threading
        import time
        from dataclasses import asdict
        from datetime import datetime, timezone

        from azure.core.exceptions import HttpResponseError

        from shared.locking import POLL_SECONDS, LockHolder, WorkdirLockedError

        container, name = self.lake._split(self.PATH)
        blob = self.lake.service.get_blob_client(container, name)
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
                if exc.status_code != 409:
                    raise
                if time.monotonic() >= deadline:
                    raw = (blob.get_blob_properties().metadata or {}).get("holder", "")
                    holder = LockHolder.parse(raw)
                    who = holder.describe() if holder else "another command"
                    waited = f" after waiting {self.wait:g} s" if self.wait > 0 else ""
                    raise WorkdirLockedError(
                        f"the lake {self.lake.uri} is being changed by {who}{waited}; '{self.command}' needs "
                        "it alone: wait for that command to finish (read-only commands and the server may "
                        "run alongside)", holder) from None
                time.sleep(max(POLL_SECONDS, 0.5))
        me = LockHolder(os.getpid(), self.command, socket.gethostname(),
                        datetime.now(timezone.utc).isoformat(timespec="seconds"))
        blob.set_blob_metadata({"holder": json.dumps(asdict(me))}, lease=lease)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.duration / 3):
                try:
                    lease.renew()
                except HttpResponseError:  # lost (expired while this process was stalled): stop renewing
                    return

        threading.Thread(target=renew, name="lake-lease", daemon=True).start()
        self._lease, self._stop = lease, stop
        return self

    def release(self) -> None:
        if self._lease is None:
            return
        lease, self._lease = self._lease, None
        self._stop.set()
        try:
            self.lake.service.get_blob_client(*self.lake._split(self.PATH)).set_blob_metadata({}, lease=lease)
        finally:
            lease.release()

    def __enter__(self) -> "LakeLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
