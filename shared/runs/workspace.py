"""A workspace: one workdir's config, lake, registries, compute backend and SQL store.

The CLI opens one per command, the Functions app one per activity; every stage of
:mod:`shared.runs.pipeline` takes one. The backends are chosen by :mod:`shared.runs.backends` from the
deployment settings (local folders and a process pool when there are none) and opened lazily:
a command that never touches a registry never opens one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from shared import layout
from shared.runs import backends
from shared.config import CONFIG_FILE_NAME, ConfigError, ProjectConfig, load_config
from shared.errors import ManyModelsError
from shared.lake import Lake, LakeError

# What a workdir's data is keyed by: changing one of these on a workdir that holds data would mix
# two projects (a dataset keyed one way scored, served or trained against another).
IDENTITY_FIELDS = ("keys", "time")
# Everything a local workdir holds that --reset clears (the lock file and input data stay).
RESET_ENTRIES = ("lake", "registry", ".cache", "report.html", CONFIG_FILE_NAME)


class WorkdirIdentityError(ConfigError):
    """A command would change the partition keys or time column of a workdir that holds data."""


class Workspace:
    """A workdir: its remembered config, the lake, the dev and prod registries and the SQL store."""

    def __init__(self, root: Path, config: ProjectConfig, lake: Lake, settings: Any = None) -> None:
        self.root = root
        self.config = config
        self.lake = lake
        self.settings = settings
        self.azureml: Any = None  # the Azure ML clients, made on first use (shared.azureml.client)
        self._dev: backends.Registry | None = None
        self._prod: backends.Registry | None = None
        self._compute: backends.Compute | None = None

    @classmethod
    def open(
        cls,
        workdir: Path | str | None = None,
        settings: Any = None,
        overrides: Mapping[str, Any] | None = None,
        config_path: Path | str | None = None,
        remember: bool = True,
    ) -> "Workspace":
        """Open a workdir; with ``remember`` the effective config is saved for later commands.

        The Functions app opens with ``remember=False``: one request's options must not become
        the defaults of the next.
        """
        if workdir is None:
            if settings is None:
                from shared.settings import Settings

                settings = Settings.from_env()
            workdir = settings.workdir
        root = Path(workdir).resolve()
        remembered = root / CONFIG_FILE_NAME
        base = Path(config_path) if config_path else (remembered if remembered.is_file() else None)
        config = load_config(base, overrides)
        ws = cls(root, config, backends.open_lake(settings, root), settings)
        ws.check_identity()
        if remember:
            ws.remember_config()
        return ws

    def stored_identity(self) -> dict[str, object] | None:
        """The key columns and time column of the data this workdir holds (its newest dataset), or
        None when it holds none."""
        if not self.lake.exists(layout.LATEST_DATASET):
            return None
        try:
            dataset_id = self.lake.read_bytes(layout.LATEST_DATASET).decode().strip()
            meta = json.loads(self.lake.read_bytes(layout.dataset_meta(dataset_id)))
            data = meta["config"]["data"]
            return {name: data[name] for name in IDENTITY_FIELDS}
        except (LakeError, ValueError, KeyError, TypeError):
            return None

    def check_identity(self) -> None:
        """Refuse a config whose partition keys or time column differ from the data the workdir holds."""
        stored = self.stored_identity()
        if stored is None:
            return
        wanted = {"keys": list(self.config.data.keys), "time": self.config.data.time}
        changed = [name for name in IDENTITY_FIELDS if stored[name] != wanted[name]]
        if changed:
            what = "; ".join(f"data.{n} {stored[n]!r} -> {wanted[n]!r}" for n in changed)
            raise WorkdirIdentityError(
                f"the workdir {self.root.name!r} holds data keyed by data.keys {stored['keys']!r} and "
                f"data.time {stored['time']!r}; this command would change {what}. Use a new --workdir "
                "for a different key set or time column, or add --reset (ingest, run, demo) to clear "
                "this workdir's data, models and results first")

    def remember_config(self) -> None:
        path = self.config_file
        text = self.config.to_toml()
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            self.config.save(path)

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE_NAME

    # -- backends ------------------------------------------------------------------------------
    @property
    def registry_backend(self) -> str:
        return backends.registry_backend(self.settings)

    @property
    def dev(self) -> backends.Registry:
        if self._dev is None:
            self._dev, self._prod = backends.open_registries(self)
        return self._dev

    @property
    def prod(self) -> backends.Registry:
        if self._prod is None:
            self._dev, self._prod = backends.open_registries(self)
        return self._prod

    @property
    def compute(self) -> backends.Compute:
        if self._compute is None:
            self._compute = backends.open_compute(self.settings)
        return self._compute

    def registry_roots(self) -> tuple[Path, Path]:
        """Plain registry folders for local entry scripts (an Azure ML registry is materialised)."""
        return self.prod.folder(), self.dev.folder()

    def store(self):
        """The SQL result store, open: use it as a context manager (``with ws.store() as store:``)."""
        from shared.results.result_store import open_store

        return open_store(self.config, self.root, int_keys=self.integer_keys)

    def integer_keys(self) -> list[str]:
        """The key columns of the latest dataset whose values are all plain integers: the store types
        them BIGINT when it creates its tables (asked only then)."""
        from shared.lake import read_parquet
        from shared.results.sql_schema import integer_keys

        if not self.lake.exists(layout.LATEST_DATASET):
            return []
        dataset_id = self.lake.read_bytes(layout.LATEST_DATASET).decode().strip()
        try:
            manifest = read_parquet(self.lake, layout.dataset_manifest(dataset_id))
        except LakeError:
            return []
        keys = [k for k in self.config.data.keys if k in manifest.columns]
        return sorted(integer_keys({k: manifest[k] for k in keys}))

    @property
    def sql_location(self) -> str:
        """Where the SQL store is: the SQLite file, or the setting that holds the ODBC connection."""
        if self.config.store.backend == "sqlite":
            return str(self.root / self.config.store.sqlite_file)
        return f"odbc ({self.config.store.odbc_connection_setting})"

    def local_dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


def reset_workdir(root: Path | str, settings: object = None) -> list[str]:
    """Clear a local workdir's lake, registries, SQL file, report, cache and remembered config;
    returns what was removed. The caller holds the workdir's lock. A blob lake is never cleared
    from here (its data belongs to the deployment, not to one command)."""
    root = Path(root).resolve()
    if backends.lake_backend(settings) != backends.LOCAL:
        raise ManyModelsError("--reset clears local workdirs only; the lake here is Azure Blob storage: "
                              "use a new lake container or delete its data deliberately")
    entries = list(RESET_ENTRIES)
    remembered = root / CONFIG_FILE_NAME
    sqlite_file = "results.sqlite"
    if remembered.is_file():
        try:
            sqlite_file = load_config(remembered).store.sqlite_file
        except ManyModelsError:
            pass
    entries += [sqlite_file, f"{sqlite_file}-wal", f"{sqlite_file}-shm", f"{sqlite_file}-journal"]
    removed = []
    for name in entries:
        path = (root / name).resolve()
        if root not in path.parents:  # a configured SQL file outside the workdir is not ours to delete
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed
