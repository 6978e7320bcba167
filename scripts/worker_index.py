"""Index the app with the real Azure Functions Python worker's loader, as the host does at start-up.

The worker is not on PyPI in a current version (``azure-functions-worker`` stops at 1.1.9, before
the v2 programming model), so this is a manual check, not part of ``make test``. Give it a checkout
of github.com/Azure/azure-functions-python-worker (tested with 4.34.0) in a virtual environment
that has its dependencies (``protobuf~=4.25``, ``grpcio~=1.59``, ``grpcio-tools~=1.59``,
``azurefunctions-extensions-base``) and can import this project's requirements; the gRPC modules
are generated from the worker's ``.proto`` files on first use, as its own build does.

    python scripts/worker_index.py /path/to/azure-functions-python-worker

It imports ``main.py`` with the worker's ``loader.index_function_app``, registers every function
with ``process_indexed_function`` (which runs the worker's parameter, binding and annotation
checks) and prints one line per function; any refusal is the worker's own exception.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ("shared/NullableTypes.proto", "identity/ClaimsIdentityRpc.proto", "FunctionRpc.proto")


def generate_protos(worker: Path) -> None:
    """Compile the worker's .proto files into its package, with the absolute imports it expects."""
    target = worker / "azure_functions_worker" / "protos"
    if (target / "FunctionRpc_pb2.py").exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "staging"
        built = Path(tmp) / "built"
        shutil.copytree(target / "_src" / "src" / "proto", staging / "azure_functions_worker" / "protos")
        built.mkdir()
        for proto in PROTOS:
            subprocess.run(
                [sys.executable, "-m", "grpc_tools.protoc", "-I", "azure_functions_worker/protos",
                 "--python_out", str(built), "--grpc_python_out", str(built),
                 f"azure_functions_worker/protos/{proto}"],
                check=True, cwd=staging,
            )
        for compiled in built.rglob("*.py"):
            text = compiled.read_text()
            text = re.sub(r"\nimport (.*?_pb2)", r"\nfrom azure_functions_worker.protos import \g<1>", text)
            text = re.sub(r"from ([a-z]*) (import.*_pb2)", r"from azure_functions_worker.protos.\g<1> \g<2>", text)
            destination = target / compiled.relative_to(built)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("worker", type=Path, help="a checkout of azure-functions-python-worker")
    args = parser.parse_args(argv)
    worker = args.worker.resolve()
    generate_protos(worker)
    sys.path[:0] = [str(worker), str(ROOT)]
    os.chdir(ROOT)
    from azure_functions_worker import bindings, functions, loader  # noqa: PLC0415 (from the checkout)

    bindings.load_binding_registry()
    indexed = loader.index_function_app(str(ROOT / "main.py"))
    registry = functions.Registry()
    results, _ = loader.process_indexed_function(registry, indexed, str(ROOT))
    for result in results:
        info = registry.get_function(result.function_id)
        kind = "async" if info.is_async else "sync (thread pool)"
        print(f"  {result.name:28s} {kind:18s} bindings: {', '.join(sorted(result.bindings))}")
    print(f"{len(results)} functions indexed by the worker's own loader")
    return 0


if __name__ == "__main__":
    sys.exit(main())
