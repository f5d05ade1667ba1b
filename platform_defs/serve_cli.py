"""`quiver serve`'s options, and what it checks before it listens: authentication when not on loopback, and the
model the FAISS index was built with. (Imported by every `quiver` command: what serving needs is imported when
it serves.)"""

import argparse
import ipaddress
import logging
import os
import sys
from typing import TYPE_CHECKING

from quiver.errors import ConfigError
from quiver.serving.client import TOKEN_ENV

if TYPE_CHECKING:
    from platform_defs.serve import ServeSettings

DEFAULT_PORT = 8765
# The model's OpenMP threads (torch's and FAISS's) sleep at a barrier instead of spinning first (libgomp's
# default): a server shares its cores with the event loop that parses requests and writes answers (and, on a
# small machine, with its clients), and a spinning thread takes a core from them between forward passes. On 2
# busy cores, 32 clients got 24 QPS with the default and 118 with sleeping threads (interleaved runs of
# bench/serve.py's load). The user's own setting wins.
OMP_WAIT_ENV = "OMP_WAIT_POLICY"
SERVE_OMP_WAIT_POLICY = "PASSIVE"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from(args: argparse.Namespace) -> "ServeSettings":
    from platform_defs.serve import ServeSettings
    from quiver.serving.batching import BatchSettings
    from quiver.serving.requests import Limits

    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(args.host) and not args.no_auth:
        raise ConfigError(f"serving on {args.host}, which is not loopback, needs a bearer token: set {TOKEN_ENV} "
                          "(clients send it as Authorization: Bearer <token>), or pass --no-auth to serve without "
                          "authentication on purpose")
    for name in ("max_batch", "max_k", "max_query_chars", "max_queries"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.poll_s > 0:
        raise ConfigError("--poll-s must be more than 0 (how often FAISS CURRENT is read)")
    for name in ("milvus_wait_s", "batch_window_ms"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: a port is between 1 and 65535")
    return ServeSettings(
        host=args.host, port=args.port, poll_s=args.poll_s, milvus_wait_s=args.milvus_wait_s, token=token,
        batching=BatchSettings(enabled=not args.no_batching, max_batch=args.max_batch,
                               window_s=args.batch_window_ms / 1000),
        limits=Limits(max_k=args.max_k, max_query_chars=args.max_query_chars, max_queries=args.max_queries),
        access_log=args.access_log, log_level=args.log_level.lower())


def serve(args: argparse.Namespace) -> int:
    """Check, then serve until interrupted."""
    os.environ.setdefault(OMP_WAIT_ENV, SERVE_OMP_WAIT_POLICY)  # read once, when torch and FAISS load: first
    import uvicorn

    from platform_defs.resources import build_resources
    from platform_defs.serve import Service, create_app
    from quiver.serving.watcher import model_mismatch

    settings = settings_from(args)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(settings, build_resources(resolve_env=True))
    current = service.faiss_store.current_version()
    if current is not None and service.faiss_store.has_version(current):
        problem = model_mismatch(current, service.faiss_store.manifest(current), service.fingerprint, service.model)
        if problem:
            raise ConfigError(f"not serving: {problem}")
    batching = (f"micro-batches of up to {settings.batching.max_batch} queries within "
                f"{settings.batching.window_s * 1000:g} ms" if settings.batching.enabled else "batching off")
    logging.getLogger("quiver.serve").info(
        f"serving on http://{settings.host}:{settings.port} ({batching}; model {service.model}, fingerprint "
        f"{service.fingerprint}; FAISS index {current or 'not built yet'} under {service.faiss_store.directory}; "
        f"authentication {'on' if settings.token else 'off'})")
    config = uvicorn.Config(create_app(service), host=settings.host, port=settings.port, lifespan="on",
                            log_level=settings.log_level, access_log=settings.access_log)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="the search service: an HTTP JSON API that answers in milliseconds and "
                         "serves each new index version")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                     f"needs {TOKEN_ENV} or --no-auth)")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    srv.add_argument("--max-batch", type=int, default=64, help="most queries encoded and searched together "
                     "(default 64)")
    srv.add_argument("--batch-window-ms", type=float, default=2.0, help="how long the first request of a batch "
                     "waits for others (default 2 ms)")
    srv.add_argument("--no-batching", action="store_true", help="every request encoded and searched alone")
    srv.add_argument("--max-k", type=int, default=100, help="largest k a request may ask (default 100)")
    srv.add_argument("--max-query-chars", type=int, default=2000, help="longest query (default 2000 characters)")
    srv.add_argument("--max-queries", type=int, default=64, help="most queries in one request (default 64)")
    srv.add_argument("--poll-s", type=float, default=0.5, help="how often the FAISS CURRENT pointer is read "
                     "(default 0.5 s)")
    srv.add_argument("--milvus-wait-s", type=float, default=2.0, help="how long a Milvus query waits for a Milvus "
                     "Lite database another process holds before a 503 (default 2 s)")
    srv.add_argument("--no-auth", action="store_true", help=f"serve a non-loopback address without {TOKEN_ENV}")
    srv.add_argument("--access-log", action="store_true", help="log every request")
    srv.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="the server's log level (default INFO)")
    srv.set_defaults(func=serve)
