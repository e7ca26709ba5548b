"""Runs a script in a Python process where `modeling_mimco` cannot be imported, as a user with only `transformers`
installed would: no PYTHONPATH, another working directory, the Hub offline, and the installed package hidden."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


PACKAGE_BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class BlockMimCoPackage(importlib.abc.MetaPathFinder):
        # The package is installed in this environment; hide it so that only the checkpoint's files can serve.
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_mimco" or name.startswith("modeling_mimco."):
                raise ImportError(f"{name} is hidden in this process")
            return None


    sys.meta_path.insert(0, BlockMimCoPackage())
    try:
        import modeling_mimco  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_mimco must not be importable here")
    """
)


def run_without_package(
    script: str, args: list[str], tmp_path: Path, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Runs `script` (dedented) after `PACKAGE_BLOCKER` with `sys.argv[1:] == args`; returns the finished process."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", PACKAGE_BLOCKER + textwrap.dedent(script), *map(str, args)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
