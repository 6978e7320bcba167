"""Connection limits of ``manymodels serve``: uvicorn's own settings, and the two it lacks.

uvicorn's settings, set by :func:`uvicorn_settings`:

- ``timeout_keep_alive`` (``MM_SERVING_KEEP_ALIVE_SECONDS``, 5): an idle connection between two
  requests is closed after it;
- ``h11_max_incomplete_event_size`` (16 KiB): a request line and headers larger than that are
  answered 400 and the connection closed;
- ``limit_concurrency`` (``MM_SERVING_MAX_CONNECTIONS`` + 1): a request arriving while more
  connections are open or more requests in flight is answered 503 (a backstop: the cap below keeps
  the open connections at ``MM_SERVING_MAX_CONNECTIONS``);
- ``backlog`` (2048): connections the kernel queues before the server accepts them.

What uvicorn lacks (0.55, h11): a deadline for a request to arrive — its keep-alive timer runs only
after a response and any byte received cancels it, so a connection that trickles its headers, or
never sends one, is held forever — and a cap on open connections — ``limit_concurrency`` answers
requests, it never closes a connection that has not finished one. 24,000 trickling connections
exhausted the process's 20,000 file descriptors; the server could accept nothing more and
``/health`` timed out. :class:`BoundedH11Protocol` adds both:

- a new connection beyond ``max_connections`` makes room by closing the open connection that has
  been idle longest (no request in flight: a trickler, a silent one, an idle keep-alive); if every
  connection has a request in flight, the new one is answered 503 and closed at once;
- a request's headers must arrive within ``read_seconds`` of the connection opening (or of the
  previous response); bytes trickling in buy no more time. The body has its own ``read_seconds``
  (:func:`shared.serving.app.create_app`: 408).

Each closing is counted (``/stats`` -> ``connections``) and logged as one summary line at most every
:data:`LOG_EVERY` seconds, never one line per connection.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.serving.cache import ServingOptions

logger = logging.getLogger(__name__)

BACKLOG = 2048
MAX_HEADER_BYTES = 16 * 1024
DESCRIPTOR_RESERVE = 256  # descriptors beyond the connections: listening socket, model files, logs, pipes
LOG_EVERY = 10.0
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"retry-after: 1\r\ncontent-length: 78\r\n\r\n"
            b'{"error":"the server is at its connection limit with every request in flight"}')
assert len(_REFUSED.split(b"\r\n\r\n", 1)[1]) == 78


class ConnectionStats:
    """Counts of connections closed by the limits, logged as one summary line at most every
    :data:`LOG_EVERY` seconds (the first at once, the rest gathered), never a line per connection."""

    def __init__(self, options: ServingOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self.counts = {"made_room": 0, "read_timeouts": 0, "refused": 0}
        self._logged = dict(self.counts)
        self._last_log = -LOG_EVERY
        self._pending: asyncio.TimerHandle | None = None
        self.open = 0

    def count(self, what: str) -> None:
        """Called on the event loop, by the protocol."""
        with self._lock:
            self.counts[what] += 1
            if self._pending is not None:
                return
            wait = LOG_EVERY - (time.monotonic() - self._last_log)
        if wait <= 0:
            self.flush()
        else:
            self._pending = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        with self._lock:
            new = {k: v - self._logged[k] for k, v in self.counts.items()}
            self._logged, self._last_log, self._pending = dict(self.counts), time.monotonic(), None
        if not any(new.values()):
            return
        logger.warning(
            "connections: closed %d idle to stay under MM_SERVING_MAX_CONNECTIONS=%d, closed %d that sent "
            "no whole request within MM_SERVING_READ_SECONDS=%g, refused %d (every connection busy) "
            "since the last report", new["made_room"], self.options.max_connections, new["read_timeouts"],
            self.options.read_seconds, new["refused"])

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"open": self.open, "max": self.options.max_connections, **self.counts}


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a request-read deadline (see the module)."""

    max_connections = 2000
    read_seconds = 10.0
    stats: ConnectionStats | None = None
    # connections by the time they last became idle, oldest first (one per server: see
    # bounded_protocol); a connection whose request is in flight is skipped and dropped when met,
    # and comes back when answered, so making room costs O(1) amortised, not a scan of them all
    idle_order: "OrderedDict[BoundedH11Protocol, None]" = OrderedDict()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm(None)
        if len(self.connections) > self.max_connections:
            self._make_room()
        if not self.transport.is_closing():
            self.idle_order[self] = None
        self._note_open()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.idle_order.pop(self, None)
        super().connection_lost(exc)
        self._note_open()

    def on_response_complete(self) -> None:
        answered = self.scope
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing():
            self.idle_order.pop(self, None)
            self.idle_order[self] = None  # idle since now: the newest
            self._arm(answered)

    # -- the cap -------------------------------------------------------------------------------
    def idle(self) -> bool:
        """No request in flight (none begun, or the last one answered)."""
        return self.cycle is None or self.cycle.response_complete

    def _make_room(self) -> None:
        while self.idle_order:
            oldest, _ = self.idle_order.popitem(last=False)
            if oldest is not self and oldest.idle() and not oldest.transport.is_closing():
                oldest._close("made_room")
                return
        self.connections.discard(self)
        self.transport.write(_REFUSED)
        self.transport.close()
        self._count("refused")

    # -- the read deadline -----------------------------------------------------------------------
    def _arm(self, answered: Any) -> None:
        """Close this connection unless a new request (a scope other than ``answered``) has begun
        within read_seconds."""
        self._disarm()
        self._deadline = self.loop.call_later(self.read_seconds, self._read_timed_out, answered)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _read_timed_out(self, answered: Any) -> None:
        self._deadline = None
        if self.scope is answered and self.idle() and not self.transport.is_closing():
            self._close("read_timeouts")

    def _close(self, why: str) -> None:
        self._disarm()
        self._unset_keepalive_if_required()
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # h11 refuses the event in some states: the socket closes anyway
            logger.debug("closing a connection h11 considers mid-message")
        self.connections.discard(self)
        self.idle_order.pop(self, None)
        self.transport.close()
        self._count(why)

    def _count(self, what: str) -> None:
        if self.stats is not None:
            self.stats.count(what)

    def _note_open(self) -> None:
        if self.stats is not None:
            self.stats.open = len(self.connections)


