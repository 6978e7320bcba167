#!/usr/bin/env bash
# The Functions app's tests on the azure-functions library the Python worker bundles.
#
# On Python <= 3.12 the worker loads its own bundled copy of azure-functions ahead of the app's,
# unless the app setting PYTHON_ISOLATE_WORKER_DEPENDENCIES=1 is honoured (we set it: Bicep and
# local.settings.json.template). So the app must also work on the bundled copy: worker 4.34.0 bundles
# azure-functions 1.22.0b4 (its pyproject.toml pins it). This creates $MM_WORKER_BUNDLE_VENV (default
# .venv/worker-bundle) holding only that library, sees the project venv's packages behind it (a .pth
# file), and runs the Functions test modules there. CloudEvents deliveries, which that copy cannot
# decode, are checked to be refused clearly; the other tests must pass unchanged.
# Usage: scripts/validate-worker-bundle.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLED="azure-functions==1.22.0b4"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
VENV="${MM_WORKER_BUNDLE_VENV:-.venv/worker-bundle}"
STAMP="$VENV/.installed-1"
if [ ! -f "$STAMP" ]; then
  echo "validate-worker-bundle: installing $BUNDLED into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$BUNDLED"
  touch "$STAMP"
fi
# The project's packages, behind the bundled library (.pth lines are appended after site-packages).
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
  > "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz-project.pth"
"$VENV/bin/python" - <<'PY'
import azure.functions as func
assert func.__version__ == "1.22.0b4", f"the bundled library did not win: {func.__version__} ({func.__file__})"
print(f"validate-worker-bundle: azure-functions {func.__version__} from {func.__file__}")
PY
"$VENV/bin/python" -m pytest -p no:cacheprovider tests/test_function_handlers.py tests/test_function_app_index.py \
  tests/test_function_serving.py "$@"
