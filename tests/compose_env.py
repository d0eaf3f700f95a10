"""The environment compose/nats-start.sh gives nats-server, for tests that run compose/nats.conf."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from nats.aio.client import Client

from bus import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
START_SCRIPT = ROOT / "compose" / "nats-start.sh"
#: Every user compose/nats.conf defines, each given its password as FUSEBUS_<ROLE>_PASSWORD.
ROLES = ("sensor", "coordinator", "agent", "fusion", "reader", "models")
#: The passwords tests give the roles.
TEST_PASSWORDS = {role: f"test-{role}-secret" for role in ROLES}


def password_env(passwords: Mapping[str, str]) -> dict[str, str]:
    """``FUSEBUS_<ROLE>_PASSWORD`` variables for passwords by role."""
    return {f"FUSEBUS_{role.upper()}_PASSWORD": password for role, password in passwords.items()}


def nats_conf_env(passwords: Mapping[str, str]) -> dict[str, str]:
    """The ``FUSEBUS_*`` variables the start script hands nats-server for these role
    passwords (``FUSEBUS_<ROLE>_PASSWORD`` keys), with a free monitoring port: the script
    is run for real, with ``env`` standing in for the server so it prints what it would get."""
    given = {**os.environ, **passwords, "FUSEBUS_NATS_MONITOR_PORT": str(free_port())}
    shown = subprocess.run(
        ["sh", str(START_SCRIPT), "-0"],
        env={**given, "NATS_SERVER": "env"},
        capture_output=True,
        check=True,
    ).stdout.decode()
    pairs = (entry.split("=", 1) for entry in shown.split("\0") if "=" in entry)
    return {k: v for k, v in pairs if k.startswith("FUSEBUS_")}


def secured_server(store_dir: Path) -> EmbeddedServer:
    """nats-server (not started yet) running compose/nats.conf, each role's password
    (:data:`TEST_PASSWORDS`) given through the environment as the start script gives it."""
    return EmbeddedServer(
        config_file=ROOT / "compose" / "nats.conf",
        env=nats_conf_env(password_env(TEST_PASSWORDS)),
        store_dir=store_dir,
    )


async def connect_noting_errors(url: str, role: str, errors: list[str]) -> Client:
    """A plain nats-py connection as ``role`` that appends each error the server sends it
    (a permissions violation arrives that way, not as the failure of a request) to
    ``errors``, lower-cased. The caller closes it."""

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = Client()
    await nc.connect(url, user=role, password=TEST_PASSWORDS[role], error_cb=on_error)
    return nc
