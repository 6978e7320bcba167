"""Orchestrator building blocks: fan out one compute job per group, monitor it, report progress.

These are generator helpers for ``yield from`` inside orchestrator functions, so they obey the
orchestrator rules: time only from ``context.current_utc_datetime``, ids only from the input and
the instance id, no I/O. Payloads are lake paths and small summaries, never data.

**Retries are by hand.** Every activity is a plain ``call_activity``; a failure waits on a durable
timer and calls again, up to ``retry_attempts`` attempts. ``call_activity_with_retry`` is not used:
with the 1.x Python SDK a retrying task left pending in a ``task_any`` while new tasks are
scheduled can leave the instance "Running" forever (the SDK and the extension number the tasks
after a retry differently: azure-functions-durable-python issue 603, closed as won't fix).

**Bounded histories.** The parent orchestration starts one sub-orchestration per chunk of at most
``max_groups`` groups (always, even for one chunk) and waits for them: its history holds about
three events per chunk. A chunk moves each group through submit -> (durable timer -> status)* ->
done, all groups together (``task_any``, so a slow or failing job never holds up the others). After
``history_tasks`` scheduled tasks (default :data:`HISTORY_TASKS`) it stops scheduling, lets the
tasks in flight finish (at most one per group: a poll interval) and ``continue_as_new`` with its
state: one generation's history holds at most ``history_tasks + max_groups`` tasks (at most four
events each: under 900 events at the defaults of 200 and 16), whatever the job's duration —
instead of 240 polls x 16 groups (~20,000 events) replayed at every step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Generator

import azure.durable_functions as df

from function_app.logging_context import RunLog

INGEST_ORCHESTRATOR = "ingest_orchestrator"
TRAIN_ORCHESTRATOR = "train_orchestrator"
SCORE_ORCHESTRATOR = "score_orchestrator"
PROMOTE_ORCHESTRATOR = "promote_orchestrator"
SUBMIT_ACTIVITY = "submit_group_job"
STATUS_ACTIVITY = "get_job_status"
CHUNK_ORCHESTRATOR = "group_chunk_orchestrator"
TERMINAL_STATES = ("completed", "failed", "canceled")
HISTORY_TASKS = 200  # tasks one chunk generation schedules before it continues as new


class ActivityFailed(RuntimeError):
    """An activity failed on every attempt; the message names it and gives its last error."""


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
                raise ActivityFailed(
                    f"{name} failed after {attempts} attempt(s): {error_text(exc)}"
                ) from exc
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
    runs (at most ``budget + 2 * retry_attempts`` tasks a generation). A job still live at
    ``deadline`` raises (it is not canceled).
    """
    poll = timedelta(seconds=int(options["poll_seconds"]))
    spent = [0]
    while handle["state"] not in TERMINAL_STATES:
        now = context.current_utc_datetime
        if now >= deadline:
            raise RuntimeError(
                f"job {handle['job_id']} still {handle['state']} after "
                f"{int(options['timeout_seconds'])} s; it was not canceled"
            )
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
    generation: int = 0
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


def new_group_states(groups: list[list[str]], offset: int) -> list[dict[str, Any]]:
    """The monitor's state of each group before anything ran: next step submit, no handle yet."""
    return [
        {"index": offset + i, "paths": list(paths), "next": "submit", "attempt": 0, "due": None,
         "deadline": None, "handle": None}
        for i, paths in enumerate(groups)
    ]


