"""The Azure ML parallel job contract, run on a local pool of worker processes.

An entry script is a module with ``init()`` (called once per worker, after ``sys.argv`` is set to
the script's arguments) and ``run(mini_batch)`` (called per mini-batch of file paths; returns one
JSON line per partition, or a pandas DataFrame). Azure ML runs exactly that module on a cluster;
:func:`run_parallel` runs it on this machine, so what the tests exercise is what runs in Azure.

Why a small pool of our own rather than ``concurrent.futures``: each worker has a private pipe,
so when one dies (``kill -9``, the OOM killer) the parent knows exactly which mini-batch it held,
retries only that one, and replaces only that worker; the others never stop. A broken
``ProcessPoolExecutor`` fails every pending future and cannot say which batch killed it.

Workers die with their parent: on Linux the kernel sends each worker SIGKILL when the parent
dies (``prctl(PR_SET_PDEATHSIG)``), and everywhere a watchdog thread in the worker exits as soon
as its parent process is gone (re-parented), even in the middle of a batch. A forked worker also
closes the parent's ends of its siblings' pipes, which it inherits: otherwise each worker keeps
the others' pipes open and none sees end-of-file when the parent dies.

Per mini-batch the parent sends a list of file paths and receives short JSON lines, so the
engine's own cost is a pipe round trip (tens of microseconds), never a pickled data frame.
"""
from __future__ import annotations

import gc
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from shared import bounds, faults
from shared.config import RunnerSpec
from shared.errors import ManyModelsError
from shared.lake import atomic_write

# Environment variables read by the BLAS / OpenMP runtimes when they first load. A worker of a
# process pool must stay single-threaded, or N workers x N threads oversubscribe the cores.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


PDEATHSIG = True  # Linux: the kernel kills a worker when its parent dies (tests turn it off)
WATCHDOG_SECONDS = 0.5  # how often a worker checks that its parent is still there
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RunnerError(ManyModelsError, RuntimeError):
    """The run as a whole cannot go on (an entry script's init() failed, bad arguments)."""


@dataclass
class RunnerOutcome:
    """What a parallel run produced.

    ``rows`` are in mini-batch order (not completion order), so two runs over the same files give
    the same list. ``batches_done`` counts batches finished in this call, ``batches_skipped``
    those whose result file already existed (reused, not rerun).
    """

    rows: list[dict[str, Any]]
    batches_total: int
    batches_done: int
    batches_skipped: int
    failed_batches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed_batches


@dataclass
class _Batch:
    index: int
    files: list[str]
    result_path: Path
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


