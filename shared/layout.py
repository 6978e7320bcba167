"""The lake's layout: every path a stage, a backend or an adapter reads or writes, built here only.

A lake path is ``<container>/<path inside it>`` (:mod:`shared.lake`; on Blob storage the first
segment is the container). This layout is a contract: Azure ML jobs mount these folders, the
Functions app finds runs by them, and a workdir written by one release is read by the next, so a
path changes here or nowhere. Ids are content-derived (``d...`` datasets, ``r...`` training runs,
``s...`` scoring runs, ``p...`` partitions) and never contain a ``/``.

::

    raw/...                                   files landed by upstream (lake events start runs)
    scoring/...                               scoring files landed by upstream
    prepared/LATEST                           id of the newest dataset
    prepared/<dataset>/dataset.json           its metadata (config, anchor, batches, validation)
    prepared/<dataset>/manifest.parquet       one row per partition (keys, counts, fingerprint, batch)
    prepared/<dataset>/batches/<batch>        mini-batch files of whole partitions
    runs/LATEST                               id of the newest training run
    runs/.manymodels-writer                   the blob lake's writer lease (one writer per lake)
    runs/<run>/run.json                       what the run is (kind, dataset, config, groups)
    runs/<run>/config/manymodels.toml         the config the entry scripts read
    runs/<run>/global/global.pkl              the run's global model fits (training)
    runs/<run>/partitions.json                the partitions an incremental run trains (training)
    runs/by-dataset/<dataset>-<config>        the run that trained a dataset with a training config
    runs/<run>/models/<file>.<token>.pack|.jsonl  a chunk's trained bundles and its done-mark sidecar
    runs/<run>/predictions/<stem>.parquet     a scoring group's predictions (scoring)
    runs/<run>/results/.../*.jsonl            one JSON line per partition (both kinds)
    runs/<run>/jobs/<job>.json                a local compute job's record
    runs/<run>/inputs/g<i>/MLTable            an Azure ML group's file list (when not a whole folder)
    runs/<run>/registry/g<i>/<name>/index.sqlite  a scoring group's slice of a registry index (Azure ML)
    scoring/<score>/batches/...               scoring request files (:mod:`shared.forecasts.scoring`)
    scoring/<score>/partitions.parquet        which partitions each request file holds
    predictions/<score>/predictions.parquet   a scoring run's predictions, all groups
    registry/<name>/index.sqlite              a registry's index (Azure ML registry in the lake,
    registry/<name>/artifacts/<pid>/v<n>.pkl  and the local registry under the workdir)

A local workdir holds ``lake/`` (the lake above), ``registry/{dev,prod}/`` (the local registries),
``manymodels.toml`` (the remembered config), the SQL store and ``.cache/``.
"""
from __future__ import annotations

from pathlib import PurePosixPath

RAW = "raw"
SCORING = "scoring"
PREPARED = "prepared"
RUNS = "runs"
PREDICTIONS = "predictions"
REGISTRY = "registry"
CONTAINERS = (RAW, PREPARED, RUNS, SCORING, PREDICTIONS)
SOURCE_CONTAINERS = (RAW, SCORING)  # where upstream lands files a stage may read
LATEST = "LATEST"
REGISTRY_NAMES = ("dev", "prod")
REGISTRY_INDEX = "index.sqlite"
DATASET_META_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
CONFIG_FILE = "manymodels.toml"


def _join(*parts: str) -> str:
    return "/".join(parts)


# -- pointers to the newest dataset and run ------------------------------------------------------
LATEST_DATASET = _join(PREPARED, LATEST)
LATEST_RUN = _join(RUNS, LATEST)
WRITER_LEASE = _join(RUNS, ".manymodels-writer")  # the blob lake's one-writer lease (LakeLease)


# -- prepared datasets ---------------------------------------------------------------------------
def dataset_dir(dataset_id: str) -> str:
    return _join(PREPARED, dataset_id)


def dataset_meta(dataset_id: str) -> str:
    return _join(PREPARED, dataset_id, DATASET_META_FILE)


def dataset_manifest(dataset_id: str) -> str:
    return _join(PREPARED, dataset_id, MANIFEST_FILE)


def batches_dir(dataset_id: str) -> str:
    return _join(PREPARED, dataset_id, "batches")


def batch(dataset_id: str, name: str) -> str:
    """A mini-batch file by its name (``batch-00000.parquet``), as the manifest's ``batch`` column has it."""
    return _join(PREPARED, dataset_id, "batches", name)


