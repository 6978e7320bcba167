"""The orchestrators under the Durable SDK's own replay: fan-out, retries, timeouts, sub-orchestrations.

Activities are scripted here (the compute jobs they would submit are the edge); the orchestrator
code, the SDK's replay and the history the harness builds are real. The core's own activities are
exercised end to end in tests/test_function_e2e.py.
"""

from __future__ import annotations

import ast
import json
import uuid
from datetime import datetime, timedelta, timezone

import azure.durable_functions as df
import pytest

from function_app.orchestration import HISTORY_TASKS

from durable_harness import (
    APP_ROOT,
    START,
    SUB_CREATED,
    TASK_SCHEDULED,
    TIMER_CREATED,
    ExtensionHang,
    NonDeterminism,
    OrchestrationHarness,
    RetryWhilePending,
    app_functions,
)

RUN_ID = "r0123456789abcdef"
OPTIONS = {
    "group_size": 2,
    "max_groups": 16,
    "poll_seconds": 60,
    "timeout_seconds": 300,
    "retry_first_ms": 1000,
    "retry_attempts": 3,
    "min_accuracy": 0.7,
    "config": {"forecast.horizon": 8},
    "full": False,
}


def ingest_result(partitions: int) -> dict:
    """What an ingestion returns (shared.entry.ingest.result_of): counts and lake paths."""
    return {
        "status": "completed",
        "source": "raw/sales.csv",
        "dataset_id": "d0123456789abcdef",
        "partitions": partitions,
        "rows": 100,
        "reused": False,
        "report_path": "prepared/d0123456789abcdef/dataset.json",
        "report": {"input_rows": 100, "output_rows": 100, "partitions": partitions, "counts": {}},
    }


class Jobs:
    """Scripted compute; per group: done | poll:N | never | fail-submit | flaky-submit | job-fails."""

    def __init__(self, behaviour: list[str], kind: str = "train") -> None:
        self.behaviour = behaviour
        self.kind = kind
        self.polls: dict[int, int] = {}
        self.submits: dict[int, int] = {}
        self.registered: list[dict] = []
        self.loaded: list[dict] = []

    def activities(self) -> dict:
        return {
            "plan_training_run": self.plan,
            "train_global_model": lambda p: {"run_id": p["run_id"], "global": False},
            "plan_scoring_run": self.plan,
            "submit_group_job": self.submit,
            "get_job_status": self.status,
            "register_trained_run": self.register,
            "send_promotion_message": lambda p: {
                "body": f"promote {p['run_id']} {p['min_accuracy']} {p['origin']}"
            },
            "load_scored_predictions": self.load,
            "ingest_dataset": lambda p: {  # the local backend: ingested inside the activity
                "job_id": "ingest-local-d0123456789abcdef",
                "kind": "ingest",
                "run_id": "d0123456789abcdef",
                "group_index": 0,
                "state": "completed",
                "detail": "ingested in process",
                "summary": ingest_result(2 * len(self.behaviour)),
            },
            "promote_run": lambda p: {"run_id": p["run_id"], "promoted": 3, "rejected": 1, "unchanged": 0},
        }

    def plan(self, payload: dict) -> dict:
        groups = [[f"prepared/d1/batches/batch-{i:05d}.parquet"] for i in range(len(self.behaviour))]
        key = "run_id" if self.kind == "train" else "score_id"
        return {
            key: RUN_ID if self.kind == "train" else "s0123456789abcdef",
            "dataset_id": "d0123456789abcdef",
            "groups": groups,
            "partitions": 2 * len(groups),
            "horizon": 8,
            "source": None,
        }

    def _handle(self, payload: dict, state: str, index: int, detail: str = "") -> dict:
        summary = {"partitions": 2, "statuses": {"trained": 2}} if state == "completed" else {}
        return {
            "job_id": f"{self.kind}-{payload['run_id']}-g{index:05d}",
            "kind": self.kind,
            "run_id": payload["run_id"],
            "group_index": index,
            "state": state,
            "detail": detail,
            "summary": summary,
        }

    def submit(self, payload: dict) -> dict:
        index = payload["group_index"]
        self.submits[index] = self.submits.get(index, 0) + 1
        how = self.behaviour[index]
        if how == "fail-submit" or (how == "flaky-submit" and self.submits[index] == 1):
            raise RuntimeError(f"compute quota exceeded for group {index}")
        return self._handle(payload, "completed" if how in ("done", "flaky-submit") else "queued", index)

    def status(self, payload: dict) -> dict:
        index = int(payload["job_id"].rsplit("-g", 1)[1])
        self.polls[index] = self.polls.get(index, 0) + 1
        how = self.behaviour[index]
        if how == "job-fails":
            return self._handle(payload, "failed", index, "mini-batch 3 raised MemoryError")
        if how.startswith("poll:") and self.polls[index] >= int(how.split(":")[1]):
            return self._handle(payload, "completed", index)
        return self._handle(payload, "running", index)

    def register(self, payload: dict) -> dict:
        self.registered.append(payload)
        return {"run_id": payload["run_id"], "trained": 4, "registered": 4, "failed": 0}

    def load(self, payload: dict) -> dict:
        self.loaded.append(payload)
        return {"score_id": payload["score_id"], "rows": 24, "partitions": 3}


def run_training(jobs: Jobs, **options) -> object:
    harness = OrchestrationHarness(activities=jobs.activities())
    return harness.run(
        "train_orchestrator",
        {"dataset_id": "d0123456789abcdef", "partition_ids": None, "options": {**OPTIONS, **options}},
        instance_id="train-abc",
    )


def _names(result) -> list[str]:
    return [name for name, _, _ in result.activity_calls]


def chunk(result, n: int = 0, parent: str = "train-abc", kind: str = "train"):
    """The sub-orchestration that started the ``n``-th chunk's group orchestrators."""
    return result.children[f"{parent}-{kind}-c{n:04d}"]


def group(result, index: int, n: int = 0, parent: str = "train-abc", kind: str = "train"):
    """The group orchestrator that followed group ``index`` (in chunk ``n``)."""
    return chunk(result, n, parent, kind).children[f"{parent}-{kind}-c{n:04d}-g{index:05d}"]


