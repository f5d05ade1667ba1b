"""The warm host's protocol, and its client: nothing here imports Dagster, torch or the definitions.

A small run's work takes a second; a new process spends far longer importing Dagster, the definitions and the
model libraries, and loading the model. The warm host (platform_defs/warm_host.py) is a process that did all of
that once and forks a child for each run it is sent: `quiver run`, or a run the Dagster daemon launches. The
child is an ordinary Dagster run in the instance (the UI shows it), with the model inherited copy-on-write.

A host serves one Dagster instance (its socket is named after $DAGSTER_HOME), and only for the code and the
environment it started with: a request from a changed project, changed installed packages or another
environment is refused, and the host exits, so a warm run never runs stale code.
"""

import hashlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from quiver.settings import PROJECT_ROOT, dagster_home

# The environment that decides what a run computes or where it writes: a request with other values is refused.
ENV_PREFIXES = ("QUIVER_", "DAGSTER_", "HF_", "TRANSFORMERS_", "SENTENCE_TRANSFORMERS_", "OMP_", "MKL_",
                "CUDA_", "PYTHONPATH", "PYTHONHASHSEED")
# ... but not these: how a process was started (`dagster dev` sets two), or the warm host's own switches.
ENV_IGNORED = {"DAGSTER_IS_DEV_CLI", "DAGSTER_verbose", "QUIVER_WARM_HOST", "QUIVER_WARM_PROFILE",
               "QUIVER_WARM_CHILD"}
CODE_PACKAGES = ("quiver", "resources", "assets", "platform_defs")
DISABLE_ENV = "QUIVER_WARM_HOST"  # "off": never use a warm host
WARM_CHILD_ENV = "QUIVER_WARM_CHILD"  # set in a host's children: the pid of their host
ACCEPT_TIMEOUT_S = 30.0  # a host answers at once; a busy machine may take a while to schedule it


def socket_path(home: Path | None = None) -> Path:
    """The host's socket for an instance: short (a socket path has about 100 bytes), named by the instance."""
    home = (home or dagster_home()).resolve()
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"quiver-warm-{os.getuid()}-{digest}.sock"


def relevant_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith(ENV_PREFIXES) and k not in ENV_IGNORED}


def _code_files(root: Path) -> Iterator[Path]:
    for package in CODE_PACKAGES:
        yield from sorted((root / package).rglob("*.py"))
    yield root / "pyproject.toml"


def _installed() -> Iterator[str]:
    """Every installed distribution with its version (the names of the `*.dist-info` directories of the
    interpreter's path: one directory listing each, cheaper than reading their metadata)."""
    for entry in sys.path:  # the environment's package directories (never the working directory)
        if entry.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(entry):
            yield from sorted(n for n in os.listdir(entry) if n.endswith((".dist-info", ".egg-info")))


def code_digest(root: Path = PROJECT_ROOT) -> str:
    """What a warm host's code is: every project source file, the interpreter and its environment, and every
    installed library's version."""
    digest = hashlib.sha256(f"{sys.version}\x00{sys.prefix}\x00{sys.executable}".encode())
    for file in _code_files(root):
        if file.is_file():
            digest.update(str(file.relative_to(root)).encode() + b"\x00" + file.read_bytes() + b"\x00")
    for name in _installed():
        digest.update(name.encode() + b"\x00")
    return digest.hexdigest()


def send(sock: socket.socket, message: Mapping[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


class LineReader:
    """Newline-delimited JSON messages from a socket (and the file descriptors sent with the first bytes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.fds: list[int] = []

    def read(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 4)
            self.fds.extend(fds)
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def connect(home: Path | None = None, timeout: float = 5.0) -> socket.socket | None:
    """A connection to the instance's warm host, or None when none is up (a stale socket is no host)."""
    if os.environ.get(DISABLE_ENV, "").lower() in ("off", "0", "false", "no"):
        return None
    path = socket_path(home)
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def ask(message: Mapping[str, Any], home: Path | None = None, timeout: float = 5.0) -> dict[str, Any] | None:
    """One request and its answer (status, stop, execute_run); None when no host is up."""
    sock = connect(home, timeout)
    if sock is None:
        return None
    with sock:
        send(sock, message)
        try:
            return LineReader(sock).read()
        except (OSError, ValueError):
            return None


class NoAnswerError(OSError):
    """A request was sent, and the host did not answer: it may have acted on it."""


def submit_run(run_id: str, home: Path | None = None) -> dict[str, Any] | None:
    """Hands a launched Dagster run to the warm host: its answer (accepted, with the child's and the host's pid,
    or refused), or None when no host is up. NoAnswerError once the request may have been acted on."""
    sock = connect(home)
    if sock is None:
        return None
    with sock:
        try:
            send(sock, {"kind": "execute_run", "run_id": run_id, "env": dict(os.environ), "digest": code_digest()})
        except OSError:
            return None  # not sent: nothing happened
        sock.settimeout(ACCEPT_TIMEOUT_S)
        try:
            answer = LineReader(sock).read()
        except (OSError, ValueError) as exc:
            raise NoAnswerError(f"the warm host did not answer about run {run_id}: {exc}") from exc
        if answer is None:
            raise NoAnswerError(f"the warm host closed the connection about run {run_id}")
        return answer


def run_through_host(argv: list[str]) -> int | None:
    """Runs a `quiver` command in a child of the warm host, with this terminal as its output; its exit code, or
    None when no host is up or the host refused (the caller then runs the command itself)."""
    sock = connect()
    if sock is None:
        return None
    with sock:
        sys.stdout.flush()
        sys.stderr.flush()
        send(sock, {"kind": "command", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                    "digest": code_digest()}, fds=[1, 2])
        reader = LineReader(sock)
        sock.settimeout(ACCEPT_TIMEOUT_S)
        try:
            answer = reader.read()
        except KeyboardInterrupt:
            return 130
        except (OSError, ValueError) as exc:
            # The host may have forked the command already: running it here too could run it twice.
            print(f"quiver: the warm host did not answer ({exc}); the command may be running there: see "
                  "`quiver warm status`, or stop it with `quiver warm stop`", file=sys.stderr)
            return 1
        if not answer or "refused" in answer:
            reason = answer["refused"] if answer else "it closed the connection"
            print(f"(warm host not used: {reason}; running in this process)", file=sys.stderr)
            return None
        sock.settimeout(None)  # a run takes as long as it takes
        try:
            done = reader.read()
        except KeyboardInterrupt:
            return 130  # closing the connection interrupts the child
        except (OSError, ValueError):
            done = None
        if not done:
            print("quiver: the warm host went away before the command finished", file=sys.stderr)
            return 1
        return int(done["exit"])
