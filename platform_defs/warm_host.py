"""The warm host: one process that imported the definitions and loaded the model once, and forks a child for
each run it is sent (quiver/warm.py is the protocol and the client).

The loop is single-threaded (a process with threads must not fork): it accepts requests, forks, reaps children
and tells each client its child's exit code. A client that hangs up interrupts its child (SIGINT, as Ctrl-C
would). The host refuses a request from other code or another environment, and then exits, so nothing stale
is ever served; it exits too after `idle_s` seconds without a run.
"""

import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from quiver.settings import dagster_home
from quiver.warm import WARM_CHILD_ENV, LineReader, code_digest, relevant_env, send, socket_path

_log = logging.getLogger("quiver.warm")
DEFAULT_IDLE_S = 900.0


@dataclass
class Child:
    pid: int
    conn: socket.socket | None  # the client waiting for it (None: a run the daemon launched)
    what: str
    started: float = field(default_factory=time.time)


class WarmHost:
    def __init__(self, idle_s: float = DEFAULT_IDLE_S) -> None:
        self.idle_s = idle_s
        self.home = dagster_home()
        self.path = socket_path(self.home)
        self.children: dict[int, Child] = {}
        self.digest = ""
        self.env: dict[str, str] = {}
        self.started = time.time()
        self.served = 0
        self.model = ""
        self.running = True
        self.inode = 0
        self.listener: socket.socket | None = None

    # -- start-up ---------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Import everything a run needs and load the model, as the forkserver preload does. The code and the
        environment are read before (loading a model sets variables of its own), and the code again after: a
        file edited meanwhile may be what was imported, so the host refuses to start."""
        started = time.perf_counter()
        self.digest, self.env = code_digest(), relevant_env(os.environ)
        import platform_defs.cli  # noqa: F401 - what a child runs, imported once here
        import platform_defs.definitions  # noqa: F401 - the code versions are computed here, once
        import platform_defs.preload as preload  # the model and tokenizer, and the instance's storage modules

        if preload.PRELOADED is None:
            raise RuntimeError("the model could not be loaded (see the log above)")
        if code_digest() != self.digest:
            raise RuntimeError("the project's code changed while the warm host started: start it again")
        self.model = preload.PRELOADED.path
        gc.freeze()
        _log.info("warm host ready in %.1fs: model %s", time.perf_counter() - started, self.model)

    def listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        previous = os.umask(0o077)  # this user's runs only, from the moment the socket exists
        try:
            listener.bind(str(tmp))
        finally:
            os.umask(previous)
        listener.listen(16)
        os.replace(tmp, self.path)  # a host that starts replaces any stale socket, atomically
        self.inode = os.stat(self.path).st_ino
        self.listener = listener
        return listener

    def _socket_is_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    # -- the loop ---------------------------------------------------------------------------------
    def serve(self) -> None:
        listener = self.listen()
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, None)
        last_busy = time.monotonic()
        try:
            # After a stop (or a request from other code) no request is taken, but the runs in flight finish and
            # their clients get their exit codes.
            while self.running or self.children:
                if not self.running and self._socket_is_ours():
                    self.path.unlink(missing_ok=True)
                    selector.unregister(listener)
                for key, _ in selector.select(timeout=0.05):
                    try:
                        if key.data is None:
                            conn, _addr = listener.accept()
                            self.handle(conn, selector)
                        else:  # a waiting client hung up (or sent something): interrupt its child
                            self.client_gone(key.fileobj, key.data, selector)  # type: ignore[arg-type]
                    except OSError as exc:  # one client's broken connection never ends the host
                        _log.warning("a request failed: %s", exc)
                self.reap(selector)
                if self.children:
                    last_busy = time.monotonic()
                elif self.running and time.monotonic() - last_busy > self.idle_s:
                    _log.info("warm host idle for %.0fs: exiting", self.idle_s)
                    break
        finally:
            if self._socket_is_ours():  # a newer host may have replaced it
                self.path.unlink(missing_ok=True)
            listener.close()

    def handle(self, conn: socket.socket, selector: selectors.BaseSelector) -> None:
        conn.settimeout(5)
        reader = LineReader(conn)
        try:
            request = reader.read()
        except (OSError, ValueError):
            for fd in reader.fds:
                os.close(fd)
            conn.close()
            return
        kind = (request or {}).get("kind")
        refused = None if kind in ("status", "stop") else self.refusal(request or {})
        if kind in ("status", "stop") or refused:
            for fd in reader.fds:
                os.close(fd)
            with conn:
                send(conn, self.status() if kind == "status" else {"stopping": os.getpid()} if kind == "stop"
                     else {"refused": refused})
            if kind == "stop" or (refused or "").startswith("the project"):  # stale code: never serve it again
                self.running = False
            return
        assert request is not None
        pid = os.fork()
        if pid == 0:
            self.child(request, reader.fds, conn)  # never returns
        for fd in reader.fds:
            os.close(fd)
        self.served += 1
        what = " ".join(request.get("argv", [])) if kind == "command" else f"run {request.get('run_id')}"
        _log.info("child %s: %s", pid, what)
        self.children[pid] = Child(pid, None, what)
        try:
            send(conn, {"accepted": pid, "host": os.getpid()})
        except OSError:  # the client is gone already: its command is interrupted, as its hang-up would
            os.kill(pid, signal.SIGINT)
            conn.close()
            return
        if kind == "command":
            self.children[pid].conn = conn
            conn.setblocking(False)
            selector.register(conn, selectors.EVENT_READ, pid)
        else:
            conn.close()

    def refusal(self, request: dict[str, Any]) -> str | None:
        if request.get("kind") not in ("command", "execute_run"):
            return f"unknown request {request.get('kind')!r}"
        if request.get("digest") != self.digest:
            if code_digest() != self.digest:  # the host's own code is stale
                return "the project's code or its installed libraries changed since the warm host started"
            return "the caller's code or libraries are not the warm host's (another checkout or environment?)"
        env = relevant_env(request.get("env", {}))
        if env != self.env:
            differ = sorted(k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k))
            return f"the environment differs from the warm host's ({', '.join(differ)})"
        return None

    def client_gone(self, conn: socket.socket, pid: int, selector: selectors.BaseSelector) -> None:
        try:
            data = conn.recv(1 << 12)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data and pid in self.children:
            _log.info("client of child %s hung up: interrupting it", pid)
            os.kill(pid, signal.SIGINT)
            selector.unregister(conn)
            conn.close()
            self.children[pid].conn = None

    def reap(self, selector: selectors.BaseSelector) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            child = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            _log.info("child %s (%s) exited %s after %.1fs", pid, child.what, code, time.time() - child.started)
            if child.conn is not None:
                selector.unregister(child.conn)
                try:
                    child.conn.setblocking(True)
                    send(child.conn, {"exit": code if code >= 0 else 128 - code})
                except OSError:
                    pass
                child.conn.close()

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "home": str(self.home), "model": self.model, "started": self.started,
                "runs_served": self.served, "running": [c.what for c in self.children.values()],
                "idle_exit_s": self.idle_s}

    # -- a child ----------------------------------------------------------------------------------
    def child(self, request: dict[str, Any], fds: list[int], conn: socket.socket) -> None:
        """In the forked child: become the client's process (its output, directory and environment), run, exit."""
        code = 1
        try:
            for other in [conn, self.listener, *(c.conn for c in self.children.values())]:
                if other is not None:
                    other.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            logging.getLogger().handlers.clear()  # the host's log handler; the command logs as it would alone
            logging.getLogger().setLevel(logging.WARNING)
            if request["kind"] == "command":
                for fd, target in zip(fds, (1, 2), strict=False):
                    os.dup2(fd, target)
                    os.close(fd)
                # the host's own stdout was its log file (block-buffered): the caller's terminal is not
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own stdout
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.argv = ["quiver", *request["argv"]]
                os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request.get("env", {}))
            os.environ[WARM_CHILD_ENV] = str(os.getppid())
            if request["kind"] == "command":
                from platform_defs.cli import main

                if os.environ.get("QUIVER_WARM_PROFILE"):  # where a warm run's time goes, for the benchmark
                    import cProfile

                    profile = cProfile.Profile()
                    code = profile.runcall(main, request["argv"])
                    profile.dump_stats(os.environ["QUIVER_WARM_PROFILE"])
                else:
                    code = main(request["argv"])
            else:
                code = execute_launched_run(request["run_id"])
        except KeyboardInterrupt:
            code = 130
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported on the client's terminal, then the child exits
            traceback.print_exc()
        finally:
            _release_services()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # never the host's own exit handlers


def _release_services() -> None:
    """What a process normally gives back when it exits: a Milvus Lite database and its server process."""
    try:
        from resources.milvus_clients import close_milvus_clients

        close_milvus_clients()
    except Exception:  # noqa: BLE001 - the child exits anyway
        traceback.print_exc()


def execute_launched_run(run_id: str) -> int:
    """A run the daemon launched (platform_defs/launcher.py), executed as `dagster api execute_run` would."""
    from dagster import DagsterInstance
    from dagster._cli.api import _execute_run_command_body  # the body of `dagster api execute_run`

    with DagsterInstance.get() as instance:
        return _execute_run_command_body(run_id, instance, lambda _event: None, set_exit_code_on_failure=False)


def main(idle_s: float) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s warm host %(process)d: %(message)s")
    host = WarmHost(idle_s)
    host.warm_up()
    print(json.dumps({"ready": os.getpid(), "socket": str(host.path)}), flush=True)
    host.serve()
    return 0
