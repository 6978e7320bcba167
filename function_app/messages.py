"""The JSON contracts of the app's inputs: HTTP bodies, Service Bus messages, lake events.

Every parser returns a small frozen dataclass or raises :class:`MessageError` naming the field,
so an HTTP start answers 400 with that field and a Service Bus trigger logs it and raises (the
message is abandoned and dead-lettered after the queue's ``maxDeliveryCount``). Nothing here
touches the lake or the Durable client: the checks are about shape, types and ranges.

Upstream queue (``MM_UPSTREAM_QUEUE``), one JSON object per message::

    {"type": "dataset-ready", "path": "raw/sales/2024-06-30.parquet", "etag": "0x8DC...",
     "options": {...}}
    {"type": "retrain", "dataset_id": "d0123456789abcdef", "partitions": "all" | [...],
     "options": {...}}
    {"type": "score", "path": "raw/scoring/next-quarter.csv", "horizon": 12, "options": {...}}

``partitions`` is ``"all"`` or a list whose items are partition ids (``"p"`` + 20 hex digits) or
key objects (``{"store": "S01", "item": "I0001"}``); ``options`` may hold ``group_size`` (files
per compute job), ``min_accuracy`` (0..1, for the promotion after training) and ``config``
(dotted project-config overrides, e.g. ``{"forecast.horizon": 8}``). A sender should set the
Service Bus ``MessageId`` (unique per request): a redelivery keeps it, so it starts nothing new.

Promotion queue (``MM_PROMOTION_QUEUE``), written by the training orchestrator::

    {"type": "promote", "run_id": "r0123456789abcdef", "min_accuracy": 0.8, "origin": "<instance>"}
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from shared import bounds
from shared.config import ConfigError, check_message_overrides
from shared.lake import LakeError, check_path
from shared.settings import DATA_FILE_SUFFIXES

RAW_CONTAINER = "raw"
# Scoring files may come from raw/ or scoring/ (shared.runs.pipeline.LAKE_SOURCE_CONTAINERS stages both).
SCORING_CONTAINERS = ("raw", "scoring")
DATA_SUFFIXES = DATA_FILE_SUFFIXES
# Names that writers use for work in progress (Spark's _temporary/, Hadoop's .crc and _SUCCESS):
# an event for such a path is not a new raw file.
HIDDEN_PREFIXES = ("_", ".")
# Written last into a folder dataset by Spark's and Hadoop's committers (and by a Data Factory step
# that ends a copy with it): the folder is complete. Its part files raise events of their own, which
# are ignored: the folder is ingested once, on its marker.
# MM_DATASET_MARKERS adds the names of manifests a user's pipeline writes last (Settings.folder_markers).
FOLDER_MARKERS = ("_SUCCESS",)
PART_PREFIXES = ("part-",)  # Spark / Hadoop part files: a piece of a folder dataset, never one alone
EVENT_SUFFIXES = DATA_SUFFIXES + tuple(f"/{marker}" for marker in FOLDER_MARKERS)  # the default filter
BLOB_CREATED = "Microsoft.Storage.BlobCreated"
# Some writers report a new file twice: an empty file first, then its committed data. ADLS Gen2
# (hierarchical namespace): CreateFile, then FlushWithClose; SFTP: SftpCreate, then SftpCommit.
# Only the second means the file is there (Microsoft's "Blob Storage as an Event Grid source").
INCOMPLETE_APIS = ("CreateFile", "SftpCreate")
# ADLS Gen2 only: a file renamed into raw/ (Spark's and Data Factory's write-then-rename) is a new
# file there; the event carries no ETag, so the version is read from the lake before the run is named.
BLOB_RENAMED = "Microsoft.Storage.BlobRenamed"
RENAMED_FILE_API = "RenameFile"
# The API calls after which a file in raw/ is complete: the Event Grid subscription's data.api filter
# (infra/app/eventgrid.bicep) lets only these through.
COMPLETED_APIS = ("PutBlob", "PutBlockList", "FlushWithClose", "CopyBlob", "SftpCommit", RENAMED_FILE_API)
UPSTREAM_TYPES = ("dataset-ready", "retrain", "score")
OPTION_NAMES = ("group_size", "min_accuracy", "config", "full")
_PARTITION_ID = re.compile(r"^p[0-9a-f]{20}$")
_RUN_ID = re.compile(r"^r[0-9a-f]{16}$")
_DATASET_ID = re.compile(r"^d[0-9a-f]{16}$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
_SUBJECT = re.compile(r"^/blobServices/default/containers/(?P<container>[^/]+)/blobs/(?P<blob>.+)$")


class MessageError(ValueError):
    """An input breaks its contract; ``field`` names the offending field (dotted, with indexes)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# -- requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunOptions:
    """Per-request options; ``None`` means the deployment's default (settings / project config)."""

    group_size: int | None = None
    min_accuracy: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    full: bool = False  # retrain every partition (default: only those whose data or config changed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainRequest:
    """Train from a raw file (ingest first) or from an ingested dataset (latest when neither)."""

    dataset: str | None = None
    dataset_id: str | None = None
    partitions: tuple[Any, ...] | None = None  # None = all partitions
    options: RunOptions = field(default_factory=RunOptions)
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "dataset_id": self.dataset_id,
            "partitions": list(self.partitions) if self.partitions is not None else None,
            "options": self.options.to_dict(),
            "request_id": self.request_id,
        }


