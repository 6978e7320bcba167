"""One writer per workdir: a real second process holds the lock, is refused by name, dies, and the
lock is free again; a read-only workdir is a clear error (issue 12 item 5)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.errors import ManyModelsError
from shared.locking import (
    LOCK_FILE,
    WorkdirLock,
    WorkdirLockedError,
    WorkdirNotWritableError,
    check_writable,
    holder,
)

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from shared.locking import WorkdirLock
lock = WorkdirLock(sys.argv[1], sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
lock.release()
print("released", flush=True)
time.sleep(60)
"""


def hold(workdir: Path, command: str = "train --workdir x", seconds: float = 60.0) -> subprocess.Popen:
    """Another process that takes the workdir's lock, holds it ``seconds``, then idles."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), command, str(seconds)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, procs):
    procs.append(other := hold(tmp_path, "ingest --data sales.csv"))
    with pytest.raises(WorkdirLockedError) as refused:
        WorkdirLock(tmp_path, "train").acquire()
    message = str(refused.value)
    assert "ingest --data sales.csv" in message and f"pid {other.pid}" in message
    assert str(tmp_path) in message and "'train'" in message
    assert isinstance(refused.value, ManyModelsError)  # the CLI maps it to exit 2
    assert refused.value.holder.pid == other.pid
    assert holder(tmp_path).command == "ingest --data sales.csv"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, procs):
    procs.append(other := hold(tmp_path))
    os.kill(other.pid, signal.SIGKILL)
    other.wait(10)
    assert holder(tmp_path) is None  # the kernel released it with the process
    with WorkdirLock(tmp_path, "train") as lock:
        assert lock.held and holder(tmp_path).pid == os.getpid()
    assert holder(tmp_path) is None and (tmp_path / LOCK_FILE).read_text() == ""


def test_waiting_gets_the_lock_once_the_holder_finishes(tmp_path, procs):
    procs.append(other := hold(tmp_path, seconds=0.5))
    started = time.monotonic()
    with WorkdirLock(tmp_path, "promote", wait=20) as lock:
        assert lock.held and time.monotonic() - started < 15
    procs.append(hold(tmp_path))
    with pytest.raises(WorkdirLockedError, match="after waiting 0.3 s"):
        WorkdirLock(tmp_path, "score", wait=0.3).acquire()
    assert other.poll() is None  # the first holder released and idles: release is not exit


def test_two_locks_in_one_process_exclude_each_other_too(tmp_path):
    with WorkdirLock(tmp_path, "run"):
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path, "ingest").acquire()
    with WorkdirLock(tmp_path, "ingest"):
        pass


def test_readers_are_not_blocked(tmp_path, procs):
    procs.append(hold(tmp_path))
    assert holder(tmp_path) is not None  # asking who holds it never waits and never locks
    assert (tmp_path / LOCK_FILE).exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs mounted ro), so even root cannot write to it."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)],
                             capture_output=True)
    if mounted.returncode != 0:
        if os.geteuid() != 0:
            target.chmod(0o555)  # not root: permissions are enough
            yield target
            target.chmod(0o755)
            return
        pytest.skip(f"cannot mount a read-only file system here: {mounted.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_a_read_only_workdir_is_a_clear_error(read_only_dir):
    with pytest.raises(WorkdirNotWritableError) as caught:
        WorkdirLock(read_only_dir / "ws", "ingest").acquire()
    assert str(read_only_dir / "ws") in str(caught.value) and "not writable" in str(caught.value)
    with pytest.raises(WorkdirNotWritableError, match="read-only|permissions"):
        check_writable(read_only_dir)
    assert isinstance(caught.value, ManyModelsError)


def test_a_read_only_registry_is_a_clear_error(read_only_dir):
    from shared.registries.registry import ModelRegistry, RegistryError

    with pytest.raises(RegistryError, match="cannot be opened|cannot be written") as caught:
        ModelRegistry(read_only_dir / "registry" / "dev", "dev")
    assert "read-only" in str(caught.value)
