"""The root of manymodels' own exceptions.

Every error meant for users derives from :class:`ManyModelsError` (keeping the builtin base that
says what kind of error it is, e.g. ``class ConfigError(ManyModelsError, ValueError)``), so a
boundary — the CLI, an HTTP handler, an orchestrator — tells "the input or the setup is wrong, the
message says how" from "a bug" by type alone. Anything else that escapes is unexpected.
"""
from __future__ import annotations


class ManyModelsError(Exception):
    """An error meant for users: its message names the problem and what to change."""
