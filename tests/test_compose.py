"""compose/: the file validates, credentials come from the environment, and the services'
own commands scale and run the pipeline against compose/nats.conf."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from nats.js.kv import KeyValue

from bus import (
    BusSettings,
    EmbeddedServer,
    LeaseView,
    Subjects,
    connect,
    discover_agents,
    find_server_binary,
    free_port,
    lease_bucket,
    read_leases,
)
from bus.shares import settled
from schemas import Decision
from tests.compose_env import ROLES, START_SCRIPT, nats_conf_env
from tests.helpers import Collector, eventually, stream_names, wait_for_agents, wait_for_role

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
CLUSTER = ROOT / "compose" / "docker-compose.cluster.yml"
EXAMPLE_ENV = ROOT / "compose" / ".env.example"
Spawn = Callable[..., subprocess.Popen[bytes]]


COMPOSE_FILES = [COMPOSE, ROOT / "compose" / "docker-compose.metrics.yml", CLUSTER]
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, and $$ for "$".
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


class MissingVariableError(LookupError):
    """A ``${NAME:?message}`` whose variable is not set."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """``text`` with compose's variable syntax filled in from ``env``, as compose does.

    Raises:
        MissingVariableError: a required variable is unset (or empty, with ``:?``).
    """

    def fill(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, colon, op, argument = match.groups()
        value = env.get(name)
        absent = value is None or (colon == ":" and value == "")
        if op == "?" and absent:
            raise MissingVariableError(f"required variable {name} is missing a value: {argument}")
        if op == "-" and absent:
            return argument
        return value or ""

    return _VARIABLE.sub(fill, text)


def validate_compose(
    path: Path, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Interpolate a compose file and check it against the compose specification's schema
    (vendored by check-jsonschema, so no network)."""
    filled = tmp_path / path.name
    filled.write_text(interpolate(path.read_text(), env))
    return subprocess.run(
        # As a module of this interpreter: installed by the test extra, whatever PATH holds.
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(filled)],
        capture_output=True,
        text=True,
    )  # fmt: skip


def example_env() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in EXAMPLE_ENV.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {k: v for k, v in pairs}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path, tmp_path: Path) -> None:
    """Each compose file shipped, filled in with the example passwords, is valid by the
    compose specification's schema; a deliberately broken copy is not (the check bites)."""
    done = validate_compose(path, example_env(), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = broken / path.name
    bad.write_text(path.read_text().replace("services:", "servicez:", 1))
    refused = validate_compose(bad, example_env(), tmp_path / "broken")
    assert refused.returncode != 0


@pytest.mark.parametrize("path", [COMPOSE, CLUSTER], ids=lambda p: p.name)
def test_credentials_come_only_from_the_environment(path: Path) -> None:
    """Without the passwords set, filling in the file fails naming the variable: nothing
    secret is baked in."""
    with pytest.raises(MissingVariableError, match="FUSEBUS_"):
        interpolate(path.read_text(), {})
    assert "change-me" not in path.read_text()


def test_interpolation_follows_compose_rules() -> None:
    """The test's own interpolation does what compose does for the forms the files use."""
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET}-${UNSET:-d}-${EMPTY:-d}-${EMPTY-d}-$$x", env) == "v-d-d--$x"
    with pytest.raises(MissingVariableError, match="EMPTY"):
        interpolate("${EMPTY:?say so}", env)
    assert interpolate("${EMPTY?say so}", env) == ""


def stop_order(path: Path = COMPOSE) -> list[str]:
    """Services in the order compose stops them: the reverse of a start order in which
    every service starts after what it depends on."""
    graph = {name: set(body.get("depends_on") or ()) for name, body in services(path).items()}
    started: list[str] = []
    while len(started) < len(graph):
        ready = sorted(n for n, deps in graph.items() if n not in started and deps <= set(started))
        assert ready, f"depends_on has a cycle among {set(graph) - set(started)}"
        started += ready
    return started[::-1]


def test_stopping_lets_windows_in_flight_finish() -> None:
    """compose stops the replay, then the coordinator (which drains: its open windows are
    answered and decided), and only then fusion and the agents, then NATS."""
    order = stop_order()
    position = {name: i for i, name in enumerate(order)}
    assert position["replay"] < position["coordinator"]
    for name in ("fusion", "agent-accel", "agent-gyro"):
        assert position["coordinator"] < position[name] < position["nats"], order
    assert "--drain-s" in services()["coordinator"]["command"]
    assert services()["nats"]["stop_signal"] == "SIGINT"


