"""Failures of the environment, told as what they are: a full disk, a memory limit, SIGTERM.

The CLI's error boundary (:func:`shared.cli.main`) asks :func:`explain` about an unexpected
exception before printing its type and text: a full disk surfaces as ``OSError(ENOSPC)`` or as
SQLite's "database or disk is full" (and, before this module, as the "cannot rollback - no
transaction is active" that a second statement raised over it); an address-space limit
(``ulimit -v``) as ``MemoryError``, a ``SystemError`` "error return without exception set" from a
C extension that could not allocate, or an ``ImportError`` "failed to map segment". Each gets a
message that names the cause, the place and the fix.

SIGTERM (what ``kill``, systemd, Kubernetes and CI runners send) is turned into
:class:`Terminated` in the main process, so a command stops the way Ctrl-C stops it: the
workdir lock and leases are released by their context managers, a message is printed, and the
exit status is the conventional 128 + 15 = 143. Forked workers restore the default action first.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import threading
from typing import Iterator

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: the shell's convention for "ended by SIGTERM"
_MEMORY_WORDS = ("error return without exception set", "failed to map segment", "cannot allocate memory")


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (not an Exception: nothing swallows it)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in this process (the main thread only;
    elsewhere, e.g. a test's worker thread, nothing changes). The previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked worker inherited this handler: die as SIGTERM says
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException) -> bool:
    """Is a full disk (or quota) behind this exception or any it was raised from?"""
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(item, sqlite3.Error) and "disk is full" in str(item):
            return True
    return False


def memory_limit_kb() -> int | None:
    """The process's address-space limit (``ulimit -v``) in KB, or None when unlimited."""
    try:
        import resource
    except ImportError:  # not on this platform (Windows)
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else int(soft // 1024)


def is_out_of_memory(exc: BaseException) -> bool:
    for item in _chain(exc):
        if isinstance(item, MemoryError):
            return True
        if isinstance(item, (SystemError, ImportError, OSError)) and any(
                w in str(item).lower() for w in _MEMORY_WORDS):
            return True
    return False


def explain(exc: BaseException, workdir: str | os.PathLike[str] | None = None) -> str | None:
    """A message naming the environmental cause of ``exc`` and the fix, or None if it is not one."""
    if is_disk_full(exc):
        path = next((item.filename for item in _chain(exc)
                     if isinstance(item, OSError) and item.filename), None) or workdir or "the working folder"
        return (f"disk full: no space left on the device holding {path} ({type(exc).__name__}: "
                f"{str(exc)[:200]}); free space there (or use a workdir on a larger disk), then rerun the "
                "same command: it resumes where it stopped")
    if is_out_of_memory(exc):
        limit = memory_limit_kb()
        where = (f"the process's address-space limit (ulimit -v {limit} KB = {limit // 1024} MB)"
                 if limit is not None else "the memory available")
        return (f"out of memory: {where} was exhausted ({type(exc).__name__}: {str(exc)[:160] or 'no detail'}); "
                "raise the limit, or lower --workers and ingest.memory_mb, then rerun the same command")
    return None
