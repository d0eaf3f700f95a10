"""The model-chains benchmark's figures: every repeat on a line, and the section of
``docs/benchmarks.md`` (see :mod:`bench.chain`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.chain import COMPONENTS, KINDS, LEGS, RATES, TRACE_RATE, ChainRun

FIGURES = (
    "frames_per_s",
    *(f"{q}@{r}" for r in RATES for q in ("p50", "p99")),
    "cpu",
    *(f"cpu@{r}" for r in RATES),
    "msgs",
)
HEADINGS = {
    "frames_per_s": "frames/s (max)",
    "cpu": "CPU-ms/frame (max)",
    "msgs": "server msgs/frame (max)",
    **{f"{q}@{r}": f"{q} ms @{r}" for r in RATES for q in ("p50", "p99")},
    **{f"cpu@{r}": f"CPU-ms/frame @{r}" for r in RATES},
}
#: The CPU figures counted in hops: at maximum rate, and at the lowest offered rate (at a
#: rate that makes a deployment CPU-bound, its CPU-ms per frame is only what there is).
HOP_FIGURES = ("cpu", f"cpu@{RATES[0]}")
#: The ratios shown: (kind, over kind).
PAIRS = (("chain", "one"), ("beside", "one"), ("chain", "beside"))


def _digits(figure: str) -> int:
    return 0 if figure == "frames_per_s" else 1 if figure[0] in "pm" else 3


def describe(run: ChainRun) -> str:
    """Every repeat's figures and ratios, a line each (for the terminal and for
    aggregating runs)."""

    def each(values: Sequence[float], digits: int = 3) -> str:
        return ", ".join(f"{v:.{digits}f}" for v in values)

    lines = []
    for m in run.measured.values():
        parts = [f"{f} {each(m.values(f))}" for f in FIGURES]
        for at in ("", *(f"@{r}" for r in RATES)):
            by_component = (f"{c} {each(m.values(f'cpu:{c}{at}'))}" for c in COMPONENTS)
            parts.append(f"CPU-ms/frame{at} " + "; ".join(by_component))
        if m.trace is not None:
            parts.append(
                f"traced @{TRACE_RATE} p50 ms "
                + "; ".join(f"{leg} {m.trace.p50(leg):.2f}" for leg in m.trace.legs)
            )
        lines.append(f"{m.name}: " + " | ".join(parts))
    for kind, base in PAIRS:
        ratios = " | ".join(f"{f} {each(run.ratios(kind, base, f))}" for f in FIGURES)
        lines.append(f"{kind} / {base}: {ratios}")
    lines.append(
        "second stage in hops: "
        + " | ".join(f"{f} {each(run.in_hops(f), 2)}" for f in HOP_FIGURES)
        + f" | latency traced @{TRACE_RATE} {run.latency_in_hops():.2f}"
    )
    lines.append(_compute(run))
    return "\n".join(lines)


def _compute(run: ChainRun) -> str:
    return (
        "Model compute in one process without the bus, µs per frame for the three models "
        "whole / cut in two: "
        + "; ".join(f"batch {b}: {w:.0f} / {c:.0f}" for b, (w, c) in sorted(run.model_us.items()))
    )


def _range(values: Sequence[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{statistics.median(values):,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def render_chain(run: ChainRun) -> str:
    """The model-chains section of ``docs/benchmarks.md``, from one run."""
    lines = [
        "## Model chains",
        "",
        "The benchmark models as one stage; each cut after its pooling into a two-stage chain "
        "(`<type>_enc`: the convolutions, answering 32 features; `<type>`: the Dense head "
        "reading them) with the same weights and the same fused types; and, as the yardstick "
        "for three more subtasks and results per frame without a chain, one stage with the "
        "three heads beside it, fed their features in the frame (six types, all fused; "
        "`--only chain`). The deployments run side by side on their own servers and are "
        f"measured in turns; median of {run.repeats} repeats (min-max in brackets), ratios "
        "taken repeat by repeat. CPU-ms per frame sums every fusebus process and nats-server; "
        "server messages are `/varz` in + out per frame.",
        "",
        _compute(run) + ".",
        "",
        "| deployment | " + " | ".join(HEADINGS[f] for f in FIGURES) + " |",
        "|---|" + "---:|" * len(FIGURES),
    ]
    for m in run.measured.values():
        cells = " | ".join(_range(m.values(f), _digits(f)) for f in FIGURES)
        lines.append(f"| {m.name} | {cells} |")
    for kind, base in PAIRS:
        cells = " | ".join(_range(run.ratios(kind, base, f), 2) for f in FIGURES)
        lines.append(f"| {KINDS[kind]} / {KINDS[base]} | {cells} |")
    lines += [
        "",
        "| deployment | offered | " + " | ".join(f"CPU-ms/frame {c}" for c in COMPONENTS) + " |",
        "|---|---|" + "---:|" * len(COMPONENTS),
    ]
    for m in run.measured.values():
        for at in ("", *(f"@{r}" for r in RATES)):
            cells = " | ".join(_range(m.values(f"cpu:{c}{at}"), 3) for c in COMPONENTS)
            lines.append(f"| {m.name} | {f'{at[1:]} frames/s' if at else 'max'} | {cells} |")
    lines += [
        "",
        f"Traced at {TRACE_RATE} frames/s, p50 ms of each leg of a frame's path as the driver "
        "sees the messages (a stage trip: from a subtask published to its result; the "
        "coordinator turn: from an encoder's result to its head's subtask):",
        "",
        "| deployment | " + " | ".join(LEGS) + " |",
        "|---|" + "---:|" * len(LEGS),
    ]
    for m in run.measured.values():
        if m.trace is not None:
            legs = (f"{m.trace.p50(leg):.2f}" if leg in m.trace.legs else "-" for leg in LEGS)
            lines.append(f"| {m.name} | " + " | ".join(legs) + " |")
    hops = ", ".join(
        f"{'at maximum rate' if f == 'cpu' else f'at {f[4:]} frames/s'} {_range(run.in_hops(f), 2)}"
        for f in HOP_FIGURES
    )
    lines += [
        "",
        "The second stage in hops, CPU (what the chain adds to one stage over what the heads "
        f"beside it add; 1.0 is one more hop coordinator -> agent -> coordinator per model): "
        f"{hops}. Latency (traced at {TRACE_RATE} frames/s: the chain's coordinator turn + "
        f"stage 2 trip over its to subtasks + stage 1 trip): {run.latency_in_hops():.2f}.",
    ]
    return "\n".join(lines) + "\n"