def run_parallel(
    entry: str,
    files: Sequence[str | os.PathLike[str]],
    args: Sequence[str],
    spec: RunnerSpec,
    results_dir: Path,
    total_items: int | None = None,
    desc: str = "",
    in_process: bool = False,
) -> RunnerOutcome:
    """Run ``entry``'s ``init()``/``run(mini_batch)`` over ``files`` on a process pool.

    Mini-batches are consecutive chunks of ``spec.mini_batch_size`` files; each finished one is
    written atomically to ``results_dir/<stem of its first file>.jsonl``. A batch whose result
    file exists is skipped and its rows reused, so rerunning after a crash redoes only the rest.
    A batch whose ``run()`` raised or whose worker died is retried ``spec.retries`` times, then
    listed in ``failed_batches`` while the others finish.

    ``in_process=True`` runs everything in this process, one batch after another (for a
    debugger); the results are the same, but a batch that kills its process kills the caller.
    """
    started = time.perf_counter()
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    batches = _plan_batches([os.fspath(f) for f in files], spec.mini_batch_size, results_dir)
    rows_by_batch: dict[int, list[dict[str, Any]]] = {}
    pending: list[_Batch] = []
    for batch in batches:
        if batch.result_path.is_file():
            rows_by_batch[batch.index] = _read_rows(batch.result_path)
        else:
            pending.append(batch)
    skipped = len(batches) - len(pending)
    failed: list[dict[str, Any]] = []

    bar_total = total_items if total_items is not None else len(batches)
    initial = sum(len(r) for r in rows_by_batch.values()) if total_items is not None else skipped
    with _Bar(total=bar_total, initial=min(initial, bar_total), desc=desc or entry.rsplit(".", 1)[-1],
              unit="item" if total_items is not None else "batch", file=sys.stderr,
              disable=None if spec.progress else True, dynamic_ncols=True) as bar:

        def finished(batch: _Batch, lines: list[str] | None, error: str | None) -> bool:
            """Record one attempt's result; False when the batch should be tried again."""
            if error is None and lines is not None:
                try:
                    rows = [_parse_row(line) for line in lines]
                except ValueError as exc:  # a broken line will not get better on retry
                    batch.errors.append(str(exc))
                    failed.append(_failure(batch))
                    return True
                _write_lines(batch.result_path, lines)
                rows_by_batch[batch.index] = rows
                bar.update(len(rows) if total_items is not None else 1)
                return True
            batch.errors.append(error or "unknown error")
            if batch.attempts <= spec.retries:
                return False
            failed.append(_failure(batch))
            return True

        if pending:
            if in_process:
                _run_in_process(entry, list(args), pending, finished)
            else:
                workers = bounds.worker_count(spec.workers)  # at most WORKERS_PER_CPU per CPU
                _Pool(entry, list(args), min(workers, len(pending))).run(pending, finished)

    return RunnerOutcome(
        rows=[row for i in sorted(rows_by_batch) for row in rows_by_batch[i]],
        batches_total=len(batches),
        batches_done=len(batches) - skipped - len(failed),
        batches_skipped=skipped,
        failed_batches=sorted(failed, key=lambda f: f["files"]),
        seconds=time.perf_counter() - started,
    )


class _Bar(tqdm):
    """tqdm without its monitor thread: the pool forks workers, and forking beside a thread
    that may hold a lock is how child processes deadlock."""

    monitor_interval = 0


# -- planning and result files -------------------------------------------------------------

