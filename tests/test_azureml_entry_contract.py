"""The entry scripts under the exact Azure ML parallel job contract give the local pipeline's results.

For training and for scoring, the job is built with the SDK exactly as it would be submitted. Its
``program_arguments`` are resolved the way Azure ML resolves them (each ``${{inputs.x}}`` and
``${{outputs.y}}`` becomes the local path of the mounted or downloaded lake data), the parallel
runtime's own driver arguments are added in front (which is why the scripts must use
``parse_known_args``), ``mini_batch_size`` files go to each ``run()`` call, and the returned lines
are appended to ``results/g00000/rows.jsonl`` as ``append_row_to`` does. The local runner plays
the node's worker processes. Models and predictions must equal those of the local pipeline on the
same data.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("azure.ai.ml")

from shared.azureml.client import AzureMLSettings  # noqa: E402
from shared.azureml.jobs import RESULTS_FILE, build_job_for_group, stage_code  # noqa: E402
from shared.runs.pipeline import (Workspace, ingest, load_predictions, plan_scoring, plan_training,  # noqa: E402
                             promote, register_run, score, train, train_global, wants_global)
from shared.runs.runner import run_parallel  # noqa: E402
from shared.data.synthetic import write_panel  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `context` parameter is deprecated")]

OVERRIDES = {"runner.progress": False, "runner.rows_per_file": 500, "runner.workers": 2}
AML = AzureMLSettings(subscription_id="sub-1", resource_group="rg-mm", workspace_dev="mlw-dev",
                      workspace_prod="mlw-prod", mini_batch_size=2)
# What the parallel runtime's driver puts on a worker's command line besides program_arguments.
DRIVER_ARGS = ["--client_sdk_version", "1.60.0", "--scoring_module_name", "{script}",
               "--mini_batch_size", "2", "--error_threshold", "-1", "--logging_level", "INFO",
               "--run_invocation_timeout", "1800", "--run_max_try", "3",
               "--create_snapshot_at_runtime", "True", "--output", "{scratch}", "--input_fds_0", "{data}"]


@pytest.fixture(scope="module")
def panel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sales.parquet"
    write_panel(path, partitions=12, periods=104, freq="W", seed=11)
    return path


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    return stage_code(tmp_path_factory.mktemp("code") / "snapshot")


@pytest.fixture(scope="module")
def local(panel, tmp_path_factory):
    """The reference: the local pipeline, train -> promote -> score."""
    ws = Workspace.open(tmp_path_factory.mktemp("local"), overrides=OVERRIDES)
    ingest(ws, panel)
    plan, _, _ = train(ws)
    promote(ws, plan.run_id, min_accuracy=0.5)
    scoring, _ = score(ws)
    return ws, plan.run_id, scoring.score_id


@pytest.fixture(scope="module")
def contract(panel, code, tmp_path_factory):
    """The same stages, with each group run as the Azure ML parallel job would run it."""
    root = tmp_path_factory.mktemp("contract")
    ws = Workspace.open(root, overrides=OVERRIDES)
    ingest(ws, panel)
    plan = plan_training(ws)
    if wants_global(ws.config):  # as the orchestrator's train_global_model activity does
        train_global(ws, plan.run_id)
    outcome = _run_as_parallel_job(ws, "train", plan.run_id, plan.groups[0], code, root / "scratch-train")
    register_run(ws, plan.run_id)
    promote(ws, plan.run_id, min_accuracy=0.5)
    scoring = plan_scoring(ws)
    _run_as_parallel_job(ws, "score", scoring.score_id, scoring.groups[0], code, root / "scratch-score")
    load_predictions(ws, scoring.score_id)
    return ws, plan.run_id, scoring.score_id, outcome


def _run_as_parallel_job(ws: Workspace, kind: str, run_id: str, batch_paths: list[str], code: Path,
                         scratch: Path):
    job = build_job_for_group(ws, AML, kind, run_id, 0, batch_paths, code=code)
    assert job._validate().passed
    rest = job._to_rest_object().as_dict()
    (node,) = rest["properties"]["jobs"].values()
    task = node["task"]
    job_inputs = {name: spec["uri"] for name, spec in rest["properties"]["inputs"].items()}
    node_outputs = {name: spec["uri"] for name, spec in node["outputs"].items()}

    def mounted(uri: str) -> Path:
        """Where Azure ML would mount or download an azureml:// datastore path on the node."""
        match = re.fullmatch(r"azureml://datastores/lake_([a-z]+)/paths/(.*)", uri)
        assert match, uri
        container, rest_path = match.groups()
        lake_path = f"{container}/{rest_path}".rstrip("/")
        if lake_path == "registry/prod":
            return ws.prod.root
        if lake_path == "registry/dev":
            return ws.dev.root
        local = ws.lake.local_path(lake_path)
        if uri.endswith("/"):
            local.mkdir(parents=True, exist_ok=True)
        return local

    def resolve(match: re.Match) -> str:
        scope, name = match.groups()
        return str(mounted(job_inputs[name] if scope == "inputs" else node_outputs[name]))

    program = shlex.split(re.sub(r"\$\{\{(inputs|outputs)\.(\w+)\}\}", resolve, task["program_arguments"]))
    data = mounted(job_inputs["data"])
    driver = [a.format(script=task["entry_script"], scratch=scratch, data=data) for a in DRIVER_ARGS]
    files = sorted(str(p) for p in data.iterdir() if p.suffix == ".parquet")
    assert [Path(f).name for f in files] == [Path(p).name for p in batch_paths], "the whole folder"

    module = task["entry_script"].removesuffix(".py").replace("/", ".")
    spec = replace(ws.config.runner, mini_batch_size=int(node["mini_batch_size"]),
                   retries=node["retry_settings"]["max_retries"], progress=False)
    outcome = run_parallel(module, files, driver + program, spec, scratch / "runner")
    assert outcome.ok, outcome.failed_batches
    results = mounted(node_outputs["results"]) / RESULTS_FILE  # what append_row_to writes
    results.write_text("".join(json.dumps(row) + "\n" for row in outcome.rows), encoding="utf-8")
    return outcome