def bounded_protocol(options: ServingOptions, stats: ConnectionStats | None = None) -> type[BoundedH11Protocol]:
    """A :class:`BoundedH11Protocol` with ``options``' limits (uvicorn makes one per connection)."""
    return type("ServeH11Protocol", (BoundedH11Protocol,), {
        "max_connections": int(options.max_connections),
        "read_seconds": float(options.read_seconds),
        "stats": stats,
        "idle_order": OrderedDict(),
    })


def uvicorn_settings(options: ServingOptions, stats: ConnectionStats | None = None) -> dict[str, Any]:
    """The ``uvicorn.Config`` keywords for the connection limits of ``options``."""
    return {
        "http": bounded_protocol(options, stats),
        "ws": "none",
        "limit_concurrency": int(options.max_connections) + 1,
        "timeout_keep_alive": float(options.keep_alive_seconds),  # type: ignore[dict-item]
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "backlog": BACKLOG,
    }


def ensure_descriptors(options: ServingOptions) -> int:
    """Raise this process's open-file limit (soft, up to hard) to hold ``max_connections`` plus a
    reserve; refuse to start, naming the setting, when the hard limit is lower. Returns the limit."""
    try:
        import resource
    except ImportError:  # not on Windows
        return -1
    need = int(options.max_connections) + DESCRIPTOR_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ValueError(
            f"MM_SERVING_MAX_CONNECTIONS={options.max_connections} needs {need} open files, but this process "
            f"may open at most {hard} (ulimit -Hn): lower MM_SERVING_MAX_CONNECTIONS or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need