# -- runs (training and scoring) -----------------------------------------------------------------
def run_dir(run_id: str) -> str:
    return _join(RUNS, run_id)


def run_meta(run_id: str) -> str:
    return _join(RUNS, run_id, "run.json")


def run_config(run_id: str) -> str:
    return _join(RUNS, run_id, "config", CONFIG_FILE)


def run_models(run_id: str) -> str:
    return _join(RUNS, run_id, "models")


def model_artifact(run_id: str, partition_id: str) -> str:
    """A partition's bundle as runs of releases before training packs wrote it."""
    return _join(RUNS, run_id, "models", f"{partition_id}.pkl")


def run_partitions(run_id: str) -> str:
    """The JSON list of partitions a run trains, when it trains only some (incremental runs)."""
    return _join(run_dir(run_id), "partitions.json")


def dataset_run(dataset_id: str, config_digest: str) -> str:
    """Which run trained a dataset with a training config: a rerun finds it instead of a new run."""
    return _join(RUNS, "by-dataset", f"{dataset_id}-{config_digest}")


def global_model(run_id: str) -> str:
    return _join(RUNS, run_id, "global", "global.pkl")


def run_results(run_id: str) -> str:
    return _join(RUNS, run_id, "results")


def group_results(run_id: str, group_index: int) -> str:
    return _join(RUNS, run_id, "results", group_name(group_index))


def run_predictions(run_id: str) -> str:
    return _join(RUNS, run_id, "predictions")


def job_record(run_id: str, job_id: str) -> str:
    return _join(RUNS, run_id, "jobs", f"{job_id}.json")


def run_of_job(job_id: str) -> str:
    """The run of a job id (``<kind>-<run>-g<group>``, :func:`shared.runs.compute.job_id_for`)."""
    return job_id.partition("-")[2].rsplit("-g", 1)[0]


def group_name(group_index: int) -> str:
    return f"g{group_index:05d}"


def group_inputs(run_id: str, group_index: int) -> str:
    return _join(RUNS, run_id, "inputs", group_name(group_index))


def run_registry_slices(score_id: str) -> str:
    """Lake folder of a scoring run's registry slices (one folder per group and registry)."""
    return _join(RUNS, score_id, REGISTRY)


def registry_slice(score_id: str, group_index: int, name: str) -> str:
    """Lake folder of one scoring group's slice of registry ``name`` (dev | prod)."""
    return _join(run_registry_slices(score_id), group_name(group_index), name)


def registry_slice_index(score_id: str, group_index: int, name: str) -> str:
    """The slice itself: the index file a scoring group's job downloads."""
    return _join(registry_slice(score_id, group_index, name), REGISTRY_INDEX)


# -- scoring inputs and outputs ------------------------------------------------------------------
def scoring_dir(score_id: str) -> str:
    return _join(SCORING, score_id)


def scoring_batches(score_id: str) -> str:
    return _join(SCORING, score_id, "batches")


def scoring_batch(score_id: str, name: str) -> str:
    """A scoring request file by its name (``batch-00000.parquet``)."""
    return _join(scoring_batches(score_id), name)


def scoring_partitions(score_id: str) -> str:
    """Which partitions each scoring request file holds (``batch``, ``partition_id``): what a
    scoring plan slices the registries by, read once instead of every request file."""
    return _join(SCORING, score_id, "partitions.parquet")


def predictions(score_id: str) -> str:
    return _join(PREDICTIONS, score_id, "predictions.parquet")


# -- registries ------------------------------------------------------------------------------------
def registry_dir(name: str) -> str:
    """A registry's folder: under the workdir for the local registry, in the lake for Azure ML's."""
    if name not in REGISTRY_NAMES:
        raise ValueError(f"unknown registry {name!r}; one of {list(REGISTRY_NAMES)}")
    return _join(REGISTRY, name)


def registry_index(name: str) -> str:
    return _join(registry_dir(name), REGISTRY_INDEX)


# -- reading paths ------------------------------------------------------------------------------------
def container(path: str) -> str:
    return path.split("/", 1)[0]


def is_source(path: str) -> bool:
    """A path in a container upstream lands files in (``raw/...``, ``scoring/...``)."""
    return container(path) in SOURCE_CONTAINERS


def name(path: str) -> str:
    return PurePosixPath(path).name


def parent(path: str) -> str:
    return str(PurePosixPath(path).parent)