def every_orchestration(result) -> list:
    """The run and all its sub-orchestrations, depth first."""
    return [result, *(r for child in result.children.values() for r in every_orchestration(child))]


def scheduled_while_pending(history: list[dict]) -> list[dict]:
    """Tasks an orchestrator scheduled while an earlier task was still pending: the pattern the
    extension's shim issues only after the task scheduled before it completes (one history: the
    last generation's)."""
    opened = {TASK_SCHEDULED, TIMER_CREATED, SUB_CREATED}
    closed = {5: "TaskScheduledId", 6: "TaskScheduledId", 8: "TaskScheduledId", 9: "TaskScheduledId",
              11: "TimerId"}
    pending: dict[int, int] = {}  # task id -> the episode that scheduled it
    found = []
    for event in history:  # an episode: its completions first, then the tasks it schedules
        if event["EventType"] in opened:
            if any(episode < event["_episode"] for episode in pending.values()):
                found.append(event)
            pending[event["EventId"]] = event["_episode"]
        elif event["EventType"] in closed:
            pending.pop(event[closed[event["EventType"]]], None)
    return found


def test_fan_out_submits_every_group_then_fans_in_to_one_registration_and_one_promotion_message():
    jobs = Jobs(["done", "poll:2", "done", "poll:1"])
    result = run_training(jobs)
    assert result.status == "Completed", result.error
    names = _names(result)
    assert names[:2] == ["plan_training_run", "train_global_model"]
    assert names[2:6] == ["submit_group_job"] * 4  # all groups submitted before any status check
    assert names.count("register_trained_run") == 1 and names.count("send_promotion_message") == 1
    assert names.index("register_trained_run") > max(i for i, n in enumerate(names) if n == "get_job_status")
    assert jobs.polls == {1: 2, 3: 1}
    out = result.output
    assert out["run_id"] == RUN_ID and out["groups_total"] == 4 and out["groups_failed"] == 0
    assert out["promotion_message"]["body"] == f"promote {RUN_ID} 0.7 train-abc"
    # the activities that write shared lake state name their orchestration (the writer lease's holder)
    assert jobs.registered == [{"run_id": RUN_ID, "config": {"forecast.horizon": 8}, "instance": "train-abc"}]
    assert result.activity_calls[0][1]["instance"] == "train-abc"


def test_progress_is_published_as_custom_status_while_groups_finish():
    result = run_training(Jobs(["done", "poll:3", "poll:1"]))
    live = chunk(result).custom_statuses  # the chunk's own status: live while its groups finish
    done = [s["groups_done"] for s in live if s and "groups_done" in s]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 3
    assert {1, 2} <= set(done)  # intermediate progress was visible while the run was live
    final = result.custom_status
    assert (
        final["stage"] == "promotion-queued" and final["models_trained"] == 6 and final["groups_failed"] == 0
    )
    assert final["chunk_prefix"] == "train-abc-train-c"  # where the parent's status points for live progress


def test_a_group_failing_after_its_retries_is_reported_while_the_others_complete():
    jobs = Jobs(["done", "fail-submit", "poll:2"])
    result = run_training(jobs)
    assert result.status == "Completed", result.error
    assert jobs.submits[1] == OPTIONS["retry_attempts"]
    out = result.output
    assert out["groups_failed"] == 1
    failed = out["failed_groups"][0]
    assert failed["group_index"] == 1 and failed["state"] == "failed"
    assert (
        "after 3 attempt(s)" in failed["reason"] and "compute quota exceeded for group 1" in failed["reason"]
    )
    assert "register_trained_run" in _names(result) and "send_promotion_message" in _names(result)
    assert result.custom_status["groups_failed"] == 1 and result.custom_status["models_trained"] == 4


def test_a_transient_submit_failure_is_retried_and_the_run_succeeds():
    jobs = Jobs(["flaky-submit", "done"])
    result = run_training(jobs)
    assert result.status == "Completed" and result.output["groups_failed"] == 0
    assert jobs.submits == {0: 2, 1: 1}
    retry_timer = [e for e in group(result, 0).events(TIMER_CREATED)]
    assert len(retry_timer) == 1  # the retry waited on a durable timer before the second attempt
    assert not group(result, 1).events(TIMER_CREATED) and not chunk(result).events(TIMER_CREATED)
    assert retry_timer[0]["FireAt"] == "2024-01-01T00:00:01.000000Z"


def test_a_failed_job_is_reported_with_the_reason_the_compute_gave():
    result = run_training(Jobs(["job-fails", "done"]))
    failed = result.output["failed_groups"]
    assert failed == [
        {
            "group_index": 0,
            "job_id": f"train-{RUN_ID}-g00000",
            "state": "failed",
            "reason": "mini-batch 3 raised MemoryError",
        }
    ]


def test_a_job_that_never_finishes_hits_the_monitor_timeout_on_durable_time():
    jobs = Jobs(["never", "done"])
    result = run_training(jobs)
    assert result.status == "Completed", result.error
    timed_out = result.output["failed_groups"][0]
    assert timed_out["state"] == "timeout" and "still running after 300 s" in timed_out["reason"]
    assert jobs.polls[0] == OPTIONS["timeout_seconds"] // OPTIONS["poll_seconds"]
    # the group's orchestrator slept on durable timers, one poll interval apart, on its own clock
    fire_times = [e["FireAt"] for e in group(result, 0).events(TIMER_CREATED)]
    expected = [(START + timedelta(seconds=60 * k)).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for k in range(1, 6)]
    assert fire_times == expected
    assert result.clock == START + timedelta(seconds=300)


def test_when_every_group_fails_the_orchestration_fails_with_the_reasons_and_registers_nothing():
    jobs = Jobs(["never", "fail-submit"])
    result = run_training(jobs)
    assert result.status == "Failed"
    assert "no group produced models (2 failed)" in result.error and "compute quota exceeded" in result.error
    assert jobs.registered == []
    assert "send_promotion_message" not in _names(result)


