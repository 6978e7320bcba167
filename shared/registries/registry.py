"""A local model registry: artifact files plus a SQLite index, one root per registry.

Why our own index: "find the model for this partition" must be O(1) for scoring and serving, and
a registry's model list (Azure ML's included) has no tag filter and is slow to page through with
thousands of models. The index answers by primary key; the artifacts are plain files.

Layout under ``root``:
- ``artifacts/<partition_id>/v<version>.pkl`` — immutable once written, each an independent file
  (never a hard link to another registry's or a run's copy: damage to one copy reaches no other);
- ``index.sqlite`` (WAL mode: readers in other processes never block and never see a half-done
  registration) with the tables ``models`` (one row per version, primary key
  (partition_id, version), unique (run_id, partition_id)), ``latest`` (partition_id -> newest
  version), ``tags`` (key, value, partition_id, version) and ``meta`` (the registry's name and a
  change counter).

Trust: an artifact is a pickle, and unpickling runs code. Each record stores the SHA-256 of its
artifact, taken while the file was written; :meth:`ModelRegistry.load` reads the bytes once, checks
them against the index and only then unpickles them (through the one artifact loader,
:mod:`shared.models.artifact_format`), so a file dropped over, edited or corrupted
after registration is refused (:class:`ArtifactIntegrityError`, one partition's failure) instead of
run. A file the index does not name is never loaded. Whoever can write ``index.sqlite`` itself is
trusted: the index and the folder's permissions are the boundary. Records of registries made before
digests existed (schema 1) carry none: they load with a warning, and gain one when promoted
(the copy is hashed) or by :meth:`ModelRegistry.seal`; a record without a digest created after the
upgrade is refused.

Development and production are two roots (``<workdir>/registry/dev`` and ``.../prod``); the name
is stored in the index and checked on open, so one can never be opened as the other.

The records, their tags and their index rows are defined in :mod:`shared.registries.registry_records`.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

from shared.models.artifact_format import load_artifact
from shared.registries.registry_records import (
    GLOBAL_PARTITION, LATEST_SQL, N_COLUMNS, REGISTRY_NAMES, SCHEMA_VERSION, _COLUMNS, _LATEST_BASE, _M_COLUMNS,
    _SCHEMA, ArtifactIntegrityError, ModelRecord, RegistryError, _as_fields, _from_db, _new_record,
    _tag_value, _to_db,
)
from shared.trust import sha256_bytes, sha256_file
from shared.layout import REGISTRY_INDEX

LOG = logging.getLogger("manymodels.registry")


class ModelRegistry:
    """Models by partition, versioned, with tags; an index makes every lookup a key lookup.

    ``sealable``: its legacy records' digests can be recorded in place (``manymodels models seal``).

    Safe to share between threads (one lock) and to use from several processes at once (SQLite
    WAL plus ``BEGIN IMMEDIATE`` for writers). Connections are per process: after a fork the
    child opens its own.
    """

    sealable = True

    def __init__(self, root: Path | str, name: str, working_copy: bool = False,
                 index: Path | str | None = None) -> None:
        if name not in REGISTRY_NAMES:
            raise RegistryError(f"registry name must be one of {REGISTRY_NAMES}, got {name!r}")
        self.root = Path(root).resolve()
        self.name = name
        # a scoring job's slice: its own small index (downloaded, writable) over the registry's
        # artifacts folder (a read-only mount, of which it reads only the files the index names)
        self.index_path = Path(index).resolve() if index is not None else self.root / REGISTRY_INDEX
        # a working copy (the Azure ML registry's local cache) is rebuilt from the lake, which holds
        # the records: a lost index there is expected, not a loss to refuse
        self.working_copy = working_copy
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._legacy_before: str | None = None  # records up to then may lack a digest (schema 1)
        self._warned: set[tuple[str, int]] = set()
        self._connect()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (to hand to worker processes): only the root and name travel."""
        return {"root": self.root, "name": self.name, "working_copy": self.working_copy,
                "index": self.index_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["name"], bool(state.get("working_copy", False)), state.get("index"))

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r}, {self.name!r})"

    # -- connection ----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._check_index_present()
        try:
            if not self.index_path.parent.is_dir():  # never a mkdir on a (read-only) mounted registry
                self.index_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.index_path, timeout=60.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.OperationalError) as exc:
            raise RegistryError(f"the {self.name} registry at {self.root} cannot be opened: {exc}; "
                                "check that the folder exists and is writable (a read-only workdir?)") from exc
        except sqlite3.DatabaseError as exc:  # "file is not a database", "disk image is malformed"
            raise RegistryError(
                f"the {self.name} registry's index {self.index_path} is damaged ({exc}): restore it "
                f"from a backup, or move the folder aside (mv {self.root} {self.root}.damaged) and register "
                "the models again (" + ("`manymodels promote --run-id RUN`" if self.name == "prod"
                                        else "`manymodels train --full`") + ")") from exc
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: never corrupt, fast commits
        conn.execute("PRAGMA foreign_keys=OFF")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            conn.close()
            raise RegistryError(f"the {self.name} registry at {self.root} cannot be written: {exc}; "
                                "check the folder's permissions (a read-only workdir?)") from exc
        try:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            stored = conn.execute("SELECT value FROM meta WHERE key = 'name'").fetchone()
            if stored is None:
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                 [("name", self.name), ("changes", "0"), ("schema", SCHEMA_VERSION)])
            elif stored[0] != self.name:
                raise RegistryError(f"the registry at {self.root} is {stored[0]!r}, not {self.name!r}; "
                                    "dev and prod registries must live in separate folders")
            self._migrate(conn)
            row = conn.execute("SELECT value FROM meta WHERE key = 'legacy_before'").fetchone()
            self._legacy_before = row[0] if row else None
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _check_index_present(self) -> None:
        """Refuse to create an empty index over a registry that holds models: a lost
        ``index.sqlite`` recreated silently would leave every partition to the fallbacks (and its
        artifacts' digests are gone with it, so they cannot be trusted back without a new copy)."""
        index, artifacts = self.index_path, self.root / "artifacts"
        if getattr(self, "working_copy", False) or index.exists() or not artifacts.is_dir() or next(artifacts.iterdir(), None) is None:
            return
        again = ("`manymodels promote --run-id RUN` for the runs to serve" if self.name == "prod"
                 else "`manymodels train --full`")
        raise RegistryError(
            f"the {self.name} registry's index {index} is missing although {artifacts} holds models: "
            f"it is not recreated empty (every partition would silently lose its model). Restore "
            f"index.sqlite from a backup, or move the folder aside (mv {self.root} {self.root}.lost) "
            f"and register the models again: {again}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Schema 1 -> 2: add the digest column; records made until now may lack one (legacy).
        Schema 2 -> 3: add the byte range of packed artifacts; records made until now are whole files."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(models)")}
        upsert = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        if "sha256" not in columns:
            conn.execute("ALTER TABLE models ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''")
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            conn.execute(upsert, ("legacy_before", now))
            LOG.warning("registry %s at %s upgraded to schema %s: its existing models have no recorded "
                        "SHA-256; they load with a warning until promoted again or sealed", self.name,
                        self.root, SCHEMA_VERSION)
        if "byte_offset" not in columns:
            conn.execute("ALTER TABLE models ADD COLUMN byte_offset INTEGER NOT NULL DEFAULT 0")
            conn.execute("ALTER TABLE models ADD COLUMN byte_length INTEGER NOT NULL DEFAULT -1")
        if "sha256" not in columns or "byte_offset" not in columns:
            conn.execute(upsert, ("schema", SCHEMA_VERSION))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._connect().execute(sql, tuple(params)).fetchall()

    # -- writing ---------------------------------------------------------------------------
    def register_many(
        self, items: Iterable[tuple[ModelRecord | Mapping[str, Any], Path | str | bytes]]
    ) -> list[ModelRecord]:
        """Register (record, artifact) pairs in one transaction; returns the stored records.

        A record is a :class:`ModelRecord` or a dict with at least ``partition_id`` and
        ``run_id`` (a training result row works: ``model_name`` is read as ``model_type``, and
        ``keys`` become tags). Version, name, artifact and created_at are assigned here. The
        artifact is a file or bytes. Idempotent: a (run_id, partition_id) already registered returns the
        existing version and writes nothing.

        The artifact is always copied into an independent file (never hard-linked), and its
        SHA-256 recorded; a record that already carries ``sha256`` (a copy from another registry,
        a training row) must match the bytes copied, or nothing is registered.
        """
        prepared = [(_as_fields(record), artifact) for record, artifact in items]
        return self._register(prepared, source_root=None)

    def copy_from(self, source: "ModelRegistry", record: ModelRecord) -> ModelRecord:
        """Copy one model (artifact, tags, metrics) from another registry as a new version here."""
        return self.copy_many(source, [record])[0]

    def copy_many(self, source: "ModelRegistry", records: Iterable[ModelRecord]) -> list[ModelRecord]:
        """Copy models from another registry in one transaction; idempotent by (run_id, partition_id).

        The copies keep their run id, fingerprint, metrics and tags, and gain the tags
        ``source_registry`` and ``source_version``. Each copy is an independent file whose bytes
        must match the digest the source recorded (:class:`ArtifactIntegrityError` otherwise); a
        legacy source record without one gets the digest of the bytes copied.
        """
        if source.root == self.root:
            raise RegistryError(f"cannot copy models from a registry into itself ({self.root})")
        prepared = []
        for rec in records:
            fields = _as_fields(rec)
            fields["tags"] = {**fields["tags"], "source_registry": source.name,
                              "source_version": str(rec.version)}
            stored = source.get(rec.partition_id, rec.version)
            if stored is not None:
                fields["sha256"] = stored.sha256
            prepared.append((fields, source.raw_bytes(stored or rec)))  # checked against the digest when packed
        return self._register(prepared, source_root=source.root)

    def _register(self, prepared: list[tuple[dict[str, Any], Path | str | bytes]],
                  source_root: Path | None) -> list[ModelRecord]:
        """Number the new versions and write their artifacts into packs (:class:`_PackWriter`):
        one file per ``PACK_MAX_BYTES`` of models, each model a byte range with its own digest.
        Why packs: a file per model was the registry's fixed cost per partition (created, copied,
        hashed, uploaded one by one; in a lake, a request each), now one file per few thousand."""
        if not prepared:
            return []
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        packs = _PackWriter(self.root)
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")  # take the write lock before choosing version numbers
            try:
                out: list[ModelRecord] = []
                new_rows, new_tags, latest_rows = [], [], {}
                claimed: dict[tuple[str, str], ModelRecord] = {}
                next_version: dict[str, int] = {}
                for fields, artifact in prepared:
                    pid, run_id = fields["partition_id"], fields["run_id"]
                    existing = claimed.get((run_id, pid)) or self._by_run(conn, run_id, pid)
                    if existing is not None:
                        out.append(existing)
                        continue
                    if pid not in next_version:
                        row = conn.execute("SELECT version FROM latest WHERE partition_id = ?",
                                           (pid,)).fetchone()
                        next_version[pid] = (row[0] if row else 0) + 1
                    version = next_version[pid]
                    next_version[pid] = version + 1
                    rel, start, length, digest = packs.add(_artifact_bytes(artifact), fields.get("sha256") or "",
                                                           f"{pid} (run {run_id})")
                    record = _new_record({**fields, "sha256": digest}, version, rel, now, (start, length))
                    claimed[(run_id, pid)] = record
                    out.append(record)
                    new_rows.append(_to_db(record))
                    new_tags.extend((k, v, pid, version) for k, v in record.tags.items())
                    latest_rows[pid] = version
                packs.close()  # every pack in place before an index row names it
                if new_rows:
                    conn.executemany(f"INSERT INTO models ({_COLUMNS}) VALUES ({','.join('?' * N_COLUMNS)})",
                                     new_rows)
                    conn.executemany("INSERT INTO tags (key, value, partition_id, version) VALUES (?,?,?,?)",
                                     new_tags)
                    conn.executemany("INSERT INTO latest (partition_id, version) VALUES (?, ?) "
                                     "ON CONFLICT (partition_id) DO UPDATE SET version = excluded.version",
                                     list(latest_rows.items()))
                    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'changes'")
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                packs.discard()  # no index row points at them; remove rather than leave orphans
                raise
        return out

    # -- reading ---------------------------------------------------------------------------
    def latest(self, partition_id: str) -> ModelRecord | None:
        """The newest version of a partition's model: one primary-key lookup."""
        rows = self._query(LATEST_SQL, (partition_id,))
        return _from_db(rows[0]) if rows else None

    def latest_many(self, partition_ids: Iterable[str]) -> dict[str, ModelRecord]:
        """``latest`` for many partitions in one query (batch scoring of a whole mini-batch)."""
        ids = list(dict.fromkeys(partition_ids))
        out: dict[str, ModelRecord] = {}
        for start in range(0, len(ids), 500):  # SQLite's parameter limit
            chunk = ids[start:start + 500]
            sql = f"{_LATEST_BASE} IN ({','.join('?' * len(chunk))})"
            for row in self._query(sql, chunk):
                out[row[0]] = _from_db(row)
        return out

    def get(self, partition_id: str, version: int) -> ModelRecord | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM models WHERE partition_id = ? AND version = ?",
                           (partition_id, int(version)))
        return _from_db(rows[0]) if rows else None

    def by_run(self, run_id: str, partition_id: str) -> ModelRecord | None:
        """The version a given run registered for a partition, if any (the idempotency key)."""
        with self._lock:
            return self._by_run(self._connect(), run_id, partition_id)

    @staticmethod
    def _by_run(conn: sqlite3.Connection, run_id: str, partition_id: str) -> ModelRecord | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM models WHERE run_id = ? AND partition_id = ?",
                           (run_id, partition_id)).fetchone()
        return _from_db(row) if row else None

    def find(self, tags: Mapping[str, str] | None = None, limit: int | None = None,
             run_id: str | None = None, latest_only: bool = False,
             include_global: bool = False) -> list[ModelRecord]:
        """Models whose tags hold all the given values, ordered by partition and version.

        Each tag is a row of the ``tags`` table, whose primary key starts with (key, value): a
        filter is an index range per tag, intersected — never a scan of every model's JSON.
        ``run_id`` uses the (run_id, partition_id) index; ``latest_only`` keeps only each
        partition's newest version.
        """
        where, params = [], []
        for key, value in (tags or {}).items():
            where.append("(m.partition_id, m.version) IN "
                         "(SELECT partition_id, version FROM tags WHERE key = ? AND value = ?)")
            params += [str(key), _tag_value(value)]
        if run_id is not None:
            where.append("m.run_id = ?")
            params.append(run_id)
        if not include_global:  # a run's global model is not a partition's model (include_global to list it)
            where.append("m.partition_id <> ?")
            params.append(GLOBAL_PARTITION)
        join = (" JOIN latest l ON l.partition_id = m.partition_id AND l.version = m.version"
                if latest_only else "")
        sql = f"SELECT {_M_COLUMNS} FROM models m{join}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.partition_id, m.version"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [_from_db(row) for row in self._query(sql, params)]

    # the project's extra estimator packages (training.estimator_packages) its models may be built
    # from, beside the built-in libraries: set by whoever opens the registry with the project config
    packages: tuple[str, ...] = ()

    def load(self, record: ModelRecord, packages: Iterable[str] | None = None) -> Any:
        """A record's artifact (a ``ForecastBundle`` for our own models), once its bytes match the
        SHA-256 the index recorded (:class:`ArtifactIntegrityError` otherwise), read by the one
        artifact loader (:func:`shared.models.artifact_format.load_artifact`: class-path map, allow-list,
        library versions; legacy pickles and joblib files still load).

        The record is looked up again by (partition, version): what is checked and loaded is what
        the index says, whatever the caller's copy of the record holds. ``packages``: the project's
        extra estimator packages, allowed beside the built-in libraries.
        """
        return self.load_bytes(record, self.verified_bytes(record), packages, checked=True)

    def load_bytes(self, record: ModelRecord, data: bytes, packages: Iterable[str] | None = None,
                   checked: bool = False) -> Any:
        """:meth:`load` of bytes read elsewhere (a range fetched from the lake): checked against the
        index's digest first unless ``checked`` (by :meth:`verified_bytes`), then unpickled."""
        if not checked:
            self._check_bytes(self._stored(record), data)
        what = f"model {record.partition_id} v{record.version} of the {self.name} registry"
        return load_artifact(data, what, self.packages if packages is None else packages)

    def _stored(self, record: ModelRecord) -> ModelRecord:
        """The index's own record of (partition, version): what is checked and loaded."""
        stored = self.get(record.partition_id, record.version)
        if stored is None:
            what = f"model {record.partition_id} v{record.version} of the {self.name} registry"
            raise ArtifactIntegrityError(f"{what} is not in its index: refusing to load an unknown file")
        return stored

    def verified_bytes(self, record: ModelRecord) -> bytes:
        """The artifact's bytes, read once and checked against the index (nothing is unpickled)."""
        stored = self._stored(record)
        data = self.raw_bytes(stored)
        self._check_bytes(stored, data)
        return data

    def _check_bytes(self, stored: ModelRecord, data: bytes) -> None:
        what = f"model {stored.partition_id} v{stored.version} of the {self.name} registry"
        if stored.sha256:
            if sha256_bytes(data) != stored.sha256:
                raise ArtifactIntegrityError(
                    f"artifact of {what} ({stored.artifact}) does not match the SHA-256 recorded at "
                    "registration: it was changed or corrupted since, so it is not loaded; register "
                    "or promote the model again")
        elif self._legacy_before is not None and stored.created_at <= self._legacy_before:
            key = (stored.partition_id, stored.version)
            if key not in self._warned:
                self._warned.add(key)
                LOG.warning("%s predates artifact digests: loaded unverified (seal the registry or "
                            "promote the model again to record one)", what)
        else:
            raise ArtifactIntegrityError(f"{what} has no recorded SHA-256 although it was registered "
                                         "after digests were introduced: refusing to load it")

    def raw_bytes(self, record: ModelRecord) -> bytes:
        """The bytes a record names (its whole file, or its range of a pack), unchecked: callers
        check them against the index's digest (:meth:`verified_bytes`, a copy's ``_register``)."""
        what = f"model {record.partition_id} v{record.version} of the {self.name} registry"
        path = self._inside(record)
        if not record.packed:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise RegistryError(f"artifact of {what} is missing: {record.artifact}") from None
        return ArtifactRange(path, record.byte_offset, record.byte_length).read(
            f"artifact of {what} ({record.artifact})", "its index names: it was truncated since registration")

    def verify(self, record: ModelRecord) -> None:
        """Raise :class:`ArtifactIntegrityError` (or RegistryError) if ``load`` would refuse it."""
        self.verified_bytes(record)

    def seal(self) -> int:
        """Record the digest of every legacy record's artifact as it is now (trust on upgrade:
        the files the registry already loaded unverified). Returns how many records were sealed."""
        rows = self._query("SELECT partition_id, version, artifact FROM models WHERE sha256 = '' "
                           "AND byte_length < 0")  # packs came after digests: none is legacy
        sealed = []
        for pid, version, artifact in rows:
            path = self._inside(ModelRecord(pid, int(version), "", "", "", "", artifact=artifact))
            if path.is_file():
                sealed.append((sha256_file(path), pid, int(version)))
        if sealed:
            with self._lock:
                conn = self._connect()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany("UPDATE models SET sha256 = ? WHERE partition_id = ? AND version = ? "
                                     "AND sha256 = ''", sealed)
                    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'changes'")
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
        return len(sealed)

    def _inside(self, record: ModelRecord) -> Path:
        """The artifact's path, which must lie under ``root/artifacts`` (no ``..``, no absolute path).
        Remembered per artifact name: the models of a pack share one (resolving walks every folder
        of the path, which cost more than reading a model's bytes)."""
        memo = self.__dict__.setdefault("_resolved", {})
        path = memo.get(record.artifact)
        if path is None:
            base = (self.root / "artifacts").resolve()
            path = (self.root / record.artifact).resolve()
            if base not in path.parents:
                raise ArtifactIntegrityError(f"model {record.partition_id} v{record.version}: artifact path "
                                             f"{record.artifact!r} is outside the registry's artifacts folder")
            if len(memo) >= 4096:
                memo.clear()
            memo[record.artifact] = path
        return path

    def artifact_path(self, record: ModelRecord) -> Path:
        return self.root / record.artifact

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM models")[0][0])

    def refresh(self, force: bool = False) -> bool:
        """Nothing to pull: a local index is read live (the Azure ML registry pulls its lake copy)."""
        return False

    def folder(self) -> Path:
        """The registry as a plain folder, for local entry scripts: this one is one already."""
        return self.root

    def index_version(self) -> int:
        """A counter bumped by every write transaction: a cache polls it to notice new versions."""
        return int(self._query("SELECT value FROM meta WHERE key = 'changes'")[0][0])


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (it does on a full disk: a second
    ROLLBACK would then raise "cannot rollback - no transaction is active" over the real error)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