AWKWARD_PASSWORDS = [
    "123456",
    "20k",
    "3e8f1a2b9c0d",
    "a;b",
    "it's",
    "x}y",
    "with space",
    'q"uo\\te',
]


async def test_any_password_works_through_the_start_script(tmp_path: Path) -> None:
    """nats-server started as compose starts it (compose/nats-start.sh, compose/nats.conf)
    takes every role's password as the exact string it is: numbers, hex, ;, ', }, spaces,
    quotes and backslashes; a wrong password is refused."""
    roles = list(ROLES)
    for round_no in range(0, len(AWKWARD_PASSWORDS), len(roles)):
        chosen = (AWKWARD_PASSWORDS[round_no:] + AWKWARD_PASSWORDS)[: len(roles)]
        passwords = dict(zip(roles, chosen, strict=True))
        env = {f"FUSEBUS_{r.upper()}_PASSWORD": p for r, p in passwords.items()}
        port = free_port()
        store = tmp_path / f"round{round_no}"
        store.mkdir()
        server = start_through_script(env, port, store)
        try:
            url = f"nats://127.0.0.1:{port}"
            await eventually(functools.partial(_accepts, url), what="nats-server up")
            for role, password in passwords.items():
                nc = await connect(BusSettings(url=url, user=role, password=password), name=role)
                await nc.close()
                with pytest.raises(Exception):  # noqa: B017 - nats-py raises several kinds
                    await connect(
                        BusSettings(url=url, user=role, password=password + "x"),
                        name=role,
                    )
        finally:
            server.terminate()
            _, stderr = server.communicate(timeout=10)
        assert server.returncode == 0, stderr.decode()[-2000:]


def start_through_script(env: dict[str, str], port: int, store: Path) -> subprocess.Popen[bytes]:
    """nats-server with compose/nats.conf, started by compose/nats-start.sh as compose does."""
    return subprocess.Popen(
        ["sh", str(START_SCRIPT), "--config", str(ROOT / "compose" / "nats.conf"),
         "-a", "127.0.0.1", "-p", str(port), "--jetstream", "--store_dir", str(store)],
        env={**os.environ, **env, "NATS_SERVER": str(find_server_binary()),
             "FUSEBUS_NATS_MONITOR_PORT": str(free_port())},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _accepts(url: str) -> bool:
    host, port = url.removeprefix("nats://").split(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.2):
        return True
    return False


def test_serving_image_requirements_follow_pyproject() -> None:
    """Every serving requirement is a project dependency with the same lower bound."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    serve = [
        line
        for line in (ROOT / "compose" / "requirements-serve.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert set(serve) <= set(project), set(serve) - set(project)
    assert not any(re.match(r"tensorflow", line) for line in serve)


def services(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["services"]  # type: ignore[no-any-return]


def compose_values(
    name: str, *, path: Path = COMPOSE, values: dict[str, str] | None = None
) -> dict[str, str]:
    """A service's own environment entries as compose fills them in (from ``values``, by
    default the example passwords)."""
    given = values or example_env()
    return {
        key: re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: given[m.group(1)], str(value))
        for key, value in services(path)[name]["environment"].items()
    }


def service_env(name: str, url: str, *, path: Path = COMPOSE) -> dict[str, str]:
    """A service's environment as compose gives it, pointed at ``url``."""
    return {**os.environ, **compose_values(name, path=path), "FUSEBUS_NATS_URL": url}


@pytest.fixture(scope="module")
def compose_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """nats-server with compose/nats.conf and the example passwords."""
    with EmbeddedServer(
        config_file=ROOT / "compose" / "nats.conf",
        env=nats_conf_env(example_env()),
        store_dir=tmp_path_factory.mktemp("compose"),
    ) as server:
        yield server


