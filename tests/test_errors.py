"""One exception root: every exception class defined in ``shared`` derives from ``ManyModelsError``.

Boundaries (the CLI, HTTP handlers, orchestrators) tell an error meant for users from a bug by
type alone, so an exception class that does not derive from the root would turn a clear message
into an "unexpected error". Internal exceptions (never meant to reach a user) are listed below
with the reason.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from shared.errors import ManyModelsError

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for p in (ROOT / "shared").rglob("*.py") if "__pycache__" not in p.parts)

# "module:Class" -> why it is not meant for users (and so may not derive from ManyModelsError).
INTERNAL: dict[str, str] = {
    # a stand-in for a crash in the fault-injection tests (MM_FAULT): it must look unexpected (exit 1)
    "shared.faults:FaultInjected": "never reaches a user: raised only when MM_FAULT asks for it",
    # SIGTERM unwinds like KeyboardInterrupt; the CLI turns it into its message and exit 143. As an
    # Exception (which ManyModelsError is) every `except Exception` on the way would swallow it
    "shared.results.failures:Terminated": "a signal, not an error: the CLI reports it (exit 143)",
    # a warning category (warnings.warn), never raised: the user reads its message in the log
    "shared.models.artifact_format:ArtifactVersionWarning": "a warning, never raised",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def exception_classes() -> list[tuple[str, type]]:
    """Module-level classes of shared/ that are exceptions, or are named like one."""
    found = []
    for path in MODULES:
        names = [n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)]
        if not names:
            continue
        module = importlib.import_module(module_name(path))
        for name in names:
            cls = getattr(module, name)
            if name.endswith("Error") or (isinstance(cls, type) and issubclass(cls, BaseException)):
                found.append((f"{module.__name__}:{name}", cls))
    return found


CLASSES = exception_classes()


def test_the_root_is_a_plain_exception() -> None:
    assert ManyModelsError.__bases__ == (Exception,)
    assert len(CLASSES) >= 15  # the scan found the project's errors


@pytest.mark.parametrize(("where", "cls"), CLASSES, ids=[w for w, _ in CLASSES])
def test_every_error_derives_from_the_root(where: str, cls: type) -> None:
    assert isinstance(cls, type) and issubclass(cls, BaseException), f"{where} is named like an error but is not one"
    if where in INTERNAL:
        assert not issubclass(cls, ManyModelsError), f"{where} derives from the root: drop it from INTERNAL"
        return
    assert issubclass(cls, ManyModelsError), (
        f"{where} does not derive from shared.errors.ManyModelsError; make it "
        f"class {cls.__name__}(ManyModelsError, {', '.join(b.__name__ for b in cls.__bases__)}), "
        "or list it in INTERNAL with the reason it never reaches a user")


def test_errors_keep_their_builtin_kind() -> None:
    """Deriving from the root kept the builtin base callers already catch (ValueError, LookupError...)."""
    from shared.config import ConfigError
    from shared.forecasts.model_cache import ModelLoadError, ModelNotFoundError
    from shared.runs.pipeline import PipelineError
    from shared.registries.registry import RegistryError
    from shared.results.result_store import StoreError
    from shared.runs.runner import RunnerError
    from shared.data.validation import DataValidationError

    assert issubclass(ConfigError, ValueError) and issubclass(DataValidationError, ValueError)
    assert issubclass(RegistryError, ValueError) and issubclass(StoreError, ValueError)
    assert issubclass(RunnerError, RuntimeError) and issubclass(PipelineError, RuntimeError)
    assert issubclass(ModelNotFoundError, LookupError) and issubclass(ModelLoadError, RuntimeError)
