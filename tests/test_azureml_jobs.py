"""The Azure ML parallel jobs, built offline with the SDK's own classes, validated and serialized."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("azure.ai.ml")
# the SDK's marshmallow schemas warn on every build; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:The `context` parameter is deprecated")

from azure.ai.ml import load_job  # noqa: E402

from shared.azureml.client import AzureMLError, AzureMLSettings  # noqa: E402
from shared.azureml.jobs import (REPO_ROOT, RESULTS_FILE, STATE_MAP, WORKER_ENV, build_environment,  # noqa: E402
                                 build_job_for_group, build_pipeline_job, conda_spec, group_input,
                                 map_job_state, plan_score, plan_train, read_requirements, stage_code,
                                 write_registry_slice)
from shared.runs.compute import JOB_STATES  # noqa: E402
from shared.config import ProjectConfig  # noqa: E402
from shared.lake import LocalLake  # noqa: E402
from shared.runs.workspace import Workspace  # noqa: E402
from azureml_tools import azureml_tools_python  # noqa: E402
from shared.settings import Settings  # noqa: E402

RUN = "r0123456789abcdef"
DATASET = "d00112233445566aa"
AML_ENV = {"MM_AZUREML_INSTANCE_COUNT": "3", "MM_AZUREML_MAX_CONCURRENCY": "8", "MM_AZUREML_MAX_RETRIES": "4",
           "MM_AZUREML_MINI_BATCH_TIMEOUT": "900", "MM_AZUREML_MINI_BATCH_ERROR_THRESHOLD": "2",
           "MM_AZUREML_LOGGING_LEVEL": "DEBUG"}


@pytest.fixture(scope="module")
def aml() -> AzureMLSettings:
    settings = Settings(workdir=Path("/unused"), compute_backend="azureml", registry_backend="azureml",
                        azureml_subscription_id="sub-1", azureml_resource_group="rg-mm",
                        azureml_workspace_dev="mlw-dev", azureml_workspace_prod="mlw-prod",
                        azureml_compute="cpu-cluster", azure_client_id="client-1")
    return AzureMLSettings.from_settings(settings, environ=AML_ENV)


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    return stage_code(tmp_path_factory.mktemp("code") / "snapshot")


@pytest.fixture
def lake(tmp_path) -> LocalLake:
    lake = LocalLake(tmp_path / "lake")
    for i in range(3):
        lake.write_bytes(f"prepared/{DATASET}/batches/batch-{i:05d}.parquet", b"PAR1")
    lake.write_bytes(f"prepared/{DATASET}/dataset.json", b"{}")
    return lake


def _batches(n: int = 3) -> list[str]:
    return [f"prepared/{DATASET}/batches/batch-{i:05d}.parquet" for i in range(n)]


def _rest(job) -> dict:
    rest = job._to_rest_object()
    return json.loads(json.dumps(rest.as_dict(), default=str))


def _node(rest: dict) -> dict:
    jobs = rest["properties"]["jobs"]
    assert len(jobs) == 1, "one parallel step per pipeline job"
    return next(iter(jobs.values()))


def test_training_job_validates_and_carries_the_parallel_settings(aml, code, lake):
    cfg = ProjectConfig()
    data = group_input(aml, lake, RUN, 0, _batches())
    job = build_pipeline_job(aml, plan_train(aml, cfg, RUN, DATASET, 0, data), code=code)
    result = job._validate()
    assert result.passed, result.error_messages

    rest = _rest(job)
    props = rest["properties"]
    assert props["jobType"] == "Pipeline"
    assert props["computeId"] == "cpu-cluster"
    assert props["inputs"]["data"] == {"uri": f"azureml://datastores/lake_prepared/paths/{DATASET}/batches/",
                                       "mode": "ReadOnlyMount", "jobInputType": "uri_folder"}
    assert props["inputs"]["config"]["uri"] == \
        f"azureml://datastores/lake_runs/paths/{RUN}/config/manymodels.toml"
    assert props["inputs"]["dataset_meta"]["uri"] == \
        f"azureml://datastores/lake_prepared/paths/{DATASET}/dataset.json"
    assert props["inputs"]["config"]["mode"] == "Download"

    node = _node(rest)
    assert node["type"] == "parallel"
    assert node["task"]["entry_script"] == "shared/entry/train.py"
    assert Path(node["task"]["code"]) == code
    assert node["task"]["append_row_to"] == "${{outputs.results}}"
    args = node["task"]["program_arguments"].split()
    assert args == ["--config", "${{inputs.config}}", "--dataset-meta", "${{inputs.dataset_meta}}",
                    "--output-dir", "${{outputs.models}}", "--run-id", RUN,
                    "--append_row_file_name", RESULTS_FILE]
    assert node["input_data"] == "${{inputs.data}}"
    assert node["mini_batch_size"] == cfg.runner.mini_batch_size
    assert node["resources"]["instance_count"] == 3
    assert node["max_concurrency_per_instance"] == 8
    assert node["retry_settings"] == {"max_retries": 4, "timeout": 900}
    assert node["mini_batch_error_threshold"] == 2
    assert node["error_threshold"] == -1
    assert node["logging_level"] == "DEBUG"
    assert node["environment_variables"] == WORKER_ENV
    assert node["outputs"]["models"] == {"uri": f"azureml://datastores/lake_runs/paths/{RUN}/models/",
                                         "mode": "ReadWriteMount", "job_output_type": "uri_folder"}
    assert node["outputs"]["results"]["uri"] == f"azureml://datastores/lake_runs/paths/{RUN}/results/g00000/"

    environment = node["task"]["environment"]
    assert environment["image"] == aml.image
    pip = environment["conda_file"]["dependencies"][-1]["pip"]
    assert {"azureml-core", "mltable"} <= set(pip)
    assert any(p.startswith("scikit-learn") for p in pip) and any(p.startswith("pandas") for p in pip)
    assert not any(p.startswith("azure-functions") for p in pip), "host-only packages stay off the cluster"
    assert job.name == f"train-{RUN}-g00000"
    assert job.tags == {"manymodels": "train", "run_id": RUN, "group": "0", "files": "3",
                        "input": "uri_folder"}
    assert job.jobs[next(iter(job.jobs))].component.is_deterministic is False


def test_scoring_job_downloads_its_groups_index_slices_and_mounts_the_registries_read_only(aml, code, lake):
    cfg = ProjectConfig()
    score_id = "s0123456789abcdef"
    paths = [f"scoring/{score_id}/batches/batch-00000.parquet"]
    lake.write_bytes(paths[0], b"PAR1")
    data = group_input(aml, lake, score_id, 4, paths)
    job = build_pipeline_job(aml, plan_score(aml, cfg, score_id, DATASET, 4, data), code=code)
    assert job._validate().passed
    rest = _rest(job)
    node = _node(rest)
    assert node["task"]["entry_script"] == "shared/entry/score.py"
    args = node["task"]["program_arguments"].split()
    flags = dict(zip(args[::2], args[1::2]))
    assert flags == {"--config": "${{inputs.config}}", "--dataset-meta": "${{inputs.dataset_meta}}",
                     "--prod-registry": "${{inputs.prod_registry}}", "--prod-index": "${{inputs.prod_index}}",
                     "--dev-registry": "${{inputs.dev_registry}}", "--dev-index": "${{inputs.dev_index}}",
                     "--output-dir": "${{outputs.predictions}}", "--score-id": score_id,
                     "--append_row_file_name": RESULTS_FILE}
    inputs = rest["properties"]["inputs"]
    runs = f"azureml://datastores/lake_runs/paths/{score_id}"
    # the group's slice of each index, downloaded (SQLite opens it read-write) ...
    assert inputs["prod_index"] == {"uri": f"{runs}/registry/g00004/prod/index.sqlite",
                                    "mode": "Download", "jobInputType": "uri_file"}
    assert inputs["dev_index"]["uri"] == f"{runs}/registry/g00004/dev/index.sqlite"
    # ... over the registry folders, mounted read-only: the job reads only the artifacts it names
    assert inputs["prod_registry"] == {"uri": "azureml://datastores/lake_registry/paths/prod/",
                                       "mode": "ReadOnlyMount", "jobInputType": "uri_folder"}
    assert inputs["dev_registry"] == {"uri": "azureml://datastores/lake_registry/paths/dev/",
                                      "mode": "ReadOnlyMount", "jobInputType": "uri_folder"}
    assert node["outputs"]["predictions"]["uri"] == f"{runs}/predictions/"
    assert node["outputs"]["results"]["uri"] == f"{runs}/results/g00004/"
    assert job.name == f"score-{score_id}-g00004"
    # a production registry on its own storage is read through its own datastore
    own = plan_score(aml.with_changes(prod_datastore="prod_registry_store"), cfg, score_id, DATASET, 4, data)
    assert own.folders["prod_registry"] == "azureml://datastores/prod_registry_store/paths/prod/"

    # without the baseline fallback the dev registry is not downloaded at all
    no_fallback = cfg.with_overrides({"promotion.fallback": "none"})
    plan = plan_score(aml, no_fallback, score_id, DATASET, 4, group_input(aml, lake, score_id, 4, paths))
    assert "dev_registry" not in plan.folders and "--dev-registry" not in plan.arguments
    assert "dev_index" not in plan.files and "--dev-index" not in plan.arguments
    # nor when the chain is production alone; any other source (here baseline alone) reads it
    production_only = cfg.with_overrides({"scoring.chain": ["production"]})
    plan = plan_score(aml, production_only, score_id, DATASET, 4, group_input(aml, lake, score_id, 4, paths))
    assert "dev_registry" not in plan.folders
    baseline_only = cfg.with_overrides({"scoring.chain": ["baseline"]})
    plan = plan_score(aml, baseline_only, score_id, DATASET, 4, group_input(aml, lake, score_id, 4, paths))
    assert "dev_registry" in plan.folders


def test_a_group_that_is_part_of_a_folder_reads_a_file_list_mltable_mounted_read_only(aml, code, lake):
    """The parallel job docs allow a file-list MLTable only as ro_mount or download (not eval_mount)."""
    subset = _batches()[1:]
    data = group_input(aml, lake, RUN, 1, subset)
    assert data.kind == "mltable"
    assert data.uri == f"azureml://datastores/lake_runs/paths/{RUN}/inputs/g00001/"
    table = yaml.safe_load(lake.read_bytes(data.mltable_path))
    workspace = "azureml://subscriptions/sub-1/resourcegroups/rg-mm/workspaces/mlw-dev"
    assert table == {"paths": [{"file": f"{workspace}/datastores/lake_prepared/paths/{p.split('/', 1)[1]}"}
                               for p in subset]}
    job = build_pipeline_job(aml, plan_train(aml, ProjectConfig(), RUN, DATASET, 1, data), code=code)
    assert job._validate().passed
    assert _rest(job)["properties"]["inputs"]["data"] == \
        {"uri": data.uri, "mode": "ReadOnlyMount", "jobInputType": "mltable"}
    with pytest.raises(AzureMLError, match="no files"):
        group_input(aml, lake, RUN, 2, [])


def test_the_job_dumps_to_yaml_and_loads_back_valid(aml, code, lake, tmp_path):
    job = build_pipeline_job(aml, plan_train(aml, ProjectConfig(), RUN, DATASET, 0,
                                             group_input(aml, lake, RUN, 0, _batches())), code=code)
    path = tmp_path / "job.yml"
    job.dump(path)
    spec = yaml.safe_load(path.read_text())
    assert spec["type"] == "pipeline" and spec["compute"] == "azureml:cpu-cluster"
    node = next(iter(spec["jobs"].values()))
    assert node["type"] == "parallel"
    assert node["mini_batch_size"] == "1" and node["max_concurrency_per_instance"] == 8
    assert node["resources"] == {"instance_count": 3}
    assert node["retry_settings"] == {"max_retries": 4, "timeout": 900}
    assert node["task"]["entry_script"] == "shared/entry/train.py"
    assert node["outputs"]["models"]["path"] == f"azureml://datastores/lake_runs/paths/{RUN}/models/"
    loaded = load_job(path)
    assert loaded._validate().passed
    assert _node(_rest(loaded))["task"]["program_arguments"] == _node(_rest(job))["task"]["program_arguments"]


def test_a_workspace_group_writes_its_config_to_the_lake_first(aml, code, tmp_path):
    cfg = ProjectConfig().with_overrides({"forecast.horizon": 6, "runner.mini_batch_size": 2})
    ws = Workspace(tmp_path, cfg, LocalLake(tmp_path / "lake"))
    for path in _batches():
        ws.lake.write_bytes(path, b"PAR1")
    ws.lake.write_bytes(f"runs/{RUN}/run.json", json.dumps({"run_id": RUN, "dataset_id": DATASET,
                                                            "config": cfg.to_dict()}).encode())
    job = build_job_for_group(ws, aml, "train", RUN, 0, _batches(), code=code)
    assert ProjectConfig.from_dict(__import__("tomllib").loads(
        ws.lake.read_bytes(f"runs/{RUN}/config/manymodels.toml").decode())).forecast.horizon == 6
    assert _node(_rest(job))["mini_batch_size"] == 2, "the project's mini-batch size unless overridden"
    assert build_job_for_group(ws, aml.with_changes(mini_batch_size=5), "train", RUN, 0, _batches(),
                               code=code).jobs[next(iter(job.jobs))].mini_batch_size == 5


def test_every_azure_ml_state_maps_onto_a_monitor_state():
    azure_states = ["NotStarted", "Queued", "Preparing", "Provisioning", "Starting", "Running", "Finalizing",
                    "CancelRequested", "Completed", "Failed", "Canceled", "NotResponding", "Paused",
                    "Unknown"]
    assert set(STATE_MAP) == set(azure_states)
    assert {map_job_state(s) for s in azure_states} <= set(JOB_STATES)
    assert [map_job_state(s) for s in ("Queued", "Running", "Completed", "Failed", "Canceled")] == \
        ["queued", "running", "completed", "failed", "canceled"]
    assert map_job_state("completed") == "completed", "case-insensitive"
    assert map_job_state("CancelRequested") == "running", "not terminal until Canceled"
    assert map_job_state(None) == "running" and map_job_state("SomethingNew") == "running"


def test_the_environment_is_requirements_txt_and_its_version_follows_the_content(aml, tmp_path):
    requirements = read_requirements()
    assert any(r.startswith("azure-ai-ml") for r in requirements)
    assert not any(r.startswith(("#", "-")) for r in requirements)
    # the ranges (requirements.in), not the Function App's pins: Azure ML adds packages of its own
    assert requirements == [line.split("#", 1)[0].strip() for line in
                            (REPO_ROOT / "requirements.in").read_text().splitlines()
                            if line.split("#", 1)[0].strip() and not line.startswith("-")]
    spec = conda_spec(["pandas>=2", "azure-functions>=1.2", "azureml-core==1.60"],
                      ("azureml-core", "mltable"))
    assert spec["dependencies"][-1] == {"pip": ["pandas>=2", "azureml-core==1.60", "mltable"]}
    env = build_environment(aml)
    assert env.name == "manymodels-parallel" and env.image == aml.image
    assert build_environment(aml).version == env.version
    other = tmp_path / "requirements.txt"
    other.write_text("pandas>=2\n")
    assert build_environment(aml, requirements=other).version != env.version
    serving = build_environment(aml, "serving")
    assert "azureml-inference-server-http" in serving.conda_file["dependencies"][-1]["pip"]
    with pytest.raises(AzureMLError):
        build_environment(aml, "gpu")


def test_the_code_snapshot_is_the_shared_package_only(code):
    assert (code / "shared" / "entry" / "train.py").is_file()
    assert (code / "shared" / "azureml" / "online_score.py").is_file()
    assert (code / "requirements.txt").is_file()
    assert not (code / "tests").exists() and not list(code.rglob("__pycache__"))
    assert stage_code(code) == code, "a complete snapshot is reused"


def test_settings_name_what_is_missing_and_map_lake_paths_to_datastores(aml):
    with pytest.raises(AzureMLError, match="MM_AZUREML_WORKSPACE_PROD"):
        AzureMLSettings.from_env({"MM_AZUREML_SUBSCRIPTION_ID": "s", "MM_AZUREML_RESOURCE_GROUP": "g",
                                  "MM_AZUREML_WORKSPACE_DEV": "d"})
    with pytest.raises(AzureMLError, match="must differ"):
        AzureMLSettings.from_env({"MM_AZUREML_SUBSCRIPTION_ID": "s", "MM_AZUREML_RESOURCE_GROUP": "g",
                                  "MM_AZUREML_WORKSPACE_DEV": "w", "MM_AZUREML_WORKSPACE_PROD": "w"})
    with pytest.raises(AzureMLError, match="MM_AZUREML_INSTANCE_COUNT"):
        AzureMLSettings.from_env({"MM_AZUREML_SUBSCRIPTION_ID": "s", "MM_AZUREML_RESOURCE_GROUP": "g",
                                  "MM_AZUREML_WORKSPACE_DEV": "d", "MM_AZUREML_WORKSPACE_PROD": "p",
                                  "MM_AZUREML_INSTANCE_COUNT": "many"})
    assert aml.client_id == "client-1" and aml.instance_count == 3 and aml.registry is None
    assert aml.lake_uri("prepared/d1/batches", folder=True) == \
        "azureml://datastores/lake_prepared/paths/d1/batches/"
    assert aml.lake_uri("registry/prod/assets/v1", datastore="prod_registry") == \
        "azureml://datastores/prod_registry/paths/prod/assets/v1"
    assert aml.registry_datastore == "lake_registry"


# -- what Azure ML itself reads: Microsoft's own mltable package, the job environment, the slices ------
def _run_mltable(folder: Path) -> list[dict]:
    """Load an MLTable folder with Microsoft's ``mltable`` package (its own venv: see
    scripts/validate-azureml.sh) and return its paths, as the parallel runtime would read them."""
    import subprocess

    python = azureml_tools_python()
    out = subprocess.run([str(python), "-c", "import json, sys, mltable; "
                          "print(json.dumps(mltable.load(sys.argv[1]).paths))", str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_file_list_mltable_we_write_loads_with_microsofts_mltable_package(aml, lake):
    subset = _batches()[::2]
    data = group_input(aml, lake, RUN, 3, subset)
    folder = lake.local_path(data.mltable_path).parent
    paths = _run_mltable(folder)
    workspace = "azureml://subscriptions/sub-1/resourcegroups/rg-mm/workspaces/mlw-dev"
    assert paths == [{"file": f"{workspace}/datastores/lake_prepared/paths/{p.split('/', 1)[1]}"} for p in subset]


def test_the_job_environment_does_not_set_pythonpath(aml, code, lake):
    """The parallel driver imports the entry module by its package path; PYTHONPATH='.' is not ours to set."""
    job = build_pipeline_job(aml, plan_train(aml, ProjectConfig(), RUN, DATASET, 0,
                                             group_input(aml, lake, RUN, 0, _batches())), code=code)
    assert "PYTHONPATH" not in _node(_rest(job))["environment_variables"]


def _registry_with_history(root: Path, name: str, partitions: list[str], versions: int):
    from shared.registries.registry import ModelRegistry

    registry = ModelRegistry(root, name)
    for v in range(versions):
        registry.register_many([({"partition_id": pid, "run_id": f"r{v:016x}", "model_type": "ets",
                                  "metrics": {"wape": 0.1 * v}}, f"{pid} v{v}".encode())
                                for pid in partitions])
    return registry


def test_a_scoring_group_gets_only_its_partitions_newest_models(aml, code, tmp_path):
    """Each job downloads a slice of the index: its partitions' newest versions, not every version of
    every model; over the registry folder it reads exactly those models' artifacts, as registered."""
    import pandas as pd

    from shared.keys import PARTITION_ID
    from shared.lake import write_parquet
    from shared.registries.registry import ModelRegistry

    score_id = "s0123456789abcdef"
    everyone = [f"p{i:020x}" for i in range(12)]
    cfg = ProjectConfig()
    ws = Workspace(tmp_path, cfg, LocalLake(tmp_path / "lake"))
    prod = _registry_with_history(tmp_path / "registry" / "prod", "prod", everyone, versions=3)
    dev = _registry_with_history(tmp_path / "registry" / "dev", "dev", everyone, versions=2)
    ws._prod, ws._dev = prod, dev  # the workspace's registries
    mine = everyone[3:6]
    batch = f"runs/{score_id}/inputs/batches/batch-00001.parquet"
    write_parquet(ws.lake, batch, pd.DataFrame({PARTITION_ID: [pid for pid in mine for _ in range(4)],
                                                "period": list(range(4)) * len(mine)}))
    ws.lake.write_bytes(f"runs/{score_id}/run.json", json.dumps(
        {"score_id": score_id, "dataset_id": DATASET, "config": cfg.to_dict()}).encode())
    job = build_job_for_group(ws, aml, "score", score_id, 1, [batch], code=code)
    inputs = _rest(job)["properties"]["inputs"]
    assert inputs["prod_index"]["uri"] == \
        f"azureml://datastores/lake_runs/paths/{score_id}/registry/g00001/prod/index.sqlite"

    for name, source, newest in (("prod", prod, 3), ("dev", dev, 2)):
        folder = ws.lake.local_path(f"runs/{score_id}/registry/g00001/{name}")
        assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["index.sqlite"]  # no copies
        # what the entry script opens on the node: the downloaded slice over the mounted registry
        sliced = ModelRegistry(source.root, name, index=folder / "index.sqlite")
        assert sliced.count() == len(mine)
        found = sliced.latest_many(everyone)
        assert sorted(found) == mine
        for pid in mine:
            expected = source.latest(pid)
            assert found[pid] == expected  # versions, run ids, metrics and tags as in the registry
            assert sliced.verified_bytes(found[pid]) == f"{pid} v{newest - 1}".encode()  # digest checked
        sliced.close()
    assert write_registry_slice(ws.lake, prod, "prod", ["p" + "f" * 20], "runs/x/empty") == \
        {"partitions": 1, "models": 0}


