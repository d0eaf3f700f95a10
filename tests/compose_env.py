"""The environment compose/nats-start.sh gives nats-server, for tests that run compose/nats.conf."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from bus import free_port

ROOT = Path(__file__).resolve().parent.parent
START_SCRIPT = ROOT / "compose" / "nats-start.sh"


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
