"""One writer per lake in the Functions app (issue 12): the blob lake's lease, the activities that hold it.

Against Azurite (a real Blob service on 127.0.0.1; skipped when it is not installed): two writers
contend and the second gets a clear, retryable error naming the first; a released lease lets the
next writer in at once; a holder killed with SIGKILL keeps the lease only until it expires (15 s,
the shortest lease the service grants), and a live holder's renewal keeps it past that. Then the
app's real activities on a blob lake whose lease someone else holds: each raises the retryable error
naming the holder and writes nothing, and the orchestrator's retry gets through once the lease is
free. Locally (no Azurite): the workdir lock is the writer lock, and code running under the CLI's
own lock does not lock again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from durable_harness import OrchestrationHarness, app_functions, call_activity
from shared.runs import backends, pipeline
from shared.errors import ManyModelsError
from shared.lake import LocalLake
from shared.locking import WorkdirLock, WorkdirLockedError, held_here
from shared.settings import Settings
from shared.data.synthetic import write_panel

ROOT = Path(__file__).resolve().parents[1]


# -- the lease itself ------------------------------------------------------------------------------------
@pytest.mark.azurite
def test_a_second_writer_waits_then_gets_a_retryable_error_naming_the_first(azurite_blob, tmp_path):
    from shared.azureml.blob_lake import BlobLake, LakeLease, LakeLeasedError

    lake = BlobLake.from_connection_string(azurite_blob.connection_string)
    ws = SimpleNamespace(lake=BlobLake.from_connection_string(azurite_blob.connection_string), root=tmp_path)
    first = LakeLease(lake, "register_trained_run of orchestration ingest-first").acquire()
    try:
        assert first.holder().command == "register_trained_run of orchestration ingest-first"
        started = time.monotonic()
        with pytest.raises(LakeLeasedError) as refused:
            with backends.writer_lease(ws, "plan_training_run of orchestration train-second", wait=1.0):
                pytest.fail("the second writer got in while the first held the lease")
        waited = time.monotonic() - started
        assert 1.0 <= waited < 5.0  # it waited the bounded time, then gave up
        error = refused.value
        assert isinstance(error, WorkdirLockedError) and isinstance(error, ManyModelsError) and error.retryable
        assert error.holder.command == "register_trained_run of orchestration ingest-first"
        assert error.holder.pid == os.getpid()
        text = str(error)
        assert "is being changed by 'register_trained_run of orchestration ingest-first'" in text
        assert "after waiting 1 s" in text and "'plan_training_run of orchestration train-second'" in text
        assert "retry" in text
    finally:
        first.release()
    assert first.holder() is None  # released: nobody holds it, and no stale description is left

    started = time.monotonic()  # a released lease lets the next writer in at once
    with backends.writer_lease(ws, "plan_training_run of orchestration train-second", wait=5.0) as lease:
        assert time.monotonic() - started < 1.0
        assert lease.holder().command == "plan_training_run of orchestration train-second"
    assert lease.holder() is None

    with pytest.raises(LakeLeasedError, match="lost the lease"):  # a lease lost mid-way fails the stage
        with backends.writer_lease(ws, "register_trained_run of orchestration stalled", wait=0) as lease:
            lease.lost = True  # what the renewal thread records when another lease id took the blob
    assert lease.holder() is None


@pytest.mark.azurite
def test_a_holder_that_stalled_past_its_lease_writes_nothing_once_another_writer_took_it(azurite_blob, tmp_path):
    """Fencing (issue 20, item 6): checked after the body, a lost lease let the stalled holder's writes
    interleave with the new holder's. Now every lake and SQL write of the holder checks it first."""
    from azure.storage.blob import BlobLeaseClient, BlobServiceClient

    from shared.azureml.blob_lake import BlobLake, LakeLease, LakeLeasedError
    from shared.results.result_store import SQLiteStore

    lake = BlobLake.from_connection_string(azurite_blob.connection_string)
    ws = SimpleNamespace(lake=lake, root=tmp_path)
    store = SQLiteStore(tmp_path / "results.sqlite")
    row = pd.DataFrame({"store": ["s"], "item": ["i"], "date": [pd.Timestamp("2024-01-07")], "prediction": [1.0],
                        "partition_id": ["p1"], "score_id": ["s1"]})
    with pytest.raises(LakeLeasedError, match="lost the lease"):
        with backends.writer_lease(ws, "register_trained_run of orchestration stalled", wait=0,
                                   duration=15) as lease:
            lake.write_bytes("runs/LATEST", b"r-before")  # held and fresh: written, with no extra request
            lease._stop.set()  # the process stalls: no more renewals ...
            lease._renewed_at -= 60  # ... for longer than the lease lasts
            leased = BlobServiceClient.from_connection_string(azurite_blob.connection_string) \
                .get_blob_client("runs", ".manymodels-writer")
            BlobLeaseClient(leased).break_lease(lease_break_period=0)  # expired, and another writer ...
            other = LakeLease(BlobLake.from_connection_string(azurite_blob.connection_string), "the next writer")
            other.acquire()  # ... holds it now
            try:
                with pytest.raises(LakeLeasedError):
                    lake.write_bytes("runs/LATEST", b"r-stalled")
                with pytest.raises(LakeLeasedError):
                    store.upsert_predictions(row)
                with pytest.raises(LakeLeasedError):
                    lake.delete("runs/LATEST")
            finally:
                other.release()
    assert lake.read_bytes("runs/LATEST") == b"r-before" and store.count("predictions") == 0
    store.close()
    lake.write_bytes("runs/LATEST", b"r-after")  # no lease held, nothing fenced: the CLI's own writes pass


