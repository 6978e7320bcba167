"""Pytest fixtures that run the Azurite storage emulator (blob and queue) on 127.0.0.1.

Azurite comes from ``npm install`` (``package.json``). Each service runs as its own process on a
free port, in memory, with the API version check off (current SDKs are newer than the emulator)
and telemetry off (otherwise it tries to reach the network and stops slowly). Tests that need it
are skipped, with the reason, when ``node_modules/.bin/azurite-blob`` is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "node_modules" / ".bin"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented, only valid against the emulator).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
FLAGS = ["--skipApiVersionCheck", "--disableTelemetry", "--inMemoryPersistence", "--silent"]


@dataclass(frozen=True)
class AzuriteService:
    """A running emulator service: its endpoint and a connection string for the SDKs and the host."""

    kind: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        name = "BlobEndpoint" if self.kind == "blob" else "QueueEndpoint"
        return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};{name}={self.endpoint};"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Azurite exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"Azurite did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def _start(kind: str, tmp: Path) -> Iterator[AzuriteService]:
    executable = BIN / f"azurite-{kind}"
    if not executable.exists():
        pytest.skip(f"Azurite is not installed ({executable} missing): run 'npm install' in {ROOT}")
    port = _free_port()
    args = [str(executable), f"--{kind}Host", "127.0.0.1", f"--{kind}Port", str(port), *FLAGS]
    log = (tmp / f"azurite-{kind}.log").open("wb")
    env = {k: v for k, v in os.environ.items() if k != "AZURITE_ACCOUNTS"}  # the well-known account only
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
    try:
        _wait_for_port(port, proc)
        yield AzuriteService(kind, port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def azurite_blob(tmp_path_factory) -> Iterator[AzuriteService]:
    """The blob service of Azurite, for the whole test session."""
    yield from _start("blob", tmp_path_factory.mktemp("azurite-blob"))


@pytest.fixture(scope="session")
def azurite_queue(tmp_path_factory) -> Iterator[AzuriteService]:
    """The queue service of Azurite, for the whole test session."""
    yield from _start("queue", tmp_path_factory.mktemp("azurite-queue"))
