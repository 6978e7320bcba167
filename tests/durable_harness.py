"""The host side of the Functions app, for tests: load the app, replay orchestrations, fake the extension.

* :func:`app_functions` imports the entry module the way the Python worker does (the app root on
  ``sys.path``, ``import main``) and indexes it once (``get_functions()`` may run once per app).
* :class:`OrchestrationHarness` plays the Durable extension's part in a replay: it calls the
  registered orchestrator with the context JSON (``history``, ``instanceId``, ``input``), reads the
  actions it returns, appends the events the extension would (``TaskScheduled`` / ``TaskCompleted``
  / ``TaskFailed``, ``TimerCreated`` / ``TimerFired``, ``SubOrchestrationInstanceCreated`` /
  ``Completed`` / ``Failed``) with event ids numbered as the SDK numbers its tasks, and replays
  until the orchestrator finishes. One completion per episode; the clock moves only when a timer
  fires (or an activity's ``latency`` has passed). A sub-orchestration runs from the moment it is
  scheduled, on the same virtual clock, and its completion reaches the parent when it has finished,
  so sibling sub-orchestrations run side by side in virtual time. Every replay must repeat the
  actions of the previous one exactly, which is the replay
  determinism rule (no wall clock, no random ids): a violation fails the test.
  ``continue_as_new`` starts a new generation: a fresh history holding only ``ExecutionStarted``
  with the carried input (as the extension does); the result reports the generations and the
  longest history any generation reached.
* The harness also refuses what the real extension cannot replay reliably although the SDK's own
  numbering (which the harness uses) can: scheduling new tasks while a task made with
  ``call_activity_with_retry`` (or a sub-orchestration with retry) is still pending. With the 1.x
  SDK the extension numbers the tasks after a retry differently, and the instance can stay
  "Running" forever (azure-functions-durable-python issue 603, won't fix):
  :class:`RetryWhilePending`.
* ``OrchestrationHarness(numbering="extension")`` numbers the tasks the way the extension does
  instead (:class:`ExtensionView`, a model of the extension's out-of-proc shim on DurableTask.Core),
  so that defect shows as what it is in production: an instance that never finishes
  (:class:`ExtensionHang`).
* :class:`FakeDurableExtension` serves the extension's HTTP API for the Durable client on
  127.0.0.1 (start, status), so client functions run with the real ``DurableOrchestrationClient``.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

APP_ROOT = Path(__file__).resolve().parents[1]
START = datetime(2024, 1, 1, tzinfo=timezone.utc)
_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

# History event types (azure.durable_functions.models.history.HistoryEventType)
EXECUTION_STARTED, TASK_SCHEDULED, TASK_COMPLETED, TASK_FAILED = 0, 4, 5, 6
SUB_CREATED, SUB_COMPLETED, SUB_FAILED = 7, 8, 9
TIMER_CREATED, TIMER_FIRED, ORCHESTRATOR_STARTED, ORCHESTRATOR_COMPLETED = 10, 11, 12, 13
# Action types (azure.durable_functions.models.actions.ActionType)
CALL_ACTIVITY, CALL_ACTIVITY_WITH_RETRY, CALL_SUB, CALL_SUB_WITH_RETRY = 0, 1, 2, 3
CONTINUE_AS_NEW, CREATE_TIMER, WHEN_ANY, WHEN_ALL = 4, 5, 11, 12
RETRYING_ACTIONS = (CALL_ACTIVITY_WITH_RETRY, CALL_SUB_WITH_RETRY)


@functools.lru_cache(maxsize=None)
def app_functions() -> dict[str, Any]:
    """The app's functions by name, indexed once, as the worker loads ``main.py`` from the app root."""
    if str(APP_ROOT) not in sys.path:
        sys.path.insert(0, str(APP_ROOT))
    main = importlib.import_module("main")
    return {fn.get_function_name(): fn for fn in main.app.get_functions()}