PACK_MAX_BYTES = 64 * 2**20  # a pack is closed once it holds this much; the next model starts another


@dataclass(frozen=True)
class ArtifactRange:
    """A model's bytes as a range of a file (a training chunk's pack): read when registered."""

    path: Path
    offset: int
    length: int

    def read(self, what: str = "", named_by: str = "its result row names") -> bytes:
        """The range's bytes; a missing file or one shorter than the range is an error naming ``what``."""
        what = what or f"model artifact {self.path}"
        try:
            with open(self.path, "rb") as fh:
                fh.seek(int(self.offset))
                data = fh.read(int(self.length))
        except FileNotFoundError:
            raise RegistryError(f"{what} is missing (model artifact not found: {self.path.name})") from None
        if len(data) != int(self.length):
            raise ArtifactIntegrityError(f"{what} is shorter than the range {self.offset}+{self.length} {named_by}")
        return data


def _artifact_bytes(artifact: Path | str | bytes | bytearray | memoryview | ArtifactRange) -> bytes:
    """A model's bytes, given as bytes, as the file that holds them, or as a range of a file."""
    if isinstance(artifact, (bytes, bytearray, memoryview)):
        return bytes(artifact)
    if isinstance(artifact, ArtifactRange):
        return artifact.read()
    source = Path(artifact)
    try:
        return source.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise RegistryError(f"model artifact not found: {source}") from None


