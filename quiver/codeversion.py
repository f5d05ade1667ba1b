"""Code versions from source hashes: a stage's version changes exactly when its code does.

A stage module's version hashes its own source and, transitively, the project modules it imports
(read with ast, never imported), and the versions of the stages upstream of it: what a stage outputs
depends on the code that made its input. Editing the chunker therefore changes the versions of chunks
and of everything downstream of it, and of nothing else.
"""

import ast
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from quiver.settings import PROJECT_ROOT

# Packages whose code decides what a stage outputs. resources/ is infrastructure (where and how
# things are stored), whose effect on outputs is captured by config and fingerprints instead.
LOGIC_PACKAGES = ("quiver", "assets")
# Project modules that decide nothing about a stage's output: how work is scheduled (memory limits, the
# staged pipeline, whose sync and async modes write identical outputs) is not what it computes.
NOT_LOGIC = frozenset({"quiver.codeversion", "quiver.settings", "quiver.cli", "quiver.memory", "quiver.stages"})


def module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(module: str, file: Path, root: Path) -> set[str]:
    tree = ast.parse(file.read_bytes(), filename=str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from quiver import chunking` imports a submodule
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in LOGIC_PACKAGES and m not in NOT_LOGIC and module_file(m, root)}


def module_dependencies(module: str, root: Path = PROJECT_ROOT) -> list[str]:
    """The module and every project logic module it imports, transitively, sorted."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        file = module_file(current, root)
        if file is None:
            continue
        seen.add(current)
        pending.extend(_imported_modules(current, file, root) - seen)
    return sorted(seen)


def code_version(module: str, root: Path = PROJECT_ROOT) -> str:
    """Short sha256 of the sources of a stage module and its project dependencies."""
    digest = hashlib.sha256()
    for name in module_dependencies(module, root):
        file = module_file(name, root)
        assert file is not None
        digest.update(name.encode() + b"\x00" + file.read_bytes() + b"\x00")
    return digest.hexdigest()[:16]


def stage_version(module: str, upstream: Mapping[str, Sequence[str]], root: Path = PROJECT_ROOT) -> str:
    """A stage's own code version combined with those of the stages it reads from, recursively."""
    digest = hashlib.sha256(code_version(module, root).encode())
    for parent in sorted(upstream.get(module, ())):
        digest.update(b"\x00" + stage_version(parent, upstream, root).encode())
    return digest.hexdigest()[:16]
