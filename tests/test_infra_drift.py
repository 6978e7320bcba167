"""Code and infrastructure cannot drift apart: every name the code reads exists in infra/.

The Function App's settings come from ``shared/settings.py`` (``SETTINGS``, ``HOST_SETTINGS``), from
``shared/azureml/client.py`` (``EXTRA_SETTINGS``) and from its bindings (connection names,
``%SETTING%`` expressions, queue names, blob paths) and host.json; the infrastructure is the
Bicep under ``infra/`` (the app settings object ``appSettings`` in ``infra/app/function-app.bicep``
and the names in ``infra/main.bicep``) and the developer's ``local.settings.json.template``.
These tests read both sides and fail on any name present in one and missing in the other. They
also run the offline structural checks of ``scripts/validate_infra.py`` (the Bicep CLI cannot be
installed here), and its grammar checks when the parsers are installed.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the app root, as the Python worker sees it (function_app/ is not installed)
    sys.path.insert(0, str(ROOT))

from durable_harness import app_functions  # noqa: E402
from function_app import messages  # noqa: E402
from shared import lake, settings  # noqa: E402
from shared.azureml import client as azureml_client  # noqa: E402
from shared.azureml import registry as azureml_registry  # noqa: E402

INFRA = ROOT / "infra"
TEMPLATE = ROOT / "local.settings.json.template"
HOST_JSON = ROOT / "host.json"
_SETTING_REF = re.compile(r"%([A-Za-z0-9_]+)%")
_LITERAL = re.compile(r"^'([^']*)'$")


def _load_validator():
    spec = importlib.util.spec_from_file_location("validate_infra", ROOT / "scripts" / "validate_infra.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("validate_infra", module)
    spec.loader.exec_module(module)
    return module


validate_infra = _load_validator()


# -- reading the two sides ---------------------------------------------------------------------
@dataclass(frozen=True)
class Infra:
    """The names infra/ defines, as read from the Bicep text."""

    app_settings: dict[str, str]  # key -> value expression (Bicep text)
    app_params_allowed: dict[str, list[str]]  # function-app.bicep param -> @allowed values
    lake_containers: list[str]
    raw_container: str
    data_suffixes: list[str]
    event_suffixes: list[str]
    servicebus_queues: list[str]
    event_grid_function: str
    has_blob_trigger: bool
    registry_container: str
    datastore_prefix: str


def _string_var(bf, name: str) -> str:
    m = re.search(rf"^var\s+{name}\s*=\s*'([^']*)'", bf.text, re.M)
    assert m, f"{bf.path.name}: no string variable {name}"
    return m.group(1)


def _array_param(bf, name: str) -> list[str]:
    """The default of a parameter that is a one-item-per-line array of string literals."""
    m = re.search(rf"^param\s+{name}\s+array\s*=\s*\[", bf.masked, re.M)
    assert m, f"{bf.path.name}: no array parameter {name} with a default"
    start, end = bf.block(m.end() - 1)
    return [_LITERAL.match(line.strip()).group(1) for line in bf.text[start + 1:end].splitlines() if line.strip()]


def _array_var(bf, name: str) -> list[str]:
    """A one-item-per-line array of string literals and string variables."""
    m = re.search(rf"^var\s+{name}\s*=\s*\[", bf.masked, re.M)
    assert m, f"{bf.path.name}: no array variable {name}"
    start, end = bf.block(m.end() - 1)
    items = []
    for line in bf.text[start + 1:end].splitlines():
        item = line.split("//", 1)[0].strip()
        if item:
            literal = _LITERAL.match(item)
            items.append(literal.group(1) if literal else _string_var(bf, item))
    return items


def read_infra(infra_dir: Path) -> Infra:
    main = validate_infra.read_bicep(infra_dir / "main.bicep")
    app = validate_infra.read_bicep(infra_dir / "app" / "function-app.bicep")
    queues_at = re.search(r"^var\s+serviceBusQueues\s*=\s*\[", main.masked, re.M)
    start, end = main.block(queues_at.end() - 1)
    queue_names = []
    for expr in re.findall(r"^\s*name:\s*(\S+)", main.text[start:end], re.M):
        literal = _LITERAL.match(expr)
        queue_names.append(literal.group(1) if literal else _string_var(main, expr))
    blob_flag = re.search(r"^var\s+hasBlobTrigger\s*=\s*(true|false)", main.text, re.M)
    return Infra(
        app_settings=app.variable_object("appSettings"),
        app_params_allowed=app.allowed,
        lake_containers=_array_var(main, "lakeContainers"),
        raw_container=_string_var(main, "rawContainer"),
        data_suffixes=_array_var(main, "dataFileSuffixes"),
        event_suffixes=_array_var(main, "dataFileSuffixes") + [f"/{m}" for m in _array_param(main, "datasetMarkers")],
        servicebus_queues=queue_names,
        event_grid_function=_string_var(main, "eventGridFunctionName"),
        has_blob_trigger=bool(blob_flag) and blob_flag.group(1) == "true",
        registry_container=_string_var(main, "registryContainer"),
        datastore_prefix=_string_var(main, "azureMLDatastorePrefix"),
    )


@dataclass(frozen=True)
class Binding:
    function: str
    type: str
    fields: dict[str, Any]


@pytest.fixture(scope="module")
def bindings() -> list[Binding]:
    """Every binding of every function, as the Python worker indexes ``main.app``."""
    out = []
    for name, fn in app_functions().items():
        for b in fn.get_bindings_dict()["bindings"]:
            out.append(Binding(name, b["type"], dict(b)))
    return out


@pytest.fixture(scope="module")
def infra() -> Infra:
    return read_infra(INFRA)


@pytest.fixture(scope="module")
def template_values() -> dict[str, str]:
    assert TEMPLATE.exists(), "local.settings.json.template is missing"
    return json.loads(TEMPLATE.read_text(encoding="utf-8"))["Values"]


@dataclass(frozen=True)
class CodeSetting:
    env: str
    default: Any
    is_int: bool
    choices: tuple[str, ...] = ()
    local: bool = True  # local.settings.json.template sets it (SettingSpec.where)


def code_settings() -> list[CodeSetting]:
    """Every variable the app reads: shared/settings.py SETTINGS and the Azure ML package's extras.

    All of them are Bicep app settings. ``SettingSpec.where`` says which ones the local template
    carries (identity-based Azure endpoints have no local meaning); the Azure ML extras are Azure-only.
    """
    out = [CodeSetting(s.env, s.default, s.kind == "int", s.choices, "local" in getattr(s, "where", ("local",)))
           for s in settings.SETTINGS]
    out += [CodeSetting(env, default, isinstance(default, int) and not isinstance(default, bool), local=False)
            for env, _field, default, _meaning in azureml_client.EXTRA_SETTINGS]
    return out


def setting_defaults() -> dict[str, Any]:
    return {s.env: s.default for s in code_settings()}


def resolve(value: str) -> str:
    """A binding value with ``%SETTING%`` replaced by the setting's code default."""
    defaults = setting_defaults()
    return _SETTING_REF.sub(lambda m: str(defaults[m.group(1)]), value)