def _folder_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


@pytest.mark.slow
def test_at_reference_scale_a_groups_slices_are_its_share_of_the_registries_not_all_of_them(aml, code, tmp_path):
    """10,000 partitions with every version of every model in dev and prod, scored in 16 groups: each
    job downloads an index of its ~625 partitions' newest models and the global models they need,
    ~1/16 of the newest models and a small part of the index's bytes; no artifact is copied."""
    import sqlite3

    import pandas as pd

    from shared.models.global_model import GLOBAL_ID
    from shared.keys import PARTITION_ID
    from shared.lake import write_parquet
    from shared.registries.registry import ModelRegistry

    score_id = "s00000000000000cd"
    everyone = [f"p{i:020x}" for i in range(10_000)]
    artifact = b"m" * 2_000  # about the size of a small model's pickle

    def registry(name: str, runs: list[tuple[str, list[str]]]) -> ModelRegistry:
        reg = ModelRegistry(tmp_path / "registry" / name, name)
        for run_id, pids in runs:  # each run registers its partitions' models and its global model
            reg.register_many([({"partition_id": pid, "run_id": run_id, "model_type": "ets"}, artifact)
                               for pid in [*pids, GLOBAL_ID]])
        return reg

    # production: every partition promoted from run 1, a third of them again from run 2; development:
    # runs 1 and 2 trained everything
    runs = ["r" + "1" * 16, "r" + "2" * 16]
    prod = registry("prod", [(runs[0], everyone), (runs[1], everyone[::3])])
    dev = registry("dev", [(runs[0], everyone), (runs[1], everyone)])
    cfg = ProjectConfig()
    ws = Workspace(tmp_path, cfg, LocalLake(tmp_path / "lake"))
    ws._prod, ws._dev = prod, dev
    ws.lake.write_bytes(f"runs/{score_id}/run.json", json.dumps(
        {"score_id": score_id, "dataset_id": DATASET, "config": cfg.to_dict()}).encode())
    groups = [everyone[g::16] for g in range(16)]  # 625 partitions each
    for g in (0, 15):
        mine = groups[g]
        batch = f"runs/{score_id}/inputs/batches/batch-{g:05d}.parquet"
        write_parquet(ws.lake, batch, pd.DataFrame({PARTITION_ID: [pid for pid in mine for _ in range(3)],
                                                    "period": [0, 1, 2] * len(mine)}))
        inputs = _rest(build_job_for_group(ws, aml, "score", score_id, g, [batch], code=code))["properties"]["inputs"]
        for name, source in (("prod", prod), ("dev", dev)):
            assert inputs[f"{name}_index"]["uri"] == \
                f"azureml://datastores/lake_runs/paths/{score_id}/registry/g{g:05d}/{name}/index.sqlite"
            folder = ws.lake.local_path(f"runs/{score_id}/registry/g{g:05d}/{name}")
            with sqlite3.connect(folder / "index.sqlite") as index:
                rows = index.execute("SELECT partition_id, version, run_id FROM models").fetchall()
            newest = source.latest_many(mine)
            expected = {(r.partition_id, r.version, r.run_id) for r in newest.values()}
            needed = {r.run_id for r in newest.values()}  # the runs whose global models bundles bind
            expected |= {(GLOBAL_ID, source.by_run(run_id, GLOBAL_ID).version, run_id) for run_id in needed}
            assert set(rows) == expected and len(rows) == 625 + len(needed)
            assert needed == (set(runs) if name == "prod" else {runs[1]})
            files, size = _folder_bytes(folder)
            assert files == 1  # the index alone: the artifacts stay in the registry folder
            # prod holds 13,336 models, dev 20,002: a slice is 627 or 626 of them
            assert size < (source.index_path.stat().st_size) / 10, (name, size)