@pytest.mark.azurite
def test_a_fresh_lease_fences_writes_without_a_request_each(azurite_blob, tmp_path, monkeypatch):
    from shared.azureml.blob_lake import BlobLake

    lake = BlobLake.from_connection_string(azurite_blob.connection_string)
    ws = SimpleNamespace(lake=lake, root=tmp_path)
    with backends.writer_lease(ws, "plan_training_run of orchestration busy", wait=0, duration=60) as lease:
        renewals = []
        real = lease._lease.renew
        monkeypatch.setattr(lease._lease, "renew", lambda *a, **k: (renewals.append(1), real(*a, **k))[1])
        for i in range(20):
            lake.write_bytes(f"runs/r1/part-{i}", b"x")
        assert renewals == []  # renewed under half a period ago: checked locally
        lease._renewed_at -= 40  # past half the period (the renewal thread starved): one renewal, then local
        for i in range(5):
            lake.write_bytes(f"runs/r1/part-{i}", b"y")
        assert renewals == [1]


@pytest.mark.azurite
@pytest.mark.slow
def test_a_killed_holder_keeps_the_lease_only_until_it_expires_and_renewal_outlives_the_period(
    azurite_blob, tmp_path
):
    """15 s leases (the shortest the service grants), run side by side to keep the test at ~17 s:
    a holder killed with SIGKILL stops renewing, and the next writer gets in within one period
    without anyone breaking the lease; a live holder's renewals keep its lease past the period."""
    from shared.azureml.blob_lake import BlobLake, LakeLease, LakeLeasedError

    class ProbeLease(LakeLease):  # the same lease on another blob, so both cases run at once
        PATH = "runs/.manymodels-writer-renewal-probe"

    script = (
        "import sys, time\n"
        "from shared.azureml.blob_lake import BlobLake, LakeLease\n"
        "LakeLease(BlobLake.from_connection_string(sys.argv[1]), 'promote_run of orchestration doomed',"
        " duration=15).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", script, azurite_blob.connection_string],
                              stdout=subprocess.PIPE, cwd=ROOT, env=env)
    lake = BlobLake.from_connection_string(azurite_blob.connection_string)
    live = ProbeLease(lake, "register_trained_run of orchestration alive", duration=15)
    try:
        assert holder.stdout.readline().strip() == b"held"
        live.acquire()
        renewed_from = time.monotonic()
        with pytest.raises(LakeLeasedError) as refused:
            LakeLease(lake, "plan_scoring_run of orchestration score-next").acquire()
        assert refused.value.holder.pid == holder.pid
        assert refused.value.holder.command == "promote_run of orchestration doomed"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        killed = time.monotonic()
        with LakeLease(lake, "plan_scoring_run of orchestration score-next", wait=40, poll=0.5) as lease:
            taken = time.monotonic()
            assert lease.holder().command == "plan_scoring_run of orchestration score-next"
        assert taken - killed <= 16.0, "the dead holder's lease outlived its period"
        time.sleep(max(0.0, renewed_from + 16.5 - time.monotonic()))  # past one period: renewals only
        with pytest.raises(LakeLeasedError, match="of orchestration alive"):
            ProbeLease(lake, "plan_scoring_run of orchestration score-next").acquire()
        assert not live.lost
    finally:
        live.release()
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_blob_leases_last_15_to_60_seconds():
    from shared.azureml.blob_lake import LakeLease
    from shared.lake import LakeError

    for duration in (5, 61):
        with pytest.raises(LakeError, match="15 to 60 seconds"):
            LakeLease(SimpleNamespace(), "x", duration=duration)


