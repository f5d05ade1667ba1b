"""Names users give and choose: the one rule for source names, the source kinds and the chunking strategies.

A source name is also a partition key and part of storage paths. One that reaches a path (a partition added
from the UI or GraphQL, a registry file, an inbox entry) is checked here first, so no path outside the
storage root can ever be built from one.
"""

import re
from typing import Literal, get_args

from quiver.errors import ConfigError

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit, at most 64 characters"


def check_source_name(name: object, what: str = "source name") -> str:
    """The name itself when it follows the rule; ConfigError naming it otherwise."""
    if not isinstance(name, str) or not SOURCE_NAME.match(name):
        raise ConfigError(f"{what} {name!r} is not allowed: use {RULE}")
    return name


# What a source can be read as (quiver/sources.py reads each kind).
SourceKind = Literal["stdlib", "files", "jsonl", "parquet", "beir"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)

# tokens: windows that fit the model; whole_document: one chunk per document, title + " " + text, left for the
# model to truncate, as MTEB encodes BEIR corpora (to reproduce published figures).
ChunkingStrategy = Literal["tokens", "whole_document"]
CHUNKING_STRATEGIES: tuple[str, ...] = get_args(ChunkingStrategy)
DEFAULT_CHUNKING: ChunkingStrategy = "tokens"
