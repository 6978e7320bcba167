"""The blob lake against Azurite: same paths, same listings, same Parquet as the local folder."""

from __future__ import annotations

import uuid

import pandas as pd
import pytest
from azure.storage.blob import BlobServiceClient

from shared.config import ProjectConfig
from shared.lake import LakeError, LocalLake, read_parquet, write_parquet
from shared.azureml.blob_lake import BlobLake
from shared.runs.backends import open_lake
from shared.settings import Settings

pytestmark = pytest.mark.azurite


@pytest.fixture
def lake(azurite_blob) -> BlobLake:
    """A fresh account view per test: container names carry a unique suffix where it matters."""
    return BlobLake.from_connection_string(azurite_blob.connection_string)


def _unique(container: str) -> str:
    return f"{container}-{uuid.uuid4().hex[:8]}"


def test_bytes_round_trip_and_the_container_is_created_on_first_write(lake):
    container = _unique("runs")
    path = f"{container}/r1/run.json"
    assert not lake.exists(path)
    lake.write_bytes(path, b'{"run_id": "r1"}')
    assert lake.exists(path)
    assert lake.read_bytes(path) == b'{"run_id": "r1"}'
    lake.write_bytes(path, b"second")  # overwrite in place
    assert lake.read_bytes(path) == b"second"


def test_missing_files_raise_a_lake_error_naming_the_path(lake):
    with pytest.raises(LakeError, match="no such file in the lake: runs/none/x.json"):
        lake.read_bytes("runs/none/x.json")
    with pytest.raises(LakeError, match="raw/absent.csv"):
        lake.size("raw/absent.csv")


def test_invalid_paths_and_container_names_are_rejected(lake):
    for bad in ("../etc/passwd", "/abs/path", "raw/a b.csv", "Raw/x.csv", "ab/x.csv", "justacontainer"):
        with pytest.raises(LakeError):
            lake.write_bytes(bad, b"x")


def test_listing_matches_the_local_lake_for_the_same_writes(lake, tmp_path):
    container = _unique("prepared")
    local = LocalLake(tmp_path)
    files = [
        f"{container}/d1/batches/batch-00000.parquet",
        f"{container}/d1/batches/batch-00001.parquet",
        f"{container}/d1/manifest.parquet",
        f"{container}/d10/dataset.json",
        f"{container}/LATEST",
    ]
    for path in files:
        lake.write_bytes(path, b"x")
        local.write_bytes(path, b"x")
    for prefix in (
        container,
        f"{container}/d1",
        f"{container}/d1/batches",
        f"{container}/d1/batches/",
        f"{container}/d2",
        f"{container}/LATEST",
    ):
        assert lake.list(prefix) == local.list(prefix), prefix
    assert lake.list(f"{container}/d1") == sorted(files[:3])  # 'd1/' does not match 'd10/'
    assert lake.list(_unique("nothing")) == []


def test_folder_markers_of_hierarchical_namespace_accounts_are_not_files(lake, azurite_blob):
    container = _unique("runs")
    lake.write_bytes(f"{container}/r1/results/batch-00000.jsonl", b"{}\n")
    service = BlobServiceClient.from_connection_string(azurite_blob.connection_string)
    service.get_blob_client(container, "r1/models").upload_blob(b"", metadata={"hdi_isfolder": "true"})
    assert lake.list(f"{container}/r1") == [f"{container}/r1/results/batch-00000.jsonl"]
    assert not lake.exists(f"{container}/r1/models")


def test_delete_is_idempotent(lake):
    path = f"{_unique('scoring')}/s1/input.parquet"
    lake.write_bytes(path, b"x")
    lake.delete(path)
    lake.delete(path)
    assert not lake.exists(path)


def test_ranges_and_sizes_read_part_of_a_blob(lake):
    path = f"{_unique('raw')}/sales.csv"
    lake.write_bytes(path, b"store,item\n1,2\n3,4\n")
    assert lake.size(path) == 19
    assert lake.read_range(path, 0, 10) == b"store,item"
    assert lake.read_range(path, 11, 3) == b"1,2"
    assert lake.local_path(path) is None
    first = lake.etag(path)
    lake.write_bytes(path, b"store,item\n5,6\n")
    assert lake.etag(path) != first and not first.startswith('"')  # a new version, without quotes


