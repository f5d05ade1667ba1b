"""The layout stays as the README draws it: one direction of imports, one concern per module, none too long.

    quiver/          plain logic: never imports dagster, resources, assets or platform_defs
    resources/       Dagster resources and IO managers: imports quiver (and libraries), never assets or platform_defs
    assets/          one module per stage: imports quiver and resources, never platform_defs
    platform_defs/   the top: definitions, jobs, sensors, schedules, the executor, the CLI
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import PROJECT

LAYERS = ("quiver", "resources", "assets", "platform_defs", "bench")
FORBIDDEN = {
    "quiver": {"dagster*", "resources", "assets", "platform_defs", "bench", "tests"},
    "resources": {"assets", "platform_defs", "bench", "tests"},
    "assets": {"platform_defs", "bench", "tests"},
    "platform_defs": {"bench", "tests"},
    "bench": {"tests"},  # benchmarks run on the product, not on the tests' helpers
}


def _forbidden(layer: str, package: str) -> bool:
    return any(package == rule or (rule.endswith("*") and package.startswith(rule[:-1]))
               for rule in FORBIDDEN[layer])
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (PROJECT / layer).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(file: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in a module, at top level or inside functions alike."""
    found = []
    for node in ast.walk(ast.parse(file.read_bytes(), filename=str(file))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and (
                getattr(node.func, "id", "") == "__import__" or getattr(node.func, "attr", "") in (
                    "import_module", "__import__")):
            found.append((node.lineno, str(node.args[0].value).split(".")[0]))
    return found


def test_every_layer_imports_only_what_is_below_it() -> None:
    wrong = []
    for file in _modules():
        layer = file.relative_to(PROJECT).parts[0]
        wrong += [f"{file.relative_to(PROJECT)}:{line} imports {package}" for line, package in _imports(file)
                  if _forbidden(layer, package)]
    assert wrong == []


def test_no_relative_imports_hide_a_layer() -> None:
    relative = [f"{file.relative_to(PROJECT)}:{node.lineno}" for file in _modules()
                for node in ast.walk(ast.parse(file.read_bytes())) if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


def test_no_module_is_longer_than_the_limit() -> None:
    long = {str(f.relative_to(PROJECT)): n for f in _modules() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_rule_catches_a_wrong_import(tmp_path: Path) -> None:
    """The check itself can fail: a plain-logic module that imports dagster inside a function is caught."""
    module = tmp_path / "bad.py"
    module.write_text("import importlib\ndef f():\n    from dagster_celery import x\n    import platform_defs.cli\n"
                      "    importlib.import_module('assets.chunks')\n")
    found = [p for _, p in _imports(module)]
    assert found == ["importlib", "dagster_celery", "platform_defs", "assets"]
    assert [p for p in found if _forbidden("quiver", p)] == ["dagster_celery", "platform_defs", "assets"]


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_has_modules(layer: str) -> None:
    assert any((PROJECT / layer).glob("*.py"))
