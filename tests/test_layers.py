"""The import contract of pyproject.toml ([tool.importlinter]) holds, and it does catch a backwards import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}  # ahead of the editable install's path
    return subprocess.run([LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "vlmtune", src / "vlmtune", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_the_tree_keeps_the_contracts():
    res = _lint(ROOT / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 3 kept, 0 broken." in res.stdout


@pytest.mark.parametrize(("module", "planted", "contract"), [
    ("models/spec.py", "from ..data.stages import encode", "layers: errors <- config <- models <- data <- train <- commands"),
    ("train/recipe.py", "from ..commands import doctor", "layers: errors <- config <- models <- data <- train <- commands"),
    ("data/sources/readers.py", "from ..stages import fit", "data: drivers <- stages <- sources <- media <- types | schema"),
    ("data/schema.py", "from .media import images", "data: drivers <- stages <- sources <- media <- types | schema"),
    ("commands/export.py", "from . import chat", "commands never import each other; only the cli dispatches to them"),
])
def test_a_planted_backwards_import_breaks_the_build(tmp_path, module, planted, contract):
    src = _copy(tmp_path)
    path = src / "vlmtune" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{planted}  # planted\n", encoding="utf-8")
    res = _lint(src)
    assert res.returncode == 1, res.stdout
    assert f"{contract} BROKEN" in res.stdout
    assert "0 broken." not in res.stdout


def private_imports(src: Path) -> list[str]:
    """`file:line name` for each `_name` (not a dunder) imported from another vlmtune module."""
    import ast

    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("vlmtune")):
                found += [f"{path.relative_to(src)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names(tmp_path):
    assert private_imports(ROOT / "src" / "vlmtune") == []
    src = _copy(tmp_path) / "vlmtune"
    path = src / "data" / "stages" / "collate.py"
    path.write_text(path.read_text(encoding="utf-8") + "\nfrom .encode import _THOUGHT  # planted\n", encoding="utf-8")
    assert private_imports(src) == [f"data/stages/collate.py:{len(path.read_text().splitlines())} _THOUGHT"]
