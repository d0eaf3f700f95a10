"""The NATS bus: connection, embedded server, subjects, JetStream topology, publish and pull,
dead letters and service discovery. The only layer that imports ``nats``."""

from bus.advisories import ExhaustedReaper, max_deliveries_subject
from bus.coalesce import Coalescer
from bus.connection import BusSettings, connect
from bus.consume import BatchPuller
from bus.discovery import (
    agent_info_from_metadata,
    agent_info_metadata,
    discover_agents,
    discover_components,
    gather,
    register_service,
)
from bus.inbound import Delivery, Inbound
from bus.keys import ticket_key
from bus.leases import LeaseKeeper, LeaseSettings, LeaseView, lease_bucket, read_leases
from bus.lifecycle import Lifecycle
from bus.loops import keep_running
from bus.pagelog import PageLog
from bus.producer import Producer
from bus.server import EmbeddedCluster, EmbeddedServer, find_server_binary, free_port
from bus.shares import Moves, fair_share, plan_moves
from bus.stats import LATENCY_BUCKETS_S, Histogram
from bus.streams import StoredMessage, follow_stored, iter_stored, last_stored, read_stored
from bus.subjects import Subjects, check_token
from bus.topology import (
    ConsumerView,
    ReplicaView,
    StreamView,
    TopologySettings,
    deployment_streams,
    ensure_reader_consumer,
    ensure_stream,
    ensure_streams,
    ensure_task_consumer,
    inspect_topology,
    intake_config,
    reconcile,
    resume_consumer,
    stream_configs,
    topology_problems,
)
from bus.types import Connection, Message, Subscription, TransportError

__all__ = [
    "LATENCY_BUCKETS_S",
    "BatchPuller",
    "BusSettings",
    "Coalescer",
    "Connection",
    "ConsumerView",
    "Delivery",
    "EmbeddedCluster",
    "EmbeddedServer",
    "ExhaustedReaper",
    "Histogram",
    "Inbound",
    "LeaseKeeper",
    "LeaseSettings",
    "LeaseView",
    "Lifecycle",
    "Message",
    "Moves",
    "PageLog",
    "Producer",
    "ReplicaView",
    "StoredMessage",
    "StreamView",
    "Subjects",
    "Subscription",
    "TopologySettings",
    "TransportError",
    "agent_info_from_metadata",
    "agent_info_metadata",
    "check_token",
    "connect",
    "deployment_streams",
    "discover_agents",
    "discover_components",
    "ensure_reader_consumer",
    "ensure_stream",
    "ensure_streams",
    "ensure_task_consumer",
    "fair_share",
    "find_server_binary",
    "follow_stored",
    "free_port",
    "gather",
    "inspect_topology",
    "intake_config",
    "iter_stored",
    "keep_running",
    "last_stored",
    "lease_bucket",
    "max_deliveries_subject",
    "plan_moves",
    "read_leases",
    "read_stored",
    "reconcile",
    "register_service",
    "resume_consumer",
    "stream_configs",
    "ticket_key",
    "topology_problems",
]