# -- the drift rules (plain functions, so the tests below can also show that they fail) ---------
def missing_names(configured: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """Names neither set themselves nor, for a connection, through ``<name>__<property>`` keys."""
    out = []
    for name in names:
        if name in configured:
            continue
        if name in settings.BINDING_CONNECTIONS and any(k.startswith(f"{name}__") for k in configured):
            continue
        out.append(name)
    return sorted(set(out))


def unknown_app_settings(app_settings: Mapping[str, str]) -> list[str]:
    """Bicep keys that look like ours but that the code never reads (a typo is silent drift)."""
    known = {s.env for s in code_settings()}
    known.add(setting_defaults()["MM_SQL_CONNECTION_SETTING"])
    out = []
    for key in app_settings:
        if key.startswith("MM_") and key not in known:
            out.append(key)
        elif "__" in key and key.split("__", 1)[0] not in settings.BINDING_CONNECTIONS:
            out.append(key)
    return sorted(out)


def identity_connection_problems(app_settings: Mapping[str, str], connection: str) -> list[str]:
    """An identity-based connection: service URI, managedidentity credential, client id, no secret."""
    problems = []
    uri_keys = [k for k in app_settings if k.startswith(f"{connection}__")
                and k.split("__", 1)[1] in ("blobServiceUri", "queueServiceUri", "tableServiceUri",
                                             "serviceUri", "fullyQualifiedNamespace")]
    if not uri_keys:
        problems.append(f"{connection}: no __blobServiceUri / __fullyQualifiedNamespace setting")
    if app_settings.get(f"{connection}__credential") != "'managedidentity'":
        problems.append(f"{connection}__credential is not 'managedidentity'")
    if f"{connection}__clientId" not in app_settings:
        problems.append(f"{connection}__clientId is missing (user-assigned identity)")
    if connection in app_settings:
        problems.append(f"{connection} is set: a connection string would hold a key")
    return problems


def default_problems(app_settings: Mapping[str, str], allowed: Mapping[str, list[str]]) -> list[str]:
    """Literal values that differ from the code's defaults or choices; @allowed outside the choices."""
    problems = []
    for spec in code_settings():
        expr = app_settings.get(spec.env)
        if expr is None:
            continue
        literal = _LITERAL.match(expr)
        if literal and spec.is_int and literal.group(1) and literal.group(1) != str(spec.default):
            problems.append(f"{spec.env}: Bicep sets {literal.group(1)}, the code default is {spec.default}")
        if literal and spec.choices and literal.group(1) and literal.group(1) not in spec.choices:
            problems.append(f"{spec.env}: {literal.group(1)!r} is not one of {list(spec.choices)}")
        if spec.choices and expr in allowed and not set(allowed[expr]) <= set(spec.choices):
            problems.append(f"{spec.env}: param {expr} allows {allowed[expr]}, the code {list(spec.choices)}")
    return problems


# -- settings and connections ------------------------------------------------------------------
def test_every_setting_the_code_reads_is_a_bicep_app_setting(infra):
    assert missing_names(infra.app_settings, [s.env for s in code_settings()]) == []


def test_the_odbc_connection_variable_named_by_the_settings_is_set(infra):
    assert setting_defaults()["MM_SQL_CONNECTION_SETTING"] in infra.app_settings


def test_every_binding_connection_is_an_identity_based_bicep_setting(infra, bindings):
    connections = sorted({b.fields["connection"] for b in bindings if b.fields.get("connection")})
    assert connections, "the app declares no binding connection at all"
    assert set(connections) <= set(settings.BINDING_CONNECTIONS)
    for connection in [*connections, settings.HOST_STORAGE_CONNECTION]:
        assert identity_connection_problems(infra.app_settings, connection) == []


def test_every_setting_expression_in_bindings_is_set_in_bicep_and_the_template(infra, bindings, template_values):
    refs = {ref for b in bindings for v in b.fields.values() if isinstance(v, str)
            for ref in _SETTING_REF.findall(v)}
    assert refs, "expected %SETTING% expressions (the queue names)"
    assert refs <= set(setting_defaults())
    assert missing_names(infra.app_settings, refs) == []
    assert missing_names(template_values, refs) == []


def test_host_json_setting_expressions_are_set_everywhere(infra, template_values):
    assert HOST_JSON.exists(), "host.json is missing"
    refs = set(_SETTING_REF.findall(HOST_JSON.read_text(encoding="utf-8")))
    assert missing_names(infra.app_settings, refs) == []
    assert missing_names(template_values, refs) == []


def test_bicep_sets_no_setting_the_code_does_not_read(infra):
    assert unknown_app_settings(infra.app_settings) == []


def test_bicep_values_agree_with_code_defaults_and_choices(infra):
    assert default_problems(infra.app_settings, infra.app_params_allowed) == []


# Settings the Flex Consumption plan rejects: the runtime is functionAppConfig.runtime there.
FLEX_FORBIDDEN = ("FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE",
                  "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING", "WEBSITE_CONTENTSHARE")


def test_entry_module_setting_names_an_existing_file(infra, template_values):
    literal = _LITERAL.match(infra.app_settings["PYTHON_SCRIPT_FILE_NAME"])
    assert literal and (ROOT / literal.group(1)).is_file()
    assert template_values.get("PYTHON_SCRIPT_FILE_NAME") == literal.group(1)
    host_settings = getattr(settings, "HOST_SETTINGS", {})
    if "PYTHON_SCRIPT_FILE_NAME" in host_settings:
        assert host_settings["PYTHON_SCRIPT_FILE_NAME"] == literal.group(1)


def test_host_settings_are_set_where_the_plan_allows(infra, template_values):
    host_settings = getattr(settings, "HOST_SETTINGS", {})
    for name in host_settings:
        if name in FLEX_FORBIDDEN:
            assert name in template_values, f"{name}: the local host needs it"
        else:
            assert missing_names(infra.app_settings, [name.split("__", 1)[0] if "__" in name else name]) == []
    assert [name for name in FLEX_FORBIDDEN if name in infra.app_settings] == []


def test_local_settings_template_has_every_local_setting_and_connection(template_values, bindings):
    connections = {b.fields["connection"] for b in bindings if b.fields.get("connection")}
    names = [s.env for s in code_settings() if s.local] + sorted(connections) + [settings.HOST_STORAGE_CONNECTION]
    assert missing_names(template_values, names) == []


def _span(text: str) -> int:
    """Seconds of a host.json time span ("[d.]hh:mm:ss")."""
    days, _, clock = text.rpartition(".") if text.count(":") == 2 and "." in text.split(":")[0] else ("", "", text)
    h, m, sec = (int(float(x)) for x in clock.split(":"))
    return (int(days) if days else 0) * 86_400 + h * 3600 + m * 60 + sec


def test_a_service_bus_message_keeps_its_lock_as_long_as_its_function_may_run():
    """Shorter renewal than the timeout: a long promotion is redelivered while it still runs."""
    host = json.loads(HOST_JSON.read_text())
    renewal = host["extensions"]["serviceBus"]["maxAutoLockRenewalDuration"]
    assert _span(renewal) >= _span(host["functionTimeout"]), (renewal, host["functionTimeout"])
    assert _span("01:00:00") == 3600 and _span("1.00:00:00") == 86_400


# -- queues, containers, functions, file types -------------------------------------------------
def test_every_service_bus_queue_the_code_uses_exists_in_bicep(infra, bindings):
    used = {resolve(b.fields["queueName"]) for b in bindings
            if b.type.startswith("serviceBus") and b.fields.get("queueName")}
    used |= {str(setting_defaults()[name]) for name in ("MM_UPSTREAM_QUEUE", "MM_PROMOTION_QUEUE")}
    assert used <= set(infra.servicebus_queues)


def test_the_code_uses_no_service_bus_topic_the_bicep_lacks(bindings):
    topics = {b.fields.get("topicName") for b in bindings if b.fields.get("topicName")}
    assert topics == set(), "topics are used: add them to infra/app/servicebus.bicep and to this test"


def test_every_lake_container_the_code_uses_exists_in_bicep(infra, bindings):
    used = set(lake.CONTAINERS) | {messages.RAW_CONTAINER, *messages.SCORING_CONTAINERS}
    used |= {resolve(b.fields["path"]).split("/", 1)[0] for b in bindings
             if b.type.startswith("blob") and b.fields.get("path")}
    assert used <= set(infra.lake_containers)


def test_the_model_registry_container_and_its_datastores_match_the_azureml_code(infra):
    containers = {prefix.split("/", 1)[0] for prefix in (azureml_registry.DEV_PREFIX, azureml_registry.PROD_PREFIX)}
    assert containers == {infra.registry_container}
    assert infra.registry_container in infra.lake_containers
    assert infra.datastore_prefix == setting_defaults()["MM_AZUREML_DATASTORE_PREFIX"]
    aml = validate_infra.read_bicep(INFRA / "app" / "aml.bicep")
    # one datastore <prefix><container> per lake container in dev, the registry's also in prod
    assert re.search(r"\[for container in lakeContainers:", aml.text)
    assert aml.text.count("name: '${datastorePrefix}${") == 2


def test_event_grid_filter_matches_the_ingestion_code(infra):
    assert infra.raw_container == messages.RAW_CONTAINER
    assert sorted(infra.data_suffixes) == sorted(messages.DATA_SUFFIXES)
    assert sorted(infra.event_suffixes) == sorted(messages.EVENT_SUFFIXES)  # files and folder markers
    # the deployment's markers reach the app as MM_DATASET_MARKERS, whose default is the same
    main = (INFRA / "main.bicep").read_text()
    assert "datasetMarkers: join(datasetMarkers, ',')" in main
    assert "MM_DATASET_MARKERS: datasetMarkers" in (INFRA / "app" / "function-app.bicep").read_text()
    assert settings.Settings(workdir=Path("/unused")).folder_markers == messages.FOLDER_MARKERS
    text = (INFRA / "app" / "eventgrid.bicep").read_text()
    types = re.search(r"includedEventTypes: \[(.*?)\]", text, re.S).group(1)
    assert sorted(re.findall(r"'([^']+)'", types)) == sorted([messages.BLOB_CREATED, messages.BLOB_RENAMED])
    apis = re.search(r"key: 'data\.api'\s+values: \[(.*?)\]", text, re.S).group(1)
    assert sorted(re.findall(r"'([^']+)'", apis)) == sorted(messages.COMPLETED_APIS)
    assert not set(messages.COMPLETED_APIS) & set(messages.INCOMPLETE_APIS)


def test_event_subscriptions_target_the_functions_that_exist(infra, bindings):
    by_function: dict[str, dict[str, Any]] = {}
    for b in bindings:
        if b.type.endswith("Trigger"):
            by_function[b.function] = {"type": b.type, **b.fields}
    assert by_function[infra.event_grid_function]["type"] == "eventGridTrigger"
    blob_triggers = {name for name, t in by_function.items() if t["type"] == "blobTrigger"}
    assert infra.has_blob_trigger == bool(blob_triggers) is False  # no blob trigger, no blobs_extension key
    assert "systemKeys.blobs_extension" not in (INFRA / "app" / "eventgrid.bicep").read_text()


# -- the templates themselves ------------------------------------------------------------------
def test_bicep_templates_are_structurally_sound():
    assert validate_infra.structural_problems(INFRA) == []


def test_main_template_creates_its_resource_group_at_subscription_scope():
    main = validate_infra.read_bicep(INFRA / "main.bicep")
    assert main.target_scope == "subscription"
    assert main.resources["rg"].startswith("Microsoft.Resources/resourceGroups@")


def test_parameters_file_uses_the_azd_environment():
    params = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert params["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert params["location"]["value"] == "${AZURE_LOCATION}"
    assert params["principalId"]["value"] == "${AZURE_PRINCIPAL_ID}"


def test_azure_yaml_deploys_the_repository_root_as_a_python_function_app():
    spec = yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))
    assert spec["infra"]["path"] == "infra"
    api = spec["services"]["api"]
    assert (api["project"], api["language"], api["host"]) == (".", "python", "function")
    # function-app.bicep tags the site with the same service name, which is how azd finds it
    app = validate_infra.read_bicep(INFRA / "app" / "function-app.bicep")
    assert "'azd-service-name': 'api'" in app.text


