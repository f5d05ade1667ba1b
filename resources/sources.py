"""The registry of sources: each source is a dynamic partition of the document-level assets."""

import json
import os
from dataclasses import dataclass

from dagster import ConfigurableResource
from pydantic import Field
from upath import UPath

from quiver.atomic import write_text_atomic
from quiver.errors import ConfigError
from quiver.names import CHUNKING_STRATEGIES, DEFAULT_CHUNKING, check_source_name
from quiver.settings import dagster_home, default_storage_root
from quiver.sources import SOURCE_KINDS, SourceKind, detect_kind
from resources.env import from_env

DEFAULT_SOURCE = "stdlib"


HOME_PLACEHOLDER = "${DAGSTER_HOME}"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    kind: SourceKind
    path: str  # where the source is read from, now
    chunking: str = DEFAULT_CHUNKING  # a chunking strategy: tokens, or whole_document
    stored_path: str = ""  # as registered: relative to ${DAGSTER_HOME} when inside it, so a moved home still works

    @property
    def identity(self) -> str:
        """The path as registered, the same wherever the home now is (what caches key on)."""
        return self.stored_path or self.path


def _stored_form(path: str) -> str:
    """A path inside $DAGSTER_HOME (the default inbox) is kept relative to it."""
    if "://" in path or path == "stdlib":
        return path
    home = str(dagster_home())
    absolute = os.path.realpath(path)
    if os.path.commonpath([home, absolute]) == home:
        return f"{HOME_PLACEHOLDER}/{os.path.relpath(absolute, home)}"
    return path


def _spec(stored: dict[str, str]) -> SourceSpec:
    path = stored["path"]
    if path.startswith(HOME_PLACEHOLDER):
        path = str(dagster_home()) + path[len(HOME_PLACEHOLDER):]
    return SourceSpec(stored["name"], stored["kind"], path, stored.get("chunking", DEFAULT_CHUNKING),  # type: ignore[arg-type]
                      stored["path"])


class SourceRegistry(ConfigurableResource):
    """Source specs stored beside the artifacts, one JSON file each, so every machine sees them."""

    directory: str = Field(default_factory=lambda: f"{default_storage_root()}/_sources")

    def _file(self, name: str) -> UPath:
        return UPath(self.directory) / f"{check_source_name(name)}.json"

    def add(self, name: str, path: str, kind: str | None = None, chunking: str = DEFAULT_CHUNKING) -> SourceSpec:
        check_source_name(name)
        if kind is not None and kind not in SOURCE_KINDS:
            raise ConfigError(f"source kind {kind!r}: use one of {', '.join(SOURCE_KINDS)}")
        if chunking not in CHUNKING_STRATEGIES:
            raise ConfigError(f"chunking {chunking!r}: use one of {', '.join(CHUNKING_STRATEGIES)}")
        if kind != "stdlib" and path != "stdlib" and "://" not in path:
            path = str(UPath(path).absolute())
        spec = SourceSpec(name, kind or detect_kind(path), path, chunking)  # type: ignore[arg-type]
        stored = {"name": spec.name, "kind": spec.kind, "path": _stored_form(path), "chunking": chunking}
        write_text_atomic(self._file(name), json.dumps(stored))
        return _spec(stored)

    def remove(self, name: str) -> bool:
        file = self._file(name)
        if file.exists():
            file.unlink()
            return True
        return False

    def get(self, name: str) -> SourceSpec:
        file = self._file(name)
        if file.exists():
            return _spec(json.loads(file.read_text()))
        if name == DEFAULT_SOURCE:
            return SourceSpec(DEFAULT_SOURCE, "stdlib", "stdlib")
        raise ConfigError(f"unknown source {name!r}: add it with `quiver source add {name} PATH`")

    def all(self) -> list[SourceSpec]:
        root = UPath(self.directory)
        if not root.exists():
            return []
        return [_spec(json.loads(f.read_text())) for f in sorted(root.glob("*.json"), key=lambda p: p.name)
                if not f.name.startswith(".")]


class Inbox(ConfigurableResource):
    """A directory whose entries are sources: JSONL(.gz)/Parquet files, or directories (text files or BEIR)."""

    directory: str = Field(default_factory=from_env("QUIVER_INBOX", lambda: str(dagster_home() / "inbox")),
                           description="The watched directory (QUIVER_INBOX).")
    settle_seconds: float = Field(default=2.0, description="An entry changed more recently than this is still "
                                                           "being written: it waits for the next tick.")
    remove_all_when_empty: bool = Field(
        default=False, description="An inbox found empty removes every source that came from it. Off by "
        "default: an unmounted directory is empty too, and must not delete every source.")
