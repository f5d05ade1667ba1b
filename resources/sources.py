"""The registry of sources: each source is a dynamic partition of the document-level assets."""

import json
import os
import re
from dataclasses import asdict, dataclass

from dagster import ConfigurableResource
from pydantic import Field
from upath import UPath

from quiver.chunking import STRATEGIES
from quiver.errors import ConfigError
from quiver.settings import dagster_home, default_storage_root
from quiver.sources import SOURCE_KINDS, SourceKind, detect_kind
from resources.fileref import write_text_atomic

DEFAULT_SOURCE = "stdlib"
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    kind: SourceKind
    path: str
    chunking: str = "tokens"  # quiver.chunking strategy: tokens, or whole_document


class SourceRegistry(ConfigurableResource):
    """Source specs stored beside the artifacts, one JSON file each, so every machine sees them."""

    directory: str = Field(default_factory=lambda: f"{default_storage_root()}/_sources")

    def _file(self, name: str) -> UPath:
        return UPath(self.directory) / f"{name}.json"

    def add(self, name: str, path: str, kind: str | None = None, chunking: str = "tokens") -> SourceSpec:
        if not SOURCE_NAME.match(name):
            raise ConfigError(f"source name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        if kind is not None and kind not in SOURCE_KINDS:
            raise ConfigError(f"source kind {kind!r}: use one of {', '.join(SOURCE_KINDS)}")
        if chunking not in STRATEGIES:
            raise ConfigError(f"chunking {chunking!r}: use one of {', '.join(STRATEGIES)}")
        if kind != "stdlib" and path != "stdlib" and "://" not in path:
            path = str(UPath(path).absolute())
        spec = SourceSpec(name, kind or detect_kind(path), path, chunking)  # type: ignore[arg-type]
        write_text_atomic(self._file(name), json.dumps(asdict(spec)))
        return spec

    def remove(self, name: str) -> bool:
        file = self._file(name)
        if file.exists():
            file.unlink()
            return True
        return False

    def get(self, name: str) -> SourceSpec:
        file = self._file(name)
        if file.exists():
            return SourceSpec(**json.loads(file.read_text()))
        if name == DEFAULT_SOURCE:
            return SourceSpec(DEFAULT_SOURCE, "stdlib", "stdlib")
        raise ConfigError(f"unknown source {name!r}: add it with `quiver source add {name} PATH`")

    def all(self) -> list[SourceSpec]:
        root = UPath(self.directory)
        if not root.exists():
            return []
        return [SourceSpec(**json.loads(f.read_text())) for f in sorted(root.glob("*.json"), key=lambda p: p.name)]


class Inbox(ConfigurableResource):
    """A directory whose entries are sources: JSONL(.gz)/Parquet files, or directories (text files or BEIR)."""

    directory: str = Field(default_factory=lambda: os.environ.get("QUIVER_INBOX") or str(dagster_home() / "inbox"),
                           description="The watched directory (QUIVER_INBOX).")
    settle_seconds: float = Field(default=2.0, description="An entry changed more recently than this is still "
                                                           "being written: it waits for the next tick.")
