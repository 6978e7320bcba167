"""One writer per workdir: an exclusive lock that names its holder and dies with it.

Commands that change a workdir (ingest, train, promote, score, run, demo...) hold a
:class:`WorkdirLock` for their whole run; read-only commands (``models list``, ``report`` of a
finished run) and the server take none and work alongside. A second writer is refused at once
with :class:`WorkdirLockedError`, whose message names the holder (command, process id, host and
start time), or waits up to ``wait`` seconds for it.

The lock is ``flock(LOCK_EX)`` on ``<workdir>/.manymodels.lock``. The kernel releases it when the
holder's last file descriptor closes, including when the holder is killed (``kill -9``, the OOM
killer): a stale lock cannot outlive its process, so there is nothing to clean up by hand. The
file's content (JSON: pid, command, host, started) only describes the holder; it is rewritten by
each new holder and never decides anything. Worker processes forked by the holder inherit the
descriptor, so the workdir stays locked while any of them still runs.

``flock`` is per machine (and unreliable on some network file systems): a workdir shared between
machines needs the lake's own lease (Blob leases for the Azure lake), not this lock.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.errors import ManyModelsError

LOCK_FILE = ".manymodels.lock"
POLL_SECONDS = 0.1
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# (resolved workdir, thread id) of every lock this process holds: held_here() answers from it
_HELD: set[tuple[str, int]] = set()


class WorkdirLockedError(ManyModelsError, RuntimeError):
    """Another command is changing the workdir; ``holder`` says which (or None if unknown)."""

    def __init__(self, message: str, holder: "LockHolder | None") -> None:
        super().__init__(message)
        self.holder = holder


class WorkdirNotWritableError(ManyModelsError, PermissionError):
    """The workdir (or the folder for it) cannot be written: read-only mount, permissions."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a workdir's lock, as its lock file says."""

    pid: int
    command: str
    host: str
    started: str

    def describe(self) -> str:
        return f"'{self.command}' (pid {self.pid} on {self.host}, since {self.started})"

    @classmethod
    def parse(cls, text: str) -> "LockHolder | None":
        try:
            raw = json.loads(text)
            return cls(int(raw["pid"]), str(raw["command"]), str(raw["host"]), str(raw["started"]))
        except (ValueError, KeyError, TypeError):
            return None


def check_writable(folder: Path | str, what: str = "workdir") -> Path:
    """Create ``folder`` if needed and prove it writable (a probe file), or raise
    :class:`WorkdirNotWritableError` naming it and the reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _not_writable(folder, what, exc) from exc
    return folder


def _not_writable(folder: Path, what: str, exc: OSError) -> WorkdirNotWritableError:
    reason = exc.strerror or str(exc)
    hint = ("the file system is read-only" if exc.errno == errno.EROFS
            else "check its permissions" if exc.errno in (errno.EACCES, errno.EPERM) else "check the path")
    return WorkdirNotWritableError(f"{what} {folder} is not writable ({reason}): {hint}; commands that "
                                   "change a workdir need a writable folder")


class WorkdirLock:
    """An exclusive, per-workdir writer lock (see the module docstring). Use as a context manager.

    ``command`` is what the holder does ("train", "run --data sales.csv"...), shown to whoever is
    refused. ``wait`` is how long :meth:`acquire` waits for a holder to finish (0: refuse at once).
    """

    def __init__(self, workdir: Path | str, command: str, wait: float = 0.0) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.command = command
        self.wait = float(wait)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WorkdirLock":
        if self._fd is not None:
            return self
        if sys.platform == "win32":  # pragma: no cover - the CLI and Functions run on Linux
            raise ManyModelsError("workdir locks need a POSIX system")
        import fcntl

        check_writable(self.workdir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _not_writable(self.workdir, "workdir", exc) from exc
        deadline = time.monotonic() + self.wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = _read_holder(fd)
                        raise WorkdirLockedError(self._refusal(holder), holder) from None
                    time.sleep(POLL_SECONDS)
            me = LockHolder(os.getpid(), self.command, socket.gethostname(),
                            datetime.now(timezone.utc).isoformat(timespec="seconds"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(me)).encode("utf-8"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._key = (str(self.workdir.resolve()), threading.get_ident())
        _HELD.add(self._key)
        return self

    def release(self) -> None:
        """Release the lock (the kernel does too when the process ends, however it ends)."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        _HELD.discard(getattr(self, "_key", None))  # type: ignore[arg-type]
        try:
            os.ftruncate(fd, 0)  # no holder any more: an old description never misleads
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _refusal(self, holder: LockHolder | None) -> str:
        who = holder.describe() if holder else "another command (its description is unreadable)"
        waited = f" after waiting {self.wait:g} s" if self.wait > 0 else ""
        return (f"workdir {self.workdir} is being changed by {who}{waited}; '{self.command}' needs it "
                "alone: wait for that command to finish (read-only commands and the server may run "
                "alongside)")

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock is released with its object, not at exit only
        if getattr(self, "_fd", None) is not None:
            _HELD.discard(getattr(self, "_key", None))  # type: ignore[arg-type]
            try:
                os.close(self._fd)
            except OSError:
                pass


def held_here(workdir: Path | str) -> bool:
    """Whether this thread holds ``workdir``'s lock already (the CLI does, for its whole command):
    code it calls must not lock the workdir again (a second ``flock`` in the same process would
    wait for the first). Another thread's lock does not count: it excludes this thread as any
    other writer's does."""
    return (str(Path(workdir).resolve()), threading.get_ident()) in _HELD


def holder(workdir: Path | str) -> LockHolder | None:
    """Who is changing ``workdir`` now, or None when nobody is (never blocks, never locks it)."""
    import fcntl

    path = Path(workdir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> LockHolder | None:
    try:
        return LockHolder.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except OSError:
        return None


# -- fencing: a writer that lost its lock writes nothing -----------------------------------------
_FENCES: list[Callable[[], None]] = []
_FENCES_LOCK = threading.Lock()


@contextmanager
def fenced(check: Callable[[], None]) -> Iterator[None]:
    """While the body runs, every shared-state write of this process first calls ``check``, which
    raises if the writer lock it stands for is no longer held (a blob lease lost in a stall)."""
    with _FENCES_LOCK:
        _FENCES.append(check)
    try:
        yield
    finally:
        with _FENCES_LOCK:
            _FENCES.remove(check)


def check_fences() -> None:
    """Called before each write to the lake or the SQL store: raises when a held lock was lost."""
    if not _FENCES:  # the common case (a local lake, the CLI): no cost
        return
    with _FENCES_LOCK:
        checks = list(_FENCES)
    for check in checks:
        check()
