"""Orchestrator building blocks: fan out one compute job per group, follow each, report progress.

These are generator helpers for ``yield from`` inside orchestrator functions, so they obey the
orchestrator rules: time only from ``context.current_utc_datetime``, ids only from the input and
the instance id, no I/O. Payloads are lake paths and small summaries, never data.

**Retries are by hand.** Every activity is a plain ``call_activity``; a failure waits on a durable
timer and calls again, up to ``retry_attempts`` attempts. ``call_activity_with_retry`` is not used:
with the 1.x Python SDK a retrying task left pending in a ``task_any`` while new tasks are
scheduled can leave the instance "Running" forever (the SDK and the extension number the tasks
after a retry differently: azure-functions-durable-python issue 603, closed as won't fix).

**No task is scheduled while a task_any waits on earlier ones.** The extension's out-of-proc shim
awaits the SDK's actions one after the other, so a task scheduled inside a ``task_any`` loop while
other tasks are pending is only issued once the task scheduled before it has completed: one
group's status check would wait for another group's poll timer. So every orchestrator here either
follows one thing one task at a time, or schedules all the tasks of one wait in the same episode
and then only waits on them:

* the parent (``train_orchestrator`` / ``score_orchestrator``, :func:`fan_out`) starts one
  ``group_chunk_orchestrator`` per chunk of at most ``max_groups`` groups, all at once, and waits;
* a chunk (:func:`chunk_steps`) starts one ``group_orchestrator`` per group, all at once, and waits,
  recording each group's result in its custom status as the group finishes (a sub-orchestration
  that fails becomes a failed group with the reason);
* a group (:func:`group_steps`) submits its job and follows it (:func:`follow_job`: durable timer,
  then status activity, one task at a time) until it is terminal or its deadline passes (a job
  still live then is a "timeout", not canceled). So a slow or failing job never holds up another.

**Bounded histories.** A group orchestrator continues as new with its job's handle and deadline
after ``history_tasks`` scheduled tasks (default :data:`HISTORY_TASKS`; submit and status retries
and their timers included): one generation holds at most ``history_tasks + 2 * retry_attempts - 1``
tasks, each four events (scheduled, completed, the episode's started / completed), so under 900
events at the defaults (200 tasks, 3 attempts: at most 205 tasks, ~825 events), however long the
job runs. A chunk never continues as new: its history holds at most four events per group (created,
completed, and the episode around the completion; fewer when completions share an episode), under
70 for 16 groups, plus its custom status (one small JSON value kept with the instance). The parent
holds as many per chunk besides its own steps. (One history holding 16 groups' 240 polls would
be ~20,000 events, replayed at every step.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Generator

from function_app.logging_context import RunLog
from shared.runs.compute import TERMINAL_STATES

INGEST_ORCHESTRATOR = "ingest_orchestrator"
TRAIN_ORCHESTRATOR = "train_orchestrator"
SCORE_ORCHESTRATOR = "score_orchestrator"
PROMOTE_ORCHESTRATOR = "promote_orchestrator"
SUBMIT_ACTIVITY = "submit_group_job"
STATUS_ACTIVITY = "get_job_status"
CHUNK_ORCHESTRATOR = "group_chunk_orchestrator"
GROUP_ORCHESTRATOR = "group_orchestrator"
HISTORY_TASKS = 200  # tasks a generation following a job (group, ingestion) schedules, then continues as new


class ActivityFailed(RuntimeError):
    """An activity failed on every attempt; the message names it and gives its last error."""

    def __init__(self, name: str, attempts: int, reason: str) -> None:
        super().__init__(f"{name} failed after {attempts} attempt(s): {reason}")
        self.attempts, self.reason = attempts, reason


class JobTimeout(RuntimeError):
    """A job still live at its deadline; it is not canceled. Carries the job's last handle."""

    def __init__(self, handle: dict[str, Any], seconds: int) -> None:
        super().__init__(
            f"job {handle['job_id']} still {handle['state']} after {seconds} s; it was not canceled"
        )
        self.handle = handle


