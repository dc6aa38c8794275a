"""The layout rules `tools/check_architecture.py` enforces (CI runs it on the package): the checker finds what
it must on a small package written here by hand, and the package itself keeps every rule."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_architecture", ROOT / "tools" / "check_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import helper\n",
        "b.py": "def helper():\n    from .a import x\n    return x\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import T\n",
        "d.py": "from .c import y\n",
    })
    found, _ = _checker().problems(root)
    assert found == ["import cycle: pkg.a <-> pkg.b"]  # c <-> d is for typing only: not a cycle


def test_checker_finds_a_cycle_through_another_subpackages_init(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "from ..stage.leaf import f\n",
        "stage/__init__.py": "from .run import g\n",
        "stage/leaf.py": "def f(): ...\n",
        "stage/run.py": "from ..models import h\n",
    })
    found, _ = _checker().problems(root)
    assert found == ["import cycle: pkg.models <-> pkg.stage <-> pkg.stage.run"]


def test_checker_finds_private_imports_and_long_functions(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(160))
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "_hidden = 1\n__dunder__ = 2\n",
        "b.py": "from .a import _hidden, __dunder__\n",
        "c.py": f"def long():\n{body}",
    })
    found, long = _checker().problems(root)
    assert any("imports _hidden from pkg.a" in p for p in found)
    assert not any("__dunder__" in p for p in found)
    assert any("function over 150 lines" in p and "long (161)" in p for p in found) and long == 1


def test_the_package_keeps_its_layout_rules():
    found, _ = _checker().problems()
    assert found == []