def monitor_groups(
    context: Any,
    kind: str,
    run_id: str,
    states: list[dict[str, Any]],
    results: list[dict[str, Any]],
    options: dict[str, Any],
    progress: Progress,
    log: RunLog,
) -> Generator[Any, Any, bool]:
    """Advance every unfinished group until done or the generation's task budget is spent.

    ``states`` and ``results`` are updated in place and are JSON (they travel through
    ``continue_as_new``). Returns True when every group is finished, False when the budget ran out
    and no task is left in flight (the caller continues as new with the state).
    """
    attempts = max(1, int(options["retry_attempts"]))
    retry_delay = timedelta(milliseconds=int(options["retry_first_ms"]))
    poll = timedelta(seconds=int(options["poll_seconds"]))
    timeout = timedelta(seconds=int(options["timeout_seconds"]))
    budget = int(options.get("history_tasks") or HISTORY_TASKS)
    config = options.get("config") or {}
    by_index = {s["index"]: s for s in states}
    entries: list[tuple[Any, int, str]] = []
    scheduled = 0

    def finish(state: dict[str, Any], result: dict[str, Any]) -> None:
        state["next"] = "done"
        results.append(result)
        progress.record(result)
        context.set_custom_status(progress.to_dict())
        report = log.info if result["state"] == "completed" else log.warning
        report(
            f"group {result['state']}", group=result["group_index"], job_id=result["job_id"],
            reason=result["reason"] or None,
        )

    def launch(state: dict[str, Any]) -> None:
        nonlocal scheduled
        if scheduled >= budget:
            return  # parked: the next generation picks it up from its state
        scheduled += 1
        now = context.current_utc_datetime
        if state["due"] is not None and datetime.fromisoformat(state["due"]) > now:
            entries.append((context.create_timer(datetime.fromisoformat(state["due"])), state["index"], "timer"))
            return
        state["due"] = None
        if state["next"] == "submit":
            payload = {"kind": kind, "run_id": run_id, "group_index": state["index"],
                       "batch_paths": state["paths"], "config": config}
            entries.append((context.call_activity(SUBMIT_ACTIVITY, payload), state["index"], "submit"))
        else:
            payload = {"job_id": state["handle"]["job_id"], "run_id": run_id, "config": config}
            entries.append((context.call_activity(STATUS_ACTIVITY, payload), state["index"], "status"))

    for state in states:
        if state["next"] != "done":
            launch(state)
    context.set_custom_status(progress.to_dict())

    while entries:
        done = yield context.task_any([task for task, _, _ in entries])
        entry = next(e for e in entries if e[0] is done)
        entries.remove(entry)
        _, index, step = entry
        state = by_index[index]
        now = context.current_utc_datetime
        if step == "timer":
            state["due"] = None
            launch(state)
            continue
        error = failure_of(done)
        if error is not None:
            state["attempt"] += 1
            if state["attempt"] >= attempts:
                what = "submission" if step == "submit" else "status check"
                finish(state, group_result(index, "failed", state["handle"],
                                           f"{what} failed after {attempts} attempt(s): {error}"))
            else:
                log.warning(f"{step} failed; retrying", group=index, attempt=state["attempt"], reason=error)
                state["due"] = (now + retry_delay).isoformat()
                launch(state)
            continue
        handle = done.result
        state["attempt"] = 0
        state["handle"] = handle
        if step == "submit":
            state["deadline"] = (now + timeout).isoformat()
            state["next"] = "status"
        if handle["state"] in TERMINAL_STATES:
            finish(state, group_result(index, handle["state"], handle))
        elif now >= datetime.fromisoformat(state["deadline"]):
            finish(state, group_result(
                index, "timeout", handle,
                f"job {handle['job_id']} still {handle['state']} after "
                f"{int(timeout.total_seconds())} s; it was not canceled",
            ))
        else:
            state["due"] = (now + poll).isoformat()
            launch(state)
    return all(s["next"] == "done" for s in states)


def fan_out(
    context: Any,
    kind: str,
    run_id: str,
    groups: list[list[str]],
    options: dict[str, Any],
    progress: Progress,
    log: RunLog,
) -> Generator[Any, Any, list[dict]]:
    """Run every group in sub-orchestrations of at most ``max_groups`` groups; one result per group."""
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
        done = yield context.task_any([task for task, *_ in entries])
        entry = next(e for e in entries if e[0] is done)
        entries.remove(entry)
        _, start, size, child = entry
        error = failure_of(done)
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


def chunk_steps(context: Any, log: RunLog) -> Generator[Any, Any, list[dict] | None]:
    """The body of the sub-orchestrator: one chunk of groups, continued as new when its budget is spent.

    Returns the chunk's results, or None after scheduling ``continue_as_new`` (the orchestrator
    returns and the extension restarts it with the carried state and an empty history).
    """
    payload = context.get_input()
    kind, run_id = payload["kind"], payload["run_id"]
    carried = payload.get("state")
    if carried is None:
        carried = {"groups": new_group_states(payload["groups"], int(payload["offset"])), "results": [],
                   "generation": 0}
    progress = Progress(
        stage="training" if kind == "train" else "scoring", run_id=run_id,
        groups_total=len(carried["groups"]), generation=int(carried["generation"]),
    )
    for result in carried["results"]:
        progress.record(result)
    log = log.bind(run_id=run_id, parent=context.parent_instance_id, generation=carried["generation"])
    finished = yield from monitor_groups(
        context, kind, run_id, carried["groups"], carried["results"], payload["options"], progress, log
    )
    if finished:
        return sorted(carried["results"], key=lambda r: r["group_index"])
    log.info("history budget reached; continuing as new",
             open_groups=sum(1 for s in carried["groups"] if s["next"] != "done"))
    context.continue_as_new(
        {
            "kind": kind, "run_id": run_id, "offset": payload["offset"], "options": payload["options"],
            "state": {**carried, "generation": int(carried["generation"]) + 1},
        }
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
