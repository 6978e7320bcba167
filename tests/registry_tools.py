"""Test helpers for stored models: damage one model's bytes where they lie (its range of a pack,
or its whole file for a record made before packs), as a disk fault or a hand edit would."""
from __future__ import annotations

from typing import Any


def damage_model(registry: Any, record: Any, filler: bytes = b"\0") -> None:
    """Overwrite the model's own bytes in place (same length): its neighbours in the pack stay intact."""
    path = registry.root / record.artifact
    if getattr(record, "byte_length", -1) < 0:
        path.write_bytes(b"not the model")
        return
    with open(path, "r+b") as fh:
        fh.seek(record.byte_offset)
        fh.write((filler * record.byte_length)[:record.byte_length])
