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
from agents.serving import (
    Choice,
    Lineup,
    canary_rows,
    card_row_seconds,
    choose,
    incompatibility,
    model_label,
)
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
    ShadowBatch,
    Subtask,
    SubtaskBatch,
)

log = structlog.get_logger("fusebus.agent")

#: How many (stream, input shape) pairs an agent remembers having warned about: enough for
#: thousands of streams, bounded so that a stream of ever-new shapes cannot grow memory.
WARNED_MISMATCHES = 4096
#: The error code of a subtask whose plan pins a model this replica does not hold.
PIN_UNSERVED = "pin_unserved"


@dataclass(frozen=True)
class _Part:
    """Rows of a batch that one model version answers, and why that one."""

    batch: SubtaskBatch
    agent: Agent
    selection: str
    choice: Choice
    shadow: Agent | None = None  # runs on the same rows; its outputs are not answers


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

    ``agent`` may be a :class:`~agents.serving.Lineup`: several models for the type (the
    fastest answering when the deadline or the backlog leaves no room for the most
    accurate), each with its rollout. :meth:`switch` replaces it between two batches.
    """

    def __init__(
        self,
        agent: Agent | Lineup,
        nc: Connection,
        *,
        subjects: Subjects,
        settings: AgentSettings | None = None,
        topology: TopologySettings | None = None,
        agent_id: str | None = None,
    ) -> None:
        self.lineup = agent if isinstance(agent, Lineup) else Lineup.single(agent)
        agent = self.lineup.preferred
        # Every result carries the weight, and fusion multiplies by it: refuse a bad one here,
        # whatever kind of agent declared it.
        for each in self.lineup.agents():
            check_weight(each.weight, owner=f"agent {each.type!r}")
        self.output, self.output_shape = output_of(agent)
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
        self.answered_by: Counter[str] = Counter()  # subtasks answered, by name@version
        # Subtasks answered by a model other than the preferred one, by why.
        self.selections: Counter[str] = Counter()
        # Model versions a rollout named that this replica would not serve, with why.
        self.refused: dict[str, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{agent.type}")
        # Estimated inference time per row, by model version (see _measure).
        self._row_seconds: dict[str, float] = {}
        # Model changes waiting for the batch in hand to end, by name (see switch()).
        self._pending: dict[str, tuple[Choice, asyncio.Future[None]]] = {}
        self._busy = False  # a batch is being served
        self._rows_per_message = 1.0  # of the subtask messages pulled lately
        self._overhead_s = 0.0  # a batch's time besides inference, lately (see _serve)
        self._shadow_failures: set[str] = set()  # shadow versions whose failure was said
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
    def agent(self) -> Agent:
        """The model answering when time allows: the lineup's preferred current version."""
        return self.lineup.preferred

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
            models=tuple(
                dict.fromkeys(
                    n for c in self.lineup.choices for n in (c.name, c.current.model.name)
                )
            ),
        )

    def stats(self) -> dict[str, Any]:
        """Counters for ``$SRV.STATS`` and the status endpoint."""
        batches = self.counts["batches"]
        return {
            "processed": self.counts["processed"],
            "errors": self.counts["errors"],
            "expired": self.counts["expired"],
            "input_mismatch": self.counts[INPUT_MISMATCH],
            "pin_unserved": self.counts[PIN_UNSERVED],
            "dead_letters": self.inbound.counts["dead_letters"]
            + (self._reaper.reaped if self._reaper else 0),
            "naks": self.inbound.counts["naks"],
            "batches": batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "inference_ms_total": round(self.inference_ms, 3),
            "inference_ms_per_batch": round(self.inference_ms / batches, 4) if batches else 0.0,
            "serving": [{"name": c.name, **c.describe()} for c in self.lineup.choices],
            "answered_by": dict(self.answered_by),
            "selections": dict(self.selections),
            "shadow_rows": self.counts["shadow_rows"],
            "shadow_lost": self.counts["shadow_lost"],
            "shadow_failed": self.counts["shadow_failed"],
            "switches": self.counts["switches"],
            "refused": dict(self.refused),
        }

    def adopt(self, part: Any) -> None:
        """Stop ``part`` (anything with an async ``stop``, such as a registry follower)
        when this replica stops."""
        self._life.adopt(part)

    def switch(self, choice: Choice) -> asyncio.Future[None]:
        """Serve ``choice`` in place of the lineup's model of the same name from the next
        batch on; the future is done once it serves.

        A batch in hand is finished with the models it started with, so no subtask is
        answered by two versions or dropped between them. Changes to several models that
        wait for the same batch to end are all applied when it does.

        Raises:
            ConfigError: this replica serves no model of that name, or a version of
                ``choice`` cannot stand in for the current ones (another type, other
                inputs, labels or output).
        """
        if all(c.name != choice.name for c in self.lineup.choices):
            raise ConfigError(f"this replica serves no model named {choice.name!r}")
        for each in choice.agents:
            problem = incompatibility(self.agent, each)
            if problem:
                raise ConfigError(f"{model_label(each)} cannot serve here: {problem}")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        superseded = self._pending.pop(choice.name, None)
        if superseded is not None:  # replaced before it served: the newer one stands
            superseded[1].set_result(None)
        self._pending[choice.name] = (choice, done)
        if not self._busy:
            self._apply_switch()
        return done

    def _apply_switch(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        before = [model_label(c.current) for c in self.lineup.choices]
        lineup = self.lineup
        for choice, _ in pending.values():
            lineup = lineup.with_choice(choice)
        self.lineup = lineup
        self.counts["switches"] += len(pending)
        log.info(
            "model.switched",
            type=self.agent.type,
            before=before,
            serving=[c.describe() for c in lineup.choices],
            batches=self.counts["batches"],
        )
        for _, done in pending.values():
            if not done.done():
                done.set_result(None)

    async def start(self) -> AgentRuntime:
        """Warm the model up, join the type's consumer and start serving."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        for each in self.lineup.agents():
            await loop.run_in_executor(self._executor, each.warm_up)
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
        self._busy = True
        try:
            await self._handle_pulled(msgs)
        finally:
            self._busy = False
            self._apply_switch()  # between two batches

    async def _handle_pulled(self, msgs: list[Message]) -> None:
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
        """Run the models over the subtasks of ``work``, publish the results, then ack."""
        # Inputs of one shape are served in one go; an odd shape out gets its own model calls.
        by_shape: dict[tuple[tuple[str, tuple[int, ...]], ...], list[SubtaskBatch]] = {}
        for _, batch in work:
            shape = tuple((k, v.shape[1:]) for k, v in batch.inputs.items())
            by_shape.setdefault(shape, []).append(batch)
        served = [SubtaskBatch.concat(group) for group in by_shape.values()]
        parts: list[_Part] = []
        unserved: list[SubtaskBatch] = []
        backlog_rows = self._backlog_rows(work)
        for batch in served:
            routed, stray = self._route(batch, backlog_rows)
            parts.extend(routed)
            if stray is not None:
                unserved.append(stray)
        outputs, infer_ms = await self._predict(parts)
        latency_ms = (time.perf_counter() - pulled) * 1e3
        answers: list[ResultBatch | Result] = [
            result
            for part, output in zip(parts, outputs, strict=True)
            for result in self._results(part, output, latency_ms)
        ]
        answers.extend(r for batch in unserved for r in self._pin_errors(batch, latency_ms))
        await self.producer.results(answers)
        # What a batch costs here besides inference (decode, the hop to the inference
        # thread, publishing until stored): time a deadline must also leave room for.
        spent_s = time.perf_counter() - pulled - infer_ms / 1e3
        self._overhead_s = 0.8 * self._overhead_s + 0.2 * max(0.0, spent_s)
        for delivery, _ in work:
            await delivery.ack()
        size = sum(map(len, served))
        self.counts["processed"] += size
        if any(part.shadow is not None for part in parts):
            await self._shadow(parts, outputs)
        log.debug(
            "batch.done",
            type=self.agent.type,
            size=size,
            messages=len(work),
            infer_ms=round(infer_ms, 3),
            duration_ms=round((time.perf_counter() - pulled) * 1e3, 3),
            outcome="ok",
        )

    def _backlog_rows(self, work: list[tuple[Delivery, SubtaskBatch]]) -> int:
        """About how many subtasks wait behind this batch: the consumer's pending messages
        (as the last delivery says) times the rows a message has carried lately. Only a
        lineup with a choice to make needs it."""
        rows = sum(len(batch) for _, batch in work)
        self._rows_per_message = 0.8 * self._rows_per_message + 0.2 * (rows / len(work))
        if len(self.lineup.choices) < 2:
            return 0
        return int(work[-1][0].pending * self._rows_per_message)

    def _route(
        self, batch: SubtaskBatch, backlog_rows: int
    ) -> tuple[list[_Part], SubtaskBatch | None]:
        """Which model version answers which rows of ``batch``, and the rows pinned to a
        model this replica does not hold (answered with an error)."""
        lineup = self.lineup
        if len(lineup.choices) == 1 and not batch.pins:
            groups, stray = [(0, "", batch)], None  # the common case: nothing to choose
        else:
            picks, stray = self._pick(batch, backlog_rows)
            groups = [
                (index, why, batch if len(rows) == len(batch) else batch.select(rows))
                for (index, why), rows in picks.items()
            ]
        parts = []
        for index, selection, part in groups:
            choice = lineup.choices[index]
            if choice.canary is not None:
                trial = canary_rows(part.task_ids, choice.canary_share)
                if trial.any():
                    parts.append(_Part(part.select(trial), choice.canary, "canary", choice))
                    if trial.all():
                        continue
                    part = part.select(~trial)
            parts.append(_Part(part, choice.current, selection, choice, choice.shadow))
        return parts, stray

    def _pick(
        self, batch: SubtaskBatch, backlog_rows: int
    ) -> tuple[dict[tuple[int, str], np.ndarray], SubtaskBatch | None]:
        """Rows by (choice, why): pinned rows to their pin, the others to the most accurate
        choice that answers in time (see :func:`~agents.serving.choose`); and the rows
        pinned to a model this replica does not hold."""
        picks: dict[tuple[int, str], np.ndarray] = {}
        stray = None
        free = np.ones(len(batch), np.bool_)
        if batch.pins:
            wanted = [self.lineup.index(pin) if pin else -1 for pin in batch.pins]
            free = np.array([w == -1 for w in wanted], np.bool_)
            by_choice: dict[int, list[int]] = {}
            strays = []
            for row, index in enumerate(wanted):
                if index is None:
                    strays.append(row)
                elif index >= 0:
                    by_choice.setdefault(index, []).append(row)
            picks = {(i, "pinned"): np.array(rows, np.int64) for i, rows in by_choice.items()}
            stray = batch.select(np.array(strays, np.int64)) if strays else None
        if free.any():
            picks[self._choose(batch, free, backlog_rows)] = np.flatnonzero(free)
        return picks, stray

    def _choose(self, batch: SubtaskBatch, free: np.ndarray, backlog_rows: int) -> tuple[int, str]:
        """The choice (and why) answering the ``free`` rows of ``batch``."""
        if len(self.lineup.choices) == 1:
            return 0, ""
        deadlines = batch.deadline_ns[free]
        deadlines = deadlines[deadlines > 0]  # 0: none known, all the time there is
        time_left_s = (
            (int(deadlines.min()) - time.time_ns()) / 1e9 - self._overhead_s
            if len(deadlines)
            else float("inf")
        )
        return choose(
            [self._cost(c.current) for c in self.lineup.choices],
            rows=int(free.sum()),
            backlog_rows=backlog_rows,
            time_left_s=time_left_s,
        )

    def _cost(self, agent: Agent) -> float | None:
        """A model version's estimated time per row: measured here, else its card's."""
        return self._row_seconds.get(model_label(agent)) or card_row_seconds(agent)

    def _pin_errors(self, batch: SubtaskBatch, latency_ms: float) -> list[Result]:
        """Error answers to subtasks pinned to a model this replica does not hold."""
        held = ", ".join(c.name for c in self.lineup.choices)
        self.counts[PIN_UNSERVED] += len(batch)
        return self._errors(
            batch,
            latency_ms,
            [
                ErrorInfo(
                    PIN_UNSERVED,
                    f"the plan pins model {batch.pin(i)!r}; this replica serves {held}",
                )
                for i in range(len(batch))
            ],
        )

    def _errors(
        self, batch: SubtaskBatch, latency_ms: float, errors: list[ErrorInfo]
    ) -> list[Result]:
        """An error result for each row of ``batch`` (with ``errors[row]``), as the protocol
        says: every task field copied, no output."""
        a = self.agent
        return [
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
                error=errors[i],
            )
            for i in range(len(batch))
        ]

    async def _shadow(self, parts: list[_Part], outputs: list[np.ndarray]) -> None:
        """Run each part's shadow version on its rows and send its outputs beside the
        current version's. Done once the answers are stored and acked: a shadow never
        delays or endangers them, and one that fails is counted and said once."""
        for part, output in zip(parts, outputs, strict=True):
            shadow = part.shadow
            if shadow is None:
                continue
            batch = part.batch
            try:
                shadow_output = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._call, shadow, batch, []
                )
            except Exception as exc:  # whatever the shadow does, the answers are out
                self.counts["shadow_failed"] += len(batch)
                label = model_label(shadow)
                if label not in self._shadow_failures:
                    self._shadow_failures.add(label)
                    log.warning("shadow.failed", model=label, error=str(exc) or type(exc).__name__)
                continue
            stored = await self.producer.shadow(
                ShadowBatch(
                    name=part.choice.name,
                    type=batch.type,
                    agent_id=self.agent_id,
                    current=part.agent.model,
                    shadow=shadow.model,
                    labels=part.agent.labels,
                    task_ids=batch.task_ids,
                    streams=batch.streams,
                    windows=batch.windows,
                    current_outputs=np.asarray(output, np.float32),
                    shadow_outputs=np.asarray(shadow_output, np.float32),
                    produced_ns=time.time_ns(),
                )
            )
            self.counts["shadow_rows" if stored else "shadow_lost"] += len(batch)

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
            errors.extend(self._errors(batch, latency_ms, [error] * len(batch)))
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

    def _results(self, part: _Part, outputs: np.ndarray, latency_ms: float) -> list[ResultBatch]:
        """The answers to ``part``, one result batch per stream."""
        a, batch = part.agent, part.batch
        self.answered_by[model_label(a)] += len(batch)
        if part.selection:
            self.selections[part.selection] += len(batch)
        streams = np.array(batch.streams)
        out = []
        for stream in dict.fromkeys(batch.streams):
            rows = np.flatnonzero(streams == stream)
            rows_part = batch if len(rows) == len(batch) else batch.select(rows)
            out.append(
                ResultBatch(
                    stream=stream,
                    type=a.type,
                    agent_id=self.agent_id,
                    model=a.model,
                    labels=a.labels,
                    weight=a.weight,
                    latency_ms=latency_ms,
                    task_ids=rows_part.task_ids,
                    outputs=np.asarray(outputs[rows], np.float32),
                    windows=rows_part.windows,
                    expected=rows_part.expected,
                    ingest_ns=rows_part.ingest_ns,
                    deadline_ns=rows_part.deadline_ns,
                    tickets=rows_part.tickets,
                    selection=part.selection,
                )
            )
        return out

    def _call(
        self, agent: Agent, batch: SubtaskBatch, calls: list[tuple[str, int, float]]
    ) -> np.ndarray:
        """``agent``'s outputs for ``batch``, in model calls of at most ``max_batch`` rows,
        each timed into ``calls``; raises :class:`ModelError` for outputs of the wrong shape."""
        size, shape = self.settings.max_batch, self.output_shape
        names = [spec.sensor for spec in agent.inputs]
        pieces = []
        for start in range(0, len(batch), size):
            inputs = {
                k: batch.inputs[k][start : start + size]
                for k in names
                if k in batch.inputs  # an optional stage input may be absent
            }
            began = time.perf_counter()
            pieces.append(agent.predict(inputs))
            calls.append((model_label(agent), len(pieces[-1]), time.perf_counter() - began))
        output = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if output.shape != (len(batch), *shape):
            raise ModelError(
                f"agent {agent.type!r} ({model_label(agent)}) answered {len(batch)} rows "
                f"with shape {output.shape}, expected {(len(batch), *shape)}"
            )
        return output

    async def _predict(self, parts: list[_Part]) -> tuple[list[np.ndarray], float]:
        """Run each part's model over its rows, in the inference thread; returns each
        part's outputs and the inference time in ms."""

        def run() -> tuple[list[np.ndarray], list[tuple[str, int, float]]]:
            calls: list[tuple[str, int, float]] = []
            return [self._call(part.agent, part.batch, calls) for part in parts], calls

        estimate = 0.0
        for part in parts:
            per_row = self._row_seconds.get(model_label(part.agent))
            estimate += len(part.batch) * per_row if per_row is not None else float("inf")
        if estimate <= self.settings.inline_s:
            outputs, calls = run()  # shorter than a hop to the inference thread and back
        else:
            outputs, calls = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        self._measure(calls)
        infer_ms = sum(s for _, _, s in calls) * 1e3
        self.inference_ms += infer_ms
        return outputs, infer_ms

    def _measure(self, calls: list[tuple[str, int, float]]) -> None:
        """Count the model calls and update each version's estimated cost per row.

        Waiting for the CPU or the GIL only ever adds to a measurement, so the estimate
        follows the fastest calls, drifting up by at most 10% a batch when the model
        really does get slower.
        """
        rows_by: Counter[str] = Counter()
        seconds_by: dict[str, float] = {}
        for label, rows, seconds in calls:
            self.inference_seconds.observe(seconds)
            self.batch_sizes[rows] += 1
            rows_by[label] += rows
            seconds_by[label] = seconds_by.get(label, 0.0) + seconds
        for label, rows in rows_by.items():
            per_row = seconds_by[label] / rows
            known = self._row_seconds.get(label)
            self._row_seconds[label] = per_row if known is None else min(per_row, 1.1 * known)
        self.counts["batches"] += len(calls)

    def _check(self, batch: SubtaskBatch) -> None:
        if batch.type != self.agent.type:
            raise SchemaError(
                "wrong_type", f"subtask of type {batch.type!r} sent to {self.agent.type!r}"
            )
