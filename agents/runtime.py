"""The agent runtime: pulls subtasks of one type, batches them, runs the agent, publishes results.

It owns the consumer, micro-batching, decoding, deadlines, acks, results, errors, logs and
counters, so that an agent is only a type and a batch function. Inference runs in a
dedicated thread, so the event loop keeps acking and answering discovery while a batch
runs; a call expected to be shorter than the hop to that thread runs on the loop.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from agents.base import Agent, check_weight, output_of
from agents.inputs import INPUT_MISMATCH, InputMismatch, InputShape, input_mismatch, input_shape
from bus import (
    BatchPuller,
    Delivery,
    ExhaustedReaper,
    Histogram,
    Inbound,
    Lifecycle,
    Producer,
    Subjects,
    TopologySettings,
    agent_info_metadata,
    ensure_streams,
    ensure_task_consumer,
)
from bus.types import Connection, Message
from schemas import (
    CODEC,
    AgentInfo,
    ConfigError,
    ErrorInfo,
    ModelError,
    Result,
    ResultBatch,
    SchemaError,
    Subtask,
    SubtaskBatch,
)

log = structlog.get_logger("fusebus.agent")

#: How many (stream, input shape) pairs an agent remembers having warned about: enough for
#: thousands of streams, bounded so that a stream of ever-new shapes cannot grow memory.
WARNED_MISMATCHES = 4096


@dataclass(frozen=True)
class AgentSettings:
    """How an agent replica pulls and batches."""

    max_batch: int = 64  # most subtasks in one model call
    max_wait_ms: float = 0.0  # longest wait for a batch to fill once one subtask is in
    idle_timeout_s: float = 1.0  # one pull request's life when nothing is waiting
    # A model call expected to take less than this runs on the event loop: a hop to the
    # inference thread and back costs more. Longer ones run in the thread, so that acks
    # and discovery replies keep flowing meanwhile.
    inline_s: float = 0.0005
    nak_delays_s: tuple[float, ...] = (
        0.2,
        1.0,
        3.0,
    )  # redelivery delay after a model error, by attempt

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.idle_timeout_s <= 0:
            raise ConfigError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")


def decode_subtasks(data: bytes) -> SubtaskBatch:
    """A ``subtask`` (as a batch of one) or a ``subtask_batch``; raises :class:`SchemaError`."""
    message = CODEC.decode_one_of(data, (Subtask, SubtaskBatch))
    return SubtaskBatch.of([message]) if isinstance(message, Subtask) else message


def new_agent_id(type_name: str) -> str:
    """A replica id that says where it runs: ``<type>-<host>-<pid>-<random>``."""
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:24]
    return f"{type_name}-{host}-{os.getpid()}-{secrets.token_hex(2)}"


class AgentRuntime:
    """Serves one :class:`~agents.base.Agent` on the bus as one replica of its type.

    Every replica of a type pulls from the same durable consumer, so replicas share the
    work and an idle one takes the next subtask.
    """

    def __init__(
        self,
        agent: Agent,
        nc: Connection,
        *,
        subjects: Subjects,
        settings: AgentSettings | None = None,
        topology: TopologySettings | None = None,
        agent_id: str | None = None,
    ) -> None:
        # Every result carries the weight, and fusion multiplies by it: refuse a bad one here,
        # whatever kind of agent declared it.
        check_weight(agent.weight, owner=f"agent {agent.type!r}")
        self.output, self.output_shape = output_of(agent)
        self.agent = agent
        self.nc = nc
        self.subjects = subjects
        self.settings = settings or AgentSettings()
        self.topology = topology or TopologySettings()
        self.agent_id = agent_id or new_agent_id(agent.type)
        self.component = f"agent-{agent.type}"
        self.producer = Producer(nc, subjects)
        self.inbound = Inbound(
            component=self.component,
            producer=self.producer,
            decode=decode_subtasks,
            max_deliver=self.topology.task_max_deliver,
            nak_delays_s=self.settings.nak_delays_s,
        )
        self.counts: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.inference_ms = 0.0
        self.inference_seconds = Histogram()  # one observation per model call
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{agent.type}")
        self._row_seconds: float | None = None  # estimated inference time per row
        self._puller: BatchPuller | None = None
        self._life = Lifecycle()
        self._reaper: ExhaustedReaper | None = None
        # Each agent input's dtype, when the agent says (a model's); else any numeric fits.
        self._input_dtypes: tuple[np.dtype, ...] | None = getattr(agent, "input_dtypes", None)
        self._warned: OrderedDict[tuple[str, InputShape], None] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"AgentRuntime({self.agent_id}, processed={self.counts['processed']} "
            f"errors={self.counts['errors']} expired={self.counts['expired']} "
            f"input_mismatch={self.counts[INPUT_MISMATCH]} "
            f"dead_letters={self.inbound.counts['dead_letters']} "
            f"batches={self.counts['batches']})"
        )

    @property
    def info(self) -> AgentInfo:
        """What this replica serves, as published in its service metadata."""
        a = self.agent
        return AgentInfo(
            agent_id=self.agent_id,
            type=a.type,
            model=a.model,
            runtime=a.runtime,
            inputs=a.inputs,
            labels=a.labels,
            weight=a.weight,
            output=self.output,
            output_shape=self.output_shape if self.output == "features" else (),
        )

    def stats(self) -> dict[str, Any]:
        """Counters for ``$SRV.STATS`` and the status endpoint."""
        batches = self.counts["batches"]
        return {
            "processed": self.counts["processed"],
            "errors": self.counts["errors"],
            "expired": self.counts["expired"],
            "input_mismatch": self.counts[INPUT_MISMATCH],
            "dead_letters": self.inbound.counts["dead_letters"]
            + (self._reaper.reaped if self._reaper else 0),
            "naks": self.inbound.counts["naks"],
            "batches": batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "inference_ms_total": round(self.inference_ms, 3),
            "inference_ms_per_batch": round(self.inference_ms / batches, 4) if batches else 0.0,
        }

    async def start(self) -> AgentRuntime:
        """Warm the model up, join the type's consumer and start serving."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self._executor, self.agent.warm_up)
        js = self.nc.jetstream()
        await ensure_streams(js, self.subjects, self.topology)
        consumer = await ensure_task_consumer(js, self.subjects, self.agent.type, self.topology)
        self._puller = await self._life.pull(
            self.nc,
            stream=self.subjects.tasks_stream,
            consumer=consumer,
            prefetch=self.settings.max_batch,
        )
        # Tasks copy the context they are created in: every line they log names this replica.
        with structlog.contextvars.bound_contextvars(agent=self.agent_id, type=self.agent.type):
            self._life.run(self._step, name=self.component)
        reaper = ExhaustedReaper(
            self.producer,
            stream=self.subjects.tasks_stream,
            consumer=consumer,
            component=self.component,
        )
        self._reaper = self._life.adopt(await reaper.start(self.nc))
        await self._life.register(
            self.nc,
            name=self.agent.type,
            description=f"fusebus agent for {self.agent.type} subtasks ({self.agent.model.name})",
            metadata=agent_info_metadata(self.info, prefix=self.subjects.prefix),
            status_subject=self.subjects.control(self.component, self.agent_id),
            stats=self.stats,
        )
        log.info(
            "agent.started",
            agent_id=self.agent_id,
            type=self.agent.type,
            runtime=self.agent.runtime,
            model=self.agent.model.name,
            warm_up_ms=round((time.perf_counter() - started) * 1e3, 1),
        )
        return self

    async def stop(self) -> None:
        """Stop pulling; a batch in hand is finished and acked first."""
        await self._life.close()
        await self.producer.close()
        self._executor.shutdown(wait=True)
        log.info("agent.stopped", agent_id=self.agent_id, **self.stats())

    async def __aenter__(self) -> AgentRuntime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # The batching loop -----------------------------------------------------------------------
    async def _step(self) -> None:
        assert self._puller is not None
        msgs = await self._puller.next_batch(
            self.settings.max_batch,
            idle_timeout_s=self.settings.idle_timeout_s,
            fill_wait_s=self.settings.max_wait_ms / 1e3,
        )
        if msgs:
            # Shielded so that a stop request lets the batch in hand finish and be acked.
            await asyncio.shield(self._handle_batch(msgs))

    async def _handle_batch(self, msgs: list[Message]) -> None:
        pulled = time.perf_counter()
        now_ns = time.time_ns()
        work: list[tuple[Delivery, SubtaskBatch]] = []
        misfits: list[tuple[Delivery, SubtaskBatch, InputMismatch]] = []
        for delivery, batch in await self.inbound.take(msgs):
            readable = await self._readable(delivery, batch, now_ns)
            if readable is None:
                continue
            # Every row of a message has the same input shapes, so one check covers it.
            mismatch = input_mismatch(self.agent.inputs, readable.inputs, dtypes=self._input_dtypes)
            if mismatch is None:
                work.append((delivery, readable))
            else:
                misfits.append((delivery, readable, mismatch))
        if misfits:
            deliveries = [delivery for delivery, _, _ in misfits]
            if not await self.inbound.run(deliveries, self._refuse(misfits, pulled)):
                self.counts["errors"] += 1
        if work:
            deliveries = [delivery for delivery, _ in work]
            if not await self.inbound.run(deliveries, self._serve(work, pulled)):
                self.counts["errors"] += 1

    async def _serve(self, work: list[tuple[Delivery, SubtaskBatch]], pulled: float) -> None:
        """Run the model over the subtasks of ``work``, publish the results, then ack."""
        # Inputs of one shape are served in one go; an odd shape out gets its own model calls.
        by_shape: dict[tuple[tuple[str, tuple[int, ...]], ...], list[SubtaskBatch]] = {}
        for _, batch in work:
            shape = tuple((k, v.shape[1:]) for k, v in batch.inputs.items())
            by_shape.setdefault(shape, []).append(batch)
        served = [SubtaskBatch.concat(group) for group in by_shape.values()]
        outputs, infer_ms = await self._predict(served)
        latency_ms = (time.perf_counter() - pulled) * 1e3
        await self.producer.results(
            [
                result
                for batch, output in zip(served, outputs, strict=True)
                for result in self._results(batch, output, latency_ms)
            ]
        )
        for delivery, _ in work:
            await delivery.ack()
        size = sum(map(len, served))
        self.counts["processed"] += size
        log.debug(
            "batch.done",
            type=self.agent.type,
            size=size,
            messages=len(work),
            infer_ms=round(infer_ms, 3),
            duration_ms=round((time.perf_counter() - pulled) * 1e3, 3),
            outcome="ok",
        )

    async def _refuse(
        self, misfits: list[tuple[Delivery, SubtaskBatch, InputMismatch]], pulled: float
    ) -> None:
        """Answer each subtask whose inputs do not fit the agent with an ``input_mismatch``
        error result, so its task ends now rather than at its deadline, then ack.

        The same misfit comes with every window of a stream, so it is logged once per
        stream and input shape, not once per subtask.
        """
        a = self.agent
        latency_ms = (time.perf_counter() - pulled) * 1e3
        errors: list[Result] = []
        for _, batch, mismatch in misfits:
            shape = input_shape(batch.inputs)
            for stream in dict.fromkeys(batch.streams):
                self._warn_once(stream, shape, mismatch)
            error = ErrorInfo(INPUT_MISMATCH, mismatch.text)
            errors.extend(
                Result.of(
                    batch.task(i),
                    type=a.type,
                    agent_id=self.agent_id,
                    model=a.model,
                    output=None,
                    labels=a.labels,
                    latency_ms=latency_ms,
                    weight=a.weight,
                    ticket=batch.ticket(i),
                    error=error,
                )
                for i in range(len(batch))
            )
        # Results are stored before the subtasks are acked, as for answers (see _serve);
        # errors go out one by one, as the protocol says.
        await self.producer.results(errors)
        for delivery, _, _ in misfits:
            await delivery.ack()
        self.counts[INPUT_MISMATCH] += len(errors)
        log.debug(
            "batch.done",
            type=a.type,
            size=len(errors),
            messages=len(misfits),
            duration_ms=round((time.perf_counter() - pulled) * 1e3, 3),
            outcome=INPUT_MISMATCH,
        )

    def _warn_once(self, stream: str, shape: InputShape, mismatch: InputMismatch) -> None:
        """Log ``mismatch`` unless it was already logged for this stream and input shape."""
        key = (stream, shape)
        if key in self._warned:
            self._warned.move_to_end(key)
            return
        self._warned[key] = None
        if len(self._warned) > WARNED_MISMATCHES:
            self._warned.popitem(last=False)
        log.warning(
            "subtask.input_mismatch",
            stream=stream,
            sensor=mismatch.sensor,
            expected=mismatch.expected,
            got=mismatch.got,
            error=mismatch.text,
            outcome="error_results",
        )

    async def _readable(
        self, delivery: Delivery, batch: SubtaskBatch, now_ns: int
    ) -> SubtaskBatch | None:
        """The subtasks of ``batch`` worth answering.

        A batch of another type is dead-lettered (``None``): it was sent to the wrong
        subject. Subtasks past their deadline are counted and dropped; a message with
        nothing else is acked (``None``). Inputs that do not fit the agent are the caller's
        to answer (see :meth:`_refuse`).
        """
        try:
            self._check(batch)
        except SchemaError as exc:
            await self.inbound.dead_letter(delivery, exc.reason, str(exc))
            return None
        live = batch.deadline_ns >= now_ns
        if live.all():
            return batch
        expired = len(batch) - int(live.sum())
        self.counts["expired"] += expired
        log.debug("subtask.expired", type=batch.type, count=expired)
        if expired == len(batch):
            await delivery.ack()
            return None
        return batch.select(live)

    def _results(
        self, batch: SubtaskBatch, outputs: np.ndarray, latency_ms: float
    ) -> list[ResultBatch]:
        """The answers to ``batch``, one result batch per stream."""
        a = self.agent
        streams = np.array(batch.streams)
        out = []
        for stream in dict.fromkeys(batch.streams):
            rows = np.flatnonzero(streams == stream)
            part = batch if len(rows) == len(batch) else batch.select(rows)
            out.append(
                ResultBatch(
                    stream=stream,
                    type=a.type,
                    agent_id=self.agent_id,
                    model=a.model,
                    labels=a.labels,
                    weight=a.weight,
                    latency_ms=latency_ms,
                    task_ids=part.task_ids,
                    outputs=np.asarray(outputs[rows], np.float32),
                    windows=part.windows,
                    expected=part.expected,
                    ingest_ns=part.ingest_ns,
                    deadline_ns=part.deadline_ns,
                    tickets=part.tickets,
                )
            )
        return out

    async def _predict(self, served: list[SubtaskBatch]) -> tuple[list[np.ndarray], float]:
        """Run the agent over each batch in model calls of at most ``max_batch`` rows, in the
        inference thread; returns each batch's outputs and the inference time in ms."""
        size = self.settings.max_batch
        sensors = [spec.sensor for spec in self.agent.inputs]

        def run() -> tuple[list[np.ndarray], list[tuple[int, float]]]:
            outputs: list[np.ndarray] = []
            calls = []
            for batch in served:
                parts = []
                for start in range(0, len(batch), size):
                    inputs = {
                        k: batch.inputs[k][start : start + size]
                        for k in sensors
                        if k in batch.inputs  # an optional stage input may be absent
                    }
                    began = time.perf_counter()
                    parts.append(self.agent.predict(inputs))
                    calls.append((len(parts[-1]), time.perf_counter() - began))
                output = parts[0] if len(parts) == 1 else np.concatenate(parts)
                if output.shape != (len(batch), *self.output_shape):
                    raise ModelError(
                        f"agent {self.agent.type!r} answered {len(batch)} rows with shape "
                        f"{output.shape}, expected {(len(batch), *self.output_shape)}"
                    )
                outputs.append(output)
            return outputs, calls

        rows = sum(map(len, served))
        if self._row_seconds is not None and rows * self._row_seconds <= self.settings.inline_s:
            outputs, calls = run()  # shorter than a hop to the inference thread and back
        else:
            outputs, calls = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        seconds = sum(s for _, s in calls)
        # The model's own cost per row: waiting for the CPU or the GIL only ever adds to a
        # measurement, so the estimate follows the fastest calls, drifting up by at most 10%
        # a call when the model really does get slower.
        per_row = seconds / rows
        self._row_seconds = (
            per_row if self._row_seconds is None else min(per_row, 1.1 * self._row_seconds)
        )
        for rows, seconds in calls:
            self.inference_seconds.observe(seconds)
            self.batch_sizes[rows] += 1
        self.counts["batches"] += len(calls)
        infer_ms = seconds * 1e3
        self.inference_ms += infer_ms
        return outputs, infer_ms

    def _check(self, batch: SubtaskBatch) -> None:
        if batch.type != self.agent.type:
            raise SchemaError(
                "wrong_type", f"subtask of type {batch.type!r} sent to {self.agent.type!r}"
            )
