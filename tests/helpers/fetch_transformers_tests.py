"""Fetches transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`) for the
installed release.

The transformers wheel has no tests, but its source distribution on PyPI ships `tests/test_modeling_common.py`,
`tests/test_configuration_common.py` and `tests/test_backbone_common.py`. This script downloads that sdist with pip
(`--no-binary :all:`, which downloads the archive and reads its metadata, but builds nothing), and extracts those
three files and the package modules they import into a folder that is not tracked by git (by default
`.venv/transformers-tests/`), as the package `transformers_tests` (renamed from `tests` so that it cannot be confused with this repository's `tests`).

Some modules that they import are not part of the sdist (5.x ships only the top-level `tests/*.py`). Those that the
files only need as a base class or a table are written as stand-ins of our own (`STAND_INS`), listed in
`SOURCES.json` next to the files; `tests/test_transformers_common.py` names them in its report. Any other missing
import is recorded too, and the test module then skips, naming it.

The script never fails: without network (or without pip) it prints a warning and exits 0, and the test module that
uses the files skips with a reason. It does nothing when the folder already holds the files of the installed
version.

    python tests/helpers/fetch_transformers_tests.py [--output_dir .venv/transformers-tests]
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


PACKAGE = "transformers_tests"
ENTRY_MODULES = ("test_modeling_common", "test_configuration_common", "test_backbone_common")
SOURCES_FILE = "SOURCES.json"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[2] / ".venv" / "transformers-tests"

# Stand-ins for modules the sdist lacks. Each is imported by the two entry files for one name only, and these bodies
# give that name without pretending to test anything.
STAND_INS = {
    "exporters.test_export": '''"""Stand-in: this transformers sdist does not ship `tests/exporters/test_export.py`.

`ModelTesterMixin` derives from `ExportTesterMixin`; without the real module the export tests (torch.export, ONNX,
ExecuTorch...) are not run. `tests/test_transformers_common.py` checks `torch.export` on every MimCo class itself.
"""


class ExportTesterMixin:
    pass
''',
    "generation.test_utils": '''"""Stand-in: this transformers sdist does not ship `tests/generation/test_utils.py`.

`ModelTesterMixin` only uses `GenerationTesterMixin` to check that testers of models that cannot `generate` do not
inherit it; vision backbones never do.
"""


class GenerationTesterMixin:
    pass
''',
    "utils.test_configuration_utils": '''"""Stand-in: this transformers sdist does not ship `tests/utils/test_configuration_utils.py`.

