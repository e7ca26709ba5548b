"""The command modules that `scripts/` runs, for tests that call a program's `main(argv)` and helpers in-process."""

from __future__ import annotations

import importlib
import subprocess
from types import ModuleType


def load_script(name: str) -> ModuleType:
    """`modeling_mimco.commands.{name}`, the program that `scripts/{name}.py` and its console command run."""
    return importlib.import_module(f"modeling_mimco.commands.{name}")


def finish_all(processes: dict[str, subprocess.Popen], timeout: float = 400) -> dict[str, subprocess.CompletedProcess]:
    """Waits for processes started side by side (text pipes), each at most `timeout` seconds (then killed), and
    returns what each printed and its exit code, by name."""
    results = {}
    for name, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results