def error_text(error: BaseException) -> str:
    """The first line of an activity's error as the SDK reports it (at most 500 characters)."""
    text = str(error).strip()
    return (text.splitlines()[0].strip() if text else type(error).__name__)[:500]


def call_with_retry(
    context: Any, name: str, payload: Any, options: dict[str, Any], spent: list[int] | None = None
) -> Generator[Any, Any, Any]:
    """Call an activity, retrying on durable timers; raises ActivityFailed after the last attempt.

    One task at a time: nothing else is scheduled while it is pending (see the module docstring).
    ``spent[0]`` (when given) counts the tasks scheduled, retries and their timers included, so a
    caller's history budget sees them.
    """
    attempts = max(1, int(options["retry_attempts"]))
    delay = timedelta(milliseconds=int(options["retry_first_ms"]))
    tally = spent if spent is not None else [0]
    for attempt in range(1, attempts + 1):
        try:
            tally[0] += 1
            return (yield context.call_activity(name, payload))
        except Exception as exc:  # the SDK raises the activity's failure into the generator
            if attempt == attempts:
                raise ActivityFailed(name, attempts, error_text(exc)) from exc
            tally[0] += 1
            yield context.create_timer(context.current_utc_datetime + delay)
    raise AssertionError("unreachable")


def follow_job(
    context: Any,
    handle: dict[str, Any],
    status_activity: str,
    payload: dict[str, Any],
    deadline: datetime,
    options: dict[str, Any],
    budget: int,
) -> Generator[Any, Any, tuple[dict[str, Any], bool]]:
    """Poll one submitted job on durable timers until it is terminal: ``(last handle, finished)``.

    One task at a time (a timer, then the status activity through :func:`call_with_retry`), so
    nothing is ever scheduled while another task is pending. ``finished`` is False once ``budget``
    tasks (status retries and their timers included) were scheduled and the job is still live: the
    caller continues as new with the handle, which keeps its history bounded however long the job
    runs (at most ``budget + 2 * retry_attempts - 1`` tasks a generation). A job still live at
    ``deadline`` raises :class:`JobTimeout` (it is not canceled); a status check failing on every
    attempt raises :class:`ActivityFailed`.
    """
    poll = timedelta(seconds=int(options["poll_seconds"]))
    spent = [0]
    while handle["state"] not in TERMINAL_STATES:
        now = context.current_utc_datetime
        if now >= deadline:
            raise JobTimeout(handle, int(options["timeout_seconds"]))
        if spent[0] >= budget:
            return handle, False
        spent[0] += 1
        yield context.create_timer(min(now + poll, deadline))
        handle = yield from call_with_retry(
            context, status_activity, {**payload, "job_id": handle["job_id"]}, options, spent
        )
    return handle, True


def failure_of(task: Any) -> str | None:
    """The reason a finished task failed (first line of the activity's error), or None if it succeeded."""
    result = task.result
    if not isinstance(result, Exception):
        return None
    return error_text(result)


def next_finished(context: Any, entries: list[tuple]) -> Generator[Any, Any, tuple[tuple, str | None]]:
    """Wait for the first task of ``entries`` (``(task, ...)`` tuples, all scheduled already: nothing
    new is scheduled inside the wait) to finish; remove its entry and return it with its failure."""
    done = yield context.task_any([entry[0] for entry in entries])
    entry = next(e for e in entries if e[0] is done)
    entries.remove(entry)
    return entry, failure_of(done)