def test_a_scoring_run_pins_every_groups_slices_when_planned_so_a_later_promotion_reaches_none(
        aml, code, tmp_path):
    import pandas as pd

    from shared.azureml.jobs import pin_scoring
    from shared.keys import PARTITION_ID
    from shared.lake import write_parquet
    from shared.registries.registry import ModelRegistry

    score_id = "s00000000000000ab"
    everyone = [f"p{i:020x}" for i in range(6)]
    cfg = ProjectConfig()
    ws = Workspace(tmp_path, cfg, LocalLake(tmp_path / "lake"))
    ws._prod = _registry_with_history(tmp_path / "registry" / "prod", "prod", everyone, versions=1)
    ws._dev = _registry_with_history(tmp_path / "registry" / "dev", "dev", everyone, versions=1)
    groups = []
    for g, part in enumerate((everyone[:3], everyone[3:])):
        batch = f"runs/{score_id}/inputs/batches/batch-{g:05d}.parquet"
        write_parquet(ws.lake, batch, pd.DataFrame({PARTITION_ID: part, "period": [0] * len(part)}))
        groups.append([batch])
    ws.lake.write_bytes(f"runs/{score_id}/run.json", json.dumps(
        {"score_id": score_id, "dataset_id": DATASET, "config": cfg.to_dict()}).encode())
    assert pin_scoring(ws, score_id, groups, cfg) == 2
    # a promotion lands while the groups run: version 2 of every partition in production
    ws.prod.register_many([({"partition_id": pid, "run_id": "r" + "9" * 16, "model_type": "ets"}, b"new")
                           for pid in everyone])
    for g, batch in enumerate(groups):
        build_job_for_group(ws, aml, "score", score_id, g, batch, code=code)  # submission keeps the pin
        sliced = ModelRegistry(ws.prod.root, "prod",
                               index=ws.lake.local_path(f"runs/{score_id}/registry/g{g:05d}/prod/index.sqlite"))
        assert {r.version for r in sliced.latest_many(everyone).values()} == {1}
        sliced.close()
    assert pin_scoring(ws, score_id, groups, cfg) == 0  # idempotent: a replanned run keeps its slices


