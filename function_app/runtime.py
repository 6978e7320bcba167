"""What every entry function shares: the workspace, the run options, starting an orchestration once.

Starters (HTTP, Service Bus, lake events) resolve the deployment settings into the orchestration's
input, so orchestrators read nothing from the environment and replay deterministically; every
activity reopens the workspace with the config overrides carried in its payload, so all of a
run's activities see the same project config on any Functions instance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ContextManager, Mapping

from azure.durable_functions import OrchestrationRuntimeStatus

from function_app.logging_context import RunLog
from function_app.messages import MessageError, RunOptions
from shared.runs import backends
from shared.config import ConfigError
from shared.keys import PartitionKeyError, partition_of
from shared.runs.workspace import Workspace
from shared.settings import Settings

# A duplicate start is a no-op while an instance with the same id is running or has completed;
# an instance that failed, was terminated or canceled is started again (the retry of an event).
RESTARTABLE = {
    OrchestrationRuntimeStatus.Failed,
    OrchestrationRuntimeStatus.Terminated,
    OrchestrationRuntimeStatus.Canceled,
}


def load_settings() -> Settings:
    """The deployment settings, read now (never at import time)."""
    return Settings.from_env()


def open_workspace(config: Mapping[str, Any] | None = None, settings: Settings | None = None) -> Workspace:
    """The workspace of the deployment, with a run's config overrides applied on top of its own."""
    settings = settings or load_settings()
    overrides = {**settings.config_overrides(), **dict(config or {})}
    return Workspace.open(settings=settings, overrides=overrides, config_path=settings.config_file, remember=False)


def lake_writer(ws: Workspace, activity: str, instance: str | None) -> ContextManager[Any]:
    """The one-writer lease an activity holds while it changes shared lake state (LATEST pointers,
    run.json, the registries, the SQL store): the blob lake's lease in Azure, the workdir's lock
    locally (:func:`shared.runs.backends.writer_lease`). The holder is named by the activity and its
    orchestration instance, so a contending writer's error says who to wait for; the wait is bounded
    and the refusal raises, so the orchestrator's retries (``call_with_retry``) try again later."""
    return backends.writer_lease(ws, f"{activity} of orchestration {instance or '(unknown)'}")


def orchestration_options(settings: Settings, options: RunOptions) -> dict[str, Any]:
    """The knobs an orchestrator needs, fixed when the run starts so every replay sees the same."""
    return {
        "group_size": options.group_size or settings.group_size,
        "max_groups": settings.max_groups_per_orchestration,
        "poll_seconds": settings.poll_interval_seconds,
        "timeout_seconds": settings.job_timeout_seconds,
        "retry_first_ms": settings.activity_retry_seconds * 1000,
        "retry_attempts": settings.activity_max_attempts,
        "min_accuracy": options.min_accuracy,
        "config": dict(options.config),
        # retrain every partition: part of the payload, so of the instance id (a full request after
        # an incremental one with the same body is a new run), and read by the plan activity
        "full": bool(options.full),
    }


def check_config(ws: Workspace, config: Mapping[str, Any]) -> None:
    """Reject config overrides the project config refuses, before anything starts."""
    try:
        ws.config.with_overrides(dict(config))
    except ConfigError as exc:
        raise MessageError("options.config", str(exc)) from exc


def resolve_partitions(ws: Workspace, partitions: tuple[Any, ...] | None) -> list[str] | None:
    """Partition ids from ids or key objects (``{"store": "S01", "item": "I1"}``), in request order."""
    if partitions is None:
        return None
    out: list[str] = []
    for i, item in enumerate(partitions):
        if isinstance(item, str):
            out.append(item)
            continue
        try:
            out.append(partition_of(ws.config.data.keys, item)[0])
        except PartitionKeyError as exc:
            raise MessageError(f"partitions[{i}]", exc.message) from exc
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class StartOutcome:
    instance_id: str
    started: bool
    runtime_status: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def start_once(
    client: Any, orchestrator: str, instance_id: str, payload: Any, log: RunLog
) -> StartOutcome:
    """Start ``orchestrator`` as ``instance_id`` unless that instance already runs or has completed.

    At-least-once delivery means the same event may arrive twice, even at the same moment: the
    status check catches the usual duplicate; if two deliveries race past it, the extension refuses
    the second start (``overridableExistingInstanceStates: NonRunningStates`` in host.json) and
    the status check after the refusal tells a duplicate from a real failure.
    """
    log = log.bind(instance_id=instance_id, orchestrator=orchestrator)
    existing = await client.get_status(instance_id)
    if _blocks_start(existing):
        log.info("duplicate start ignored", runtime_status=existing.runtime_status.value)
        return StartOutcome(instance_id, False, existing.runtime_status.value)
    try:
        await client.start_new(orchestrator, instance_id, payload)
    except Exception as exc:  # the Durable client raises plain Exception for every refusal
        now = await client.get_status(instance_id)
        if _blocks_start(now):
            log.info(
                "concurrent duplicate start refused by the extension", runtime_status=now.runtime_status.value
            )
            return StartOutcome(instance_id, False, now.runtime_status.value)
        log.error("orchestration start failed", error=str(exc)[:300])
        raise
    restarted = bool(existing) and existing.runtime_status in RESTARTABLE
    log.info("orchestration restarted" if restarted else "orchestration started")
    return StartOutcome(instance_id, True, OrchestrationRuntimeStatus.Pending.value)


async def existing_run(client: Any, instance_id: str) -> str | None:
    """The runtime status of an instance that makes a new start a duplicate, else None."""
    status = await client.get_status(instance_id)
    return status.runtime_status.value if _blocks_start(status) else None


def _blocks_start(status: Any) -> bool:
    return bool(status) and status.runtime_status is not None and status.runtime_status not in RESTARTABLE
