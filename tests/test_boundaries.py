"""Layer boundaries that keep processes small: who may import TensorFlow and nats."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["schemas", "bus", "coordinator", "agents", "fusebus"]
# A package may import those to its left (and itself), never those to its right.
ALLOWED = {name: set(LAYERS[: i + 1]) for i, name in enumerate(LAYERS)}
ALLOWED["agents"].discard("coordinator")


def _modules_loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "statement",
    [
        "import coordinator",
        "import schemas, bus",
        "import agents, agents.fusion",
        "from agents.runtimes import load_runtime; from pathlib import Path; "
        "load_runtime(Path('models/accel.tflite')).warm_up()",
        "import fusebus.cli, fusebus.up",
    ],
)
def test_serving_path_never_imports_tensorflow(statement: str) -> None:
    """The coordinator, the bus and a LiteRT agent run without TensorFlow or Keras loaded."""
    loaded = _modules_loaded_after(statement)
    assert "tensorflow" not in loaded
    assert "keras" not in loaded


PURE_CORES = [
    "schemas",
    "coordinator",
    "coordinator.plan",
    "coordinator.windows",
    "coordinator.decompose",
    "coordinator.tracker",
    "coordinator.directory",
    "coordinator.liveness",
    "agents",
    "agents.fusion",
    "agents.fusion.strategies",
]


@pytest.mark.parametrize("module", PURE_CORES)
def test_pure_cores_import_without_the_transport(module: str) -> None:
    """Plans, windows, the tracker, decomposition and fusion strategies are plain code: they
    load without nats, structlog or the bus (the services load only when asked for)."""
    loaded = _modules_loaded_after(f"import {module}")
    assert {"nats", "structlog", "bus"}.isdisjoint(loaded), sorted(
        name for name in loaded if name.split(".")[0] in ("nats", "structlog", "bus")
    )


def test_services_still_come_from_their_packages() -> None:
    """The lazy package attributes give the services (and nothing that does not exist)."""
    loaded = _modules_loaded_after(
        "from coordinator import Coordinator; from agents.fusion import FusionAgent; "
        "from agents import AgentRuntime; import coordinator; "
        "assert not hasattr(coordinator, 'Nope')"
    )
    assert {"coordinator.service", "agents.fusion.service", "agents.runtime", "nats"} <= loaded


def test_only_bus_imports_nats() -> None:
    """Transport stays in bus/: every other package reaches NATS through it."""
    for layer in ("schemas", "coordinator", "agents", "fusebus"):
        for file in sorted((ROOT / layer).rglob("*.py")):
            for imported in _imports(file):
                assert not imported.startswith("nats"), (
                    f"{file.relative_to(ROOT)} imports {imported}"
                )


def test_imports_point_down_the_layers() -> None:
    """schemas -> bus -> coordinator/agents -> fusebus: no package imports one above it."""
    for layer in LAYERS:
        for file in sorted((ROOT / layer).rglob("*.py")):
            for imported in _imports(file):
                top = imported.split(".")[0]
                if top in LAYERS:
                    assert top in ALLOWED[layer], f"{file.relative_to(ROOT)} imports {imported}"


def _imports(file: Path) -> list[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names
