"""Every function of the package and the scripts reads in one sitting: at most 80 lines from its `def` line to the
last line of its body (docstring included, decorators not)."""

from __future__ import annotations

import ast
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("modeling_mimco", "scripts")
MAX_LINES = 80


def long_functions(root: Path, folders: tuple[str, ...] = FOLDERS, max_lines: int = MAX_LINES) -> list[str]:
    """`path:line name (N lines)` for each function or method under `folders` longer than `max_lines` lines."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                length = node.end_lineno - node.lineno + 1
                if length > max_lines:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    too_long = long_functions(REPO)
    assert not too_long, f"functions over {MAX_LINES} lines (split them into helpers):\n" + "\n".join(too_long)


def test_the_checker_counts_from_the_def_line_to_the_end_of_the_body(tmp_path):
    (tmp_path / "scripts").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    (tmp_path / "scripts" / "sample.py").write_text(
        f'def fits():\n{body}\n\n\n@staticmethod\ndef too_long():\n    """Doc."""\n{body}\n'
    )
    assert long_functions(tmp_path, ("scripts",)) == ["scripts/sample.py:84 too_long (81 lines)"]
