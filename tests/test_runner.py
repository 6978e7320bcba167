"""The local runner keeps the Azure ML parallel job contract, with real worker processes."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shared.config import RunnerSpec
from shared.runs.runner import RunnerError, run_parallel

ENTRY = "entry_fixture"


@pytest.fixture(autouse=True)
def _entry_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.fixture
def logs(tmp_path):
    path = tmp_path / "logs"
    path.mkdir()
    return path


def make_files(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.parquet"
        path.write_bytes(b"")
        paths.append(str(path))
    return paths


def spec(workers=2, mini_batch_size=1, retries=2) -> RunnerSpec:
    return RunnerSpec(workers=workers, mini_batch_size=mini_batch_size, retries=retries, progress=False)


def run_calls(logs: Path) -> list[list[str]]:
    return [json.loads(line) for f in logs.glob("run-*.log") for line in f.read_text().splitlines()]


def init_counts(logs: Path) -> dict[str, int]:
    return {f.name: len(f.read_text().splitlines()) for f in logs.glob("init-*.log")}


def test_every_file_is_run_once_with_the_arguments_and_rows_keep_batch_order(tmp_path, logs):
    files = make_files(tmp_path / "in", [f"batch-{i:05d}" for i in range(7)])
    out = run_parallel(ENTRY, files, ["--log-dir", str(logs), "--tag", "t1", "--ignored", "x"],
                       spec(workers=2, mini_batch_size=2), tmp_path / "results")

    assert out.ok and out.batches_total == 4 and out.batches_done == 4 and out.batches_skipped == 0
    assert [r["file"] for r in out.rows] == [Path(f).name for f in files]
    assert {r["tag"] for r in out.rows} == {"t1"}
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "batch-00000.jsonl", "batch-00002.jsonl", "batch-00004.jsonl", "batch-00006.jsonl"]
    assert sorted(len(c) for c in run_calls(logs)) == [1, 2, 2, 2]
    # init() once per worker process, and every run() happened in a process that ran init()
    counts = init_counts(logs)
    assert 1 <= len(counts) <= 2 and set(counts.values()) == {1}
    run_pids = {f.name.removeprefix("run-") for f in logs.glob("run-*.log")}
    assert run_pids <= {f.removeprefix("init-") for f in counts}


def test_a_failing_batch_is_retried_then_recorded_while_the_others_finish(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a", "b-fail", "c", "d"])
    out = run_parallel(ENTRY, files, ["--log-dir", str(logs)], spec(retries=1), tmp_path / "results")

    assert [r["file"] for r in out.rows] == ["a.parquet", "c.parquet", "d.parquet"]
    assert out.batches_done == 3 and not out.ok
    [failure] = out.failed_batches
    assert failure["files"] == [files[1]] and failure["attempts"] == 2
    assert "ValueError: cannot process b-fail.parquet" in failure["error"]
    assert not (tmp_path / "results" / "b-fail.jsonl").exists()
    assert sum(1 for call in run_calls(logs) if call == [files[1]]) == 2


def test_a_batch_that_fails_once_succeeds_on_retry(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a-flaky", "b"])
    out = run_parallel(ENTRY, files, ["--log-dir", str(logs)], spec(retries=1), tmp_path / "results")
    assert out.ok and [r["file"] for r in out.rows] == ["a-flaky.parquet", "b.parquet"]


def test_a_killed_worker_is_replaced_and_only_its_batch_is_retried(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a", "b-die", "c", "d", "e"])
    out = run_parallel(ENTRY, files, ["--log-dir", str(logs)], spec(workers=2), tmp_path / "results")

    assert out.ok, out.failed_batches
    assert [r["file"] for r in out.rows] == [Path(f).name for f in files]
    calls = run_calls(logs)
    assert sum(1 for c in calls if c == [files[1]]) == 2  # the killed batch, and its retry
    assert all(sum(1 for c in calls if c == [f]) == 1 for f in files if "die" not in f)
    # every run() happened in a worker that ran init() exactly once (a replacement runs its own)
    counts = init_counts(logs)
    assert set(counts.values()) == {1}
    run_pids = {f.name.removeprefix("run-") for f in logs.glob("run-*.log")}
    assert run_pids <= {f.removeprefix("init-") for f in counts}


def test_a_batch_that_always_kills_its_worker_fails_after_its_retries(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a", "b-doom", "c"])
    out = run_parallel(ENTRY, files, ["--log-dir", str(logs)], spec(retries=2), tmp_path / "results")

    assert [r["file"] for r in out.rows] == ["a.parquet", "c.parquet"]
    [failure] = out.failed_batches
    assert failure["attempts"] == 3 and "signal 9" in failure["error"]
    assert len(failure["errors"]) == 3


def test_a_rerun_reuses_result_files_and_calls_run_zero_times(tmp_path, logs):
    files = make_files(tmp_path / "in", [f"batch-{i}" for i in range(5)])
    args = ["--log-dir", str(logs)]
    first = run_parallel(ENTRY, files, args, spec(), tmp_path / "results")
    calls_after_first = run_calls(logs)

    second = run_parallel(ENTRY, files, args, spec(), tmp_path / "results")
    assert run_calls(logs) == calls_after_first
    assert second.batches_skipped == 5 and second.batches_done == 0
    assert second.rows == first.rows

    (tmp_path / "results" / "batch-3.jsonl").unlink()  # as if the run had died before batch 3
    third = run_parallel(ENTRY, files, args, spec(), tmp_path / "results")
    assert sorted(map(tuple, run_calls(logs))) == sorted([*map(tuple, calls_after_first), (files[3],)])
    assert third.batches_skipped == 4 and third.batches_done == 1
    assert [r["file"] for r in third.rows] == [r["file"] for r in first.rows]


def test_a_rerun_after_a_failure_redoes_only_the_failed_batch(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a", "b-flaky", "c"])
    args = ["--log-dir", str(logs)]
    first = run_parallel(ENTRY, files, args, spec(retries=0), tmp_path / "results")
    assert len(first.failed_batches) == 1 and len(first.rows) == 2

    second = run_parallel(ENTRY, files, args, spec(retries=0), tmp_path / "results")
    assert second.ok and second.batches_skipped == 2 and second.batches_done == 1
    assert [r["file"] for r in second.rows] == ["a.parquet", "b-flaky.parquet", "c.parquet"]


def test_a_dataframe_returned_by_run_becomes_rows(tmp_path, logs):
    files = make_files(tmp_path / "in", ["x-frame", "y"])
    out = run_parallel(ENTRY, files, ["--log-dir", str(logs), "--tag", "df"], spec(mini_batch_size=2),
                       tmp_path / "results")
    assert out.ok
    assert [(r["file"], r["tag"]) for r in out.rows] == [("x-frame.parquet", "df"), ("y.parquet", "df")]
    lines = (tmp_path / "results" / "x-frame.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == ["x-frame.parquet", "y.parquet"]


def test_a_line_that_is_not_json_fails_its_batch_without_retries(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a-garbage", "b"])
    out = run_parallel(ENTRY, files, ["--log-dir", str(logs)], spec(retries=2), tmp_path / "results")
    [failure] = out.failed_batches
    assert failure["attempts"] == 1 and "not JSON" in failure["error"]
    assert [r["file"] for r in out.rows] == ["b.parquet"]


def test_a_failing_init_stops_the_run_with_its_error(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a", "b"])
    with pytest.raises(RunnerError, match="init refuses the tag bad-init"):
        run_parallel(ENTRY, files, ["--log-dir", str(logs), "--tag", "bad-init"], spec(),
                     tmp_path / "results")
    assert list((tmp_path / "results").iterdir()) == []


def test_workers_that_die_in_init_stop_the_run_instead_of_looping(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a", "b", "c"])
    with pytest.raises(RunnerError, match="keep dying while starting"):
        run_parallel(ENTRY, files, ["--log-dir", str(logs), "--tag", "die-in-init"], spec(),
                     tmp_path / "results")
    assert run_calls(logs) == []


def test_batches_whose_first_files_share_a_name_are_refused(tmp_path, logs):
    files = make_files(tmp_path / "one", ["batch-0"]) + make_files(tmp_path / "two", ["batch-0"])
    with pytest.raises(RunnerError, match="share the result file batch-0.jsonl"):
        run_parallel(ENTRY, files, ["--log-dir", str(logs)], spec(), tmp_path / "results")


def test_one_worker_and_the_in_process_path_give_the_same_rows(tmp_path, logs):
    files = make_files(tmp_path / "in", ["a", "b-flaky", "c"])
    pooled = run_parallel(ENTRY, files, ["--log-dir", str(logs)], spec(workers=1), tmp_path / "r1")
    assert len(init_counts(logs)) == 1
    local = run_parallel(ENTRY, files, ["--log-dir", str(logs)], spec(workers=1), tmp_path / "r2",
                         in_process=True)
    assert [r["file"] for r in local.rows] == [r["file"] for r in pooled.rows]
    assert {r["pid"] for r in pooled.rows} != {r["pid"] for r in local.rows}



# -- workers die with their parent (issue 12 item 4) -------------------------------------------
PARENT = """
import sys
sys.path.insert(0, {tests!r})
import shared.runs.runner as runner
runner.PDEATHSIG = {pdeathsig!r}
from shared.config import RunnerSpec
runner.run_parallel("entry_fixture", {files!r}, ["--log-dir", {logs!r}],
                    RunnerSpec(workers=2, mini_batch_size=1, retries=0, progress=False), {results!r})