# -- the local lake: the workdir lock, never taken twice by one thread --------------------------------------
def test_on_a_local_lake_the_writer_lock_is_the_workdir_lock_and_not_taken_again_under_the_cli(tmp_path):
    ws = SimpleNamespace(lake=LocalLake(tmp_path / "lake"), root=tmp_path)
    with WorkdirLock(tmp_path, "manymodels train"):  # what the CLI holds for its whole command
        assert held_here(tmp_path)
        with backends.writer_lease(ws, "register", wait=0) as inner:
            assert inner is None  # the caller's own lock covers it: no second flock, no deadlock
        errors: list[BaseException] = []

        def other_thread() -> None:  # another thread is another writer
            assert not held_here(tmp_path)
            try:
                with backends.writer_lease(ws, "promote_run of orchestration p-1", wait=0.2):
                    pass
            except WorkdirLockedError as exc:
                errors.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(errors) == 1 and "'manymodels train'" in str(errors[0])
    assert not held_here(tmp_path)
    with backends.writer_lease(ws, "promote_run of orchestration p-1", wait=0) as lock:
        assert isinstance(lock, WorkdirLock) and held_here(tmp_path)
    assert not held_here(tmp_path)


# -- the app's activities on a blob lake ---------------------------------------------------------------
@pytest.fixture
def blob_app(azurite_blob, tmp_path, monkeypatch):
    """A workspace on the Azurite lake (local registries and SQLite in its workdir) with one
    ingested dataset and one planned run; the activities wait at most 0.5 s for the lease."""
    from azure.storage.blob import BlobServiceClient

    from shared.runs.workspace import Workspace

    workdir = tmp_path / "wd"
    for name, value in {"MM_WORKDIR": str(workdir), "MM_LAKE_BACKEND": "blob", "MM_COMPUTE_BACKEND": "local",
                        "MM_REGISTRY_BACKEND": "local", "LakeStorage": azurite_blob.connection_string}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(backends, "WRITER_WAIT_SECONDS", 0.5)
    service = BlobServiceClient.from_connection_string(azurite_blob.connection_string)
    csv = tmp_path / "sales.csv"
    write_panel(csv, partitions=4, periods=40, seed=5)
    ws = Workspace.open(settings=Settings.from_env(), overrides={"runner.progress": False}, remember=False)
    ws.lake.write_bytes("raw/lease/sales.csv", csv.read_bytes())
    ws.lake.write_bytes("raw/lease/future.csv", pd.read_csv(csv).drop(columns=["sales"]).head(8)
                        .to_csv(index=False).encode())
    ingested = pipeline.ingest(ws, "raw/lease/sales.csv")
    plan = pipeline.plan_training(ws, ingested.dataset_id)
    return SimpleNamespace(ws=ws, service=service, workdir=workdir, dataset_id=ingested.dataset_id,
                           run_id=plan.run_id)


def _state(app) -> set:
    """Every blob of the account (name and ETag) and every file of the workdir but the staging cache."""
    blobs = {(c.name, b.name, b.etag) for c in app.service.list_containers()
             for b in app.service.get_container_client(c.name).list_blobs()}
    files = {(str(p.relative_to(app.workdir)), p.stat().st_size, p.stat().st_mtime_ns)
             for p in app.workdir.rglob("*") if p.is_file() and ".cache" not in p.parts}
    return blobs | files


@pytest.mark.azurite
def test_writing_activities_refuse_with_the_holder_and_write_nothing_while_another_writer_holds_the_lake(
    blob_app,
):
    from azure.functions.servicebus import ServiceBusMessage

    from shared.azureml.blob_lake import LakeLease, LakeLeasedError

    functions = app_functions()
    calls = {
        "ingest_dataset": {"source": "raw/lease/sales.csv", "config": {}, "key": "ingest-mine"},
        "plan_training_run": {"dataset_id": blob_app.dataset_id, "partition_ids": None, "group_size": 2,
                              "config": {}, "full": True, "instance": "train-mine"},
        "register_trained_run": {"run_id": blob_app.run_id, "config": {}, "instance": "train-mine"},
        "promote_run": {"run_id": blob_app.run_id, "min_accuracy": 0.5, "config": {}, "instance": "promote-mine"},
        "plan_scoring_run": {"data": None, "horizon": None, "dataset_id": blob_app.dataset_id,
                             "group_size": 2, "config": {}, "instance": "score-mine"},
        "load_scored_predictions": {"score_id": "s0123456789abcdef", "config": {}, "instance": "score-mine"},
    }
    other = LakeLease(blob_app.ws.lake, "register_trained_run of orchestration ingest-other").acquire()
    try:
        before = _state(blob_app)
        for name, payload in calls.items():
            with pytest.raises(LakeLeasedError) as refused:
                call_activity(functions[name], payload, [])
            text = str(refused.value)
            assert "being changed by 'register_trained_run of orchestration ingest-other'" in text, name
            instance = payload.get("instance") or payload.get("key")
            assert f"'{name} of orchestration {instance}' needs it alone" in text, name
            assert refused.value.retryable
        body = json.dumps({"type": "promote", "run_id": blob_app.run_id, "origin": "train-mine"}).encode()
        message = ServiceBusMessage(body=body, message_id="m-1", delivery_count=1, application_properties={},
                                    user_properties={}, content_type="application/json")
        with pytest.raises(LakeLeasedError, match="ingest-other"):
            functions["on_promotion_message"].get_user_function()(message=message)
        # nothing shared written: not a pointer, not a registry or SQL row. The scoring plan prepared
        # its own request files before it asked for the lease to publish; it published nothing
        written = _state(blob_app) - before
        assert written and all(where == "scoring" for where, _, _ in written), written
    finally:
        other.release()