def test_a_copy_into_a_blob_reports_whether_it_is_still_running(lake):
    """Azurite finishes a server-side copy at once (status ``success``); in Azure a copy from another
    account can stay ``pending`` while Event Grid already reported the blob."""
    source = f"{_unique('raw')}/source.csv"
    lake.write_bytes(source, b"store,item\n1,2\n")
    target = f"{source.split('/')[0]}/copied.csv"
    src_container, src_name = source.split("/", 1)
    source_url = lake.service.get_blob_client(src_container, src_name).url
    copied = lake.service.get_blob_client(src_container, "copied.csv")
    copied.start_copy_from_url(source_url)
    assert copied.get_blob_properties().copy.status == "success"
    assert lake.copy_pending(target) is False and lake.copy_pending(source) is False
    with pytest.raises(LakeError, match="no such file"):
        lake.copy_pending(f"{src_container}/missing.csv")


def test_parquet_round_trip_through_the_core_helpers(lake):
    frame = pd.DataFrame(
        {"store": ["S1", "S2"], "sales": [1.5, 2.0], "date": pd.to_datetime(["2024-01-07"] * 2)}
    )
    path = f"{_unique('predictions')}/s1/predictions.parquet"
    write_parquet(lake, path, frame)
    back = read_parquet(lake, path)
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    assert list(read_parquet(lake, path, columns=["sales"]).columns) == ["sales"]


def test_open_lake_follows_the_settings(azurite_blob, tmp_path):
    local = open_lake(Settings(workdir=tmp_path))
    assert isinstance(local, LocalLake) and local.root == (tmp_path / "lake").resolve()
    blob = open_lake(
        Settings(workdir=tmp_path, lake_backend="blob", lake_connection_string=azurite_blob.connection_string)
    )
    assert isinstance(blob, BlobLake)
    assert blob.uri == azurite_blob.endpoint


def test_the_partition_step_writes_the_same_layout_to_blob_as_to_a_local_folder(lake, tmp_path):
    from shared.data.partitioning import load_dataset, prepare_dataset
    from shared.data.synthetic import generate_panel
    from shared.data.validation import validate

    cfg = ProjectConfig().with_overrides({"runner.rows_per_file": 400})
    frame = pd.concat(generate_panel(partitions=12, periods=60, seed=5), ignore_index=True)
    validated, report = validate(frame, cfg)
    local = LocalLake(tmp_path / "lake")
    on_disk = prepare_dataset(local, validated, cfg, report)
    in_blob = prepare_dataset(lake, validated, cfg, report)

    assert in_blob.dataset_id == on_disk.dataset_id
    prefix = f"prepared/{on_disk.dataset_id}"
    assert lake.list(prefix) == local.list(prefix)
    assert len(in_blob.batch_paths) > 1
    for path in in_blob.batch_paths:
        pd.testing.assert_frame_equal(read_parquet(lake, path), read_parquet(local, path))
    reloaded = load_dataset(lake, on_disk.dataset_id)
    pd.testing.assert_frame_equal(reloaded.manifest, on_disk.manifest)
    again = prepare_dataset(lake, validated, cfg, report)  # idempotent on blob too
    assert again.dataset_id == on_disk.dataset_id and lake.list(prefix) == local.list(prefix)


def test_one_writer_per_blob_lake_a_lease_that_names_its_holder(azurite_blob):
    """The blob lake's writer lock (issue 12, case 5 in Azure): a second writer is refused naming
    the first, a released lease is taken at once, a waiting writer gets it when the holder ends."""
    import threading
    import time

    from shared.azureml.blob_lake import LakeLease
    from shared.errors import ManyModelsError
    from shared.locking import WorkdirLockedError

    first = BlobLake.from_connection_string(azurite_blob.connection_string)
    second = BlobLake.from_connection_string(azurite_blob.connection_string)
    with LakeLease(first, "manymodels train") as held:
        with pytest.raises(WorkdirLockedError) as caught:
            LakeLease(second, "manymodels ingest").acquire()
        assert "manymodels train" in str(caught.value) and caught.value.holder.command == "manymodels train"
        assert isinstance(caught.value, ManyModelsError)
        threading.Timer(1.0, held.release).start()
        started = time.monotonic()
        with LakeLease(second, "manymodels promote", wait=20):
            assert time.monotonic() - started < 10
    with LakeLease(first, "manymodels score"):
        pass