async def test_services_started_as_compose_starts_them_share_the_work(
    compose_server: EmbeddedServer, spawn: Spawn
) -> None:
    """coordinator, fusion, three agent-accel replicas (as `--scale agent-accel=3`),
    agent-gyro and replay, each with its compose command and role credentials: every window
    is decided and all three accel replicas take part."""

    def start(name: str) -> subprocess.Popen[bytes]:
        command = [
            a
            for a in services()[name]["command"]
            if a not in ("--metrics-port", "9100", "--metrics-host", "0.0.0.0")
        ]
        return spawn(
            sys.executable, "-m", "fusebus", *command, env=service_env(name, compose_server.url)
        )

    reader = await connect(
        BusSettings(
            url=compose_server.url, user="reader", password=example_env()["FUSEBUS_READER_PASSWORD"]
        ),
        name="reader",
    )
    try:
        start("coordinator")
        await wait_for_role(reader, "fb", "coordinator")
        start("fusion")
        for _ in range(3):
            start("agent-accel")
        start("agent-gyro")
        await wait_for_agents(reader, "fb", {"accel": 3, "gyro": 1})
        decisions = await Collector(Decision).start_stream(reader, "fb.decision.*")
        replay = services()["replay"]["command"]
        fast = [*replay, "--limit", "5"]
        fast[fast.index("--speed") + 1] = "200"  # the demo's pace, sped up for the test
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fusebus", *fast],
            env=service_env("replay", compose_server.url),
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        # The sensor role may publish but not read streams: the replay says it could not
        # learn where the stream had reached, and goes on.
        assert b"could not read where the stream(s) had reached" in done.stdout, done.stdout
        await decisions.wait_for(20, timeout_s=60)  # 4 streams x 5 windows
        assert {d.status for d in decisions.items} == {"complete"}
        found = await discover_agents(reader, prefix="fb", timeout_s=0.3)
        per_replica = [c["processed"] for info, c in found if info.type == "accel"]
        assert len(per_replica) == 3 and sum(per_replica) == 20 and min(per_replica) > 0
    finally:
        await reader.close()


# The cluster variant (compose/docker-compose.cluster.yml) ---------------------------------
NODES = ("nats-1", "nats-2", "nats-3")
CLIENT_PORT, ROUTE_PORT = 4222, 6222
# What a route password may hold and still log the nodes in: the URL's own characters too.
ROUTE_PASSWORD = "r@u:t/e%?#q\"uo\\te it's 20k"


def fusebus_services() -> dict[str, Any]:
    """The cluster file's services that run fusebus (everything but the NATS nodes)."""
    return {n: body for n, body in services(CLUSTER).items() if n not in NODES}


def depends_on_all(name: str, on: str) -> bool:
    """Whether ``name`` is started after ``on``, directly or through what it depends on."""
    direct = set(services(CLUSTER)[name].get("depends_on") or ())
    return on in direct or any(depends_on_all(d, on) for d in direct)


def test_cluster_nodes_form_one_cluster_and_every_component_reaches_all_three() -> None:
    """Every fusebus service of the cluster file is given all three nodes' URLs, R3 and the
    same partition count (more than one), starts after every node is healthy, and every
    node runs the cluster config through the start script and stops on SIGINT."""
    urls = {f"nats://{node}:{CLIENT_PORT}" for node in NODES}
    partitions = set()
    for name, body in fusebus_services().items():
        env = body["environment"]
        assert set(env["FUSEBUS_NATS_URL"].split(",")) == urls, name
        assert env["FUSEBUS_REPLICAS"] == "3", name
        partitions.add(env["FUSEBUS_PARTITIONS"])
        assert all(depends_on_all(name, node) for node in NODES), name
    assert len(partitions) == 1 and int(partitions.pop()) > 1
    names = set()
    for node in NODES:
        body = services(CLUSTER)[node]
        assert body["entrypoint"] == ["/bin/sh", "/etc/nats/nats-start.sh"]
        assert body["command"][:2] == ["--config", "/etc/nats/nats-cluster.conf"]
        assert body["stop_signal"] == "SIGINT"
        assert "healthz" in " ".join(body["healthcheck"]["test"])
        names.add(body["environment"]["FUSEBUS_NATS_SERVER_NAME"])
    assert names == set(NODES)


def test_cluster_stopping_lets_windows_in_flight_finish() -> None:
    """compose stops the replay, then both coordinators (each drains its windows in flight),
    then the fusion agents and the agents, and only then the three nodes; the replay starts
    only once both coordinators are healthy (the streams exist)."""
    order = stop_order(CLUSTER)
    position = {name: i for i, name in enumerate(order)}
    coordinators = ("coordinator-1", "coordinator-2")
    for coordinator in coordinators:
        assert position["replay"] < position[coordinator]
        assert "--drain-s" in services(CLUSTER)[coordinator]["command"]
        assert services(CLUSTER)["replay"]["depends_on"][coordinator] == {
            "condition": "service_healthy"
        }
        for name in ("fusion-1", "fusion-2", "agent-accel", "agent-gyro"):
            for node in NODES:
                assert position[coordinator] < position[name] < position[node], order


