"""Code versions from source hashes: a stage's version changes exactly when code it runs changes.

A stage's own version hashes the sources of its modules and, transitively, of every project module they
import (read with ast, never imported), across all of the project's packages: plain logic, resources and
stages alike, since batch planning, tokenizer use or what a store keeps decide outputs as much as the stage
body does. Its version then combines that with the versions of the stages upstream of it (taken from the
asset graph by the caller): what a stage outputs depends on the code that made its input.
"""

import ast
import contextlib
import hashlib
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from quiver.settings import PROJECT_ROOT

# Every package of the project whose code a stage can run. (platform_defs, the wiring on top, is never
# imported by a stage.)
PROJECT_PACKAGES = ("quiver", "resources", "assets")
K = TypeVar("K", bound=Hashable)


def module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# sha256 of (module, source) -> every name the module imports (of any package, whether a file exists for it or
# not: which of them are project modules is decided at each lookup). Parsing every module takes most of the
# definitions' import time, on every `quiver` command and step process: the lists are kept in a file, keyed by
# the source itself (an edited file is parsed again), and each module is parsed at most once per process.
_IMPORTS: dict[str, list[str]] = {}
_CACHE_DIR = os.environ.get("QUIVER_CACHE_DIR") or Path.home() / ".cache" / "quiver"
_IMPORTS_FILE = Path(_CACHE_DIR) / "code-imports.json"
_IMPORTS_KEPT = 4000
_loaded_file = False


def _imported_modules(module: str, file: Path, root: Path) -> set[str]:
    """Project modules a module imports, at top level or inside functions alike, and its parent packages."""
    global _loaded_file
    source = file.read_bytes()
    key = hashlib.sha256(b"\x00".join([b"v2", module.encode(), file.name.encode(), source])).hexdigest()
    if key not in _IMPORTS and not _loaded_file:
        _loaded_file = True
        with contextlib.suppress(OSError, ValueError):
            _IMPORTS.update(json.loads(_IMPORTS_FILE.read_text()))
    if key not in _IMPORTS:
        _IMPORTS[key] = sorted(_parse_imports(module, file, source))
        _save_imports()
    return {m for m in _IMPORTS[key] if m.split(".")[0] in PROJECT_PACKAGES and module_file(m, root)}


def _save_imports() -> None:
    """Atomically (a reader never sees half a file); an unwritable cache directory only costs the parsing."""
    with contextlib.suppress(OSError):
        _IMPORTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _IMPORTS_FILE.with_name(f".{_IMPORTS_FILE.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(list(_IMPORTS.items())[-_IMPORTS_KEPT:])))  # the newest sources
        os.replace(tmp, _IMPORTS_FILE)


def _parse_imports(module: str, file: Path, source: bytes) -> set[str]:
    tree = ast.parse(source, filename=str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = {package} if package else set()
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
    return found


def module_dependencies(modules: str | Sequence[str], root: Path = PROJECT_ROOT) -> list[str]:
    """The modules and every project module they import, transitively, sorted."""
    seen: set[str] = set()
    pending = [modules] if isinstance(modules, str) else list(modules)
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


def code_version(modules: str | Sequence[str], root: Path = PROJECT_ROOT) -> str:
    """Short sha256 of the sources of the given modules and of all project code they import."""
    digest = hashlib.sha256()
    for name in module_dependencies(modules, root):
        file = module_file(name, root)
        assert file is not None
        digest.update(name.encode() + b"\x00" + file.read_bytes() + b"\x00")
    return digest.hexdigest()[:16]


def stage_versions(modules: Mapping[K, Sequence[str]], upstream: Mapping[K, Sequence[K]],
                   root: Path = PROJECT_ROOT) -> dict[K, str]:
    """Each stage's version: its own modules' code version combined with its upstream stages' versions,
    recursively. `modules` names the modules of each stage's code; `upstream` the stages each reads."""
    versions: dict[K, str] = {}

    def version(stage: K, path: tuple[K, ...]) -> str:
        if stage in path:
            raise ValueError(f"the stage graph has a cycle through {stage!r}")
        if stage not in versions:
            digest = hashlib.sha256(code_version(modules[stage], root).encode())
            for parent in sorted((p for p in upstream.get(stage, ()) if p in modules), key=str):
                digest.update(b"\x00" + version(parent, (*path, stage)).encode())
            versions[stage] = digest.hexdigest()[:16]
        return versions[stage]

    for stage in modules:
        version(stage, ())
    return versions