def test_large_fan_outs_run_in_sub_orchestrations_that_keep_the_parent_history_small():
    jobs = Jobs(["done", "poll:2", "done", "fail-submit", "done"])
    result = run_training(jobs, max_groups=2)
    assert result.status == "Completed", result.error
    children = sorted(result.children)
    assert children == ["train-abc-train-c0000", "train-abc-train-c0001", "train-abc-train-c0002"]
    created = result.events(SUB_CREATED)
    assert [e["InstanceId"] for e in created] == children
    parent_tasks = {e["Name"] for e in result.events(TASK_SCHEDULED)}
    assert "submit_group_job" not in parent_tasks and "get_job_status" not in parent_tasks
    # each chunk starts one group orchestrator per group (ids: the chunk's id and the group index)
    # and schedules nothing else: only the group orchestrators submit and poll
    started = {
        c: [(e["Name"], e["InstanceId"], json.loads(e["Input"])["group_index"])
            for e in result.children[c].events(SUB_CREATED)]
        for c in children
    }
    assert started == {
        c: [("group_orchestrator", f"{c}-g{i:05d}", i) for i in indexes]
        for c, indexes in zip(children, [[0, 1], [2, 3], [4]])
    }
    assert not [e for c in children for e in result.children[c].events(TASK_SCHEDULED)]
    assert all(e["Name"] == "submit_group_job" for e in group(result, 3, n=1).events(TASK_SCHEDULED))
    out = result.output
    assert (
        out["groups_total"] == 5 and out["groups_failed"] == 1 and out["failed_groups"][0]["group_index"] == 3
    )
    assert result.custom_status["chunks_total"] == 3 and result.custom_status["chunks_done"] == 3
    assert result.children["train-abc-train-c0001"].status == "Completed"


def test_replays_are_deterministic_two_identical_runs_write_identical_histories():
    first = run_training(Jobs(["done", "poll:2", "never"]))
    second = run_training(Jobs(["done", "poll:2", "never"]))
    assert first.history == second.history
    assert [r.history for r in every_orchestration(first)] == [r.history for r in every_orchestration(second)]
    assert group(first, 2).replays > 10  # replayed many times, each replay checked by the harness


def _careless_app() -> dict:
    """Deliberately wrong orchestrators: one reads the wall clock, one makes a random id."""
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def wall_clock_orchestrator(context: df.DurableOrchestrationContext):
        yield context.create_timer(datetime.now(timezone.utc) + timedelta(seconds=30))
        yield context.create_timer(datetime.now(timezone.utc) + timedelta(seconds=30))
        return "done"

    @app.orchestration_trigger(context_name="context")
    def random_id_orchestrator(context: df.DurableOrchestrationContext):
        yield context.call_activity("anything", {"job": uuid.uuid4().hex})
        yield context.call_activity("anything", {"job": uuid.uuid4().hex})
        return "done"

    return {f.get_function_name(): f for f in app.get_functions()}


@pytest.mark.parametrize("orchestrator", ["wall_clock_orchestrator", "random_id_orchestrator"])
def test_the_harness_catches_orchestrators_that_read_the_clock_or_make_random_ids(orchestrator):
    harness = OrchestrationHarness(functions=_careless_app(), activities={"anything": lambda p: None})
    with pytest.raises(NonDeterminism, match="changed earlier actions"):
        harness.run(orchestrator, None, clock=datetime.now(timezone.utc))


def test_scoring_fans_out_the_same_way_then_loads_predictions():
    jobs = Jobs(["done", "poll:1"], kind="score")
    harness = OrchestrationHarness(activities=jobs.activities())
    result = harness.run(
        "score_orchestrator",
        {"data": None, "horizon": 8, "dataset_id": "d0123456789abcdef", "options": OPTIONS},
        instance_id="score-abc",
    )
    assert result.status == "Completed", result.error
    assert result.output["score_id"] == "s0123456789abcdef" and result.output["loaded"]["rows"] == 24
    assert jobs.loaded == [{"score_id": "s0123456789abcdef", "config": {"forecast.horizon": 8},
                            "instance": "score-abc"}]
    assert result.activity_calls[0][1]["instance"] == "score-abc"
    assert result.custom_status["stage"] == "loaded" and result.custom_status["groups_done"] == 2


def test_scoring_fails_without_loading_when_no_group_produced_predictions():
    jobs = Jobs(["fail-submit"], kind="score")
    result = OrchestrationHarness(activities=jobs.activities()).run(
        "score_orchestrator", {"data": None, "horizon": None, "dataset_id": None, "options": OPTIONS}
    )
    assert result.status == "Failed" and "no group produced predictions" in result.error
    assert jobs.loaded == []


def test_ingestion_ingests_then_trains_the_new_dataset():
    jobs = Jobs(["done", "done"])
    harness = OrchestrationHarness(activities=jobs.activities())
    result = harness.run(
        "ingest_orchestrator",
        {"source": "raw/sales.csv", "trigger": {"etag": "0x1"}, "partition_ids": None, "options": OPTIONS},
        instance_id="ingest-abc",
    )
    assert result.status == "Completed", result.error
    names = _names(result)
    assert names[:2] == ["ingest_dataset", "plan_training_run"]
    plan_payload = result.activity_calls[1][1]
    assert plan_payload["dataset_id"] == "d0123456789abcdef" and plan_payload["group_size"] == 2
    assert result.output["ingested"]["partitions"] == 4 and result.output["training"]["run_id"] == RUN_ID
    assert result.custom_statuses[0]["stage"] == "ingesting"


# -- ingestion on Azure ML: a command job, submitted and polled like a group's job ------------------------
class IngestJob:
    """Scripted Azure ML ingestion: ``states`` are what successive status polls answer."""

    def __init__(self, states: list[str], detail: str = "", flaky_status: int = 0) -> None:
        self.states = states
        self.detail = detail
        self.flaky_status = flaky_status  # status checks that raise before answering
        self.submits: list[dict] = []
        self.polls: list[dict] = []

    def handle(self, state: str) -> dict:
        done = state == "completed"
        return {
            "job_id": "ingest-i0123456789abcdef",
            "kind": "ingest",
            "run_id": "i0123456789abcdef",
            "group_index": 0,
            "state": state,
            "detail": self.detail if state == "failed" else f"Azure ML {state.title()}",
            "summary": ingest_result(4) if done else {},
        }

    def submit(self, payload: dict) -> dict:
        self.submits.append(payload)
        return self.handle("queued")

    def status(self, payload: dict) -> dict:
        self.polls.append(payload)
        if self.flaky_status:
            self.flaky_status -= 1
            raise RuntimeError("Azure ML throttled the status check")
        return self.handle(self.states[min(len(self.polls), len(self.states)) - 1])

    def activities(self, jobs: Jobs) -> dict:
        return {**jobs.activities(), "ingest_dataset": self.submit, "get_ingest_job_status": self.status}


