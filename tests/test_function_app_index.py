"""The app as the Python worker indexes it: every function, trigger, binding, connection and auth level.

``get_functions()`` runs once (a second call raises). Beyond the binding table, the checks the
worker's loader makes are repeated here, so a signature that would fail to load in Azure fails
here first: exactly one top-level app in the entry module, parameter names equal to binding
names, and each annotation accepted by the binding's converter.
"""

from __future__ import annotations

import importlib
import inspect
import json
import typing
from pathlib import Path

import pytest
from azure.functions import FunctionRegister
from azure.functions.meta import get_binding_registry

from durable_harness import APP_ROOT, app_functions
from shared.settings import SERVICEBUS_CONNECTION

ACTIVITIES = [
    "ingest_dataset",
    "get_ingest_job_status",
    "plan_training_run",
    "train_global_model",
    "submit_group_job",
    "get_job_status",
    "register_trained_run",
    "send_promotion_message",
    "promote_run",
    "plan_scoring_run",
    "load_scored_predictions",
]
ORCHESTRATORS = [
    "ingest_orchestrator",
    "train_orchestrator",
    "group_chunk_orchestrator",
    "group_orchestrator",
    "promote_orchestrator",
    "score_orchestrator",
]
CLIENT = {"type": "durableClient", "direction": "IN", "name": "client"}

EXPECTED: dict[str, list[dict]] = {
    "on_lake_event": [CLIENT, {"type": "eventGridTrigger", "direction": "IN", "name": "event"}],
    "on_upstream_message": [
        CLIENT,
        {
            "type": "serviceBusTrigger",
            "direction": "IN",
            "name": "message",
            "queueName": "%MM_UPSTREAM_QUEUE%",
            "connection": SERVICEBUS_CONNECTION,
        },
    ],
    "on_promotion_message": [
        {
            "type": "serviceBusTrigger",
            "direction": "IN",
            "name": "message",
            "queueName": "%MM_PROMOTION_QUEUE%",
            "connection": SERVICEBUS_CONNECTION,
        }
    ],
    "send_promotion_message": [
        {
            "type": "serviceBus",
            "direction": "OUT",
            "name": "message",
            "queueName": "%MM_PROMOTION_QUEUE%",
            "connection": SERVICEBUS_CONNECTION,
        },
        {"type": "activityTrigger", "direction": "IN", "name": "payload"},
    ],
    **{
        name: [
            CLIENT,
            {
                "type": "httpTrigger",
                "direction": "IN",
                "name": "req",
                "methods": [method],
                "authLevel": "FUNCTION",
                "route": route,
            },
            {"type": "http", "direction": "OUT", "name": "$return"},
        ]
        for name, method, route in [
            ("start_training_run", "POST", "train"),
            ("start_promotion_run", "POST", "promote"),
            ("start_scoring_run", "POST", "score"),
            ("get_run_status", "GET", "status/{instance_id}"),
        ]
    },
    **{  # real-time serving: no Durable client
        name: [
            {
                "type": "httpTrigger",
                "direction": "IN",
                "name": "req",
                "methods": [method],
                "authLevel": "FUNCTION",
                "route": route,
            },
            {"type": "http", "direction": "OUT", "name": "$return"},
        ]
        for name, method, route in [
            ("predict_partition", "POST", "predict"),
            ("serving_health", "GET", "health"),
        ]
    },
    **{
        name: [{"type": "orchestrationTrigger", "direction": "IN", "name": "context"}]
        for name in ORCHESTRATORS
    },
    **{
        name: [{"type": "activityTrigger", "direction": "IN", "name": "payload"}]
        for name in ACTIVITIES
        if name != "send_promotion_message"
    },
}


def _bindings(function) -> list[dict]:
    return json.loads(function.get_function_json())["bindings"]


def test_every_function_has_exactly_the_expected_bindings():
    functions = app_functions()
    assert sorted(functions) == sorted(EXPECTED)
    for name, expected in EXPECTED.items():
        assert _bindings(functions[name]) == expected, name


def test_every_function_has_one_trigger_and_http_is_never_anonymous():
    for name, function in app_functions().items():
        triggers = [b for b in _bindings(function) if b["type"].endswith("Trigger")]
        assert len(triggers) == 1, name
        if triggers[0]["type"] == "httpTrigger":
            assert triggers[0]["authLevel"] == "FUNCTION", name


def test_the_entry_module_holds_exactly_one_app_as_the_worker_requires():
    main = importlib.import_module("main")  # already on sys.path through app_functions()
    app_functions()
    registers = [n for n in dir(main) if isinstance(getattr(main, n), FunctionRegister)]
    assert registers == ["app"]
    assert not (APP_ROOT / "function_app.py").exists(), (
        "function_app.py would shadow the function_app/ package"
    )
    template = json.loads((APP_ROOT / "local.settings.json.template").read_text())
    assert template["Values"]["PYTHON_SCRIPT_FILE_NAME"] == "main.py"


def _is_out(annotation) -> bool:
    origin = typing.get_origin(annotation)
    return origin is not None and getattr(origin, "__name__", "") == "Out"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_signatures_pass_the_worker_loader_checks(name):
    """Parameter names must equal binding names and annotations must suit each binding's converter."""
    function = app_functions()[name]
    user = function.get_user_function()
    bindings = {b["name"]: b for b in _bindings(function) if b["name"] != "$return"}
    params = dict(inspect.signature(user).parameters)
    if "context" in params and "context" not in bindings:
        params.pop("context")  # the worker passes its own Context object there
    assert set(params) == set(bindings), f"{name}: parameters {sorted(params)} vs bindings {sorted(bindings)}"
    hints = typing.get_type_hints(user)
    registry = get_binding_registry()
    for param in params:
        if param not in hints:
            continue
        binding = bindings[param]
        annotation = hints[param]
        converter = registry.get(binding["type"])
        assert converter is not None, f"{name}: no converter for {binding['type']}"
        if _is_out(annotation):
            assert binding["direction"] == "OUT", f"{name}.{param}: Out annotation on an input binding"
            (inner,) = typing.get_args(annotation)
            assert converter.check_output_type_annotation(inner), f"{name}.{param}: {inner} not accepted"
        else:
            assert binding["direction"] == "IN", f"{name}.{param}: output binding without func.Out"
            if annotation in (str, bytes) and not converter.has_implicit_output():
                continue  # the worker binds these as 'generic'
            assert converter.check_input_type_annotation(annotation), (
                f"{name}.{param}: {annotation} not accepted"
            )


def test_funcignore_keeps_tests_and_infrastructure_out_of_the_package():
    ignored = {
        line.strip()
        for line in (APP_ROOT / ".funcignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"tests/", "infra/", "benchmarks/", ".venv/", "node_modules/", "local.settings.json"} <= ignored
    assert not any(
        entry.strip("/") in ("shared", "function_app", "main.py", "host.json", "requirements.txt")
        for entry in ignored
    )


def test_host_json_configures_the_extensions_the_app_relies_on():
    host = json.loads((Path(APP_ROOT) / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"
    assert host["extensionBundle"]["version"].startswith("[4.")  # replay schema V2+ for task_any fan-in
    durable = host["extensions"]["durableTask"]
    assert durable["hubName"] == "%MM_TASK_HUB%"
    assert durable["overridableExistingInstanceStates"] == "NonRunningStates"
    service_bus = host["extensions"]["serviceBus"]
    assert service_bus["autoCompleteMessages"] is True
    assert host["extensions"]["queues"]["maxDequeueCount"] >= 1