"""


@contextlib.contextmanager
def busy_pool(tmp_path: Path, logs: Path, pdeathsig: bool = True):
    """A real parent process running a 2-worker pool whose workers are both inside a long batch
    (writing a heartbeat file, as training writes models). Yields (parent, workers); afterwards
    the session it ran in is killed whole, so a failing test leaves no process behind."""
    files = make_files(tmp_path / "in", [f"slow-{i}" for i in range(4)])
    script = PARENT.format(tests=str(Path(__file__).parent), pdeathsig=pdeathsig, files=files,
                           logs=str(logs), results=str(tmp_path / "results"))
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1],
                              start_new_session=True)  # its own session: we can kill the parent alone
    try:
        deadline = time.monotonic() + 60
        while len(list(logs.glob("beat-*"))) < 2:
            assert parent.poll() is None, "the parent exited before its workers started"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
        workers = psutil.Process(parent.pid).children(recursive=True)
        assert len(workers) == 2
        yield parent, workers
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(10)
        try:
            os.killpg(parent.pid, signal.SIGKILL)  # only what this test started
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["parent-death-signal", "watchdog-only"])
def test_killing_only_the_parent_leaves_no_worker_alive(tmp_path, logs, pdeathsig):
    """kill -9 of the parent alone (not its process group): every worker is gone within 10 s and
    stops writing, by the kernel's parent-death signal or by the worker's own watchdog."""
    with busy_pool(tmp_path, logs, pdeathsig) as (parent, workers):
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
        beats = {p.name: p.read_text() for p in logs.glob("beat-*")}
        time.sleep(0.3)
        assert {p.name: p.read_text() for p in logs.glob("beat-*")} == beats  # nobody writes any more


def test_a_forked_worker_holds_no_pipe_end_of_the_parent(tmp_path, logs):
    """Each worker closes the parent's pipe ends it inherited (its own and its siblings'), so a
    dead parent means end-of-file on every worker's pipe."""

    def sockets(pid: int) -> set[str]:
        out = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:"):  # multiprocessing's duplex pipes are socket pairs
                out.add(target)
        return out

    with busy_pool(tmp_path, logs) as (parent, workers):
        held_by_parent = sockets(parent.pid)
        assert len(held_by_parent) >= 2
        for worker in workers:
            assert not sockets(worker.pid) & held_by_parent, "a worker holds one of the parent's pipe ends"
