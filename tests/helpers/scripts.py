"""The command modules that `scripts/` runs, for tests that call a program's `main(argv)` and helpers in-process."""

from __future__ import annotations

import importlib
from types import ModuleType


def load_script(name: str) -> ModuleType:
    """`modeling_mimco.commands.{name}`, the program that `scripts/{name}.py` and its console command run."""
    return importlib.import_module(f"modeling_mimco.commands.{name}")
