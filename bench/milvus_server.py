"""A real Milvus server for the tests and benchmarks: the standalone binary of the PyPI package `milvus`
(Milvus 2.3, embedded etcd and local storage), in its own process, on free ports.

Settings are milvus.yaml keys of that package's template: `tls_mode` (0 off, 1 one-way, 2 mutual),
`server_pem_path`, `server_key_path`, `ca_pem_path`, `authorization_enabled`. A server stopped or killed
starts again on the same port with the same data.
"""

import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(peer_port: int, **settings: Any) -> Any:
    """The package's server config, probing its ports the way the server binds them (SO_REUSEADDR: a server
    that was killed leaves connections in TIME_WAIT, which must not stop it from starting again on its port),
    and giving the embedded etcd a peer port of its own (the template leaves it at 2380 for every server, so
    two servers on one machine could not both start)."""
    from milvus import MilvusServerConfig

    class Config(MilvusServerConfig):
        def write_config(self) -> None:
            super().write_config()
            configs = Path(self.base_data_dir) / "configs"
            client = f"http://localhost:{self.get('etcd_port')}"
            (configs / "embed-etcd.yaml").write_text(
                f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
                f"listen-peer-urls: http://localhost:{peer_port}\n"
                f"initial-advertise-peer-urls: http://localhost:{peer_port}\n"
                f"initial-cluster: default=http://localhost:{peer_port}\n")
            milvus_yaml = configs / "milvus.yaml"
            text = milvus_yaml.read_text()
            milvus_yaml.write_text(text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: "
                                                f"{configs / 'embed-etcd.yaml'}\n", 1))

        def try_bind_port(self, port: int) -> socket.socket | None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
                return sock
            except OSError:
                sock.close()
                return None

    return Config(**settings)


class MilvusServer:
    """The Milvus standalone binary with its data in `data_dir`."""

    def __init__(self, data_dir: Path, port: int | None = None, **settings: Any) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.settings = settings
        self.server: Any = None
        self._ports: dict[str, int] = {"proxy_port": self.port}  # all of them pinned after the first start
        self._peer_port = free_port()

    @property
    def tls(self) -> bool:
        return int(self.settings.get("tls_mode", 0)) > 0

    @property
    def uri(self) -> str:
        return f"{'https' if self.tls else 'http'}://{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    @property
    def process(self) -> subprocess.Popen | None:
        return self.server.server_proc if self.server is not None else None

    def start(self, wait: bool = True) -> "MilvusServer":
        from milvus import MilvusServer as Binary

        # A restart reuses every port of the first start: the embedded etcd's data remembers its own.
        self.server = Binary(_config(self._peer_port, **self._ports), wait_for_started=wait)
        self.server.set_base_dir(str(self.data_dir))
        for key, value in self.settings.items():
            self.server.config.set(key, value)
        self.server.start()
        self._ports = {key: int(self.server.config.get(key)) for key in self.server.config.configurable_items
                       if key.endswith("_port")}
        return self

    def wait_until_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, "the Milvus server exited"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    self.server.wait_started(timeout=int(1000 * max(1.0, deadline - time.monotonic())))
                    return
            time.sleep(0.2)
        raise AssertionError(f"the Milvus server did not listen on {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL, as a crash or an outage would stop it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        if self.server is not None:
            self.server.server_proc = None
            self.server.stop()  # closes its log files

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
