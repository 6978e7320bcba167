"""Register the Azure ML environments built from the ranges of requirements.in (the pipeline's DevOps step).

The parallel-job environment goes to the development workspace (training and batch scoring run
there), the serving environment to the production workspace (the online endpoint lives there).
Versions are content hashes (``shared.azureml.jobs.build_environment``), so registering an
unchanged environment again is a no-op and a changed one never overwrites a version in use.

Reads the ``MM_AZUREML_*`` variables, which ``azd env get-values`` provides after ``azd provision``
(main.bicep outputs them), and authenticates with ``DefaultAzureCredential`` (the pipeline's
federated login). Usage: ``python scripts/register_aml_environments.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.azureml.client import AzureMLSettings, call_with_retry, ml_client  # noqa: E402
from shared.azureml.jobs import build_environment  # noqa: E402

TARGETS = (("parallel", "dev"), ("serving", "prod"))


def main() -> int:
    aml = AzureMLSettings.from_env()
    for purpose, target in TARGETS:
        environment = build_environment(aml, purpose)
        client = ml_client(aml, target)
        registered = call_with_retry(lambda c=client, e=environment: c.environments.create_or_update(e),
                                     f"register environment {environment.name} in {target}")
        print(f"{target}: {registered.name}:{registered.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
