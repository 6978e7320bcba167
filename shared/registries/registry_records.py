"""The registry's records: :class:`ModelRecord`, how a caller's record (or a training result row)
becomes one with its standard tags, and its row in the SQLite index (schema, columns, the
``latest`` lookup). :class:`shared.registries.registry.ModelRegistry` stores and loads them; every name here
is also importable from :mod:`shared.registries.registry`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from shared.errors import ManyModelsError

REGISTRY_NAMES = ("dev", "prod")
GLOBAL_PARTITION = "_global"  # shared.models.global_model.GLOBAL_ID: a run's global model, not a partition
ASSET_PREFIX = "mm-"
# Tags every record gets from its own fields; callers' tags and key values may not contradict them.
STANDARD_TAGS = ("partition_id", "run_id", "model_type", "fingerprint", "status", "version", "name")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    partition_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    model_type TEXT NOT NULL,
    run_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    metrics TEXT NOT NULL,
    tags TEXT NOT NULL,
    artifact TEXT NOT NULL,
    created_at TEXT NOT NULL,
    status TEXT NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '',
    byte_offset INTEGER NOT NULL DEFAULT 0,
    byte_length INTEGER NOT NULL DEFAULT -1,
    PRIMARY KEY (partition_id, version)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS models_by_run ON models (run_id, partition_id);
CREATE TABLE IF NOT EXISTS latest (
    partition_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tags (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    partition_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (key, value, partition_id, version)
) WITHOUT ROWID;
"""
_COLUMNS = ("partition_id, version, name, model_type, run_id, fingerprint, metrics, tags, artifact, "
            "created_at, status, sha256, byte_offset, byte_length")
N_COLUMNS = len(_COLUMNS.split(","))
# 2: every record has its artifact's SHA-256; 3: an artifact may be a byte range of a pack file
SCHEMA_VERSION = "3"
_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))
# Two primary-key lookups (latest, then models): no scan, whatever the number of models.
_LATEST_BASE = (f"SELECT {_M_COLUMNS} FROM latest l JOIN models m "
                "ON m.partition_id = l.partition_id AND m.version = l.version WHERE l.partition_id")
LATEST_SQL = _LATEST_BASE + " = ?"


class RegistryError(ManyModelsError, ValueError):
    """A registry is misused: wrong name for its root, a missing artifact, contradicting tags."""


class ArtifactIntegrityError(RegistryError):
    """A model file is not the one registered (digest mismatch, no digest, not in the index):
    it is refused before anything in it runs."""


@dataclass
class ModelRecord:
    """One registered model version. ``tags`` are all strings: partition key values, run id,
    model type, fingerprint, status, version, plus whatever the caller added."""

    partition_id: str
    version: int
    name: str
    model_type: str
    run_id: str
    fingerprint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifact: str = ""  # relative to the registry root
    created_at: str = ""
    status: str = "trained"
    sha256: str = ""  # of the artifact's bytes, recorded at registration, checked before loading
    # where in ``artifact`` the model's bytes are: a pack holds many models (byte_length -1: the
    # whole file, as records made before packs)
    byte_offset: int = 0
    byte_length: int = -1

    @property
    def packed(self) -> bool:
        return self.byte_length >= 0

    @property
    def model_name(self) -> str:
        """The chosen candidate's name (gbm, loglinear, ...): the same thing as ``model_type``."""
        return self.model_type

    @property
    def keys(self) -> dict[str, str]:
        """The partition key values, from the tags (``partition_keys`` lists their names)."""
        names = [n for n in self.tags.get("partition_keys", "").split(",") if n]
        return {n: self.tags[n] for n in names if n in self.tags}

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def _tag_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _as_fields(record: ModelRecord | Mapping[str, Any]) -> dict[str, Any]:
    """The caller's part of a record, from a ModelRecord or a dict such as a training result row."""
    # a record's fields as they are (dataclasses.asdict deep-copies every metric and tag: it was
    # most of a promotion's cost per model); the dicts are copied below anyway
    raw = dict(vars(record)) if isinstance(record, ModelRecord) else dict(record)
    for required in ("partition_id", "run_id"):
        if not raw.get(required):
            raise RegistryError(f"a model record needs {required!r}; got keys {sorted(raw)}")
    model_type = raw.get("model_type") or raw.get("model_name") or "custom"
    tags: dict[str, str] = {}
    keys = raw.get("keys") or {}
    if keys:
        tags.update({str(k): _tag_value(v) for k, v in keys.items()})
        tags["partition_keys"] = ",".join(str(k) for k in keys)
    tags.update({str(k): _tag_value(v) for k, v in (raw.get("tags") or {}).items()})
    return {
        "partition_id": str(raw["partition_id"]),
        "run_id": str(raw["run_id"]),
        "model_type": str(model_type),
        "fingerprint": str(raw.get("fingerprint") or ""),
        "metrics": dict(raw.get("metrics") or {}),
        "status": str(raw.get("status") or "trained"),
        "tags": tags,
        "sha256": str(raw.get("sha256") or ""),
    }


def _new_record(fields: dict[str, Any], version: int, artifact: str, now: str,
                byte_range: tuple[int, int] = (0, -1)) -> ModelRecord:
    name = ASSET_PREFIX + fields["partition_id"]
    standard = {"partition_id": fields["partition_id"], "run_id": fields["run_id"],
                "model_type": fields["model_type"], "fingerprint": fields["fingerprint"],
                "status": fields["status"], "version": str(version), "name": name}
    tags = dict(fields["tags"])
    for key, value in standard.items():
        if key in tags and key not in ("version", "name") and tags[key] != value:
            raise RegistryError(f"tag {key}={tags[key]!r} contradicts the record's {key} {value!r} "
                                f"(partition {fields['partition_id']}); a partition key column may "
                                f"not be named like a standard tag {STANDARD_TAGS}")
        tags[key] = value
    return ModelRecord(partition_id=fields["partition_id"], version=version, name=name,
                       model_type=fields["model_type"], run_id=fields["run_id"],
                       fingerprint=fields["fingerprint"], metrics=fields["metrics"], tags=tags,
                       artifact=artifact, created_at=now, status=fields["status"],
                       sha256=fields["sha256"], byte_offset=int(byte_range[0]), byte_length=int(byte_range[1]))



def _to_db(record: ModelRecord) -> tuple:
    return (record.partition_id, record.version, record.name, record.model_type, record.run_id,
            record.fingerprint, json.dumps(record.metrics, default=float), json.dumps(record.tags),
            record.artifact, record.created_at, record.status, record.sha256, int(record.byte_offset),
            int(record.byte_length))


def _from_db(row: tuple) -> ModelRecord:
    return ModelRecord(partition_id=row[0], version=int(row[1]), name=row[2], model_type=row[3],
                       run_id=row[4], fingerprint=row[5], metrics=json.loads(row[6]),
                       tags=json.loads(row[7]), artifact=row[8], created_at=row[9], status=row[10],
                       sha256=row[11] or "", byte_offset=int(row[12]), byte_length=int(row[13]))

