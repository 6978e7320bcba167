"""Registries opened for reading only: ``manymodels serve`` on a workdir it may not write.

The recommended server setup gives the server's account read access to the workdir and nothing
more (docs/reliability.md, trust boundaries). A :class:`~shared.registries.registry.ModelRegistry` opens its
index for writing (WAL mode, schema, ``BEGIN IMMEDIATE``), which a read-only folder refuses.
:class:`ReadOnlyRegistry` creates, migrates and writes nothing:

- SQLite's ``mode=ro`` first: it reads a WAL index whose ``-shm`` file exists (a writer has it
  open) or can be created;
- else (the usual case: the pipeline finished, its WAL checkpointed and removed, and the folder is
  read-only so no ``-shm`` can be made) ``immutable=1``: no locks, no side files. That promise
  ("the file does not change") is kept by reopening whenever the index file or its WAL changes
  (inode, size, modification time: two ``stat`` calls per query), so a version promoted by the
  pipeline is picked up as on a writable workdir.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from shared.layout import REGISTRY_INDEX
from shared.registries.registry import ModelRegistry, RegistryError

INDEX = REGISTRY_INDEX
OPEN_ATTEMPTS = 3  # an immutable open that raced a checkpoint is made again


class ReadOnlyRegistry(ModelRegistry):
    """A local registry read without writing anything (writes fail: the index is opened read-only)."""

    def __init__(self, root: Path | str, name: str) -> None:
        self._signature: tuple[Any, ...] | None = None
        self.mode = ""
        super().__init__(root, name)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["name"])

    def __repr__(self) -> str:
        return f"ReadOnlyRegistry({str(self.root)!r}, {self.name!r})"

    def _files(self) -> tuple[Any, ...]:
        index = self.root / INDEX
        out: list[Any] = []
        for path in (index, index.with_name(INDEX + "-wal")):
            try:
                st = path.stat()
            except FileNotFoundError:
                out.append(None)
                continue
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _connect(self) -> sqlite3.Connection:
        signature = self._files()
        if self._conn is not None and self._pid == os.getpid() and signature == self._signature:
            return self._conn
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None
        if signature[0] is None:
            raise RegistryError(f"the {self.name} registry at {self.root} has no index ({INDEX}): "
                                "nothing to serve; run the pipeline first")
        for _ in range(OPEN_ATTEMPTS):
            conn, mode = self._open()
            after = self._files()
            if after == signature:
                break
            conn.close()  # the index changed while it was read: read it again
            signature = after
        else:
            raise RegistryError(f"the {self.name} registry at {self.root} kept changing while it was opened")
        self._conn, self._pid, self._signature, self.mode = conn, os.getpid(), signature, mode
        return conn

    def _open(self) -> tuple[sqlite3.Connection, str]:
        uri = (self.root / INDEX).as_uri()
        failure: Exception | None = None
        for mode in ("ro", "immutable"):
            query = "?mode=ro" if mode == "ro" else "?mode=ro&immutable=1"
            try:
                conn = sqlite3.connect(uri + query, uri=True, timeout=60.0, isolation_level=None,
                                       check_same_thread=False)
            except sqlite3.Error as exc:
                failure = exc
                continue
            try:
                self._check(conn)
            except sqlite3.OperationalError as exc:  # ro: no -shm and none can be made
                conn.close()
                failure = exc
                continue
            except BaseException:
                conn.close()
                raise
            return conn, mode
        raise RegistryError(f"the {self.name} registry at {self.root} cannot be read: {failure}")

    def _check(self, conn: sqlite3.Connection) -> None:
        """The index's name and schema, as :class:`ModelRegistry` checks them (read, never migrated)."""
        stored = conn.execute("SELECT value FROM meta WHERE key = 'name'").fetchone()
        if stored is None or stored[0] != self.name:
            raise RegistryError(f"the registry at {self.root} is {stored[0] if stored else None!r}, not "
                                f"{self.name!r}; dev and prod registries must live in separate folders")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(models)")}
        if "sha256" not in columns:
            raise RegistryError(f"the {self.name} registry at {self.root} has an older schema without "
                                "artifact digests; run any writing command (or `manymodels models seal`) "
                                "on it once, then serve it read-only")
        row = conn.execute("SELECT value FROM meta WHERE key = 'legacy_before'").fetchone()
        self._legacy_before = row[0] if row else None


def read_only_registries(workspace: Any, dev_needed: bool) -> tuple[ReadOnlyRegistry, ReadOnlyRegistry | None]:
    """The workspace's local prod registry (and dev registry, when ``dev_needed`` and it exists),
    opened read-only."""
    from shared import layout

    prod = ReadOnlyRegistry(workspace.root / layout.registry_dir("prod"), "prod")
    dev_root = workspace.root / layout.registry_dir("dev")
    dev = ReadOnlyRegistry(dev_root, "dev") if dev_needed and (dev_root / INDEX).is_file() else None
    return prod, dev