@dataclass
class Progress:
    """The custom status of a run: what the status endpoint shows while it is live."""

    stage: str
    run_id: str
    groups_total: int
    groups_done: int = 0
    groups_failed: int = 0
    partitions_done: int = 0
    models_trained: int = 0
    models_failed: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    chunk_prefix: str = ""  # the chunks' instance ids are <prefix>0000, <prefix>0001...: live progress

    def record(self, result: dict[str, Any]) -> None:
        self.groups_done += 1
        if result["state"] != "completed":
            self.groups_failed += 1
        statuses = result.get("statuses") or {}
        self.partitions_done += int(result.get("partitions") or 0)
        self.models_trained += int(statuses.get("trained", 0)) + int(statuses.get("baseline_only", 0))
        self.models_failed += int(statuses.get("failed", 0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def group_result(
    index: int, state: str, handle: dict[str, Any] | None = None, reason: str = ""
) -> dict[str, Any]:
    summary = (handle or {}).get("summary") or {}
    return {
        "group_index": index,
        "job_id": (handle or {}).get("job_id"),
        "state": state,
        "reason": reason or (handle or {}).get("detail") or "",
        "partitions": int(summary.get("partitions") or 0),
        "statuses": dict(summary.get("statuses") or {}),
    }


def fan_out(
    context: Any,
    kind: str,
    run_id: str,
    groups: list[list[str]],
    options: dict[str, Any],
    progress: Progress,
    log: RunLog,
) -> Generator[Any, Any, list[dict]]:
    """Run every group in chunk sub-orchestrations of at most ``max_groups`` groups, all started in
    one episode, then only waited on; one result per group, sorted by group index."""
    limit = max(1, int(options["max_groups"]))
    starts = list(range(0, len(groups), limit))
    progress.chunks_total = len(starts)
    progress.chunk_prefix = f"{context.instance_id}-{kind}-c"
    entries = []
    for n, start in enumerate(starts):
        chunk = groups[start : start + limit]
        payload = {"kind": kind, "run_id": run_id, "groups": chunk, "offset": start, "options": options}
        child = f"{progress.chunk_prefix}{n:04d}"
        entries.append(
            (context.call_sub_orchestrator(CHUNK_ORCHESTRATOR, payload, child), start, len(chunk), child)
        )
    context.set_custom_status(progress.to_dict())
    log.info("sub-orchestrations started", kind=kind, groups=len(groups), chunks=len(starts))
    results: list[dict[str, Any]] = []
    while entries:
        (done, start, size, child), error = yield from next_finished(context, entries)
        if error is None:
            chunk_results = done.result
        else:
            log.warning("sub-orchestration failed", child=child, reason=error)
            chunk_results = [
                group_result(start + i, "failed", reason=f"sub-orchestration {child} failed: {error}")
                for i in range(size)
            ]
        for result in chunk_results:
            progress.record(result)
            results.append(result)
        progress.chunks_done += 1
        context.set_custom_status(progress.to_dict())
    return sorted(results, key=lambda r: r["group_index"])


def group_instance_id(chunk_instance_id: str, group_index: int) -> str:
    """The group orchestrator's instance id: its chunk's id and its index in the run, so a replay
    (or a second delivery of the chunk) addresses the same instance."""
    return f"{chunk_instance_id}-g{group_index:05d}"


def chunk_steps(context: Any, log: RunLog) -> Generator[Any, Any, list[dict]]:
    """The body of the chunk sub-orchestrator: one group orchestrator per group, all started in one
    episode, then only waited on (no task is scheduled inside the wait); one result per group."""
    payload = context.get_input()
    kind, run_id, offset = payload["kind"], payload["run_id"], int(payload["offset"])
    groups: list[list[str]] = payload["groups"]
    progress = Progress(
        stage="training" if kind == "train" else "scoring", run_id=run_id, groups_total=len(groups)
    )
    log = log.bind(run_id=run_id, parent=context.parent_instance_id)
    entries = []
    for i, paths in enumerate(groups):
        index = offset + i
        child = group_instance_id(context.instance_id, index)
        child_input = {"kind": kind, "run_id": run_id, "group_index": index, "paths": list(paths),
                       "options": payload["options"]}
        entries.append((context.call_sub_orchestrator(GROUP_ORCHESTRATOR, child_input, child), index, child))
    context.set_custom_status(progress.to_dict())
    results: list[dict[str, Any]] = []
    while entries:
        (done, index, child), error = yield from next_finished(context, entries)
        if error is None:
            result = done.result
        else:
            result = group_result(index, "failed", reason=f"sub-orchestration {child} failed: {error}")
        results.append(result)
        progress.record(result)
        context.set_custom_status(progress.to_dict())
        report = log.info if result["state"] == "completed" else log.warning
        report(
            f"group {result['state']}", group=index, job_id=result["job_id"], reason=result["reason"] or None,
        )
    return sorted(results, key=lambda r: r["group_index"])


def group_steps(context: Any, log: RunLog) -> Generator[Any, Any, dict[str, Any] | None]:
    """The body of the group orchestrator: submit one group's job and follow it to its result.

    One task at a time (:func:`call_with_retry`, :func:`follow_job`). Returns the group's result
    (:func:`group_result`): the job's terminal state, "timeout" for a job still live at its deadline,
    "failed" with the reason when the submission or a status check failed on every attempt. Returns
    None after scheduling ``continue_as_new`` with the job's handle, deadline and generation once
    ``history_tasks`` tasks were scheduled, so each generation's history stays bounded.
    """
    payload = context.get_input()
    kind, run_id, index = payload["kind"], payload["run_id"], int(payload["group_index"])
    options = payload["options"]
    config = options.get("config") or {}
    budget = max(1, int(options.get("history_tasks") or HISTORY_TASKS))
    carried = payload.get("job")
    log = log.bind(run_id=run_id, group=index, parent=context.parent_instance_id)
    spent = [0]
    if carried is None:
        generation = 0
        submit = {"kind": kind, "run_id": run_id, "group_index": index, "batch_paths": payload["paths"],
                  "config": config}
        try:
            handle = yield from call_with_retry(context, SUBMIT_ACTIVITY, submit, options, spent)
        except ActivityFailed as exc:
            return group_result(index, "failed", reason=f"submission failed after {exc.attempts} attempt(s): "
                                                        f"{exc.reason}")
        deadline = context.current_utc_datetime + timedelta(seconds=int(options["timeout_seconds"]))
        log.info("job submitted", job_id=handle["job_id"], state=handle["state"])
    else:
        handle, deadline = carried["handle"], datetime.fromisoformat(carried["deadline"])
        generation = int(carried["generation"])
    context.set_custom_status({"stage": "training" if kind == "train" else "scoring", "run_id": run_id,
                               "group_index": index, "job_id": handle["job_id"], "job_state": handle["state"],
                               "generation": generation})
    try:
        final, finished = yield from follow_job(
            context, handle, STATUS_ACTIVITY, {"run_id": run_id, "config": config}, deadline, options,
            max(1, budget - spent[0]),
        )
    except JobTimeout as exc:
        return group_result(index, "timeout", exc.handle, str(exc))
    except ActivityFailed as exc:
        return group_result(index, "failed", handle,
                            f"status check failed after {exc.attempts} attempt(s): {exc.reason}")
    if finished:
        return group_result(index, final["state"], final)
    log.info("history budget reached; continuing as new", job_id=final["job_id"], generation=generation)
    context.continue_as_new(
        {**payload, "job": {"handle": final, "deadline": deadline.isoformat(), "generation": generation + 1}}
    )
    return None


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [r for r in results if r["state"] != "completed"]
    return {
        "groups_total": len(results),
        "groups_failed": len(failed),
        "failed_groups": [
            {
                "group_index": r["group_index"],
                "job_id": r["job_id"],
                "state": r["state"],
                "reason": r["reason"],
            }
            for r in failed
        ],
    }


def produced_output(result: dict[str, Any]) -> bool:
    """Did a group leave results in the lake? (A job can fail on one mini-batch and keep the rest.)"""
    return result["state"] == "completed" or (result["state"] == "failed" and result["partitions"] > 0)