def test_an_incremental_training_job_passes_the_list_of_partitions_to_train(aml, code, lake):
    from shared import layout

    data = group_input(aml, lake, RUN, 0, _batches())
    plan = plan_train(aml, ProjectConfig(), RUN, DATASET, 0, data, layout.global_model(RUN),
                      layout.run_partitions(RUN))
    job = build_pipeline_job(aml, plan, code=code)
    assert job._validate().passed
    rest = _rest(job)
    assert rest["properties"]["inputs"]["partitions"]["uri"].endswith(f"{RUN}/partitions.json")
    args = _node(rest)["task"]["program_arguments"]
    assert "--partitions ${{inputs.partitions}}" in args and "--global-model ${{inputs.global_model}}" in args
    alone = build_pipeline_job(aml, plan_train(aml, ProjectConfig(), RUN, DATASET, 0, data, None,
                                               layout.run_partitions(RUN)), code=code)
    assert alone._validate().passed and "global_model" not in _rest(alone)["properties"]["inputs"]


def test_the_training_job_passes_the_global_models_recorded_digest_to_its_workers(aml, code, lake):
    from shared import layout

    data = group_input(aml, lake, RUN, 0, _batches())
    digest = "ab" * 32
    job = build_pipeline_job(aml, plan_train(aml, ProjectConfig(), RUN, DATASET, 0, data,
                                             layout.global_model(RUN), None, digest), code=code)
    assert job._validate().passed
    assert f"--global-model-sha256 {digest}" in _node(_rest(job))["task"]["program_arguments"]
    with pytest.raises(AzureMLError, match="not a digest"):
        plan_train(aml, ProjectConfig(), RUN, DATASET, 0, data, layout.global_model(RUN), None, "x; rm -rf /")
