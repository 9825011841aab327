"""Re-form a torch.distributed (gloo) job without the ranks it lost.

When a rank dies, gloo fails the collectives that involve it at once ("Connection closed by peer"); a
stalled rank makes them time out (--timeout). Either way TorchComm raises CommError naming the missing
ranks, and the broken process group cannot be used again. The survivors then agree, through the
rendezvous store that rank 0 hosts (rank 0 serves the clients, so it must be among them), on a new group:

    rank 0:  sets "moecluster/reform" = g (waiting workers poll it: TorchComm.watch_reform), waits for
             the other current ranks except the missing ones to check in ("moecluster/g{g}/in/{r}"), at
             most --timeout, then writes "moecluster/g{g}/plan": {"survivors": [...]} or {"lost": why}
    others:  check in, read the plan (at most 2 x --timeout + 5 s), leave if not in it

and every survivor builds a ProcessGroupGloo over the store (prefix "moecluster/g{g}/pg") with ranks
renumbered 0..k-1 in the order of the survivors' current ranks. `can_lose(missing) -> str | None`
(the caller's: e.g. "experts [3, 7] of MoE layer 0 would be lost") vetoes a plan. MPI cannot shrink
a communicator after a failure (no ULFM in MPICH), so this needs `--backend torch`.
"""

from __future__ import annotations

import atexit
import datetime
import json
import time
from collections.abc import Callable

from moecluster.distributed.comm import Comm, CommError, _hard_exit

REFORM_KEY = "moecluster/reform"
POLL_S = 0.05
GRACE_S = 2.0  # ranks the error named as missing may still check in this long after the others


class ReformError(CommError):
    """The cluster cannot re-form: the lost ranks held the only copy of some experts, or rank 0 is gone."""


def supports_reform(comm: Comm | None) -> bool:
    """Only torch.distributed (gloo) groups can be rebuilt over a subset of their ranks."""
    return comm is not None and comm.backend == "torch" and comm.world_size > 1 and comm.device.type == "cpu"  # pyright: ignore[reportAttributeAccessIssue]


def lead(comm, members: list[int], can_lose: Callable[[list[int]], str | None]) -> tuple[Comm, list[int]]:
    """Rank 0: decide the survivors, build the new comm; (new comm, survivors as current ranks).

    The ranks the CommError named are only a hint (a live rank that failed out of an earlier collective
    never reached the one that was checked): every other rank gets up to --timeout to check in, the
    named ones a short grace after the rest are in. A dead rank never checks in."""
    gen = comm.generation + 1
    store, keys = comm._store, f"moecluster/g{gen}/"
    store.set_timeout(datetime.timedelta(seconds=comm.timeout_s))
    store.set(REFORM_KEY, str(gen))
    named = set(comm.last_missing)
    others = list(range(1, comm.world_size))
    t0 = time.monotonic()
    deadline, grace_from = t0 + comm.timeout_s, None
    while True:
        checked = [r for r in others if store.check([f"{keys}in/{r}"])]
        now = time.monotonic()
        if len(checked) == len(others) or now > deadline:
            break
        if grace_from is None and all(r in checked for r in others if r not in named):
            grace_from = now
        if grace_from is not None and now > grace_from + min(GRACE_S, comm.timeout_s / 4):
            break
        time.sleep(POLL_S)
    missing = [r for r in others if r not in checked]
    lost = can_lose(missing) if missing else None
    if lost is not None:
        store.set(f"{keys}plan", json.dumps({"lost": lost}))
        raise ReformError(lost)
    survivors = [r for r in range(comm.world_size) if r not in missing]
    store.set(f"{keys}plan", json.dumps({"survivors": survivors}))
    return regroup(comm, survivors, gen), survivors


def follow(comm, members: list[int]) -> tuple[Comm, list[int]]:
    """Any other rank: check in, wait for rank 0's plan; (new comm, survivors) or ReformError."""
    try:
        plan, gen = _await_plan(comm, members)
    except RuntimeError as e:  # the store lives in rank 0: it is gone
        raise ReformError(
            f"rank {members[comm.rank]}: cannot re-form the cluster: the rendezvous store (rank 0) is unreachable ({e})"
        ) from None
    if "lost" in plan:
        raise ReformError(f"rank {members[comm.rank]}: the cluster cannot re-form: {plan['lost']}")
    survivors = plan["survivors"]
    if comm.rank not in survivors:
        raise ReformError(f"rank {members[comm.rank]} was left out of the re-formed cluster (too late); stopping")
    return regroup(comm, survivors, gen), survivors


def _await_plan(comm, members: list[int]) -> tuple[dict, int]:
    store = comm._store
    store.set_timeout(datetime.timedelta(seconds=comm.timeout_s))
    deadline = time.monotonic() + 2 * comm.timeout_s + 5.0
    gen = comm.generation + 1
    while True:  # rank 0 may be re-forming a later generation already (it lost us, then more)
        gen = max(gen, int(store.get(REFORM_KEY)) if store.check([REFORM_KEY]) else 0)
        keys = f"moecluster/g{gen}/"
        store.set(f"{keys}in/{comm.rank}", "1")
        if store.check([f"{keys}plan"]):
            return json.loads(store.get(f"{keys}plan")), gen
        if time.monotonic() > deadline:
            raise ReformError(f"rank {members[comm.rank]}: rank 0 did not re-form the cluster within the deadline")
        time.sleep(POLL_S)


def regroup(comm, survivors: list[int], gen: int) -> Comm:
    """A TorchComm over a new gloo group of `survivors` (current ranks), sharing comm's store."""
    import torch.distributed as dist
    from torch.distributed import PrefixStore  # pyright: ignore[reportPrivateImportUsage]

    from moecluster.distributed.comm_torch import TorchComm

    new = TorchComm.__new__(TorchComm)
    new.__dict__.update(comm.__dict__)  # store, timeouts, device, watch_reform
    new.rank, new.world_size, new.generation = survivors.index(comm.rank), len(survivors), gen
    new._keys, new._num_ops, new._hard_exit_armed = f"moecluster/g{gen}/", 0, False
    new.failed, new.closed, new.last_missing = False, False, []
    atexit.unregister(_hard_exit)  # the old comm's exit code 2 on failure: this rank carries on, and ends
    atexit.register(_hard_exit, 0, 0.0)  # without the old group's shutdown (it still lists the lost ranks)
    new._store.set(new._hb_key(new.rank), "0")
    timeout = datetime.timedelta(seconds=comm.timeout_s)
    try:
        pg_store = PrefixStore(f"moecluster/g{gen}/pg", comm._store)
        new._group = dist.ProcessGroupGloo(pg_store, new.rank, len(survivors), timeout)
    except RuntimeError as e:
        raise ReformError(f"rank {comm.rank}: could not join the re-formed group of ranks {survivors} ({e})") from e
    return new
