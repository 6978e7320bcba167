"""The errors of a real-time request: each carries its HTTP status and the JSON body the client gets.

400 names the bad field (``body``, ``keys.store``, ``rows[3].price``, ``horizon``), 404 names the
partition, 413 gives the limit, 503 gives the reason a model failed to load.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from shared.errors import ManyModelsError


class ServingError(ManyModelsError):
    """A request answered with an HTTP error; ``body()`` is the JSON the client gets."""

    status = 500

    def __init__(
        self,
        message: str,
        field: str | None = None,
        partition: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.partition = dict(partition) if partition else None
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "status": self.status}
        if self.field is not None:
            out["field"] = self.field
        if self.partition is not None:
            out["partition"] = self.partition
        out.update(self.extra)
        return out


class BadRequest(ServingError):
    status = 400


class PartitionNotFound(ServingError):
    status = 404


class PayloadTooLarge(ServingError):
    status = 413


class ModelUnavailable(ServingError):
    status = 503


class RequestTimeout(ServingError):
    """The request's lookup and forecast took longer than its time budget (503, Retry-After)."""

    status = 503


_ABSOLUTE_PATH = re.compile(r"file://[^\s'\"]*|(?<![\w:/.])(?:/[\w.@+-]+){2,}/?")


def redact_paths(text: str) -> str:
    """``text`` without absolute file paths (the server's folders are nobody's business)."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def redact(value: Any) -> Any:
    """A JSON body with every string's absolute paths replaced by ``<path>``."""
    if isinstance(value, str):
        return redact_paths(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value