def _python_with_parsers() -> str | None:
    """This interpreter if it has the Bicep parsers, else the tool venv of validate-infra.sh."""
    if importlib.util.find_spec("tree_sitter_bicep") and importlib.util.find_spec("pycep"):
        return sys.executable
    tool = ROOT / ".venv" / "infra-tools" / "bin" / "python"
    return str(tool) if tool.exists() else None


def test_bicep_templates_parse_with_the_bicep_grammars():
    python = _python_with_parsers()
    if python is None:
        pytest.skip("Bicep parsers not installed: run scripts/validate-infra.sh once")
    proc = subprocess.run([python, str(ROOT / "scripts" / "validate_infra.py"), "--require-parsers", str(INFRA)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- the checks catch drift (each rule fails on a broken copy) ----------------------------------
@pytest.fixture
def infra_copy(tmp_path) -> Path:
    target = tmp_path / "infra"
    shutil.copytree(INFRA, target)
    return target


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_a_renamed_app_setting_is_caught(infra_copy):
    _edit(infra_copy / "app" / "function-app.bicep", "  MM_PROMOTION_QUEUE:", "  MM_PROMOTION_QUEUES:")
    broken = read_infra(infra_copy)
    assert missing_names(broken.app_settings, [s.env for s in code_settings()]) == ["MM_PROMOTION_QUEUE"]
    assert unknown_app_settings(broken.app_settings) == ["MM_PROMOTION_QUEUES"]


def test_a_key_based_connection_is_caught(infra_copy):
    _edit(infra_copy / "app" / "function-app.bicep", "  LakeStorage__credential: 'managedidentity'\n",
          "  LakeStorage: 'DefaultEndpointsProtocol=https;AccountKey=abc'\n")
    problems = identity_connection_problems(read_infra(infra_copy).app_settings, "LakeStorage")
    assert any("__credential" in p for p in problems) and any("hold a key" in p for p in problems)


def test_a_changed_default_or_choice_is_caught(infra_copy):
    _edit(infra_copy / "app" / "function-app.bicep", "MM_GROUP_SIZE: '50'", "MM_GROUP_SIZE: '500'")
    _edit(infra_copy / "app" / "function-app.bicep", "MM_LAKE_BACKEND: 'blob'", "MM_LAKE_BACKEND: 'adls'")
    broken = read_infra(infra_copy)
    problems = default_problems(broken.app_settings, broken.app_params_allowed)
    assert [p.split(":")[0] for p in problems] == ["MM_LAKE_BACKEND", "MM_GROUP_SIZE"]


def test_a_missing_queue_or_container_is_caught(infra_copy):
    _edit(infra_copy / "main.bicep", "var promotionQueueName = 'mm-promotions'", "var promotionQueueName = 'mm-promote'")
    _edit(infra_copy / "main.bicep", "  'scoring'\n", "")
    broken = read_infra(infra_copy)
    assert "mm-promotions" not in broken.servicebus_queues
    assert "scoring" not in broken.lake_containers


@pytest.mark.parametrize("path, old, new, expected", [
    ("app/monitoring.bicep", "    retentionInDays: retentionInDays\n  }", "    retentionInDays: retentionInDays\n",
     "is never closed"),
    ("app/servicebus.bicep", "'Microsoft.ServiceBus/namespaces@2024-01-01' =", "'Microsoft.ServiceBus/namespaces' =",
     "no valid @api-version"),
    ("main.bicep", "    queues: serviceBusQueues\n", "    queues: serviceBusQueues\n    queueCount: 2\n",
     "passes 'queueCount'"),
    ("main.bicep", "module lake 'app/storage-lake.bicep'", "module lake 'app/storage-lakes.bicep'",
     "does not exist"),
    ("main.bicep", "aml.outputs.computeName", "aml.outputs.clusterName", "not an output of app/aml.bicep"),
    ("app/sql.bicep", "param maxVCores int = 2\n", "param maxVCores int = 2\nparam unusedKnob int = 1\n",
     "param unusedKnob is declared but never used"),
    ("app/aml.bicep", "param computeVmSize string\n", "param computeVmSize string\nparam computeZone string\n",
     "does not pass required param 'computeZone'"),
    ("main.parameters.json", '"sqlBackend": {', '"sqlFlavour": {', "sets 'sqlFlavour', not a param"),
    ("app/aml-workspace.bicep", "workspaceDescription", "description", "shadows the function description()"),
])
def test_structural_checks_catch_a_broken_template(infra_copy, path, old, new, expected):
    _edit(infra_copy / path, old, new)
    problems = validate_infra.structural_problems(infra_copy)
    assert any(expected in p for p in problems), problems


def test_strings_comments_and_interpolations_do_not_confuse_the_scanner():
    text = ("var a = '{ not a brace }' // } nor this {\n"
            "var b = '${toLower('x}')}-${a}'\n/* { */\nvar c = '''\n{ multi\n'''\n")
    masked = validate_infra.mask(text)
    assert len(masked) == len(text)
    assert validate_infra.bracket_problems(masked) == []
    assert "toLower" in masked and "${" not in masked



# Writable properties of Microsoft.ServiceBus/namespaces (SBNamespaceProperties) per API version, as
# the Bicep type definitions give them (github.com/Azure/bicep-types-az, generated/servicebus/
# microsoft.servicebus/<version>/types.md). ARM drops a property its version's schema lacks, silently.
_SB_BASE = {"alternateName", "disableLocalAuth", "encryption", "privateEndpointConnections", "zoneRedundant"}
SERVICE_BUS_NAMESPACE_PROPERTIES = {
    "2021-11-01": _SB_BASE,
    "2024-01-01": _SB_BASE | {"minimumTlsVersion", "publicNetworkAccess", "premiumMessagingPartitions"},
}


def _namespace_properties(text: str) -> tuple[str, set[str]]:
    """The API version of the namespace resource and the property names its ``properties:`` sets."""
    m = re.search(r"^resource \w+ 'Microsoft\.ServiceBus/namespaces@([0-9a-z-]+)' = \{\n(.*?)^\}", text, re.M | re.S)
    assert m, "no Service Bus namespace resource"
    props = re.search(r"^  properties: \{\n(.*?)^  \}", m.group(2), re.M | re.S)
    assert props, "the namespace sets no properties"
    return m.group(1), set(re.findall(r"^    (\w+):", props.group(1), re.M))


def test_every_service_bus_namespace_property_is_in_its_api_versions_schema():
    """minimumTlsVersion and publicNetworkAccess are not in the 2021-11-01 schema: ARM drops them."""
    version, used = _namespace_properties((INFRA / "app" / "servicebus.bicep").read_text())
    assert {"minimumTlsVersion", "publicNetworkAccess", "disableLocalAuth"} <= used
    assert version in SERVICE_BUS_NAMESPACE_PROPERTIES, f"add {version}'s SBNamespaceProperties to the table"
    assert used <= SERVICE_BUS_NAMESPACE_PROPERTIES[version], used - SERVICE_BUS_NAMESPACE_PROPERTIES[version]
    # the rule itself: on the old version the two settings would not be in the schema
    assert used - SERVICE_BUS_NAMESPACE_PROPERTIES["2021-11-01"] == {"minimumTlsVersion", "publicNetworkAccess"}


def test_the_online_endpoint_name_and_identity_come_from_the_template(infra):
    """Endpoint names are unique per region: built from the resource token; the endpoint runs as the
    compute identity, whose client id the scoring container gets."""
    main = (INFRA / "main.bicep").read_text()
    assert re.search(r"^var azureMLEndpointName = 'mm-\$\{resourceToken\}'", main, re.M)
    settings = infra.app_settings
    assert settings["MM_AZUREML_ENDPOINT"] == "azureMLEndpointName"
    assert settings["MM_AZUREML_ENDPOINT_IDENTITY_ID"] == "azureMLEndpointIdentityId"
    assert "azureMLEndpointIdentityId: identity.outputs.computeIdentityId" in main
    assert "azureMLEndpointIdentityClientId: identity.outputs.computeIdentityClientId" in main


def _role_assignments(text: str) -> list[dict[str, str]]:
    """Each role assignment of a Bicep file: its scope, principal and role (the Bicep expressions)."""
    out = []
    for block in re.split(r"^resource ", text, flags=re.M)[1:]:
        if "'Microsoft.Authorization/roleAssignments@" not in block.split("\n", 1)[0]:
            continue
        fields = {k: re.search(rf"^\s*{k}:\s*(.+)$", block, re.M) for k in ("scope", "principalId", "roleDefinitionId")}
        out.append({k: m.group(1).strip() if m else "" for k, m in fields.items()})
    return out


def test_the_endpoint_identity_holds_the_roles_a_managed_online_endpoint_needs():
    """A managed online endpoint's identity needs AcrPull on the workspace's container registry and
    Storage Blob Data Reader on its default storage, or the deployment never becomes healthy; the
    scoring script reads registry/prod in the lake. The endpoint runs as the compute identity."""
    main = (INFRA / "main.bicep").read_text()
    assert "azureMLEndpointIdentityId: identity.outputs.computeIdentityId" in main
    assert "computePrincipalId: identity.outputs.computeIdentityPrincipalId" in main
    assert "prodWorkspaceStorageName: aml.outputs.prodStorageName" in main
    aml = (INFRA / "app" / "aml.bicep").read_text()
    prod = re.search(r"^module prod 'aml-workspace\.bicep' = \{(.*?)^\}", aml, re.M | re.S).group(1)
    assert "containerRegistryId: registry.id" in prod and "registryName string = registry.name" in aml
    granted = {(a["scope"], a["roleDefinitionId"].split("roles.")[-1].rstrip(")"))
               for a in _role_assignments((INFRA / "app" / "roles.bicep").read_text())
               if a["principalId"] == "computePrincipalId"}
    assert ("containerRegistry", "acrPull") in granted
    assert ("prodWorkspaceStorage", "storageBlobDataReader") in granted
    assert ("lake", "storageBlobDataReader") in granted  # registry/prod, read on demand
