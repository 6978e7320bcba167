"""A tiny entry script for the runner tests, with the Azure ML contract: init() and run().

It logs every init() and run() call to files (one per process), echoes the names of the files
it gets, and misbehaves on purpose by file name:
- ``fail``: run() raises; ``flaky``: raises the first time only;
- ``die``: the worker kills itself with SIGKILL the first time only; ``doom``: every time;
- ``frame``: run() returns a pandas DataFrame instead of JSON lines;
- ``garbage``: run() returns a line that is not JSON;
- ``slow``: run() writes a heartbeat file every 0.1 s for a minute (a batch still busy).

It also holds :class:`PickyRegressor`, an extra training candidate the training entry tests use
to make a chosen partition fail.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import Ridge


@dataclass
class _State:
    log_dir: Path
    tag: str


_state: _State | None = None  # set by init(), as in an Azure ML entry script


def init() -> None:
    global _state
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--tag", default="")
    args, _unknown = parser.parse_known_args()
    if args.tag == "bad-init":
        raise ValueError("init refuses the tag bad-init")
    if args.tag == "die-in-init":
        os.kill(os.getpid(), signal.SIGKILL)
    _state = _State(Path(args.log_dir), args.tag)
    with open(_state.log_dir / f"init-{os.getpid()}.log", "a", encoding="utf-8") as fh:
        fh.write("init\n")


def _once(name: str) -> bool:
    """True the first time this name is seen across all processes (a marker file)."""
    assert _state is not None
    try:
        fd = os.open(_state.log_dir / f"seen-{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def run(mini_batch: list[str]) -> list[str] | object:
    assert _state is not None, "run() before init()"
    with open(_state.log_dir / f"run-{os.getpid()}.log", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(mini_batch) + "\n")
    rows = []
    for path in mini_batch:
        name = Path(path).name
        if "fail" in name or ("flaky" in name and _once(name)):
            raise ValueError(f"cannot process {name}")
        if "doom" in name or ("die" in name and _once(name)):
            os.kill(os.getpid(), signal.SIGKILL)
        if "slow" in name:  # a long batch that keeps writing files, like training writing models
            for i in range(600):
                (_state.log_dir / f"beat-{os.getpid()}").write_text(str(i))
                time.sleep(0.1)
        rows.append({"file": name, "tag": _state.tag, "pid": os.getpid()})
    if any("garbage" in Path(p).name for p in mini_batch):
        return ["this is not json"]
    if any("frame" in Path(p).name for p in mini_batch):
        import pandas as pd

        return pd.DataFrame(rows)
    return [json.dumps(row) for row in rows]


class PickyRegressor(RegressorMixin, BaseEstimator):
    """A linear regressor that refuses targets whose mean exceeds ``max_mean`` while the file
    ``marker`` exists (so a test can make one partition fail, then let a rerun succeed), and
    can be slowed down by ``sleep`` seconds per fit (so a test can kill a run part-way)."""

    def __init__(self, max_mean: float = float("inf"), marker: str = "", sleep: float = 0.0):
        self.max_mean = max_mean
        self.marker = marker
        self.sleep = sleep

    def fit(self, X, y):
        if self.sleep:
            time.sleep(self.sleep)
        if self.marker and Path(self.marker).exists() and float(np.mean(y)) > self.max_mean:
            raise ValueError(f"picky: mean target {float(np.mean(y)):.1f} above {self.max_mean}")
        self.model_ = Ridge(alpha=1.0).fit(X, y)
        return self

    def predict(self, X):
        return self.model_.predict(X)
