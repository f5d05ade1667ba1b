"""`quiver warm start|stop|status`: the warm host, which spares a small `quiver run` its imports and model load."""

import argparse
import json
import os
import subprocess
import sys
import time

from quiver.errors import QuiverError
from quiver.settings import dagster_home
from quiver.warm import ask, socket_path

START_TIMEOUT_S = 180.0


def cmd_warm(args: argparse.Namespace) -> int:
    if args.action == "serve":  # the host itself, in the foreground (what `start` runs in the background)
        from platform_defs.warm_host import main

        return main(args.idle)
    status = ask({"kind": "status"})
    if args.action == "status":
        if status is None:
            print(f"no warm host for {dagster_home()} (start one with `quiver warm start`)")
            return 1
        print(json.dumps(status, indent=2))
        return 0
    if args.action == "stop":
        if status is None:
            print("no warm host is running")
            return 0
        ask({"kind": "stop"})
        print(f"warm host {status['pid']} stopped")
        return 0
    if status is not None:
        print(f"warm host {status['pid']} is already running for {status['home']}")
        return 0
    return start(args.idle)


def start(idle_s: float) -> int:
    """Starts the host in the background (its log in $DAGSTER_HOME/warm-host.log) and waits until it answers."""
    log_path = dagster_home() / "warm-host.log"
    started = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "platform_defs.cli", "warm", "serve", "--idle", str(idle_s)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env={**os.environ, "DAGSTER_HOME": str(dagster_home())})
    print("starting the warm host (imports and the model load once) ...", file=sys.stderr, flush=True)
    while time.monotonic() - started < START_TIMEOUT_S:
        if proc.poll() is not None:
            raise QuiverError(f"the warm host exited with {proc.returncode}; see {log_path}")
        status = ask({"kind": "status"}, timeout=1.0)
        if status is not None:
            print(f"warm host {status['pid']} ready in {time.monotonic() - started:.1f}s for {status['home']}: "
                  f"`quiver run` runs in it (socket {socket_path()}); it stops after {idle_s:.0f}s without a run, "
                  "or with `quiver warm stop`")
            return 0
        time.sleep(0.2)
    proc.kill()
    raise QuiverError(f"the warm host did not start in {START_TIMEOUT_S:.0f}s; see {log_path}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from platform_defs.warm_host import DEFAULT_IDLE_S

    warm = sub.add_parser("warm", help="a warm host: `quiver run` and daemon-launched runs skip the imports and "
                                       "the model load")
    warm.add_argument("action", choices=["start", "stop", "status", "serve"],
                      help="start (in the background), stop, status, or serve (the host, in the foreground)")
    warm.add_argument("--idle", type=float, default=DEFAULT_IDLE_S,
                      help=f"seconds without a run before the host exits (default {DEFAULT_IDLE_S:.0f})")
    warm.set_defaults(func=cmd_warm)
