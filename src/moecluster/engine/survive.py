"""Keep serving on the surviving ranks (issue 15, `moecluster serve --backend torch`).

A CommError during serving (a rank died or stalled) reaches `Survival.recover` on every live rank: the
job re-forms without the lost ranks (distributed/reform.py), the placement is restricted to the
survivors (parallel/survivors.py) and the engine's expert-parallel layers are rebound to the new comm
and placement. Each survivor keeps exactly the experts it loaded, so nothing is reloaded. Rank 0's
scheduler then re-prefills every in-flight sequence from the tokens it already has (Scheduler._resume)
and decodes on. If the lost ranks held the only copy of some experts, recover raises ReformError naming
them, and the job fails as it did before (rank 0 answers 503, then exits for a supervisor).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from moecluster.distributed import reform
from moecluster.distributed.comm import CommError
from moecluster.engine.generate import Engine
from moecluster.parallel.placement import Placement
from moecluster.parallel.survivors import describe_lost, lost_experts, restrict
from moecluster.tracing import now


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


class Survival:
    """One rank's part in re-forming the cluster; `members[r]`: the launch rank of current rank r."""

    def __init__(self, engine: Engine, placement: Placement) -> None:
        self.engine, self.placement = engine, placement
        self.members = list(range(engine.world_size))
        self.lost: list[int] = []  # launch ranks lost so far
        self.recoveries: list[float] = []  # seconds each re-forming took
        engine.comm.watch_reform = True  # waiting workers hear rank 0 start re-forming
        # rank 0: called with (placement, members) after each re-forming (serve: Metrics.set_placement)
        self.on_reform: Callable[[Placement, list[int]], None] | None = None

    def degraded(self) -> str | None:
        """None while every rank serves; else which were lost and what serves on."""
        if not self.lost:
            return None
        return (
            f"degraded: {_ranks(self.lost)} lost; serving on {_ranks(self.members)} "
            f"(launch numbering), every expert still has a copy"
        )

    def recover(self, exc: BaseException) -> bool:
        """After a CommError: re-form without the lost ranks and rebind the engine (True), or raise
        ReformError saying why not; False for any other exception (not ours to handle)."""
        if not isinstance(exc, CommError) or isinstance(exc, reform.ReformError):
            return False
        comm, t0 = self.engine.comm, now()
        if comm.rank == 0:
            names = "" if len(self.lost) == 0 else f" (launch ranks of the current ranks: {self.members})"
            print(f"moecluster: {exc}{names}; re-forming the cluster on the survivors", file=sys.stderr, flush=True)
            new, survivors = reform.lead(comm, self.members, lambda gone: self._can_lose(gone, str(exc)))
        else:
            new, survivors = reform.follow(comm, self.members)
        gone = [self.members[r] for r in range(comm.world_size) if r not in survivors]
        self.placement = restrict(self.placement, survivors)
        self.members = [self.members[r] for r in survivors]
        self.lost += gone
        rebind(self.engine, new, self.placement)
        self.recoveries.append(now() - t0)
        if new.rank == 0:
            if self.on_reform is not None:
                self.on_reform(self.placement, self.members)
            print(
                f"moecluster: re-formed without {_ranks(gone)} in {self.recoveries[-1]:.1f} s; "
                f"serving on {_ranks(self.members)}",
                file=sys.stderr,
                flush=True,
            )
        return True

    def _can_lose(self, gone: list[int], cause: str) -> str | None:
        lost = lost_experts(self.placement, gone)
        if not lost:
            return None
        numbering = ""
        if self.members != list(range(len(self.members))):  # the comm's message numbers ranks among the survivors
            pairs = ", ".join(f"{i} = launch rank {m}" for i, m in enumerate(self.members))
            numbering = f"; ranks numbered among the survivors: {pairs}"
        return f"{_ranks([self.members[r] for r in gone])} lost and {describe_lost(lost)} ({cause}{numbering})"


def rebind(engine: Engine, comm, placement: Placement) -> None:
    """Point the engine and its expert-parallel layers at a new comm and placement."""
    engine.comm, engine.rank, engine.world_size = comm, comm.rank, comm.world_size
    for index, moe in enumerate(engine.model.moe_layers()):
        experts = moe.experts
        held = placement.experts_of(comm.rank, index)
        if getattr(experts, "expert_ids", held) != held:  # a survivor keeps its experts: nothing moves
            raise CommError(f"rank {comm.rank}: the re-formed placement gives it other experts in layer {index}")
        experts.comm, experts.placement, experts.rank = comm, placement, comm.rank
    engine.prefix_store = None  # pyright: ignore[reportAttributeAccessIssue] - rank 0 forgets its prefix index too
