"""`quiver search` through a running `quiver serve` (QUIVER_SERVER_URL): the standard library's HTTP client only,
so the command answers in a fraction of a second, importing neither torch nor Dagster."""

import json
import os
import urllib.error
import urllib.request
from typing import Any

from quiver.errors import QuiverError

URL_ENV = "QUIVER_SERVER_URL"
TOKEN_ENV = "QUIVER_SERVER_TOKEN"  # the bearer token, on both sides


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason if isinstance(exc.reason, str) else str(exc)


def search_server(url: str, query: str, k: int, store: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The top-k documents as `quiver search` shows them (same fields, same ranking), from the server at url."""
    body = json.dumps({"query": query, "k": k, "store": store, "documents": True}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    try:
        request = urllib.request.Request(url.rstrip("/") + "/search", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
        return list(answer["hits"])
    except urllib.error.HTTPError as exc:
        raise QuiverError(f"the Quiver server at {url} answered {exc.code}: {_error_message(exc)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise QuiverError(f"cannot reach the Quiver server at {url} ({URL_ENV}): {reason}") from exc
    except (ValueError, KeyError, TypeError) as exc:  # not a URL, or not a Quiver server's answer
        raise QuiverError(f"{URL_ENV}={url!r}: not a Quiver server's address, or not its answer "
                          f"({type(exc).__name__}: {exc})") from exc