@pytest.mark.azurite
def test_a_refused_activity_is_retried_by_the_orchestrator_and_goes_through_once_the_lease_is_free(
    blob_app, monkeypatch
):
    """The real promote_run activity in the promotion orchestration (the harness plays the extension):
    the first attempt meets another writer's lease and fails naming it; the retry promotes."""
    from shared.azureml.blob_lake import LakeLease

    functions = app_functions()
    other = LakeLease(blob_app.ws.lake, "plan_training_run of orchestration train-other").acquire()
    seen: list = []
    real_promote = pipeline.promote

    def promote(ws, run_id, min_accuracy=None):  # the lease is this activity's while it promotes
        seen.append(LakeLease(ws.lake, "probe").holder().command)
        return real_promote(ws, run_id, min_accuracy=min_accuracy)

    monkeypatch.setattr(pipeline, "promote", promote)
    attempts: list = []

    def promote_run(payload):
        attempts.append(payload)
        try:
            return call_activity(functions["promote_run"], payload, [])
        finally:
            other.release()  # the other writer finishes while this one waits for its retry

    options = {"group_size": 2, "max_groups": 16, "poll_seconds": 60, "timeout_seconds": 300,
               "retry_first_ms": 1000, "retry_attempts": 3, "min_accuracy": 0.5, "config": {}}
    try:
        result = OrchestrationHarness(activities={"promote_run": promote_run}).run(
            "promote_orchestrator", {"run_id": blob_app.run_id, "options": options}, instance_id="promote-1")
    finally:
        other.release()
    assert result.status == "Completed", result.error
    assert len(attempts) == 2 and result.output["run_id"] == blob_app.run_id
    assert seen == ["promote_run of orchestration promote-1"]
    with LakeLease(blob_app.ws.lake, "after", wait=0):  # released at the end of the activity
        pass


# -- a scoring plan at scale: slices in O(groups) requests, the lease held for a handful -----------
@pytest.mark.azurite
@pytest.mark.slow
def test_a_scoring_plan_slices_the_registries_in_requests_per_group_and_holds_the_lease_for_a_few(
    azurite_blob, tmp_path
):
    """Issue 20, item 4. Planning used to copy every model of both registries (a download and an
    upload each, sequentially) under the lake's lease. Now: the same requests for 60 models as for
    240, one upload per group and registry for the slices; the lease held for a handful of requests
    (check the registries, write run.json), each 20 ms late here as on a distant account. The
    set-up and the counting transport are the benchmark's (``benchmarks/scoring_plan.py``)."""
    from benchmarks.scoring_plan import plan_over_blob, slice_uploads, under_lease
    from shared.registries.registry import ModelRegistry

    logs = []
    for partitions in (60, 240):  # one lake at a time: the second empties the first's
        run = plan_over_blob(azurite_blob.connection_string, tmp_path / f"wd{partitions}", partitions,
                             groups=4, latency=0.02)
        logs.append(run.log)
        assert len(run.plan.groups) == 4
        assert slice_uploads(run.log) == 8  # one index per group and registry; no artifact is copied
        # a slice opens over the registry folder and holds its group's newest models
        index = run.ws.lake.read_bytes(f"runs/{run.plan.score_id}/registry/g00002/prod/index.sqlite")
        (tmp_path / "slice.sqlite").write_bytes(index)
        sliced = ModelRegistry(run.prod.root, "prod", index=tmp_path / "slice.sqlite")
        assert 0 < sliced.count() - 1 <= len(run.partitions) // 4 + 1  # its share, and the global model
        sliced.close()
        held, seconds = under_lease(run.log)
        assert len(held) <= 10, [p for _, _, p in held]
        assert seconds < 1.0, seconds
    # the plan's requests do not grow with the number of models
    assert len(logs[0]) == len(logs[1]), (len(logs[0]), len(logs[1]))
