"""Connecting to NATS: settings parsed at the edge, one ``connect`` for every component."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client

from schemas import BusError, ConfigError

log = structlog.get_logger("fusebus.bus")


@dataclass(frozen=True)
class BusSettings:
    """How a component reaches the bus.

    ``url`` may hold several comma-separated servers and ``user:password@`` credentials.
    ``token``, ``user``/``password`` and ``creds_file`` (a NATS ``.creds`` file) are the other
    ways to authenticate.
    """

    url: str = "nats://127.0.0.1:4222"
    prefix: str = "fb"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: Path | None = None
    connect_timeout_s: float = 5.0
    reconnect_wait_s: float = 0.5
    wait_for_server_s: float = 0.0  # keep retrying the first connect this long (containers)

    def __post_init__(self) -> None:
        for server in self.servers:
            if "://" not in server:
                raise ConfigError(f"NATS url {server!r} needs a scheme, e.g. nats://host:4222")
        if (self.user is None) != (self.password is None):
            raise ConfigError("NATS user and password must be given together")
        if self.creds_file is not None and not self.creds_file.exists():
            raise ConfigError(f"NATS credentials file {self.creds_file} does not exist")
        if self.connect_timeout_s <= 0:
            raise ConfigError("connect_timeout_s must be > 0")

    @property
    def servers(self) -> list[str]:
        """The server URLs, split."""
        return [s.strip() for s in self.url.split(",") if s.strip()]


async def connect(
    settings: BusSettings, *, name: str, on_closed: Callable[[], None] | None = None
) -> Client:
    """Connect to NATS, reconnecting forever after a loss; raises :class:`BusError`.

    The first connect is retried for ``settings.wait_for_server_s`` so that components
    started before the server (containers start in any order) wait for it.

    Args:
        settings: where and how to connect.
        name: the client name the server shows for this connection.
        on_closed: called when the connection is closed for good (closed by us, or given up
            by the client after an error it does not reconnect from), so that a process
            never lives on without its bus.
    """

    nc = Client()

    first_errors: list[Exception] = []
    refusals: list[Exception] = []
    refused = asyncio.Event()  # credentials refused: retrying cannot help

    async def on_error(exc: Exception) -> None:
        if not (nc.is_connected or nc.is_reconnecting):
            # Before the first connect the caller gets one BusError; attempts are only debug.
            first_errors.append(exc)
            if (
                isinstance(exc, nats.errors.AuthorizationError)
                or "authorization" in str(exc).lower()
            ):
                refusals.append(exc)
                refused.set()
            log.debug("bus.error", client=name, error=str(exc) or type(exc).__name__)
            return
        log.warning("bus.error", client=name, error=str(exc) or type(exc).__name__)

    async def on_disconnect() -> None:
        if not (nc.is_draining or nc.is_closed):  # a close we asked for is no news
            log.warning("bus.disconnected", client=name)

    async def on_reconnect() -> None:
        log.info("bus.reconnected", client=name)

    async def on_close() -> None:
        if on_closed is not None:
            on_closed()

    options: dict[str, Any] = {
        "servers": settings.servers,
        "name": name,
        "connect_timeout": settings.connect_timeout_s,
        "reconnect_time_wait": settings.reconnect_wait_s,
        "max_reconnect_attempts": -1,
        "allow_reconnect": True,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "closed_cb": on_close,
        "pending_size": 8 * 1024 * 1024,
    }
    if settings.user is not None:
        options["user"], options["password"] = settings.user, settings.password
    if settings.token is not None:
        options["token"] = settings.token
    if settings.creds_file is not None:
        options["user_credentials"] = str(settings.creds_file)
    # nats-py retries the first connect forever when reconnects are unlimited, so the wait
    # for a server that is not up (yet) is bounded here.
    budget_s = max(settings.wait_for_server_s, settings.connect_timeout_s)
    connecting = asyncio.ensure_future(nc.connect(**options))
    giving_up = asyncio.ensure_future(refused.wait())
    try:
        done, _ = await asyncio.wait(
            {connecting, giving_up}, timeout=budget_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        giving_up.cancel()
    if connecting in done:
        try:
            connecting.result()
        except Exception as exc:  # nats-py raises assorted types for refused/auth/timeouts
            raise BusError(
                f"cannot connect to NATS at {settings.url}: {str(exc) or type(exc).__name__}"
            ) from exc
        return nc
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    with contextlib.suppress(Exception):
        await nc.close()
    if refusals:
        raise BusError(f"NATS at {settings.url} refused the credentials: {refusals[0]}")
    last = f": {first_errors[-1]}" if first_errors else ""
    raise BusError(f"cannot connect to NATS at {settings.url} within {budget_s:g}s{last}")