def _ts(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime(_FORMAT)


class RecordingOut:
    """An output binding as the host gives it to a function: ``set()`` records the value."""

    def __init__(self) -> None:
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def call_activity(function: Any, payload: Any, outputs: list[dict[str, Any]]) -> Any:
    """Run a registered activity as the host would: JSON in, output bindings collected, JSON out."""
    bindings = json.loads(function.get_function_json())["bindings"]
    trigger = next(b for b in bindings if b["type"] == "activityTrigger")
    kwargs: dict[str, Any] = {trigger["name"]: json.loads(json.dumps(payload))}
    outs = {
        b["name"]: (b, RecordingOut()) for b in bindings if b["direction"] == "OUT" and b["name"] != "$return"
    }
    kwargs.update({name: out for name, (_, out) in outs.items()})
    result = function.get_user_function()(**kwargs)
    for name, (binding, out) in outs.items():
        if out.value is not None:
            outputs.append(
                {
                    "function": function.get_function_name(),
                    "binding": name,
                    "type": binding["type"],
                    "queue": binding.get("queueName"),
                    "value": out.value,
                }
            )
    return json.loads(json.dumps(result))


@dataclass
class _Pending:
    kind: str  # activity | timer | retry-timer | sub
    event_id: int
    ready: datetime
    action: dict[str, Any]
    attempt: int = 1
    final: bool = False
    child: "HarnessResult | None" = None  # a sub-orchestration, run when it was scheduled


@dataclass
class HarnessResult:
    status: str  # Completed | Failed
    output: Any
    error: str | None
    custom_status: Any
    custom_statuses: list[Any]
    history: list[dict[str, Any]]
    activity_calls: list[tuple[str, Any, int]]
    outputs: list[dict[str, Any]]
    children: dict[str, "HarnessResult"]
    replays: int
    clock: datetime
    generations: int = 1
    max_history: int = 0
    call_times: list[datetime] = field(default_factory=list)  # virtual time each activity call ran
    status_times: list[datetime] = field(default_factory=list)  # virtual time of each custom status

    def events(self, event_type: int) -> list[dict[str, Any]]:
        return [e for e in self.history if e["EventType"] == event_type]


@dataclass
class OrchestrationHarness:
    """Drive one orchestration through the SDK's replay until it completes or fails.

    ``activities`` maps activity names to callables ``payload -> result`` (raise to fail); names
    not in it run the app's registered activity. ``schema`` is the replay schema the extension
    announces: 2 (V3, what the current extension sends, with its timer limits) or 1 (V2). The
    legacy V1 protocol (0) cannot express waiting on already-scheduled tasks together with a new
    one, which the monitor loop does, so the app needs the extension bundle v4 (V2 or later).
    With ``numbering="extension"`` the extension's own view decides which tasks exist and their
    event ids (see :class:`ExtensionView`); with the default the harness follows the SDK's.
    ``latency(name, payload)`` (seconds) is how long an activity call takes on the virtual clock
    (0 without it), so tasks complete out of the order they were scheduled in.
    """

    functions: dict[str, Any] = field(default_factory=app_functions)
    activities: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    schema: int = 2
    max_replays: int = 5000
    numbering: str = "sdk"  # "sdk": event ids as the SDK numbers its tasks; "extension": as the extension does
    history_limit: int | None = None  # fail as soon as one generation's history reaches it
    latency: Callable[[str, Any], float] | None = None  # seconds an activity call takes (virtual time)

    def __post_init__(self) -> None:
        if self.schema not in (1, 2):
            raise ValueError("the harness plays replay schema V2 (1) or V3 (2)")
        if self.numbering not in ("sdk", "extension"):
            raise ValueError("numbering is 'sdk' or 'extension'")

    def run(
        self,
        orchestrator: str,
        payload: Any,
        instance_id: str = "test-instance",
        parent: str | None = None,
        clock: datetime = START,
    ) -> HarnessResult:
        return _Replay(self, orchestrator, payload, instance_id, parent, clock).run()

    def run_activity(self, name: str, payload: Any, outputs: list[dict[str, Any]]) -> Any:
        if name in self.activities:
            return json.loads(json.dumps(self.activities[name](json.loads(json.dumps(payload)))))
        function = self.functions.get(name)
        if function is None:
            raise LookupError(f"no activity named {name!r} is registered")
        return call_activity(function, payload, outputs)


class NonDeterminism(AssertionError):
    """A replay produced different actions than the run it replays."""


class RetryWhilePending(AssertionError):
    """New tasks were scheduled while a retrying task was pending (SDK issue 603: can hang forever)."""


class HistoryTooLong(AssertionError):
    """One generation's history reached the harness's ``history_limit``."""


class ExtensionHang(AssertionError):
    """The extension has no task left to complete but the orchestration is not finished: it stays
    "Running" forever (what SDK issue 603 reports)."""


class _Replay:
    def __init__(
        self,
        harness: OrchestrationHarness,
        name: str,
        payload: Any,
        instance_id: str,
        parent: str | None,
        clock: datetime,
    ) -> None:
        function = harness.functions.get(name)
        if function is None:
            raise LookupError(f"no orchestrator named {name!r} is registered")
        self.harness, self.name, self.instance_id, self.parent = harness, name, instance_id, parent
        self.handle = function.get_user_function()
        self.input = json.dumps(payload)
        self.clock = clock
        self.history: list[dict[str, Any]] = []
        self.episode = 0
        self.next_id = 0
        self.seen: list[dict[str, Any]] = []
        self.pending: list[_Pending] = []
        self.calls: list[tuple[datetime, tuple[str, Any, int]]] = []
        self.outputs: list[dict[str, Any]] = []
        self.children: dict[str, HarnessResult] = {}
        self.statuses: list[Any] = []
        self.status_times: list[datetime] = []
        self.replays = 0
        self.generations = 1
        self.max_history = 0
        self._start_generation()

    def _start_generation(self) -> None:
        self.history = []
        self.seen = []
        self.pending = []
        self.next_id = 0
        self._new_episode()
        self._event(
            EXECUTION_STARTED,
            Name=self.name,
            Input=self.input,
            Version="",
            ParentInstance=None
            if self.parent is None
            else {"OrchestrationInstance": {"InstanceId": self.parent}},
        )

    # -- history ---------------------------------------------------------------------------------
    def _event(self, event_type: int, event_id: int = -1, **fields: Any) -> None:
        self.history.append(
            {
                "EventType": event_type,
                "EventId": event_id,
                "Timestamp": _ts(self.clock),
                "_episode": self.episode,
                **fields,
            }
        )

    def _new_episode(self) -> None:
        self.episode += 1
        self._event(ORCHESTRATOR_STARTED)

    def _context(self) -> str:
        history = [
            {**{k: v for k, v in e.items() if k != "_episode"}, "IsPlayed": e["_episode"] < self.episode}
            for e in self.history
        ]
        return json.dumps(
            {
                "history": history,
                "instanceId": self.instance_id,
                "isReplaying": False,
                "parentInstanceId": self.parent,
                "input": self.input,
                "upperSchemaVersion": 1,
                "upperSchemaVersionNew": self.harness.schema,
                "maximumShortTimerDuration": "6.00:00:00",
                "longRunningTimerIntervalDuration": "3.00:00:00",
            }
        )

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> HarnessResult:
        while True:
            self.replays += 1
            if self.replays > self.harness.max_replays:
                raise AssertionError(f"{self.name}: more than {self.harness.max_replays} replays")
            state, error = self._replay()
            self.statuses.append(state.get("customStatus"))
            self.status_times.append(self.clock)
            actions = _flatten(state.get("actions") or [])
            if actions[: len(self.seen)] != self.seen:
                raise NonDeterminism(
                    f"{self.name}: replay {self.replays} changed earlier actions:\n"
                    f"before: {self.seen}\nnow:    {actions[: len(self.seen)]}"
                )
            self.max_history = max(self.max_history, len(self.history))
            limit = self.harness.history_limit
            if limit is not None and len(self.history) >= limit:
                raise HistoryTooLong(
                    f"{self.name}: generation {self.generations} reached {len(self.history)} history events "
                    f"(limit {limit}) at replay {self.replays}"
                )
            if self.harness.numbering == "extension":
                outcome = self._extension_episode(state, error, actions)
                if outcome is not None:
                    return outcome
                continue
            continued = [a for a in actions if a.get("actionType") == CONTINUE_AS_NEW]
            if error is None and state.get("isDone") and continued:
                if self.pending:
                    raise AssertionError(f"{self.name}: continue_as_new with {len(self.pending)} task(s) pending")
                self.input = continued[-1]["input"]
                self.generations += 1
                self._start_generation()
                continue
            if error is not None or state.get("isDone"):
                return self._result("Failed" if error is not None else "Completed", state, error)
            new = actions[len(self.seen) :]
            retrying = [p for p in self.pending if p.action.get("actionType") in RETRYING_ACTIONS]
            if new and retrying:
                raise RetryWhilePending(
                    f"{self.name}: replay {self.replays} schedules {[a.get('functionName') for a in new]} "
                    f"while retrying task(s) {[p.action.get('functionName') for p in retrying]} are pending"
                )
            for action in new:
                self._schedule(action)
            self.seen = actions
            self._event(ORCHESTRATOR_COMPLETED)
            if not self.pending:
                raise AssertionError(f"{self.name}: waiting, but nothing is scheduled")
            self._complete_next()

    def _extension_episode(
        self, state: dict[str, Any], error: str | None, actions: list[dict[str, Any]]
    ) -> HarnessResult | None:
        """One episode as the extension plays it: its shim replays the SDK's actions over the history,
        and only the tasks *it* schedules, with *its* ids, are written and completed."""
        view = ExtensionView(state.get("actions") or [], self.history)
        view.play()
        ended = error is not None or bool(state.get("isDone"))
        if ended and view.shim_done and not view.open_ids():
            continued = [a for a in actions if a.get("actionType") == CONTINUE_AS_NEW]
            if error is None and continued:
                self.input = continued[-1]["input"]
                self.generations += 1
                self._start_generation()
                return None
            return self._result("Failed" if error is not None else "Completed", state, error)
        self.seen = actions
        for task_id, issued in view.new():
            self._schedule(issued.action, task_id, issued.attempt)
        self._event(ORCHESTRATOR_COMPLETED)
        if {p.event_id for p in self.pending} != view.open_ids() | {i for i, _ in view.new()}:
            raise AssertionError(f"{self.name}: the harness and the extension view disagree on open tasks")
        if not self.pending:
            waiting = "the orchestrator is waiting" if not ended else "the shim is waiting"
            raise ExtensionHang(
                f"{self.name}: replay {self.replays}: {waiting}, but the extension has no task left to "
                f"complete: the instance stays Running forever (SDK {len(actions)} actions, "
                f"extension ids 0..{view.next_id - 1})"
            )
        self._complete_next()
        return None

    def _replay(self) -> tuple[dict[str, Any], str | None]:
        try:
            return json.loads(self.handle(self._context())), None
        except Exception as exc:  # the SDK reports an orchestrator failure as an exception carrying its state
            message, marker, state = str(exc).partition("$OutOfProcData$:")
            if not marker:
                raise
            return json.loads(state), message.strip()

    def _schedule(self, action: dict[str, Any], event_id: int | None = None, attempt: int = 1) -> None:
        kind = action["actionType"]
        if event_id is None:
            event_id = self.next_id
            self.next_id += 1
        if kind in (CALL_ACTIVITY, CALL_ACTIVITY_WITH_RETRY):
            self._event(TASK_SCHEDULED, event_id, Name=action["functionName"], Input=action.get("input"))
            self.pending.append(_Pending("activity", event_id, self._done_at(action), action, attempt))
        elif kind == CREATE_TIMER:
            fire_at = _parse(action["fireAt"])
            self._event(TIMER_CREATED, event_id, FireAt=action["fireAt"])
            self.pending.append(_Pending("timer", event_id, fire_at, action))
        elif kind == CALL_SUB:
            self._event(
                SUB_CREATED,
                event_id,
                Name=action["functionName"],
                InstanceId=action.get("instanceId"),
                Input=action.get("input"),
            )
            child = self._start_sub(action, event_id)
            self.pending.append(_Pending("sub", event_id, child.clock, action, attempt, child=child))
        else:
            raise AssertionError(f"the harness does not play action type {kind}: {action}")

    def _done_at(self, action: dict[str, Any]) -> datetime:
        """When an activity scheduled now completes: after its ``latency`` on the virtual clock."""
        if self.harness.latency is None:
            return self.clock
        payload = json.loads(action["input"]) if action.get("input") is not None else None
        return self.clock + timedelta(seconds=self.harness.latency(action["functionName"], payload))

    def _complete_next(self) -> None:
        item = min(self.pending, key=lambda p: (p.ready, p.event_id))
        self.pending.remove(item)
        self.clock = max(self.clock, item.ready)
        self._new_episode()
        if item.kind == "timer":
            self._event(TIMER_FIRED, TimerId=item.event_id, FireAt=item.action["fireAt"])
        elif item.kind == "retry-timer":
            self._event(TIMER_FIRED, TimerId=item.event_id, FireAt=_ts(item.ready))
            if not item.final:
                event_id = self.next_id
                self.next_id += 1
                self._event(
                    TASK_SCHEDULED, event_id, Name=item.action["functionName"], Input=item.action.get("input")
                )
                self.pending.append(
                    _Pending("activity", event_id, self._done_at(item.action), item.action, item.attempt + 1)
                )
        elif item.kind == "activity":
            self._run_activity(item)
        else:
            self._run_sub(item)

    def _run_activity(self, item: _Pending) -> None:
        name = item.action["functionName"]
        payload = json.loads(item.action["input"]) if item.action.get("input") is not None else None
        self.calls.append((self.clock, (name, payload, item.attempt)))
        try:
            result = self.harness.run_activity(name, payload, self.outputs)
        except Exception as exc:  # an activity failure becomes a TaskFailed event, as in the extension
            self._event(
                TASK_FAILED,
                TaskScheduledId=item.event_id,
                Reason=f"{type(exc).__name__}: {exc}",
                Details=traceback.format_exc(limit=3),
            )
            if item.action["actionType"] == CALL_ACTIVITY_WITH_RETRY:
                retry = item.action["retryOptions"]
                delay = timedelta(milliseconds=retry["firstRetryIntervalInMilliseconds"])
                timer_id = self.next_id
                self.next_id += 1
                fire_at = self.clock + delay
                self._event(TIMER_CREATED, timer_id, FireAt=_ts(fire_at))
                final = item.attempt >= retry["maxNumberOfAttempts"]
                self.pending.append(
                    _Pending("retry-timer", timer_id, fire_at, item.action, item.attempt, final)
                )
            return
        self._event(TASK_COMPLETED, TaskScheduledId=item.event_id, Result=json.dumps(result))

    def _start_sub(self, action: dict[str, Any], event_id: int) -> HarnessResult:
        """Run a sub-orchestration from now, on the virtual clock; its completion waits in ``pending``."""
        child_id = action.get("instanceId") or f"{self.instance_id}:{event_id}"
        payload = json.loads(action["input"]) if action.get("input") is not None else None
        child = _Replay(
            self.harness, action["functionName"], payload, child_id, self.instance_id, self.clock
        ).run()
        self.children[child_id] = child
        self.calls.extend(zip(child.call_times, child.activity_calls))
        self.outputs.extend(child.outputs)
        return child

    def _run_sub(self, item: _Pending) -> None:
        child = item.child
        assert child is not None
        if child.status == "Completed":
            self._event(SUB_COMPLETED, TaskScheduledId=item.event_id, Result=json.dumps(child.output))
        else:
            self._event(SUB_FAILED, TaskScheduledId=item.event_id, Reason=child.error, Details="")

    def _result(self, status: str, state: dict[str, Any], error: str | None) -> HarnessResult:
        calls = sorted(self.calls, key=lambda c: c[0])  # in virtual-time order (stable: ties as run)
        return HarnessResult(
            status=status,
            output=state.get("output"),
            error=error,
            custom_status=state.get("customStatus"),
            custom_statuses=self.statuses,
            history=self.history,
            activity_calls=[call for _, call in calls],
            outputs=self.outputs,
            children=self.children,
            replays=self.replays,
            clock=self.clock,
            generations=self.generations,
            max_history=max(self.max_history, len(self.history)),
            call_times=[moment for moment, _ in calls],
            status_times=self.status_times,
        )


# -- the extension's view: its out-of-proc shim replaying the SDK's actions on DurableTask.Core -----------
class _Future:
    """A .NET task as DurableTask.Core runs it: continuations run inline when it settles."""

    def __init__(self) -> None:
        self.done = False
        self.failed = False
        self._callbacks: list[Callable[["_Future"], None]] = []

    def settle(self, failed: bool = False) -> None:
        if self.done:
            return
        self.done, self.failed = True, failed
        for callback in self._callbacks:
            callback(self)

    def then(self, callback: Callable[["_Future"], None]) -> None:
        if self.done:
            callback(self)
        else:
            self._callbacks.append(callback)


def _run_async(steps: Any) -> _Future:
    """Run an ``async`` method written as a generator that yields futures; its own future settles
    when it returns (failed if it raises)."""
    result = _Future()

    def advance(previous: _Future | None) -> None:
        try:
            future = steps.send(previous)
        except StopIteration:
            result.settle()
            return
        except _TaskFailed:
            result.settle(failed=True)
            return
        future.then(advance)

    advance(None)
    return result


class _TaskFailed(Exception):
    """A task of the extension's view failed (raised inside a retry interceptor)."""


@dataclass
class _Issued:
    kind: str  # activity | timer | sub
    action: dict[str, Any]
    future: _Future
    attempt: int = 1


class ExtensionView:
    """What the Durable extension schedules, and with which event ids, for one out-of-proc episode.

    A model of the sources, not a guess (azure-functions-durable-extension
    ``Listener/OutOfProcOrchestrationShim.cs``; DurableTask.Core ``TaskOrchestrationContext``,
    ``TaskOrchestrationExecutor``, ``RetryInterceptor``):

    * every task the extension schedules takes the next id of one counter at the moment it is
      scheduled (``idCounter++``), activities, timers and sub-orchestrations alike;
    * the shim replays the SDK's top-level actions (schema V2/V3) one after the other, awaiting
      each before it issues the next; a ``WhenAny`` / ``WhenAll`` issues its compound actions
      (the SDK leaves out the ones it scheduled before) and is awaited as a whole;
    * ``CallActivityWithRetry`` / ``CallSubOrchestratorWithRetry`` run DurableTask.Core's retry
      interceptor: on a failure it creates a timer (a zero-delay one after the last attempt) and
      then schedules the task again, each taking the next id *when the extension gets there*;
    * history events are played in order, continuations run inline (a synchronous scheduler), an
      ``OrchestratorStarted`` event sets the clock, a completion for an id it does not hold is
      dropped as a duplicate, and a scheduled event for an id it did not schedule is a
      non-determinism failure.

    The SDK numbers a retry's timer and rescheduled task when *it* sees the failure and the
    timer; the shim, still awaiting an earlier action, may reach them before or after tasks the
    SDK scheduled meanwhile, and then the two disagree on ids. Not modelled (the app uses none):
    external events, entities, HTTP calls, canceled timers, timers longer than the extension's
    short-timer limit, retry handlers, the V1 schema.
    """

    def __init__(self, actions: list[Any], history: list[dict[str, Any]]) -> None:
        if len(actions) > 1 or (actions and not isinstance(actions[0], list)):
            raise AssertionError("the extension view plays the V2 / V3 action schema only")
        self.actions: list[dict[str, Any]] = actions[0] if actions else []
        self.history = history
        self.clock = START
        self.next_id = 0
        self.issued: dict[int, _Issued] = {}
        self.recorded: set[int] = set()  # ids the history shows as scheduled
        self.closed: set[int] = set()  # ids the history completed
        self.shim_done = False

    def play(self) -> None:
        for event in self.history:
            kind = event["EventType"]
            if kind == ORCHESTRATOR_STARTED:
                self.clock = _parse(event["Timestamp"])
            elif kind == EXECUTION_STARTED:
                _run_async(self._shim()).then(lambda _: setattr(self, "shim_done", True))
            elif kind in (TASK_SCHEDULED, TIMER_CREATED, SUB_CREATED):
                expected = {TASK_SCHEDULED: "activity", TIMER_CREATED: "timer", SUB_CREATED: "sub"}[kind]
                issued = self.issued.get(event["EventId"])
                if issued is None or issued.kind != expected or issued.action.get("functionName") != event.get("Name"):
                    raise AssertionError(
                        f"extension: non-deterministic orchestration: history event {event} was not scheduled "
                        f"by this replay ({issued})"
                    )
                self.recorded.add(event["EventId"])
            elif kind in (TASK_COMPLETED, TASK_FAILED, SUB_COMPLETED, SUB_FAILED, TIMER_FIRED):
                task_id = event["TimerId"] if kind == TIMER_FIRED else event["TaskScheduledId"]
                issued = self.issued.get(task_id)
                if issued is None or task_id in self.closed:
                    continue  # DurableTask.Core logs a duplicate event and drops it
                self.closed.add(task_id)
                issued.future.settle(failed=kind in (TASK_FAILED, SUB_FAILED))

    def new(self) -> list[tuple[int, _Issued]]:
        """The tasks this episode schedules, in id order (the extension's new orchestrator actions)."""
        return sorted((i, t) for i, t in self.issued.items() if i not in self.recorded)

    def open_ids(self) -> set[int]:
        return {i for i in self.issued if i in self.recorded and i not in self.closed}

    # -- the shim and DurableTask.Core's context --------------------------------------------------------
    def _shim(self) -> Any:
        for action in self.actions:
            yield self._invoke(action)  # awaited; a failure is swallowed, as the shim does

    def _invoke(self, action: dict[str, Any]) -> _Future:
        kind = action["actionType"]
        if kind == CALL_ACTIVITY:
            return self._issue("activity", action)
        if kind == CREATE_TIMER:
            if action.get("isCanceled"):
                raise AssertionError("the extension view does not play canceled timers")
            if _parse(action["fireAt"]) - self.clock > timedelta(days=6):
                raise AssertionError("the extension view plays timers up to the 6-day short-timer limit")
            return self._issue("timer", action)
        if kind == CALL_SUB:
            return self._issue("sub", action)
        if kind in (CALL_ACTIVITY_WITH_RETRY, CALL_SUB_WITH_RETRY):
            return _run_async(self._retry_interceptor(action))
        if kind == CONTINUE_AS_NEW:
            done = _Future()
            done.settle()
            return done
        if kind in (WHEN_ANY, WHEN_ALL):
            children = [self._invoke(child) for child in action.get("compoundActions") or []]
            if not children:
                raise AssertionError("extension: Task.WhenAny / WhenAll of no tasks throws (an empty compound action)")
            combined = _Future()
            remaining = [len(children)]

            def child_done(_: _Future) -> None:
                remaining[0] -= 1
                if kind == WHEN_ANY or remaining[0] == 0:
                    combined.settle()

            for child in children:
                child.then(child_done)
            return combined
        raise AssertionError(f"the extension view does not play action type {kind}: {action}")

    def _issue(self, kind: str, action: dict[str, Any], attempt: int = 1) -> _Future:
        future = _Future()
        self.issued[self.next_id] = _Issued(kind, action, future, attempt)
        self.next_id += 1
        return future

    def _retry_interceptor(self, action: dict[str, Any]) -> Any:
        """DurableTask.Core ``RetryInterceptor.Invoke`` (no retry timeout or handler: the SDK sends none)."""
        retry = action["retryOptions"]
        attempts = int(retry["maxNumberOfAttempts"])
        first = timedelta(milliseconds=int(retry["firstRetryIntervalInMilliseconds"]))
        backoff = float(retry.get("backoffCoefficient", 1.0))
        plain = {**{k: v for k, v in action.items() if k != "retryOptions"},
                 "actionType": CALL_ACTIVITY if action["actionType"] == CALL_ACTIVITY_WITH_RETRY else CALL_SUB}
        kind = "activity" if plain["actionType"] == CALL_ACTIVITY else "sub"
        for attempt in range(attempts):
            call = yield self._issue(kind, plain, attempt + 1)
            if not call.failed:
                return
            if attempt + 1 == attempts:  # "Dummy timer for back-compat": fires at once
                yield self._issue("timer", {"actionType": CREATE_TIMER, "fireAt": _ts(self.clock)})
                break
            delay = first * (backoff**attempt)
            yield self._issue("timer", {"actionType": CREATE_TIMER, "fireAt": _ts(self.clock + delay)})
        raise _TaskFailed(action.get("functionName"))


def _flatten(actions: list[Any]) -> list[dict[str, Any]]:
    """Actions in scheduling order (V1: lists per yield; V2: compound WhenAll/WhenAny nested)."""
    out: list[dict[str, Any]] = []
    for item in actions:
        if isinstance(item, list):
            out.extend(_flatten(item))
        elif item.get("actionType") in (WHEN_ALL, WHEN_ANY):
            out.extend(_flatten(item.get("compoundActions") or []))
        else:
            out.append(item)
    return out


def _parse(text: str) -> datetime:
    from dateutil.parser import parse

    return parse(text)


# -- the extension's HTTP API for the Durable client -----------------------------------------------------
ACTIVE = ("Pending", "Running", "ContinuedAsNew", "Suspended")


class FakeDurableExtension:
    """The Durable extension's client API on 127.0.0.1: starts are recorded, runs are played on demand.

    A start of an instance that is still active is refused (the extension's default
    ``overridableExistingInstanceStates: NonRunningStates``); a finished one is replaced.
    :meth:`run_pending` plays every pending instance through :class:`OrchestrationHarness`.
    """

    def __init__(self, harness: OrchestrationHarness | None = None) -> None:
        self.harness = harness or OrchestrationHarness()
        self.instances: dict[str, dict[str, Any]] = {}
        self.starts: list[tuple[str, str, Any]] = []
        self.results: dict[str, HarnessResult] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def client_json(self) -> str:
        """The ``durableClient`` binding value the host passes to a client function."""
        webhooks = f"{self.base}/runtime/webhooks/durabletask"
        hub = f"{webhooks}/instances/INSTANCEID?taskHub=TestHub&connection=Storage&code=key"
        return json.dumps(
            {
                "taskHubName": "TestHub",
                "creationUrls": {"createNewInstancePostUri": f"{webhooks}/orchestrators/{{functionName}}"},
                "managementUrls": {
                    "id": "INSTANCEID",
                    "statusQueryGetUri": hub,
                    "sendEventPostUri": hub.replace("?", "/raiseEvent/{eventName}?"),
                    "terminatePostUri": hub.replace("?", "/terminate?reason={text}&"),
                    "purgeHistoryDeleteUri": hub,
                },
                "rpcBaseUrl": f"{self.base}/durabletask/",
            }
        )

    def set_status(self, instance_id: str, runtime_status: str, **fields: Any) -> None:
        with self.lock:
            record = self.instances.setdefault(instance_id, self._record("unknown", instance_id, None))
            record.update(runtimeStatus=runtime_status, **fields)

    def run_pending(self) -> dict[str, HarnessResult]:
        """Play every pending instance to its end; their status becomes Completed or Failed."""
        done = {}
        while True:
            with self.lock:
                todo = [(i, r) for i, r in self.instances.items() if r["runtimeStatus"] == "Pending"]
            if not todo:
                return done
            for instance_id, record in todo:
                self.set_status(instance_id, "Running")
                result = self.harness.run(record["name"], record["input"], instance_id)
                self.results[instance_id] = done[instance_id] = result
                self.set_status(
                    instance_id,
                    result.status,
                    output=result.output if result.status == "Completed" else result.error,
                    customStatus=result.custom_status,
                    lastUpdatedTime=_ts(result.clock),
                )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _record(name: str, instance_id: str, payload: Any) -> dict[str, Any]:
        now = _ts(datetime.now(timezone.utc))
        return {
            "name": name,
            "instanceId": instance_id,
            "runtimeStatus": "Pending",
            "input": payload,
            "output": None,
            "customStatus": None,
            "createdTime": now,
            "lastUpdatedTime": now,
        }

    def _start(self, name: str, instance_id: str, body: bytes) -> tuple[int, Any]:
        payload = json.loads(body) if body else None
        if isinstance(payload, str):  # the client posts the input already serialized, as a JSON string
            payload = json.loads(payload)
        with self.lock:
            existing = self.instances.get(instance_id)
            if existing and existing["runtimeStatus"] in ACTIVE:
                return 409, f"An orchestration with instance ID '{instance_id}' already exists and is active."
            self.instances[instance_id] = self._record(name, instance_id, payload)
            self.starts.append((name, instance_id, payload))
        return 202, {"id": instance_id}

    def _status(self, instance_id: str) -> tuple[int, Any]:
        with self.lock:
            record = self.instances.get(instance_id)
            if record is None:
                return 404, ""
            body = {k: v for k, v in record.items() if k != "input"}
        return (200 if record["runtimeStatus"] not in ACTIVE else 202), body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        extension = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                return

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                parts = urlsplit(self.path).path.strip("/").split("/")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if parts[:2] == ["durabletask", "orchestrators"] and len(parts) == 4:
                    self._reply(*extension._start(unquote(parts[2]), unquote(parts[3]), body))
                else:
                    self._reply(404, {"error": f"not served by the fake extension: POST {self.path}"})

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if parts[:2] == ["durabletask", "instances"] and len(parts) == 3:
                    parse_qs(url.query)  # showInput / showHistory are accepted and ignored
                    self._reply(*extension._status(unquote(parts[2])))
                else:
                    self._reply(404, {"error": f"not served by the fake extension: GET {self.path}"})

        return Handler