class _PackWriter:
    """Writes one registration's artifacts into pack files ``artifacts/packs/<id>.pack``: each model
    appended as it comes, its byte range and SHA-256 returned; a pack reaching ``PACK_MAX_BYTES``
    is closed and the next begins. Each pack is written under a temporary name and put in place by
    :meth:`close` (before the index names it); :meth:`discard` removes everything on a failure.

    A pack is an independent file (never a link to another registry's or a run's copy), immutable
    once in place: a later registration writes new packs.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: list[tuple[Path, Path]] = []  # (temporary, final) of every pack so far
        self._fh: BinaryIO | None = None
        self._rel = ""
        self._size = 0

    def add(self, data: bytes, expected: str = "", what: str = "") -> tuple[str, int, int, str]:
        """Append one model; returns (pack path relative to the root, offset, length, SHA-256),
        refusing bytes that do not match ``expected`` (the digest their writer recorded)."""
        digest = sha256_bytes(data)
        if expected and digest != expected:
            raise ArtifactIntegrityError(f"model artifact of {what or 'a model'} does not match the SHA-256 "
                                         "recorded for it: it was changed after it was written; not copied")
        if self._fh is not None and self._size + len(data) > PACK_MAX_BYTES:
            self._fh.close()
            self._fh = None
        if self._fh is None:
            self._rel = f"artifacts/packs/{uuid.uuid4().hex}.pack"
            final = self.root / self._rel
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".tmp-{final.name}")
            self.done.append((tmp, final))
            self._fh = open(tmp, "xb")
            self._size = 0
        start = self._size
        self._fh.write(data)
        self._size += len(data)
        return self._rel, start, len(data), digest

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for tmp, final in self.done:
            if tmp.exists():
                os.replace(tmp, final)

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for tmp, final in self.done:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