@dataclass(frozen=True)
class PromoteRequest:
    run_id: str | None = None  # None = the latest training run
    min_accuracy: float | None = None
    origin: str | None = None
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreRequest:
    """Score a scoring file's rows, or the next ``horizon`` periods of every partition."""

    data: str | None = None
    horizon: int | None = None
    dataset_id: str | None = None
    options: RunOptions = field(default_factory=RunOptions)
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "horizon": self.horizon,
            "dataset_id": self.dataset_id,
            "options": self.options.to_dict(),
            "request_id": self.request_id,
        }


@dataclass(frozen=True)
class UpstreamMessage:
    """A parsed upstream message: its type and the request it stands for."""

    type: str
    request: TrainRequest | ScoreRequest
    etag: str | None = None


@dataclass(frozen=True)
class RawFile:
    """A new file in the raw container, identified by its storage location and ETag (its content version)."""

    path: str  # lake path: raw/... (a file, or the folder of a folder dataset)
    url: str
    etag: str | None  # None: the event carries no version (a rename); read it from the lake first
    size: int | None = None
    renamed_from: str | None = None  # the source URL of a rename, for the log
    marker: str | None = None  # a folder dataset: the lake path of its _SUCCESS (its version is the folder's)

    @property
    def is_folder(self) -> bool:
        return self.marker is not None

    @property
    def version_path(self) -> str:
        """The lake file whose ETag is this dataset's version: the file, or the folder's marker."""
        return self.marker or self.path

    @property
    def identity(self) -> str:
        """Account, container, blob and version: the same file version has one identity whichever
        endpoint names it (``dfs`` in ADLS events, ``blob`` in HTTP and upstream starts)."""
        if self.etag is None:
            raise ValueError(f"{self.path}: the file version is not known yet")
        return f"{storage_location(self.url)}|{normalise_etag(self.etag)}"


