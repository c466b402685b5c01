"""One import root, and layers that import only downward (issue 16, item 6).

headscreen's modules live in the layer folders at the repository root and are imported
as `headscreen.<layer>` (headscreen/ links to the folders). These tests read every
module's imports (the ast, nothing imported) so a new `from daemon.x import y` or an
upward import fails here rather than in a wheel install or a circular import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("daemon", "db", "export", "imaging", "model_training")
# Each layer may import the root (rank 0) and the layers of lower rank; db and export
# are peers that import neither each other nor anything above.
RANK = {"root": 0, "imaging": 1, "db": 2, "export": 2, "daemon": 3, "model_training": 3}
# torch is an extra: the command line reaches the trainer only inside `train`.
LAZY_ALLOWED = {("daemon/cli.py", "model_training")}
# `python -m headscreen` is the command line, the top of every layer.
ENTRY_POINT = "headscreen/__main__.py"


def first_party_imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level) for every import of a first-party name in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            if name.split(".")[0] in (*LAYERS, "headscreen"):
                found.append((name, id(node) in top_level))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "root"


def sources() -> list[Path]:
    files = [*REPO.joinpath("headscreen").glob("*.py")]
    for layer in LAYERS:
        files += [p for p in (REPO / layer).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files)


def test_every_first_party_import_goes_through_the_headscreen_root() -> None:
    files = [*sources(), *REPO.joinpath("tests").glob("*.py"), *REPO.joinpath("bench").glob("*.py")]
    bare = [f"{path.relative_to(REPO)}: {module}" for path in files
            for module, _ in first_party_imports(path) if module.split(".")[0] != "headscreen"]
    assert bare == []
    assert len(files) > 150  # the walk found the tree


@pytest.mark.parametrize("layer", ["root", *LAYERS])
def test_a_layer_imports_only_the_root_and_the_layers_below_it(layer: str) -> None:
    files = REPO.joinpath("headscreen").glob("*.py") if layer == "root" else (REPO / layer).rglob("*.py")
    upward = []
    for path in files:
        relative = path.relative_to(REPO).as_posix()
        if relative == ENTRY_POINT:
            continue
        for module, module_level in first_party_imports(path):
            target = layer_of(module)
            if target == layer or RANK[target] < RANK[layer]:
                continue
            if (relative, target) in LAZY_ALLOWED and not module_level:
                continue
            upward.append(f"{relative}: {module}")
    assert upward == []


def test_the_root_links_to_the_layer_folders() -> None:
    for name in (*LAYERS, "models"):
        link = REPO / "headscreen" / name
        assert link.is_symlink() and link.resolve() == (REPO / name).resolve(), name
