"""Prometheus metrics for a running component (``--metrics-port``).

Counters and histograms are read from the component at scrape time (its own counters are
the source of truth), named by Prometheus conventions: ``fusebus_`` prefix, ``_total`` for
counters, base units (seconds).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from agents import AgentRuntime
from agents.fusion import FusionAgent
from bus import Histogram
from coordinator import Coordinator


def _histogram(
    name: str, documentation: str, histogram: Histogram, labels: dict[str, str]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(
        list(labels.values()), [(b, float(c)) for b, c in histogram.cumulative()], histogram.sum
    )
    return family


def _counter(
    name: str, documentation: str, value: float, labels: dict[str, str] | None = None
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


class ComponentCollector(Collector):
    """Exports one coordinator, agent runtime or fusion agent."""

    def __init__(self, component: Any) -> None:
        self.component = component

    def collect(self) -> Iterator[Any]:
        c = self.component
        if isinstance(c, Coordinator):
            yield from self._coordinator(c)
        elif isinstance(c, AgentRuntime):
            yield from self._agent(c)
        elif isinstance(c, FusionAgent):
            yield from self._fusion(c)

    def _coordinator(self, c: Coordinator) -> Iterator[Any]:
        stats = c.stats()
        yield _counter("fusebus_frames", "Frames received.", stats["frames"])
        yield _counter("fusebus_chunks", "Sensor chunks received.", stats["chunks"])
        yield _counter(
            "fusebus_late_chunks",
            "Chunks dropped for arriving after the lateness.",
            stats["late_chunks"],
        )
        yield _counter("fusebus_tasks_opened", "Tasks opened.", stats["opened"])
        ended = CounterMetricFamily(
            "fusebus_tasks_ended", "Tasks ended, by final state.", labels=["state"]
        )
        for state in ("complete", "partial", "failed"):
            ended.add_metric([state], stats[state])
        yield ended
        yield _counter(
            "fusebus_tasks_shed", "Open tasks ended early over max_inflight.", stats["shed"]
        )
        yield _counter(
            "fusebus_dead_letters",
            "Messages dead-lettered.",
            stats["dead_letters"],
            {"component": "coordinator"},
        )
        yield _counter(
            "fusebus_sensors_down",
            "Times a sensor went silent past its allowance.",
            stats["sensors_down"],
        )
        yield GaugeMetricFamily("fusebus_open_tasks", "Tasks open now.", value=stats["open_tasks"])
        yield GaugeMetricFamily(
            "fusebus_streams", "Streams with live windowing state.", value=stats["streams"]
        )

    def _agent(self, a: AgentRuntime) -> Iterator[Any]:
        labels = {"type": a.agent.type}
        stats = a.stats()
        yield _counter(
            "fusebus_agent_subtasks_processed", "Subtasks answered.", stats["processed"], labels
        )
        yield _counter("fusebus_agent_errors", "Model calls that failed.", stats["errors"], labels)
        yield _counter(
            "fusebus_agent_subtasks_expired",
            "Subtasks dropped past their deadline.",
            stats["expired"],
            labels,
        )
        yield _counter(
            "fusebus_dead_letters",
            "Messages dead-lettered.",
            stats["dead_letters"],
            {"component": a.component},
        )
        yield _counter("fusebus_agent_batches", "Model calls.", stats["batches"], labels)
        yield _histogram(
            "fusebus_agent_inference_seconds",
            "Time of one model call.",
            a.inference_seconds,
            labels,
        )
        answers = CounterMetricFamily(
            "fusebus_agent_answers",
            "Subtasks answered, by the model version that answered (name@version).",
            labels=["type", "model"],
        )
        for model, count in a.answered_by.items():
            answers.add_metric([a.agent.type, model], count)
        yield answers
        chosen = CounterMetricFamily(
            "fusebus_agent_selections",
            "Subtasks answered by another than the preferred model, by why (deadline, "
            "backlog, pinned, canary).",
            labels=["type", "selection"],
        )
        for why, count in a.selections.items():
            chosen.add_metric([a.agent.type, why], count)
        yield chosen
        yield _counter(
            "fusebus_agent_model_switches",
            "Times the replica switched the models it serves (a rollout).",
            stats["switches"],
            labels,
        )

    def _fusion(self, f: FusionAgent) -> Iterator[Any]:
        decisions = CounterMetricFamily(
            "fusebus_decisions", "Decisions emitted, by status.", labels=["status"]
        )
        for status in ("complete", "partial", "failed"):
            decisions.add_metric([status], f.counts[f"decisions_{status}"])
        yield decisions
        yield _counter(
            "fusebus_dead_letters",
            "Messages dead-lettered.",
            f.counts["dead_letters"],
            {"component": "fusion"},
        )
        yield GaugeMetricFamily(
            "fusebus_fusion_pending_tasks",
            "Tasks heard of and not yet decided.",
            value=len(f.pending),
        )
        yield _histogram("fusebus_decision_latency_seconds", "Ingest to decision.", f.latency, {})


def serve_metrics(component: Any, port: int, *, host: str = "127.0.0.1") -> CollectorRegistry:
    """Expose ``component`` on ``http://host:port/metrics``; returns the registry."""
    registry = CollectorRegistry()
    registry.register(ComponentCollector(component))
    start_http_server(port, addr=host, registry=registry)
    return registry