# -- JSON bodies -------------------------------------------------------------------------------
MAX_BODY_BYTES = 1 << 20  # a start request or message is small: ids, paths and a few options


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json_object(body: bytes | str, field_name: str = "body") -> dict[str, Any]:
    """Decode a UTF-8 JSON object; anything else is a MessageError on ``field_name``."""
    if len(body) > MAX_BODY_BYTES:
        raise MessageError(field_name, f"larger than {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
        value = json.loads(text, parse_constant=_no_constant) if text and text.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise MessageError(field_name, f"not valid UTF-8 JSON ({exc})") from exc
    except RecursionError as exc:
        raise MessageError(field_name, "JSON nested too deeply") from exc
    if not isinstance(value, dict):
        raise MessageError(field_name, "must be a JSON object")
    where = _unencodable(value, "")
    if where is not None:  # JSON's \ud800 escapes decode to text no UTF-8 encoder (hash, log, lake) takes
        raise MessageError(where or field_name, "not valid unicode: a lone surrogate (such as \\ud800); "
                                                "text must be encodable as UTF-8")
    return value


def _unencodable(value: Any, where: str) -> str | None:
    """The field (dotted, with indexes) of the first string or name that is not valid unicode, else None.

    A name that is not valid unicode is reported by the object holding it (it cannot be shown).
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _unencodable(item, f"{where}[{i}]")
            if found is not None:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            if _unencodable(key, where) is not None:
                return where
            found = _unencodable(item, f"{where}.{key}" if where else key)
            if found is not None:
                return found
    return None


def parse_train_request(body: Mapping[str, Any]) -> TrainRequest:
    _only(body, ("dataset", "dataset_id", "partitions", "options", "request_id"))
    dataset = _optional_lake_file(body, "dataset", (RAW_CONTAINER,))
    dataset_id = _optional_id(body, "dataset_id", _DATASET_ID, "'d' followed by 16 hex digits")
    if dataset and dataset_id:
        raise MessageError(
            "dataset_id", "give either 'dataset' (a raw file to ingest) or 'dataset_id', not both"
        )
    return TrainRequest(
        dataset=dataset,
        dataset_id=dataset_id,
        partitions=_partitions(body),
        options=_options(body),
        request_id=_request_id(body),
    )


def parse_promote_request(
    body: Mapping[str, Any], allowed: tuple[str, ...] = ("run_id", "min_accuracy", "request_id")
) -> PromoteRequest:
    _only(body, allowed)
    return PromoteRequest(
        run_id=_optional_id(body, "run_id", _RUN_ID, "'r' followed by 16 hex digits"),
        min_accuracy=_fraction(body.get("min_accuracy"), "min_accuracy"),
        origin=_optional_str(body, "origin"),
        request_id=_request_id(body),
    )


def parse_score_request(body: Mapping[str, Any], path_field: str = "data") -> ScoreRequest:
    _only(body, (path_field, "horizon", "dataset_id", "options", "request_id", "type"))
    horizon = body.get("horizon")
    if horizon is not None:
        horizon = _bounded_int(horizon, "forecast.horizon", "horizon")
    return ScoreRequest(
        data=_optional_lake_file(body, path_field, SCORING_CONTAINERS),
        horizon=horizon,
        dataset_id=_optional_id(body, "dataset_id", _DATASET_ID, "'d' followed by 16 hex digits"),
        options=_options(body),
        request_id=_request_id(body),
    )


def parse_upstream_message(body: bytes | str) -> UpstreamMessage:
    """Parse one upstream Service Bus message (see the module docstring for the contract)."""
    raw = load_json_object(body)
    kind = raw.get("type")
    if kind not in UPSTREAM_TYPES:
        raise MessageError("type", f"unknown message type {kind!r}; expected one of {list(UPSTREAM_TYPES)}")
    if kind == "dataset-ready":
        _only(raw, ("type", "path", "etag", "options"))
        path = _optional_lake_file(raw, "path", (RAW_CONTAINER,))
        if path is None:
            raise MessageError("path", "required: the lake path of the new raw file (raw/...)")
        etag = _optional_str(raw, "etag")
        return UpstreamMessage(kind, TrainRequest(dataset=path, options=_options(raw)), etag=etag)
    if kind == "retrain":
        _only(raw, ("type", "dataset_id", "partitions", "options"))
        if "partitions" not in raw:
            raise MessageError("partitions", 'required: a list of partition keys or ids, or "all"')
        request = TrainRequest(
            dataset_id=_optional_id(raw, "dataset_id", _DATASET_ID, "'d' followed by 16 hex digits"),
            partitions=_partitions(raw),
            options=_options(raw),
        )
        return UpstreamMessage(kind, request)
    return UpstreamMessage(kind, parse_score_request(raw, path_field="path"))


def parse_promotion_message(body: bytes | str) -> PromoteRequest:
    raw = load_json_object(body)
    if raw.get("type") != "promote":
        raise MessageError("type", f'expected "promote", got {raw.get("type")!r}')
    request = parse_promote_request(raw, allowed=("type", "run_id", "min_accuracy", "origin"))
    if request.run_id is None:
        raise MessageError("run_id", "required in a promotion message")
    return request


def promotion_message(run_id: str, min_accuracy: float | None, origin: str) -> str:
    """The promotion queue's message body for one finished training run."""
    return json.dumps(
        {"type": "promote", "run_id": run_id, "min_accuracy": min_accuracy, "origin": origin}, sort_keys=True
    )


# -- lake events -------------------------------------------------------------------------------
class Ignored(Exception):
    """A valid event that is not ours to act on (another container, another file type)."""


@dataclass(frozen=True)
class LakeEvent:
    """The fields we use of a storage event, whichever schema delivered it."""

    id: str | None
    type: str | None
    subject: str | None
    data: Any
    schema: str  # "EventGrid" | "CloudEvents"


def lake_event(event: Any) -> LakeEvent:
    """Read an event the worker decoded: ``func.EventGridEvent`` (Event Grid schema) or
    ``func.CloudEvent`` (CloudEvents 1.0, azure-functions >= 1.26), by their own attributes.

    An older azure-functions decodes a CloudEvents delivery as an ``EventGridEvent`` without an
    event type: that is refused with a MessageError naming the fix (never silently ignored). On
    Python <= 3.12 the worker uses its own bundled azure-functions unless the app setting
    ``PYTHON_ISOLATE_WORKER_DEPENDENCIES=1`` lets it load ours, so the fix may be that setting.
    """
    if hasattr(event, "specversion"):  # func.CloudEvent: ``type``, ``source``; no event_type
        return LakeEvent(event.id, event.type, event.subject, event.get_json(), "CloudEvents")
    event_type = getattr(event, "event_type", None)
    if event_type is None:
        raise MessageError(
            "eventType",
            "missing: a CloudEvents 1.0 delivery decoded by azure-functions older than 1.26 (on Python "
            "<= 3.12 the worker's bundled copy unless PYTHON_ISOLATE_WORKER_DEPENDENCIES=1); load "
            "azure-functions >= 1.26 or use the Event Grid schema on the subscription",
        )
    return LakeEvent(event.id, event_type, event.subject, event.get_json(), "EventGrid")


def parse_lake_file_event(event_type: str | None, subject: str | None, data: Any,
                          markers: tuple[str, ...] = FOLDER_MARKERS) -> RawFile:
    """A new file in the raw container, announced by a ``BlobCreated`` or a ``BlobRenamed`` event.

    Raises :class:`Ignored` for events we do not act on, :class:`MessageError` for malformed ones.
    """
    if event_type == BLOB_RENAMED:
        return parse_blob_renamed(subject, data, markers)
    return parse_blob_created(event_type, subject, data, markers)


def parse_blob_created(event_type: str | None, subject: str | None, data: Any,
                       markers: tuple[str, ...] = FOLDER_MARKERS) -> RawFile:
    """A ``BlobCreated`` event of the raw container as a RawFile.

    Raises :class:`Ignored` for events we do not act on, :class:`MessageError` for malformed ones.
    """
    if event_type != BLOB_CREATED:
        raise Ignored(f"event type {event_type!r} is neither {BLOB_CREATED} nor {BLOB_RENAMED}")
    data = _event_data(data)
    if data.get("api") in INCOMPLETE_APIS:
        raise Ignored(f"{data.get('api')}: the file is created but not written yet (FlushWithClose follows)")
    container, blob = _subject_blob(subject)
    url = _blob_url(data, "url", container, blob)
    etag = data.get("eTag")
    if not isinstance(etag, str) or not etag.strip('"'):
        raise MessageError("data.eTag", "missing: the ETag identifies the file version")
    size = data.get("contentLength")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise MessageError("data.contentLength", f"must be a non-negative integer, got {size!r}")
    path, marker = raw_dataset(f"{container}/{blob}", markers)
    return RawFile(path=path, url=url, etag=normalise_etag(etag), size=None if marker else size, marker=marker)


def parse_blob_renamed(subject: str | None, data: Any, markers: tuple[str, ...] = FOLDER_MARKERS) -> RawFile:
    """A file renamed into the raw container (ADLS Gen2 ``RenameFile``) as a RawFile without a version.

    The subject names the destination. A renamed directory is ignored with the reason: its event
    names no file, and the files inside it are announced by no event of their own.
    """
    data = _event_data(data)
    container, blob = _subject_blob(subject)
    api = data.get("api")
    if api != RENAMED_FILE_API:
        raise Ignored(
            f"{container}/{blob}: {api or 'a rename'} is not a file rename ({RENAMED_FILE_API}); rename "
            "files, not folders, into the raw container, or start the run with a dataset-ready message"
        )
    url = _blob_url(data, "destinationUrl", container, blob)
    source = data.get("sourceUrl")
    path, marker = raw_dataset(f"{container}/{blob}", markers)
    return RawFile(path=path, url=url, etag=None, renamed_from=source if isinstance(source, str) else None,
                   marker=marker)


def _event_data(data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise MessageError("data", "must be a JSON object")
    return data


def _subject_blob(subject: str | None) -> tuple[str, str]:
    """``(container, blob)`` of a storage event's subject."""
    match = _SUBJECT.match(subject or "")
    if not match:
        raise MessageError("subject", f"not a blob subject: {subject!r}")
    return match.group("container"), unquote(match.group("blob"))


def _blob_url(data: Mapping[str, Any], name: str, container: str, blob: str) -> str:
    """The event's URL of the blob, which must name the subject's blob."""
    url = data.get(name)
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise MessageError(f"data.{name}", "missing or not an http(s) URL")
    if not normalise_url(url).endswith(f"/{container}/{blob}"):
        raise MessageError(f"data.{name}", f"does not name the blob of the subject ({container}/{blob})")
    return url


def raw_dataset(name: str, markers: tuple[str, ...] = FOLDER_MARKERS) -> tuple[str, str | None]:
    """What an event's file starts: ``(file, None)`` for a single file; ``(folder, marker)`` for a
    marker of a folder dataset (``_SUCCESS``, or a manifest named in ``markers``); Ignored (with the
    reason) for a part file of one, which the folder's marker will start, and for anything else
    :func:`raw_lake_path` ignores."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf in markers:
        folder = name.rsplit("/", 1)[0]
        if folder.count("/") < 1:
            raise Ignored(f"{name}: a completion marker directly in {RAW_CONTAINER}/ names no folder")
        try:
            check_path(name)
        except LakeError as exc:
            raise MessageError("path", str(exc)) from exc
        if _hidden(folder):
            raise Ignored(f"{name}: the marker of a hidden or temporary folder")
        return folder, name
    path = raw_lake_path(name)
    if leaf.startswith(PART_PREFIXES) and path.count("/") >= 2:
        raise Ignored(f"{name}: a part file of a folder dataset; the folder is ingested once, when its "
                      f"{' or '.join(markers)} marker arrives")
    return path, None


def raw_lake_path(name: str) -> str:
    """``container/blob`` of a new file as a lake path under raw/, or Ignored with the reason."""
    container = name.split("/", 1)[0]
    if container != RAW_CONTAINER:
        raise Ignored(f"{name}: not in the {RAW_CONTAINER!r} container")
    if not name.lower().endswith(DATA_SUFFIXES):
        raise Ignored(f"{name}: not a data file ({', '.join(DATA_SUFFIXES)})")
    try:
        path = check_path(name)  # hostile paths first: they are malformed, not merely hidden
    except LakeError as exc:
        raise MessageError("path", str(exc)) from exc
    if _hidden(path):
        raise Ignored(
            f"{name}: a hidden or temporary path (a folder or file name starts with "
            f"{' or '.join(repr(p) for p in HIDDEN_PREFIXES)}, as Spark and Hadoop name work in progress)"
        )
    return path


def _hidden(path: str) -> bool:
    """A folder or file name below the container starts with ``_`` or ``.`` (work in progress)."""
    return any(part.startswith(HIDDEN_PREFIXES) for part in path.split("/")[1:])


def normalise_url(url: str) -> str:
    """One spelling per blob URL: lower-case scheme and host, decoded path, no query."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{unquote(parts.path)}"


def normalise_etag(etag: str) -> str:
    """An ETag without its quotes: Event Grid's ``data.eTag`` and the Blob API both quote it
    (``"0x8D..."``), some tools strip them; the version is the same."""
    return etag.strip().strip('"')


def storage_location(url: str) -> str:
    """``account/container/blob`` of a storage URL, the same for its ``blob`` and ``dfs`` endpoints.

    Host-style URLs (``https://acct.dfs.core.windows.net/raw/a.csv``) name the account in the host;
    path-style ones (Azurite, ``http://127.0.0.1:10000/devstoreaccount1/raw/a.csv``) in the first
    path segment. A local lake (``file://``) is named by its path.
    """
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.scheme.lower() == "file":
        return f"file:{path}"
    host = (parts.hostname or "").lower()
    segments = path.lstrip("/").split("/")
    if _path_style(host):
        account, segments = (segments[0], segments[1:]) if segments else ("", [])
    else:
        account = host.split(".", 1)[0]
    return f"{account}/{'/'.join(segments)}"


def check_lake_account(url: str, lake_uri: str) -> None:
    """Ignored unless ``url`` names a blob of the lake's own storage account (either endpoint).

    An event is JSON that names an account: one naming another account's blob must neither make the
    app ingest the lake's file of the same name nor start a run under another account's identity. A
    local lake (``file://``) has no account to compare: its events come from tests and tools.
    """
    if urlsplit(lake_uri).scheme.lower() == "file":
        return
    own = storage_location(lake_uri.rstrip("/") + "/").split("/", 1)[0]
    named = storage_location(url).split("/", 1)[0]
    if named != own:
        raise Ignored(f"{named!r} is not the lake's storage account {own!r}: only the lake's own events start runs")


def _path_style(host: str) -> bool:
    if host == "localhost" or "." not in host:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- identities --------------------------------------------------------------------------------
def instance_id(kind: str, *identity: Any) -> str:
    """A Durable instance id derived from content: the same input twice names the same instance."""
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return f"{kind}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:24]}"


def check_instance_id(value: str) -> str:
    if not _INSTANCE_ID.match(value or ""):
        raise MessageError(
            "instance_id", "letters, digits, '.', '_', ':' and '-' only, at most 100 characters"
        )
    return value


# -- field helpers -----------------------------------------------------------------------------
def _only(body: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise MessageError(unknown[0], f"unknown field; allowed: {list(allowed)}")


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise MessageError(name, "must be a non-empty string")
    return value.strip()


def _request_id(body: Mapping[str, Any]) -> str | None:
    value = _optional_str(body, "request_id")
    if value is not None and len(value) > 200:
        raise MessageError("request_id", "at most 200 characters")
    return value


def _optional_id(body: Mapping[str, Any], name: str, pattern: re.Pattern, shape: str) -> str | None:
    value = _optional_str(body, name)
    if value is not None and not pattern.match(value):
        raise MessageError(name, f"{value!r} is not an id of the form {shape}")
    return value


def _optional_lake_file(body: Mapping[str, Any], name: str, containers: tuple[str, ...]) -> str | None:
    value = _optional_str(body, name)
    if value is None:
        return None
    try:
        path = check_path(value)
    except LakeError as exc:
        raise MessageError(name, str(exc)) from exc
    if PurePosixPath(path).parts[0] not in containers or len(PurePosixPath(path).parts) < 2:
        raise MessageError(name, f"must be a lake path under {' or '.join(c + '/' for c in containers)}")
    if not path.lower().endswith(DATA_SUFFIXES):
        raise MessageError(name, f"must be a {' or '.join(DATA_SUFFIXES)} file")
    return path


def _bounded_int(value: Any, bound: str, name: str) -> int:
    """A JSON integer within its bound of the one table (:data:`shared.bounds.BOUNDS`), as the CLI's."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(name, f"must be {bounds.limit(bound).describe()}, got {bounds.shorten(value)}")
    return _in_bounds(value, bound, name)


def _in_bounds(value: Any, bound: str, name: str) -> Any:
    try:
        return bounds.check(bound, value, name)
    except bounds.BoundsError as exc:
        raise MessageError(name, exc.reason) from exc


def _fraction(value: Any, name: str) -> float | None:
    if value is None:
        return None
    return float(_in_bounds(value, "min_accuracy", name))


def _key_text(text: str, where: str) -> str:
    """A key column's name or value no longer than a partition key value may be at ingestion."""
    try:
        return bounds.check_length("key_length", text, where)
    except bounds.BoundsError as exc:
        raise MessageError(where, exc.reason) from exc


def _partitions(body: Mapping[str, Any]) -> tuple[Any, ...] | None:
    value = body.get("partitions", "all")
    if value == "all" or value is None:
        return None
    if not isinstance(value, list) or not value:
        raise MessageError("partitions", 'must be "all" or a non-empty list of partition ids or key objects')
    out: list[Any] = []
    for i, item in enumerate(value):
        where = f"partitions[{i}]"
        if isinstance(item, str):
            if not _PARTITION_ID.match(item):
                raise MessageError(where, f"{item!r} is not a partition id ('p' + 20 hex digits)")
            out.append(item)
        elif isinstance(item, dict) and item:
            for key, val in item.items():
                _key_text(key, f"{where}.{key[:40]}")
                if not isinstance(val, (str, int)) or isinstance(val, bool):
                    raise MessageError(f"{where}.{key}", "a key value must be a string or an integer")
                if isinstance(val, str):
                    _key_text(val, f"{where}.{key}")
            out.append(dict(sorted(item.items())))
        else:
            raise MessageError(where, "must be a partition id or an object of key values")
    return tuple(out)


def _options(body: Mapping[str, Any]) -> RunOptions:
    raw = body.get("options")
    if raw is None:
        return RunOptions()
    if not isinstance(raw, dict):
        raise MessageError("options", "must be a JSON object")
    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        raise MessageError(f"options.{unknown[0]}", f"unknown option; allowed: {list(OPTION_NAMES)}")
    group_size = raw.get("group_size")
    if group_size is not None:
        group_size = _bounded_int(group_size, "group_size", "options.group_size")
    try:  # data only: allow-listed options with typed, bounded values (never estimators or paths)
        config = check_message_overrides(raw.get("config") or {})
    except ConfigError as exc:
        raise MessageError("options.config", str(exc)) from exc
    full = raw.get("full", False)
    if not isinstance(full, bool):
        raise MessageError("options.full", "must be true or false")
    return RunOptions(
        group_size=group_size,
        min_accuracy=_fraction(raw.get("min_accuracy"), "options.min_accuracy"),
        config=dict(config),
        full=full,
    )