INGEST_INPUT = {"source": "raw/sales.csv", "trigger": {"etag": "0x1"}, "partition_ids": None, "options": OPTIONS}


def run_ingestion(job: IngestJob, **options) -> object:
    harness = OrchestrationHarness(activities=job.activities(Jobs(["done", "done"])))
    return harness.run(
        "ingest_orchestrator", {**INGEST_INPUT, "options": {**OPTIONS, **options}}, instance_id="ingest-abc"
    )


@pytest.mark.parametrize("start", ["train", "ingest"])
def test_a_full_retrain_request_reaches_the_training_plan_through_the_replay(start):
    result = (run_training(Jobs(["done", "done"]), full=True) if start == "train"
              else run_ingestion(IngestJob(["completed"]), full=True))
    assert result.status == "Completed", result.error
    plan_payload = next(p for n, p, _ in result.activity_calls if n == "plan_training_run")
    assert plan_payload["full"] is True


def test_azure_ml_ingestion_is_submitted_then_polled_on_durable_timers_then_training_starts():
    job = IngestJob(["running", "running", "completed"])
    result = run_ingestion(job)
    assert result.status == "Completed", result.error
    names = _names(result)
    assert names[:5] == ["ingest_dataset"] + ["get_ingest_job_status"] * 3 + ["plan_training_run"]
    # the submit holds the source's lake path, the run's config and the instance (the job's name key)
    assert job.submits == [{"source": "raw/sales.csv", "config": {"forecast.horizon": 8}, "key": "ingest-abc"}]
    assert job.polls == [{"config": {"forecast.horizon": 8}, "job_id": "ingest-i0123456789abcdef"}] * 3
    # one poll interval between status checks, from the orchestration's own clock
    fire_times = [e["FireAt"] for e in result.events(TIMER_CREATED)][:3]
    assert fire_times == [(START + timedelta(seconds=60 * k)).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for k in (1, 2, 3)]
    plan_payload = next(p for n, p, _ in result.activity_calls if n == "plan_training_run")
    assert plan_payload["dataset_id"] == "d0123456789abcdef"
    assert result.output["ingested"]["dataset_id"] == "d0123456789abcdef"
    assert result.output["ingested"]["report_path"] == "prepared/d0123456789abcdef/dataset.json"
    assert result.output["training"]["run_id"] == RUN_ID
    live = [s for s in result.custom_statuses if s and s.get("stage") == "ingesting"]
    assert live and live[-1]["job_id"] == "ingest-i0123456789abcdef"


def test_a_failed_ingestion_job_fails_the_orchestration_with_its_reason_and_trains_nothing():
    job = IngestJob(["running", "failed"], detail="column 'sales': not numeric (3 rows) (Azure ML Failed)")
    result = run_ingestion(job)
    assert result.status == "Failed"
    assert "ingestion of raw/sales.csv failed: job ingest-i0123456789abcdef" in result.error
    assert "column 'sales': not numeric (3 rows)" in result.error
    assert "plan_training_run" not in _names(result)


def test_a_flaky_status_check_is_retried_on_a_durable_timer_and_the_ingestion_completes():
    job = IngestJob(["completed"], flaky_status=1)
    result = run_ingestion(job)
    assert result.status == "Completed", result.error
    assert len(job.polls) == 2 and "plan_training_run" in _names(result)


def test_an_ingestion_job_that_never_finishes_times_out_on_durable_time():
    job = IngestJob(["running"])
    result = run_ingestion(job, timeout_seconds=300)
    assert result.status == "Failed"
    assert "job ingest-i0123456789abcdef still running after 300 s" in result.error
    assert len(job.polls) == 5 and result.clock == START + timedelta(seconds=300)


def test_a_long_ingestion_job_continues_as_new_and_keeps_the_history_bounded():
    polls, budget = 40, 10
    job = IngestJob(["running"] * (polls - 1) + ["completed"])
    result = run_ingestion(job, history_tasks=budget, timeout_seconds=60 * (polls + 5))
    assert result.status == "Completed", result.error
    assert len(job.submits) == 1, "the job is submitted once, whatever the generation"
    assert len(job.polls) == polls
    assert result.generations >= polls * 2 // budget
    assert result.max_history <= 4 * (budget + 2) + 40  # a generation's polls, or the training steps
    assert result.output["training"]["run_id"] == RUN_ID


def test_no_ingestion_payload_carries_rows_of_data():
    """Activity inputs and outputs are lake paths, ids and counts: small, whatever the data's size."""
    result = run_ingestion(IngestJob(["running", "completed"]))
    assert result.status == "Completed", result.error
    ingest_events = [e for e in result.history if e.get("Name") in ("ingest_dataset", "get_ingest_job_status")]
    completed = {e["TaskScheduledId"]: e for e in result.events(5)}  # TaskCompleted
    for event in ingest_events:
        assert len(event["Input"]) < 300, event["Input"]
        assert len(completed[event["EventId"]]["Result"]) < 1500
    for _, payload, _ in [c for c in result.activity_calls if c[0] in ("ingest_dataset", "get_ingest_job_status")]:
        assert set(payload) <= {"source", "config", "key", "job_id"}


def test_the_local_backend_ingests_in_the_activity_and_polls_nothing():
    result = OrchestrationHarness(activities=Jobs(["done"]).activities()).run(
        "ingest_orchestrator", INGEST_INPUT, instance_id="ingest-abc")
    assert result.status == "Completed", result.error
    assert "get_ingest_job_status" not in _names(result)
    assert not [e for e in result.events(TIMER_CREATED)]