`ConfigTester.check_config_arguments_init` builds a config from these common `PreTrainedConfig` arguments, each set to
a value that is not its default, and checks that every one is kept (composite configs skip that check).
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["ModelForTesting"],
    "id2label": {0: "zero", 1: "one", 2: "two"},
    "label2id": {"zero": 0, "one": 1, "two": 2},
    "problem_type": "regression",
}
''',
}


def installed_transformers_version() -> str:
    return importlib.metadata.version("transformers")


def read_sources(output_dir: Path) -> dict | None:
    """The `SOURCES.json` of a previous fetch, or `None`."""
    try:
        return json.loads((output_dir / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(output_dir: Path, version: str) -> bool:
    sources = read_sources(output_dir)
    if sources is None or sources.get("transformers_version") != version:
        return False
    package = output_dir / PACKAGE
    return all((package / f"{name}.py").is_file() for name in ENTRY_MODULES)


def download_sdist(version: str, download_dir: Path, timeout: float) -> Path:
    """Downloads `transformers==version`'s sdist into `download_dir`; raises `RuntimeError` with pip's message."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "--retries",
        "1",
        "--timeout",
        "20",
        f"transformers=={version}",
        "-d",
        str(download_dir),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"`pip download` did not finish: {error}") from error
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"`pip download` failed (exit {result.returncode}): {' / '.join(message[-3:])}")
    archives = sorted(download_dir.glob(f"transformers-{version}.tar.gz"))
    if not archives:
        raise RuntimeError(f"`pip download` left no transformers-{version}.tar.gz in {download_dir}.")
    return archives[0]


def _relative_imports(source: str, module: str) -> list[str]:
    """Dotted names (inside the package) of the modules that `module`'s `from .x import y` statements import."""
    package_parts = module.split(".")[:-1]
    imported = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package_parts[: len(package_parts) - (node.level - 1)]
            imported.append(".".join([*base, *(node.module.split(".") if node.module else [])]))
    return imported


def extract_tests(archive: Path, version: str, package_dir: Path) -> dict:
    """Writes the entry modules and what they import (from the archive, else a stand-in) into `package_dir`.

    Returns what came from where: `{"from_sdist": [...], "stand_ins": [...], "missing": [...]}` (module names).
    """
    prefix = f"transformers-{version}/tests/"
    from_sdist, stand_ins, missing = [], [], []
    with tarfile.open(archive, "r:gz") as tar:
        # only regular files under tests/, read by name: nothing in the archive chooses where we write
        members = {m.name[len(prefix) :]: m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()}
        pending, seen = list(ENTRY_MODULES), set()
        while pending:
            module = pending.pop()
            if module in seen:
                continue
            seen.add(module)
            relative_path = module.replace(".", "/") + ".py"
            if relative_path in members:
                source = tar.extractfile(members[relative_path]).read().decode("utf-8")
                from_sdist.append(module)
                pending.extend(_relative_imports(source, module))
            elif module in STAND_INS:
                source = STAND_INS[module]
                stand_ins.append(module)
            elif module.replace(".", "/") + "/__init__.py" in members or module == "":
                continue  # a package: its `__init__.py` is written below
            else:
                missing.append(module)
                continue
            target = package_dir / relative_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source, encoding="utf-8")

        # every folder becomes a package; the sdist's own `__init__.py` where it has one
        for folder in [package_dir, *(p for p in package_dir.rglob("*") if p.is_dir())]:
            init = folder / "__init__.py"
            relative = init.relative_to(package_dir).as_posix()
            if relative in members:
                init.write_bytes(tar.extractfile(members[relative]).read())
            elif not init.exists():
                init.write_text("")
    return {"from_sdist": sorted(from_sdist), "stand_ins": sorted(stand_ins), "missing": sorted(missing)}


def fetch(output_dir: Path, timeout: float = 600.0, force: bool = False) -> bool:
    """Fetches the test files for the installed transformers into `output_dir`; `True` when they are there."""
    version = installed_transformers_version()
    if not force and is_up_to_date(output_dir, version):
        print(f"transformers {version} common tests already in {output_dir}")
        return True
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="transformers-sdist-") as download_dir:
        try:
            archive = download_sdist(version, Path(download_dir), timeout)
        except RuntimeError as error:
            print(
                f"WARNING: could not fetch transformers {version}'s common tests ({error}); "
                "tests/test_transformers_common.py will skip.",
                file=sys.stderr,
            )
            return False
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir.parent))
        try:
            report = extract_tests(archive, version, staging / PACKAGE)
            sources = {"transformers_version": version, "sdist": archive.name, **report}
            (staging / SOURCES_FILE).write_text(json.dumps(sources, indent=2) + "\n")
            # replace the old folder only once the new one is complete
            if output_dir.exists():
                shutil.rmtree(output_dir)
            staging.rename(output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    elapsed = time.monotonic() - start
    print(
        f"fetched transformers {version} common tests into {output_dir} in {elapsed:.1f} s "
        f"({len(report['from_sdist'])} from the sdist, stand-ins for {report['stand_ins'] or 'none'}"
        + (f", MISSING {report['missing']}" if report["missing"] else "")
        + ")"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds `pip download` may take.")
    parser.add_argument("--force", action="store_true", help="Fetch again even when the files are up to date.")
    args = parser.parse_args(argv)
    fetch(args.output_dir, timeout=args.timeout, force=args.force)
    return 0  # never fail the install: the tests skip without the files


if __name__ == "__main__":
    sys.exit(main())
