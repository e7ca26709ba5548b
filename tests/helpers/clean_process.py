"""Runs a script in a Python process where `modeling_mimco` cannot be imported, as a user with only `transformers`
installed would: no PYTHONPATH, another working directory, the Hub offline, and the installed package hidden.

Two ways to hide the package: `PACKAGE_BLOCKER`, an import hook in this environment's own Python, or
`make_clean_venv`, a virtual environment of its own (`sys.prefix` elsewhere) whose site-packages holds every package
of this environment but this one, so that nothing of `modeling_mimco` (its files, its editable-install finder, its
metadata) is there to block. `run_without_package(..., python=...)` runs in such a venv.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
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


CLEAN_VENV_CHECK = textwrap.dedent(
    """
    import importlib.util
    import sys

    # A venv of its own without this package: nothing to hide, it must simply not be there.
    if sys.prefix == sys.base_prefix or importlib.util.find_spec("modeling_mimco") is not None:
        raise SystemExit(f"not a clean venv: prefix {sys.prefix}, modeling_mimco importable")
    try:
        import modeling_mimco  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_mimco must not be importable here")
    """
)


def _is_this_package(name: str) -> bool:
    """A site-packages entry of this project: the package, its editable-install finder and `.pth`, its metadata."""
    return "mimco" in name.lower()


def make_clean_venv(root: Path) -> Path:
    """Creates a virtual environment at `root` with this environment's packages (torch, transformers, PIL...) and
    without this project, and returns its Python.

    The venv is created from the base interpreter without pip (under a second); its site-packages then gets a
    symbolic link to every entry of this environment's site-packages except this project's (`_is_this_package`):
    the packages are the very same files, their `.pth` files run as usual, and `modeling_mimco` is not installed
    there in any form. Refuses (`RuntimeError`) when the new venv can import `modeling_mimco` anyway.
    """
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = Path(purelib)
    sources = list(dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]))
    for source in map(Path, sources):
        if not source.is_dir() or source.resolve() == target.resolve():
            continue
        for entry in source.iterdir():
            link = target / entry.name
            if not _is_this_package(entry.name) and not link.exists():
                link.symlink_to(entry, target_is_directory=entry.is_dir())
    check = subprocess.run([str(python), "-c", CLEAN_VENV_CHECK], capture_output=True, text=True, cwd=root)
    if check.returncode != 0:
        raise RuntimeError(f"{root} is no clean venv: {check.stderr.strip() or check.stdout.strip()}")
    return python


def run_without_package(
    script: str, args: list[str], tmp_path: Path, timeout: int = 300, python: Path | None = None
) -> subprocess.CompletedProcess:
    """Runs `script` (dedented) with `sys.argv[1:] == args`; returns the finished process. With `python` (a venv of
    `make_clean_venv`), in that venv after `CLEAN_VENV_CHECK`; else in this Python after `PACKAGE_BLOCKER`."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    prelude = PACKAGE_BLOCKER if python is None else CLEAN_VENV_CHECK
    return subprocess.run(
        [str(python or sys.executable), "-c", prelude + textwrap.dedent(script), *map(str, args)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