def test_promotion_orchestrator_runs_the_rules_once_with_the_requested_threshold():
    calls = []
    harness = OrchestrationHarness(
        activities={
            "promote_run": lambda p: (
                calls.append(p) or {"run_id": p["run_id"], "promoted": 2, "rejected": 0, "unchanged": 1}
            )
        }
    )
    result = harness.run("promote_orchestrator", {"run_id": RUN_ID, "options": OPTIONS})
    assert result.status == "Completed" and result.output["promoted"] == 2
    assert calls == [{"run_id": RUN_ID, "min_accuracy": 0.7, "config": {"forecast.horizon": 8},
                      "instance": "test-instance"}]


def test_every_orchestrator_of_the_app_is_a_generator_the_sdk_can_replay():
    functions = app_functions()
    orchestrators = [
        n
        for n, f in functions.items()
        if f.get_bindings_dict()["bindings"][0]["type"] == "orchestrationTrigger"
    ]
    assert sorted(orchestrators) == [
        "group_chunk_orchestrator",
        "group_orchestrator",
        "ingest_orchestrator",
        "promote_orchestrator",
        "score_orchestrator",
        "train_orchestrator",
    ]


# -- what the real extension needs beyond the SDK's own replay ------------------------------------------
def _retry_in_task_any_app() -> dict:
    """The old monitor's pattern: retrying tasks in a task_any, new tasks scheduled while they are pending."""
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def retry_fan_out_orchestrator(context: df.DurableOrchestrationContext):
        retry = df.RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=3)
        tasks = [context.call_activity_with_retry("work", retry, i) for i in range(2)]
        first = yield context.task_any(tasks)
        yield context.call_activity("work", first.result)  # the other retrying task is still pending
        return "done"

    return {f.get_function_name(): f for f in app.get_functions()}


def test_the_harness_refuses_new_tasks_while_a_retrying_task_is_pending():
    """SDK issue 603: the extension and the 1.x SDK disagree on task ids after a retry; the instance hangs."""
    harness = OrchestrationHarness(functions=_retry_in_task_any_app(), activities={"work": lambda p: p})
    with pytest.raises(RetryWhilePending, match="while retrying task"):
        harness.run("retry_fan_out_orchestrator", None)


@pytest.mark.parametrize("behaviour", [["flaky-submit", "poll:2", "fail-submit"], ["done", "job-fails"]])
def test_no_orchestrator_schedules_work_while_a_retrying_task_is_pending(behaviour):
    """Retries are by hand (call_activity + durable timer), so the whole app passes the strict harness."""
    result = run_training(Jobs(behaviour))
    assert result.status == "Completed", result.error
    every = every_orchestration(result)
    assert all(e["EventType"] != TASK_SCHEDULED or e["Name"] for r in every for e in r.history)
    retried = [e for r in chunk(result).children.values() for e in r.events(TIMER_CREATED)]
    assert retried  # the flaky / failing submissions waited on durable timers between attempts