def _plan_batches(files: list[str], size: int, results_dir: Path) -> list[_Batch]:
    if size < 1:
        raise RunnerError(f"mini_batch_size must be >= 1, got {size}")
    batches: list[_Batch] = []
    seen: dict[str, str] = {}
    for index, start in enumerate(range(0, len(files), size)):
        chunk = files[start:start + size]
        stem = Path(chunk[0]).stem
        if stem in seen:
            raise RunnerError(
                f"mini-batches starting with {seen[stem]!r} and {chunk[0]!r} would share the result "
                f"file {stem}.jsonl; give the input files distinct names")
        seen[stem] = chunk[0]
        batches.append(_Batch(index, chunk, results_dir / f"{stem}.jsonl"))
    return batches


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [_parse_row(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parse_row(line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"run() returned a line that is not JSON: {line[:200]!r} ({exc})") from exc
    if not isinstance(row, dict):
        raise ValueError(f"run() returned a line that is not a JSON object: {line[:200]!r}")
    return row


def _write_lines(path: Path, lines: list[str]) -> None:
    """Temp file + rename: a result file exists only when its batch is completely done."""
    atomic_write(path, lambda fh: fh.write("".join(line + "\n" for line in lines).encode("utf-8")))


def _failure(batch: _Batch) -> dict[str, Any]:
    return {"files": list(batch.files), "error": batch.errors[-1], "attempts": batch.attempts,
            "errors": list(batch.errors)}


def _to_lines(result: Any) -> list[str]:
    """run() may return a list (of JSON strings or dicts) or a DataFrame, as Azure ML allows."""
    if isinstance(result, (list, tuple)):
        return [item if isinstance(item, str) else json.dumps(item, default=str) for item in result]
    if hasattr(result, "to_json") and hasattr(result, "columns"):
        if len(result) == 0:
            return []
        text = result.to_json(orient="records", lines=True, date_format="iso")
        return [line for line in text.splitlines() if line]
    raise TypeError("run() must return a list of JSON strings or a pandas DataFrame, "
                    f"got {type(result).__name__}")


# -- the worker side -----------------------------------------------------------------------

def _limit_threads() -> None:
    """One thread per worker: env vars for runtimes loaded later, threadpoolctl for loaded ones."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def _load_entry(entry: str, args: list[str]) -> Any:
    sys.argv = [entry, *args]
    module = importlib.import_module(entry)
    if not callable(getattr(module, "run", None)):
        raise RunnerError(f"entry script {entry} has no run(mini_batch) function")
    init = getattr(module, "init", None)
    if callable(init):
        init()
    return module


def _die_with_parent(parent_pid: int) -> None:
    """Make sure this worker does not outlive ``parent_pid``: the kernel's parent-death signal on
    Linux, and a watchdog thread everywhere (it also covers a parent that died before prctl)."""
    if PDEATHSIG and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl here: the watchdog below still stops us
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent_pid:  # re-parented: the parent is gone, so is its run
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_main(conn: multiprocessing.connection.Connection, entry: str, args: list[str],
                 parent_pid: int | None = None,
                 siblings: Sequence[multiprocessing.connection.Connection] = ()) -> None:
    """A worker: init() once, then run(mini_batch) for each (index, files) message until None."""
    for inherited in siblings:  # the parent's ends of the other workers' pipes (forked copies)
        inherited.close()
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    _limit_threads()
    try:
        module = _load_entry(entry, args)
        _limit_threads()  # again: init() may have loaded an OpenMP runtime (scikit-learn)
    except BaseException:  # reported to the parent, which stops the run with this text
        conn.send(("init_failed", None, traceback.format_exc()))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            break
        index, files = message
        try:
            faults.point(f"worker.{entry.rsplit('.', 1)[-1]}")
            conn.send(("ok", index, _to_lines(module.run(files))))
        except BaseException:  # one batch's error is that batch's result, retried by the parent
            conn.send(("error", index, traceback.format_exc()))
    shutdown = getattr(module, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _start_method() -> str:
    """fork on Linux: a worker starts in milliseconds with pandas and scikit-learn already
    imported; spawn elsewhere (macOS and Windows cannot fork safely)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


class _Worker:
    """One worker process and its private pipe; ``batch`` is what it holds, ``ready`` whether
    its init() has finished."""

    def __init__(self, ctx: Any, entry: str, args: list[str],
                 siblings: Sequence[multiprocessing.connection.Connection] = ()) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        # a forked child inherits the parent's end of its own and every sibling's pipe: it closes
        # them first (a spawned child inherits nothing, and passing them would duplicate them)
        forked = ctx.get_start_method() == "fork"
        self.process = ctx.Process(
            target=_worker_main,
            args=(child, entry, args, os.getpid(), [*siblings, self.conn] if forked else []),
            daemon=True,
        )
        # Forked children share the parent's heap copy-on-write; a child's garbage collector
        # walking the parent's objects would touch (and copy) every page and stall the worker.
        # Freezing moves them out of the collector's reach for the children.
        gc.freeze()
        try:
            self.process.start()
        finally:
            gc.unfreeze()
        child.close()
        self.batch: _Batch | None = None
        self.ready = False

    def assign(self, batch: _Batch) -> None:
        batch.attempts += 1
        self.batch = batch
        self.conn.send((batch.index, batch.files))

    def receive(self) -> tuple[str | None, Any]:
        """The worker's next message as (kind, payload), ("died", text) if it is dead, or
        (None, None) when it woke us with neither."""
        try:
            if self.conn.poll():
                kind, index, payload = self.conn.recv()
                if kind in ("ok", "error") and (self.batch is None or index != self.batch.index):
                    raise RunnerError(f"worker answered batch {index} while holding "
                                      f"{self.batch.index if self.batch else 'none'}")
                return kind, payload
            if self.process.is_alive():
                return None, None
        except (EOFError, ConnectionResetError, OSError):
            pass  # the pipe broke: the process is dead or exiting
        self.process.join(10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        code = self.process.exitcode
        note = f" (signal {-code})" if code is not None and code < 0 else ""
        where = f" while running {self.batch.files}" if self.batch else ""
        return "died", f"worker process {self.process.pid} died with exit code {code}{note}{where}"

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass  # already exiting; killed below if it does not
            if timeout > 0:
                self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.conn.close()


class _Pool:
    """N workers, one private pipe each; a dead worker costs only its own batch an attempt."""

    def __init__(self, entry: str, args: list[str], workers: int) -> None:
        self.entry, self.args, self.size = entry, args, max(1, workers)
        self.ctx = multiprocessing.get_context(_start_method())

    def run(self, pending: list[_Batch], finished: Any) -> None:
        if self.ctx.get_start_method() == "fork":
            # import once in the parent so forked workers inherit it instead of importing again
            try:
                importlib.import_module(self.entry)
            except ImportError as exc:
                raise RunnerError(f"cannot import entry script {self.entry}: {exc}") from exc
        queue = deque(pending)
        workers: list[_Worker] = []
        startup_deaths = 0
        try:
            while queue or any(w.batch for w in workers):
                for worker in workers:
                    if worker.batch is None and queue:
                        worker.assign(queue.popleft())
                while queue and len(workers) < self.size:
                    workers.append(_Worker(self.ctx, self.entry, self.args, [w.conn for w in workers]))
                    workers[-1].assign(queue.popleft())
                ready = set(multiprocessing.connection.wait(
                    [w.conn for w in workers] + [w.process.sentinel for w in workers]))
                for worker in [w for w in workers if w.conn in ready or w.process.sentinel in ready]:
                    kind, payload = worker.receive()
                    if kind is None:
                        continue
                    if kind == "ready":
                        worker.ready = True
                        continue
                    if kind == "init_failed":
                        raise RunnerError(f"init() of entry script {self.entry} failed:\n{payload}")
                    batch, worker.batch = worker.batch, None
                    if kind == "died":
                        workers.remove(worker)
                        worker.stop()
                        if not worker.ready:  # died before init() returned: not the batch's fault
                            startup_deaths += 1
                            if startup_deaths > max(3, self.size):
                                raise RunnerError(
                                    f"workers of {self.entry} keep dying while starting: {payload}")
                            if batch is not None:
                                batch.attempts -= 1
                                queue.appendleft(batch)
                            continue
                    if batch is None:
                        continue  # an idle worker died; a new one starts when there is work
                    ok = kind == "ok"
                    if not finished(batch, payload if ok else None, None if ok else payload):
                        queue.append(batch)
        finally:
            for worker in workers:  # busy ones only on an error or Ctrl-C: no point waiting for them
                worker.stop(timeout=5.0 if worker.batch is None else 0.0)


# -- the in-process path (debugging) -------------------------------------------------------

def _run_in_process(entry: str, args: list[str], pending: list[_Batch], finished: Any) -> None:
    saved_argv = sys.argv
    try:
        try:
            module = _load_entry(entry, args)
        except Exception as exc:
            raise RunnerError(f"init() of entry script {entry} failed: {exc}") from exc
        queue = list(pending)
        while queue:
            batch = queue.pop(0)
            batch.attempts += 1
            try:
                lines, error = _to_lines(module.run(list(batch.files))), None
            except Exception:  # recorded as this batch's error and retried, as in the pool
                lines, error = None, traceback.format_exc()
            if not finished(batch, lines, error):
                queue.append(batch)
    finally:
        sys.argv = saved_argv