def node_routes(node: str, env: dict[str, str]) -> list[str]:
    """The route URLs compose/nats-start.sh gives ``node``, from its compose environment."""
    given = {**compose_values(node, path=CLUSTER, values=example_env()), **env}
    routes = nats_conf_env(given)["FUSEBUS_NATS_ROUTES"]
    return re.findall(r'"([^"]+)"', routes)


@pytest.mark.parametrize("node", NODES)
def test_each_node_routes_to_the_other_two_with_the_route_password(node: str) -> None:
    """The start script gives each node one route to each of the other two nodes, logging in
    as the route user with the route password, whatever characters it holds."""
    routes = [
        urlsplit(url) for url in node_routes(node, {"FUSEBUS_ROUTE_PASSWORD": ROUTE_PASSWORD})
    ]
    assert sorted(r.hostname or "" for r in routes) == sorted(set(NODES) - {node})
    assert {r.port for r in routes} == {ROUTE_PORT}
    assert {(r.scheme, r.username) for r in routes} == {("nats-route", "route")}
    assert {unquote(r.password or "") for r in routes} == {ROUTE_PASSWORD}


def mounted(body: dict[str, Any], target: str) -> Path:
    """The file of compose/ that a service's volume mounts at ``target``."""
    volume: str
    for volume in body["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return (CLUSTER.parent / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


@dataclass
class LoopbackCluster:
    """The cluster file's three nodes running on loopback: ``addresses`` maps each compose
    ``host:port`` (``nats-2:6222``) to where that node listens here."""

    addresses: dict[str, str]
    nodes: dict[str, EmbeddedServer]
    monitor_ports: dict[str, str]

    def on_loopback(self, text: str) -> str:
        """``text`` (a URL list, a peer list) with each node's compose address replaced."""
        for compose_address, here in self.addresses.items():
            text = text.replace(compose_address, here)
        return text

    @property
    def url(self) -> str:
        return self.on_loopback(
            fusebus_services()["coordinator-1"]["environment"]["FUSEBUS_NATS_URL"]
        )

    def env(self, name: str) -> dict[str, str]:
        """A service's environment as compose gives it, its node addresses on loopback."""
        values = compose_values(name, path=CLUSTER)
        return {**os.environ, **{k: self.on_loopback(v) for k, v in values.items()}}

    def healthy(self, node: str) -> bool:
        """What the node's compose healthcheck asks (its /healthz answering 200)."""
        import urllib.request

        url = services(CLUSTER)[node]["healthcheck"]["test"][-1]
        url = url.replace("localhost:8222", f"127.0.0.1:{self.monitor_ports[node]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False


@pytest.fixture
def loopback_cluster(tmp_path: Path) -> Iterator[LoopbackCluster]:
    """nats-1, nats-2 and nats-3 started as the cluster file starts them: each with its
    compose environment (a route password with URL characters in it), compose/nats-start.sh's
    variables and the config its command names, on free loopback client and route ports."""
    addresses = {}
    for node in NODES:
        addresses[f"{node}:{CLIENT_PORT}"] = f"127.0.0.1:{free_port()}"
        addresses[f"{node}:{ROUTE_PORT}"] = f"127.0.0.1:{free_port()}"
    cluster = LoopbackCluster(addresses=addresses, nodes={}, monitor_ports={})
    values = {**example_env(), "FUSEBUS_ROUTE_PASSWORD": ROUTE_PASSWORD}
    try:
        for node in NODES:
            body = services(CLUSTER)[node]
            env = {
                k: cluster.on_loopback(v)
                for k, v in compose_values(node, path=CLUSTER, values=values).items()
            }
            route = addresses[f"{node}:{ROUTE_PORT}"]
            env |= {"FUSEBUS_NATS_CLUSTER_HOST": "127.0.0.1",
                    "FUSEBUS_NATS_CLUSTER_PORT": route.rsplit(":", 1)[1]}  # fmt: skip
            server_env = nats_conf_env(env)
            cluster.monitor_ports[node] = server_env["FUSEBUS_NATS_MONITOR_PORT"]
            server = EmbeddedServer(
                port=int(addresses[f"{node}:{CLIENT_PORT}"].rsplit(":", 1)[1]),
                config_file=mounted(body, body["command"][body["command"].index("--config") + 1]),
                env=server_env,
                store_dir=tmp_path / node,
            )
            cluster.nodes[node] = server
            server.start()
        yield cluster
    finally:
        for server in cluster.nodes.values():
            server.stop()


def served_command(name: str) -> tuple[list[str], int]:
    """A cluster service's command with its metrics on a free loopback port, and the port."""
    port = free_port()
    command = [
        {"9100": str(port), "0.0.0.0": "127.0.0.1"}.get(a, a)
        for a in services(CLUSTER)[name]["command"]
    ]
    return command, port


async def shared_by(kv: KeyValue, group: str, *, members: int, partitions: int) -> None:
    """Wait until ``members`` members of a lease group hold fair shares of every partition."""
    view = LeaseView((), {})

    async def shared() -> bool:
        nonlocal view
        view = await read_leases(kv, group)
        return len(view.members) == members and settled(
            partitions=partitions, members=view.members, owners=view.owners
        )

    await eventually(
        shared,
        what=f"{members} members sharing {group}",
        timeout_s=30,
        state=lambda: view,
        every_s=0.5,  # each look is a consumer on the bucket: a cluster removes them lazily
    )


async def test_cluster_services_started_as_compose_starts_them_decide_each_window_once(
    loopback_cluster: LoopbackCluster, spawn: Spawn
) -> None:
    """The three nodes as the cluster file starts them form one JetStream cluster; its two
    coordinators, two fusion agents, two agent-accel replicas, agent-gyro and replay, each
    with the file's command and environment, share the partitions (two each), every window
    is decided exactly once, and every stream and bucket has three current replicas."""
    cluster = loopback_cluster
    await eventually(
        lambda: all(cluster.healthy(n) for n in NODES),
        what="every node healthy by its compose healthcheck",
        timeout_s=30,
    )
    env = example_env()
    reader = await connect(
        BusSettings(url=cluster.url, user="reader", password=env["FUSEBUS_READER_PASSWORD"]),
        name="reader",
    )
    admin = await connect(
        BusSettings(
            url=cluster.url, user="coordinator", password=env["FUSEBUS_COORDINATOR_PASSWORD"]
        ),
        name="test-admin",
    )

    def start(name: str) -> int:
        command, port = served_command(name)
        spawn(sys.executable, "-m", "fusebus", *command, env=cluster.env(name))
        return port

    def coordinator_healthy(name: str, port: int) -> bool:
        _, python, flag, script = services(CLUSTER)[name]["healthcheck"]["test"]
        assert (python, flag) == ("python", "-c")
        check = [sys.executable, "-c", script.replace("9100", str(port))]
        return subprocess.run(check, capture_output=True, timeout=10).returncode == 0

    try:
        for name in ("fusion-1", "fusion-2", "agent-accel", "agent-accel", "agent-gyro"):
            start(name)
        metrics = {name: start(name) for name in ("coordinator-1", "coordinator-2")}
        for name, port in metrics.items():
            await eventually(
                functools.partial(asyncio.to_thread, coordinator_healthy, name, port),
                what=f"{name} healthy by its compose healthcheck",
                timeout_s=30,
                every_s=0.2,
            )
        await wait_for_agents(reader, "fb", {"accel": 2, "gyro": 1})
        partitions = int(fusebus_services()["replay"]["environment"]["FUSEBUS_PARTITIONS"])
        leases = await lease_bucket(admin, Subjects("fb"), ttl_s=6.0)
        for group in ("coordinator", "fusion-fusion"):
            await shared_by(leases, group, members=2, partitions=partitions)
        decisions = await Collector(Decision).start_stream(reader, "fb.decision.*")
        fast = [*services(CLUSTER)["replay"]["command"], "--limit", "3"]
        fast[fast.index("--speed") + 1] = "200"  # the demo's pace, sped up for the test
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fusebus", *fast],
            env=cluster.env("replay"),
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        await decisions.wait_for(12, timeout_s=30)  # 4 streams x 3 windows
        await decisions.settle(1.0)
        per_task = Counter(d.task_id for d in decisions.items)
        assert len(per_task) == 12 and set(per_task.values()) == {1}, per_task
        assert {d.status for d in decisions.items} == {"complete"}
        js = admin.jetstream()
        names = await stream_names(admin)
        assert {"FB_TASKS", "FB_RESULTS", "FB_DECISIONS", "FB_INTAKE", "KV_FB_LEASES"} <= names
        for name in names:
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster is not None and info.cluster.leader in NODES, name
            peers = [info.cluster.leader, *(p.name for p in info.cluster.replicas or [])]
            assert sorted(str(p) for p in peers) == list(NODES), name
            assert all(p.current for p in info.cluster.replicas or []), name
    finally:
        await reader.close()
        await admin.close()
