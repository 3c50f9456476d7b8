"""The product (server/, actors/, persistence/, protocol/) never imports the
benchmark (bench/), not even inside a function: the benchmark uses the server,
and ``loadout bench`` reaches the command line through an entry point."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("server", "actors", "persistence", "protocol")


def imported(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Every module ``tree`` imports, anywhere in it, with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                yield node.lineno, str(first.value)


def bench_imports(source: str, filename: str) -> list[str]:
    return [
        f"{filename}:{line}: {module}"
        for line, module in imported(ast.parse(source, filename))
        if module == "bench" or module.startswith("bench.")
    ]


def test_the_product_does_not_import_the_benchmark() -> None:
    paths = [path for package in PRODUCT for path in sorted((REPO / package).rglob("*.py"))]
    assert len(paths) > 20, paths  # the check looked at the product
    found = [
        hit
        for path in paths
        for hit in bench_imports(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]
    assert found == []


def test_the_check_sees_every_form_of_import() -> None:
    source = (
        "import bench\n"
        "import benchmarks\n"
        "def f():\n"
        "    from bench.main import run\n"
        "    import importlib\n"
        "    return importlib.import_module('bench.lock_core'), __import__('bench.server')\n"
    )
    assert bench_imports(source, "x.py") == [
        "x.py:1: bench",
        "x.py:4: bench.main",
        "x.py:6: bench.lock_core",
        "x.py:6: bench.server",
    ]
