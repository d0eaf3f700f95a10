"""Who should own which partitions: the pure rule behind the leases of :mod:`bus.leases`.

Members of one group (the coordinators of a deployment, or the fusion agents of one fusion
name) split ``partitions`` partitions between them. Each member computes its *fair share*
from the live members alone, so every member reaches the same answer without talking to the
others: ``partitions // members`` each, and one more for the first ``partitions % members``
members in id order. A member holding more than its share gives back its highest-numbered
partitions; one holding fewer takes the lowest free ones. A partition still leased to a
member that died is not free: it becomes free when that lease runs out.

No asyncio and no NATS here; the lease keeper calls :func:`plan_moves` once per round.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Moves:
    """What one member should do this round: partitions to give back, then ones to take."""

    release: tuple[int, ...] = ()
    acquire: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.release or self.acquire)


def fair_share(partitions: int, members: Collection[str], me: str) -> int:
    """How many of ``partitions`` ``me`` should hold among ``members`` (``me`` counts as a
    member even when the registry does not show it yet)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    everyone = sorted({*members, me})
    base, extra = divmod(partitions, len(everyone))
    return base + (1 if everyone.index(me) < extra else 0)


def plan_moves(
    *, partitions: int, members: Collection[str], owners: Mapping[int, str], me: str
) -> Moves:
    """The partitions ``me`` should release and acquire, given the live ``members`` and the
    current ``owners`` (partition -> owner id, for leased partitions only).

    Releases come before acquisitions in the same round only when ``me`` holds too many;
    a member never takes a partition another member still holds.
    """
    share = fair_share(partitions, members, me)
    mine = sorted(p for p, owner in owners.items() if owner == me and 0 <= p < partitions)
    if len(mine) > share:
        return Moves(release=tuple(mine[share:]))
    free = [p for p in range(partitions) if p not in owners]
    return Moves(acquire=tuple(free[: share - len(mine)]))


def settled(*, partitions: int, members: Collection[str], owners: Mapping[int, str]) -> bool:
    """Whether every partition is leased and every member holds exactly its fair share."""
    if len(owners) != partitions:
        return False
    held = {m: sum(1 for o in owners.values() if o == m) for m in members}
    return all(held[m] == fair_share(partitions, members, m) for m in members)