def test_long_jobs_continue_as_new_in_their_group_orchestrators_and_every_history_stays_bounded():
    """240 polls x 16 groups used to grow one history to ~20,000 events; now each group's
    orchestrator continues as new after its budget, and the chunk and the parent hold only one
    sub-orchestration per group / chunk."""
    groups, polls, budget = 4, 60, 30
    attempts = OPTIONS["retry_attempts"]
    jobs = Jobs([f"poll:{polls}"] * groups)
    result = run_training(jobs, history_tasks=budget, timeout_seconds=10 * 60 * polls)
    assert result.status == "Completed", result.error
    assert result.output["groups_failed"] == 0 and result.output["groups_total"] == groups
    assert jobs.polls == {g: polls for g in range(groups)}  # every job was followed to its end
    assert jobs.submits == {g: 1 for g in range(groups)}  # and submitted once, whatever the generation
    for g in range(groups):
        child = group(result, g)
        assert child.generations == -(-2 * polls // budget)  # a timer and a status call per poll
        # a generation holds at most budget + 2 x attempts - 1 tasks (the last poll's retries), each
        # four events (scheduled, completed, the orchestrator started / completed around them)
        assert child.max_history <= 4 * (budget + 2 * attempts - 1) + 4, child.max_history
    assert chunk(result).generations == 1
    assert chunk(result).max_history <= 4 * groups + 4, chunk(result).max_history
    assert result.max_history <= 40  # the parent only holds its steps and one sub-orchestration per chunk


def _group_input(behaviour: str = "poll:1", **options) -> dict:
    return {"kind": "train", "run_id": RUN_ID, "group_index": 0,
            "paths": ["prepared/d1/batches/batch-00000.parquet"], "options": {**OPTIONS, **options}}


def _throttled(jobs: Jobs, failures: int = 2) -> dict:
    """Jobs' activities with every status check failing ``failures`` times before it answers."""
    tries = [0]

    def status(payload: dict) -> dict:
        tries[0] += 1
        if tries[0] % (failures + 1):
            raise RuntimeError("Azure ML throttled the status check")
        return jobs.status(payload)

    return {**jobs.activities(), "get_job_status": status}


@pytest.mark.parametrize("numbering", ["extension", "sdk"])
@pytest.mark.parametrize("throttled", [False, True])
def test_a_group_orchestrator_follows_a_job_far_longer_than_its_budget_in_bounded_generations(
    numbering, throttled
):
    """One job polled 45 times with a budget of 10 tasks: nine generations or more (with throttled
    status checks, whose retries and timers count against the budget), each within budget + 2 x
    attempts - 1 tasks; submitted once, and the group's result as the chunk expects it."""
    budget, polls = 10, 45
    attempts = OPTIONS["retry_attempts"]
    jobs = Jobs([f"poll:{polls}"])
    activities = _throttled(jobs) if throttled else jobs.activities()
    harness = OrchestrationHarness(activities=activities, numbering=numbering)
    result = harness.run(
        "group_orchestrator", _group_input(history_tasks=budget, timeout_seconds=4 * 60 * polls),
        instance_id="train-abc-train-c0000-g00000", parent="train-abc-train-c0000",
    )
    assert result.status == "Completed", result.error
    assert result.output == {"group_index": 0, "job_id": f"train-{RUN_ID}-g00000", "state": "completed",
                             "reason": "", "partitions": 2, "statuses": {"trained": 2}}
    assert jobs.submits == {0: 1} and jobs.polls == {0: polls}
    tasks = 2 * polls * (attempts if throttled else 1)  # a timer and a status call per poll (+ retries)
    assert result.generations >= tasks // (budget + 2 * attempts - 1)
    assert result.generations >= 9
    assert result.max_history <= 4 * (budget + 2 * attempts - 1) + 4, result.max_history
    live = [s for s in result.custom_statuses if s]
    assert live[-1]["job_id"] == f"train-{RUN_ID}-g00000" and live[-1]["generation"] == result.generations - 1


def test_a_group_orchestrators_deadline_carries_over_its_generations():
    """A job still running at its deadline is a timeout (not canceled), counted from its submit
    across generations: 12 polls of 60 s with a budget of 6 tasks (three polls a generation)."""
    jobs = Jobs(["never"])
    harness = OrchestrationHarness(activities=jobs.activities())
    result = harness.run("group_orchestrator", _group_input(history_tasks=6, timeout_seconds=720))
    assert result.status == "Completed", result.error
    assert result.output["state"] == "timeout" and result.generations == 4
    assert result.output["reason"] == (
        f"job train-{RUN_ID}-g00000 still running after 720 s; it was not canceled"
    )
    assert jobs.polls == {0: 12} and result.clock == START + timedelta(seconds=720)


def test_a_group_whose_submission_or_status_checks_fail_every_attempt_is_a_failed_result_with_the_reason():
    jobs = Jobs(["fail-submit"])
    submitted = OrchestrationHarness(activities=jobs.activities()).run("group_orchestrator", _group_input())
    assert submitted.status == "Completed" and submitted.output["state"] == "failed"
    assert submitted.output["reason"] == (
        "submission failed after 3 attempt(s): RuntimeError: compute quota exceeded for group 0"
    )
    jobs = Jobs(["poll:2"])
    polled = OrchestrationHarness(activities=_throttled(jobs, failures=3)).run(
        "group_orchestrator", _group_input()
    )
    assert polled.status == "Completed" and polled.output["state"] == "failed"
    assert polled.output["job_id"] == f"train-{RUN_ID}-g00000"
    assert polled.output["reason"] == (
        "status check failed after 3 attempt(s): RuntimeError: Azure ML throttled the status check"
    )


def test_a_failed_group_orchestrator_is_a_failed_group_result_and_the_other_groups_complete():
    """An orchestrator failure (here a status answer without a state) is the group's failure, with
    the sub-orchestration's id and reason; the chunk and the run go on."""
    jobs = Jobs(["poll:1", "poll:2", "done"])
    answer = jobs.status

    def status(payload: dict) -> dict:
        handle = answer(payload)
        return {k: v for k, v in handle.items() if k != "state"} if handle["group_index"] == 1 else handle

    harness = OrchestrationHarness(activities={**jobs.activities(), "get_job_status": status})
    result = harness.run(
        "train_orchestrator",
        {"dataset_id": "d0123456789abcdef", "partition_ids": None, "options": OPTIONS},
        instance_id="train-abc",
    )
    assert result.status == "Completed", result.error
    assert group(result, 1).status == "Failed"
    [failed] = result.output["failed_groups"]
    assert failed["group_index"] == 1 and failed["state"] == "failed" and failed["job_id"] is None
    assert failed["reason"].startswith("sub-orchestration train-abc-train-c0000-g00001 failed: ")
    assert "state" in failed["reason"]  # the KeyError the group orchestrator raised
    assert result.output["groups_total"] == 3 and result.custom_status["groups_failed"] == 1
    live = chunk(result).custom_status
    assert live["groups_done"] == 3 and live["groups_failed"] == 1


@pytest.mark.parametrize("numbering", ["extension", "sdk"])
def test_a_slow_groups_polling_never_delays_another_groups_result(numbering):
    """Group A's submission takes 50 s and its job runs for ten polls; group B's job is done at its
    first status check. B's result is recorded one poll interval after its submit, whichever side
    numbers the tasks: each group has its own orchestrator, so none of A's tasks is ever queued
    ahead of B's. (The single chunk monitor this replaced scheduled B's status check inside its
    task_any while A's poll timer was pending; the extension's shim, awaiting its actions in turn,
    issued it only when A's timer fired: 110 s after B's submit.)"""
    jobs = Jobs(["poll:10", "poll:1"])
    harness = OrchestrationHarness(
        activities=jobs.activities(), numbering=numbering,
        latency=lambda name, payload: 50 if name == "submit_group_job" and payload["group_index"] == 0 else 0,
    )
    result = harness.run(
        "train_orchestrator",
        {"dataset_id": "d0123456789abcdef", "partition_ids": None,
         "options": {**OPTIONS, "timeout_seconds": 3600}},
        instance_id="train-abc",
    )
    assert result.status == "Completed", result.error
    assert jobs.polls == {0: 10, 1: 1} and result.output["groups_failed"] == 0
    poll = timedelta(seconds=OPTIONS["poll_seconds"])
    calls = list(zip(result.call_times, result.activity_calls))
    [b_submit] = [t for t, (name, p, _) in calls if name == "submit_group_job" and p["group_index"] == 1]
    [b_status] = [
        t for t, (name, p, _) in calls if name == "get_job_status" and p["job_id"].endswith("-g00001")
    ]
    live = chunk(result)
    recorded, status = next(
        (t, s) for t, s in zip(live.status_times, live.custom_statuses) if s and s["groups_done"] >= 1
    )
    assert status["groups_done"] == 1 and status["models_trained"] == 2  # B's result, A still running
    assert recorded - b_submit <= poll, f"B's result was recorded {recorded - b_submit} after its submit"
    assert b_status - b_submit == poll
    assert result.clock >= START + timedelta(seconds=50 + 10 * 60)  # A ran its ten polls meanwhile


@pytest.mark.parametrize("numbering", ["extension", "sdk"])
def test_no_orchestrator_schedules_a_task_while_an_earlier_one_is_pending(numbering):
    """The rule the design keeps for the extension's shim: an orchestrator schedules new tasks only
    when none of its earlier tasks is pending (one at a time, or all of one wait in one episode)."""
    jobs = Jobs(["flaky-submit", "poll:3", "fail-submit", "done", "never"])
    harness = OrchestrationHarness(activities=jobs.activities(), numbering=numbering)
    result = harness.run(
        "train_orchestrator",
        {"dataset_id": "d0123456789abcdef", "partition_ids": None, "options": {**OPTIONS, "max_groups": 3,
                                                                              "history_tasks": 6}},
        instance_id="train-abc",
    )
    assert result.status == "Completed", result.error
    every = every_orchestration(result)
    assert len(every) == 1 + 2 + 5
    assert max(r.generations for r in every) > 1  # group orchestrators continued as new
    assert {id(r): scheduled_while_pending(r.history) for r in every} == {id(r): [] for r in every}
    ingest = IngestJob(["running"] * 5 + ["completed"], flaky_status=2)
    activities = ingest.activities(Jobs(["done", "poll:2"]))
    harness = OrchestrationHarness(activities=activities, numbering=numbering)
    ingested = harness.run(
        "ingest_orchestrator", {**INGEST_INPUT, "options": {**OPTIONS, "history_tasks": 4}},
        instance_id="ingest-abc",
    )
    assert ingested.status == "Completed", ingested.error
    assert all(scheduled_while_pending(r.history) == [] for r in every_orchestration(ingested))


def _incremental_task_any_app() -> dict:
    """The pattern the design avoids: a task scheduled inside a task_any while another is pending."""
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def incremental_orchestrator(context: df.DurableOrchestrationContext):
        tasks = [context.call_activity("work", i) for i in range(2)]
        first = yield context.task_any(tasks)
        tasks.remove(first)
        tasks.append(context.create_timer(context.current_utc_datetime + timedelta(seconds=60)))
        yield context.task_all(tasks)
        return "done"

    return {f.get_function_name(): f for f in app.get_functions()}


def test_the_pending_check_sees_a_task_scheduled_inside_a_task_any():
    harness = OrchestrationHarness(functions=_incremental_task_any_app(), activities={"work": lambda p: p})
    result = harness.run("incremental_orchestrator", None)
    assert result.status == "Completed"
    assert [e["EventType"] for e in scheduled_while_pending(result.history)] == [TIMER_CREATED]


# -- the extension's own numbering, and guards that keep the SDK's retrying calls out ------------------------
def _old_monitor_app() -> dict:
    """The monitor before the fix, in small: SDK-retried submits and status checks in a task_any, a
    poll timer scheduled as each submit finishes, while the other retrying tasks are still pending."""
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def old_monitor_orchestrator(context: df.DurableOrchestrationContext):
        retry = df.RetryOptions(first_retry_interval_in_milliseconds=1000, max_number_of_attempts=3)
        entries = [(context.call_activity_with_retry("submit", retry, i), i, "submit") for i in range(2)]
        results = {}
        while entries:
            done = yield context.task_any([task for task, _, _ in entries])
            entry = next(e for e in entries if e[0] is done)
            entries.remove(entry)
            _, group, step = entry
            if step == "submit":
                timer = context.create_timer(context.current_utc_datetime + timedelta(seconds=60))
                entries.append((timer, group, "timer"))
            elif step == "timer":
                entries.append((context.call_activity_with_retry("status", retry, group), group, "status"))
            else:
                results[str(group)] = done.result
        return results

    return {f.get_function_name(): f for f in app.get_functions()}


def _flaky_status_once(group: int):
    """Activities for the old monitor: submits succeed; ``group``'s first status check fails."""
    calls: dict[int, int] = {}

    def status(i: int) -> dict:
        calls[i] = calls.get(i, 0) + 1
        if i == group and calls[i] == 1:
            raise RuntimeError("throttled")
        return {"group": i, "state": "completed"}

    return {"submit": lambda i: {"group": i, "state": "queued"}, "status": status}


def test_under_the_extensions_numbering_a_retry_in_a_task_any_hands_results_to_the_wrong_tasks():
    """SDK issue 603 as the extension plays it: after the retry the two sides disagree on task ids."""
    expected = {"0": {"group": 0, "state": "completed"}, "1": {"group": 1, "state": "completed"}}
    strict = OrchestrationHarness(functions=_old_monitor_app(), activities=_flaky_status_once(0))
    with pytest.raises(RetryWhilePending):
        strict.run("old_monitor_orchestrator", None)
    # the extension's shim is still awaiting group 1's poll timer when group 0's status check fails,
    # so its retry timer takes the id the SDK gave that poll timer: the ids disagree from there on
    extension = OrchestrationHarness(
        functions=_old_monitor_app(), activities=_flaky_status_once(0), numbering="extension"
    )
    try:
        result = extension.run("old_monitor_orchestrator", None)
    except ExtensionHang:
        return  # the other way it goes wrong: the instance never finishes
    assert result.status != "Completed" or result.output != expected, result.output


def _losing_timer_app() -> dict:
    """An orchestrator that returns while the timer that lost its task_any is still open."""
    app = df.DFApp()

    @app.orchestration_trigger(context_name="context")
    def plain_orchestrator(context: df.DurableOrchestrationContext):
        first = context.call_activity("work", 1)
        yield context.task_any([first, context.create_timer(context.current_utc_datetime + timedelta(hours=1))])
        return "done"

    return {f.get_function_name(): f for f in app.get_functions()}


def test_the_extension_view_finishes_only_when_its_shim_has_awaited_every_action():
    """The harness's extension view waits like the shim: a losing timer of a task_any is still
    awaited (the instance ends when it fires), and the SDK's own numbering ends at once."""
    harness = OrchestrationHarness(functions=_losing_timer_app(), activities={"work": lambda p: p}, numbering="extension")
    result = harness.run("plain_orchestrator", None)
    assert result.status == "Completed" and result.output == "done"
    assert result.clock == START + timedelta(hours=1)  # DurableTask.Core completes with no open task


TRAIN_CASES = [
    (["flaky-submit", "poll:2", "fail-submit", "done", "never"], {"max_groups": 2, "history_tasks": 6}),
    (["done", "poll:3", "flaky-submit", "poll:2"], {}),
    (["poll:2", "poll:3", "fail-submit", "done", "job-fails"], {"history_tasks": 8}),
]


@pytest.mark.parametrize("behaviour,options", TRAIN_CASES)
def test_training_runs_the_same_when_the_extension_numbers_the_tasks(behaviour, options):
    """The app's orchestrators give the same results whichever side numbers the tasks: with retries
    by hand, one counter in the same order on both sides (the old monitor failed here)."""
    results = {}
    for numbering in ("extension", "sdk"):  # the extension first: its failure is the one to see
        jobs = Jobs(behaviour)
        harness = OrchestrationHarness(activities=jobs.activities(), numbering=numbering)
        results[numbering] = harness.run(
            "train_orchestrator",
            {"dataset_id": "d0123456789abcdef", "partition_ids": None, "options": {**OPTIONS, **options}},
            instance_id="train-abc",
        )
        assert results[numbering].status == "Completed", results[numbering].error
        results[numbering].jobs = (jobs.submits, jobs.polls)
    assert results["extension"].output == results["sdk"].output
    assert results["extension"].jobs == results["sdk"].jobs


def test_ingestion_and_scoring_run_the_same_when_the_extension_numbers_the_tasks():
    seen = {}
    for numbering in ("extension", "sdk"):  # the extension first: its failure is the one to see
        job = IngestJob(["running"] * 5 + ["completed"], flaky_status=2)
        harness = OrchestrationHarness(activities=job.activities(Jobs(["flaky-submit", "done"])), numbering=numbering)
        result = harness.run(
            "ingest_orchestrator", {**INGEST_INPUT, "options": {**OPTIONS, "history_tasks": 4}}, instance_id="ingest-abc"
        )
        assert result.status == "Completed", (numbering, result.error)
        assert result.generations > 1 and result.output["training"]["groups_failed"] == 0
        jobs = Jobs(["done", "flaky-submit"], kind="score")
        scored = OrchestrationHarness(activities=jobs.activities(), numbering=numbering).run(
            "score_orchestrator", {"data": None, "horizon": 8, "dataset_id": None, "options": OPTIONS}
        )
        assert scored.status == "Completed" and scored.output["groups_failed"] == 0, (numbering, scored.error)
        seen[numbering] = (result.output, len(job.polls), result.generations, scored.output, jobs.submits)
    assert seen["extension"] == seen["sdk"]


RETRYING_CALLS = {"call_activity_with_retry", "call_sub_orchestrator_with_retry", "RetryOptions"}


def test_no_code_of_the_functions_app_uses_the_sdks_retrying_calls():
    """A guard for what no replay can be relied on to catch: every retry in function_app is by hand."""
    found = []
    for path in sorted((APP_ROOT / "function_app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in RETRYING_CALLS:
                found.append(f"{path.relative_to(APP_ROOT)}:{node.lineno}: {name}")
    assert not found, found


def test_at_the_defaults_no_history_reaches_the_stated_900_events():
    """A chunk of 16 groups at the defaults (200 tasks, 3 attempts, 16 groups): one job polled 80
    times with every status check throttled twice (six tasks a poll, so a generation reaches the
    most the module states: 205 tasks, ~825 events) and 15 jobs polled 30 times. No history of any
    orchestration (parent, chunk, group) reaches 900 events."""
    polls = [80] + [30] * 15
    jobs = Jobs([f"poll:{n}" for n in polls])
    throttled = _throttled(jobs)["get_job_status"]
    status = lambda p: throttled(p) if p["job_id"].endswith("-g00000") else jobs.status(p)  # noqa: E731
    harness = OrchestrationHarness(activities={**jobs.activities(), "get_job_status": status},
                                   history_limit=900, max_replays=20_000)
    options = {**OPTIONS, "timeout_seconds": 4 * 60 * max(polls)}
    assert "history_tasks" not in options and options["max_groups"] == 16
    result = harness.run(
        "train_orchestrator", {"dataset_id": "d0123456789abcdef", "partition_ids": None, "options": options},
        instance_id="train-abc",
    )
    assert result.status == "Completed", result.error
    assert jobs.polls == {g: n for g, n in enumerate(polls)}
    slow = group(result, 0)
    attempts = OPTIONS["retry_attempts"]
    assert slow.generations == -(-6 * 80 // HISTORY_TASKS)  # 6 x 80 tasks, ~200 a generation
    assert slow.max_history <= 4 * (HISTORY_TASKS + 2 * attempts - 1) + 4
    assert slow.max_history > 800, slow.max_history  # a generation filled its budget
    assert all(group(result, g).generations == 1 for g in range(1, 16))
    assert chunk(result).max_history <= 4 * 16 + 4 and result.max_history <= 40


def test_a_long_ingestion_job_with_flaky_status_checks_keeps_each_generation_within_its_budget():
    """Status retries and their timers count against the budget: a generation holds at most
    budget + 2 x attempts tasks (counting only polls, every poll that needs three attempts made
    six tasks of each two counted, and a generation three times its budget)."""
    budget, polls = 20, 30
    job = IngestJob(["running"] * (polls - 1) + ["completed"])
    answer = job.status
    tries = [0]

    def status(payload: dict) -> dict:  # every poll fails twice, then answers
        tries[0] += 1
        if tries[0] % 3:
            raise RuntimeError("Azure ML throttled the status check")
        return answer(payload)

    harness = OrchestrationHarness(activities={**job.activities(Jobs(["done"])), "get_ingest_job_status": status})
    result = harness.run(
        "ingest_orchestrator",
        {**INGEST_INPUT, "options": {**OPTIONS, "history_tasks": budget, "timeout_seconds": 60 * 4 * polls}},
        instance_id="ingest-abc",
    )
    assert result.status == "Completed", result.error
    assert len(job.polls) == polls
    tasks_per_generation = budget + 2 * OPTIONS["retry_attempts"]
    assert result.max_history <= 4 * tasks_per_generation + 40, result.max_history  # + the training steps
