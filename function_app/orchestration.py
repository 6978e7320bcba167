"""Orchestrator building blocks: fan out one compute job per group, monitor it, report progress.

These are generator helpers for ``yield from`` inside orchestrator functions, so they obey the
orchestrator rules: time only from ``context.current_utc_datetime``, ids only from the input and
the instance id, no I/O. Payloads are lake paths and small summaries, never data.

Each group moves through submit -> (durable timer -> status)* -> done. All groups advance
together: the orchestrator waits for whichever task finishes first (``task_any``), so one slow or
failing job never holds up the others, and a group that fails after its retries or outlives the
timeout is recorded with its reason while the rest carry on. Above ``max_groups`` groups the work
is split over sub-orchestrations of at most ``max_groups`` groups each, so no single history grows
with the size of the fan-out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
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


def retry_options(options: dict[str, Any]) -> df.RetryOptions:
    return df.RetryOptions(
        first_retry_interval_in_milliseconds=int(options["retry_first_ms"]),
        max_number_of_attempts=int(options["retry_attempts"]),
    )


def failure_of(task: Any) -> str | None:
    """The reason a finished task failed (first line of the activity's error), or None if it succeeded."""
    result = task.result
    if not isinstance(result, Exception):
        return None
    text = str(result).strip()
    return (text.splitlines()[0].strip() if text else type(result).__name__)[:500]


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


def run_groups(
    context: Any,
    kind: str,
    run_id: str,
    groups: list[list[str]],
    offset: int,
    options: dict[str, Any],
    progress: Progress,
    log: RunLog,
) -> Generator[Any, Any, list[dict]]:
    """Submit one job per group and monitor them all with durable timers; one result per group."""
    retry = retry_options(options)
    poll = timedelta(seconds=int(options["poll_seconds"]))
    timeout = timedelta(seconds=int(options["timeout_seconds"]))
    config = options.get("config") or {}
    entries: list[tuple[Any, int, str]] = []
    handles: dict[int, dict[str, Any]] = {}
    deadlines: dict[int, Any] = {}
    results: dict[int, dict[str, Any]] = {}

    def finish(index: int, result: dict[str, Any]) -> None:
        results[index] = result
        progress.record(result)
        context.set_custom_status(progress.to_dict())
        report = log.info if result["state"] == "completed" else log.warning
        report(
            f"group {result['state']}", group=index, job_id=result["job_id"], reason=result["reason"] or None
        )

    for i, paths in enumerate(groups):
        payload = {
            "kind": kind,
            "run_id": run_id,
            "group_index": offset + i,
            "batch_paths": list(paths),
            "config": config,
        }
        entries.append(
            (context.call_activity_with_retry(SUBMIT_ACTIVITY, retry, payload), offset + i, "submit")
        )
    context.set_custom_status(progress.to_dict())
    log.info("groups submitted", kind=kind, groups=len(groups), first_group=offset)

    while entries:
        done = yield context.task_any([task for task, _, _ in entries])
        entry = next(e for e in entries if e[0] is done)
        entries.remove(entry)
        _, index, stage = entry
        now = context.current_utc_datetime
        if stage == "wait":
            payload = {"job_id": handles[index]["job_id"], "run_id": run_id, "config": config}
            entries.append(
                (context.call_activity_with_retry(STATUS_ACTIVITY, retry, payload), index, "status")
            )
            continue
        error = failure_of(done)
        if error is not None:
            what = "submission" if stage == "submit" else "status check"
            finish(
                index,
                group_result(
                    index,
                    "failed",
                    handles.get(index),
                    f"{what} failed after {retry.max_number_of_attempts} attempt(s): {error}",
                ),
            )
            continue
        handle = done.result
        handles[index] = handle
        if stage == "submit":
            deadlines[index] = now + timeout
        if handle["state"] in TERMINAL_STATES:
            finish(index, group_result(index, handle["state"], handle))
        elif now >= deadlines[index]:
            finish(
                index,
                group_result(
                    index,
                    "timeout",
                    handle,
                    f"job {handle['job_id']} still {handle['state']} after "
                    f"{int(timeout.total_seconds())} s; it was not canceled",
                ),
            )
        else:
            entries.append((context.create_timer(now + poll), index, "wait"))
    return [results[k] for k in sorted(results)]


def fan_out(
    context: Any,
    kind: str,
    run_id: str,
    groups: list[list[str]],
    options: dict[str, Any],
    progress: Progress,
    log: RunLog,
) -> Generator[Any, Any, list[dict]]:
    """Run every group, inline when there are few, else in sub-orchestrations of ``max_groups``."""
    limit = int(options["max_groups"])
    if len(groups) <= limit:
        return (yield from run_groups(context, kind, run_id, groups, 0, options, progress, log))
    starts = list(range(0, len(groups), limit))
    progress.chunks_total = len(starts)
    entries = []
    for n, start in enumerate(starts):
        chunk = groups[start : start + limit]
        payload = {"kind": kind, "run_id": run_id, "groups": chunk, "offset": start, "options": options}
        child = f"{context.instance_id}-{kind}-c{n:04d}"
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


def chunk_steps(context: Any, log: RunLog) -> Generator[Any, Any, list[dict]]:
    """The body of the sub-orchestrator: one chunk of groups, its own progress in its custom status."""
    payload = context.get_input()
    kind, run_id, groups = payload["kind"], payload["run_id"], payload["groups"]
    progress = Progress(
        stage="training" if kind == "train" else "scoring", run_id=run_id, groups_total=len(groups)
    )
    log = log.bind(run_id=run_id, parent=context.parent_instance_id)
    return (
        yield from run_groups(
            context, kind, run_id, groups, int(payload["offset"]), payload["options"], progress, log
        )
    )


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