def test_the_training_job_runs_the_training_entry_script_in_mini_batches(contract):
    ws, run_id, _, outcome = contract
    assert outcome.batches_total == (len(list(ws.lake.list(f"prepared/{_dataset(ws)}/batches"))) + 1) // 2
    rows = [json.loads(line) for line in
            ws.lake.read_bytes(f"runs/{run_id}/results/g00000/{RESULTS_FILE}").decode().splitlines()]
    assert len(rows) == 12 and {r["run_id"] for r in rows} == {run_id}
    packed = next(r for r in rows if r.get("byte_length") is not None)
    assert ws.lake.exists(f"runs/{run_id}/models/{packed['artifact']}")  # its chunk's pack


def test_the_models_equal_the_local_pipeline_models(local, contract):
    local_ws, local_run, _ = local
    ws, run_id, _, _ = contract
    assert run_id == local_run, "same data and config, same run id"
    ours = {r.partition_id: r for r in ws.dev.find(run_id=run_id)}
    theirs = {r.partition_id: r for r in local_ws.dev.find(run_id=run_id)}
    assert ours.keys() == theirs.keys() and len(set(ours) - {"_global"}) == 12  # + the run's global model
    for pid, record in ours.items():
        assert (record.model_type, record.status, record.fingerprint) == \
            (theirs[pid].model_type, theirs[pid].status, theirs[pid].fingerprint)
        timeless = {k: v for k, v in record.metrics.items() if not k.endswith("_seconds")}  # wall-clock timings
        assert timeless == pytest.approx({k: theirs[pid].metrics[k] for k in timeless}, nan_ok=True)
        # their forecasts (with the run's global model bound) are compared by the predictions test below
    assert {r.partition_id for r in ws.prod.find(run_id=run_id)} == \
        {r.partition_id for r in local_ws.prod.find(run_id=run_id)}


def test_the_predictions_equal_the_local_pipeline_predictions(local, contract):
    local_ws, _, local_score = local
    ws, _, score_id, _ = contract
    columns = ["partition_id", "store", "item", "date", "prediction", "model", "model_version", "is_fallback"]
    order = ["partition_id", "date"]
    mine = _predictions(ws, score_id)[columns].sort_values(order).reset_index(drop=True)
    reference = _predictions(local_ws, local_score)[columns].sort_values(order).reset_index(drop=True)
    assert len(mine) == 12 * ws.config.forecast.horizon
    pd.testing.assert_frame_equal(mine, reference)
    statuses = [json.loads(line)["status"] for line in
                ws.lake.read_bytes(f"runs/{score_id}/results/g00000/{RESULTS_FILE}").decode().splitlines()]
    assert len(statuses) == 12 and set(statuses) <= {"scored", "fallback"}


def _predictions(ws: Workspace, score_id: str) -> pd.DataFrame:
    from shared.lake import read_parquet

    return read_parquet(ws.lake, f"predictions/{score_id}/predictions.parquet")


def _dataset(ws: Workspace) -> str:
    return ws.lake.read_bytes("prepared/LATEST").decode().strip()
