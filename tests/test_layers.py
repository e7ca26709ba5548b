"""The package's folders are its layers (docs/architecture.md): every import points down, and there are no cycles.

Read from the source with `ast`, so the test sees every import, also those inside functions, without running any.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "modeling_mimco"

# The files that `save_pretrained` copies next to the weights: they import only each other (relatively).
MODEL_FILES = {
    "configuration_mimco",
    "modeling_mimco",
    "modeling_mimco_contrastive",
    "modeling_mimco_segmentation",
    "losses",
    "masking",
    "teacher",
}

# Bottom to top. A module may import from its own room and from rooms listed before it, never after.
LAYERS = [
    "model",  # the model files and the package's __init__
    "errors",
    "data",
    "interop",
    "hub",
    "training",
    "evaluation",
    "commands",
    "experiments",
    "benchmarks",
]


def room_of(module: str) -> str:
    """`modeling_mimco.data.sources` -> `data`; the top-level model files and `__init__` -> `model`."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in MODEL_FILES:
        return "model"
    return parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The package modules that `path` imports (absolute or relative, at any depth of the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("modeling_mimco"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("modeling_mimco"):
                continue
            # `from modeling_mimco.hub import upload` imports the module `modeling_mimco.hub.upload`
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                    PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
                ).is_file()
                found.add(candidate if is_module else target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_sits_in_a_known_room():
    rooms = {room_of(name) for name in import_graph()}
    assert rooms <= set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}"


def test_model_files_sit_alone_at_the_top_of_the_package():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == MODEL_FILES | {"__init__", "errors"}


def test_imports_point_down():
    rank = {room: index for index, room in enumerate(LAYERS)}
    upward = []
    for module, imports in import_graph().items():
        for target in imports:
            if rank[room_of(target)] > rank[room_of(module)]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_model_files_import_only_model_files():
    leaks = [
        f"{module} -> {target}"
        for module, imports in import_graph().items()
        if room_of(module) == "model" and module != "modeling_mimco"
        for target in imports
        if room_of(target) != "model"
    ]
    assert not leaks, "the remote-code files must not import the tooling:\n" + "\n".join(leaks)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("room", [room for room in LAYERS if room not in ("model", "errors")])
def test_each_room_is_a_documented_sub_package(room):
    init = PACKAGE / room / "__init__.py"
    assert init.is_file()
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} says nothing of what the room holds"
    assert f"`{room}/`" in (PACKAGE.parent / "docs" / "architecture.md").read_text()
