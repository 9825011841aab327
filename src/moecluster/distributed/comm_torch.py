"""TorchComm: collectives over torch.distributed (gloo on CPU, NCCL on CUDA) with deadlines and
store heartbeats naming missing ranks.

Legend: W world size (ranks), N values.
"""

from __future__ import annotations

import atexit
import datetime
import socket
import time
from typing import Any

import torch

from moecluster.distributed.comm import (
    EXIT_CODE_FAILED,
    REDUCE_DTYPES,
    Comm,
    CommError,
    _hard_exit,
    _short,
    _waiting_note,
    missing_message,
)

REFORM_POLL_S = 0.25  # with watch_reform: how often a long wait checks whether rank 0 is re-forming


def _listen(addr: str, port: int) -> socket.socket | None:
    """A listening socket on addr:port for the store; None (the store binds every interface) if addr is
    not an address of this machine."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(256)
        return sock
    except OSError:
        sock.close()
        return None


class TorchComm(Comm):
    """torch.distributed: gloo on CPU, NCCL on CUDA; laggards named by heartbeat store keys."""

    backend = "torch"

    def __init__(
        self,
        rank: int,
        world_size: int,
        addr: str,
        port: int,
        timeout_s: float = 30.0,
        *,
        device: str = "cpu",
        local_rank: int = 0,
        agent_store: str | None = None,
    ) -> None:
        """agent_store: torchrun's agent already serves the store at addr:port; our keys go under
        this prefix (else rank 0 hosts the store)."""
        import torch.distributed as dist
        from torch.distributed import PrefixStore, TCPStore  # pyright: ignore[reportPrivateImportUsage]

        self._dist, self.rank, self.world_size = dist, rank, world_size
        self._group: Any = None  # the default process group; a re-formed comm has its own (reform.regroup)
        self._keys = "moecluster/"  # store key prefix of this generation of the job
        self.generation, self.watch_reform = 0, False  # see reform.py
        self.last_missing: list[int] = []  # the ranks the last CommError named as missing
        self.timeout_s, self.device = timeout_s, torch.device(device)
        self._probe_s = min(2.0, 0.25 * timeout_s)
        self._num_ops, self._hard_exit_armed = 0, False
        self._first_wait = datetime.timedelta(milliseconds=50)
        timeout = datetime.timedelta(seconds=timeout_s)
        is_master = rank == 0 and agent_store is None
        # The store's server listens on MASTER_ADDR only (127.0.0.1 for a local job), not on every interface.
        self._listener = _listen(addr, port) if is_master else None
        try:
            fd = self._listener.fileno() if self._listener is not None else None
            self._store = TCPStore(addr, port, world_size, timeout=timeout, is_master=is_master, master_listen_fd=fd)
            if agent_store is not None:
                self._store = PrefixStore(agent_store, self._store)
            self._store_host = "rank 0" if agent_store is None else "torchrun's agent"
            self._store.set(self._hb_key(rank), "0")
            if self.device.type == "cuda":
                torch.cuda.set_device(local_rank)
            # gloo's own timeout is a backstop behind ours, so our named message comes first.
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                store=self._store,
                rank=rank,
                world_size=world_size,
                timeout=timeout + datetime.timedelta(seconds=10),
            )
        except (RuntimeError, ValueError) as e:
            raise CommError(
                f"rank {rank}: could not join the {world_size} ranks at {addr}:{port}"
                f" within {timeout_s:.1f} s ({_short(e)}); check that "
                f"every rank started and MASTER_ADDR/MASTER_PORT agree"
            ) from e

    def _hb_key(self, rank: int) -> str:
        return f"{self._keys}hb/{rank}"

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        self._check_device(x, "all_reduce_sum", REDUCE_DTYPES)
        if x.numel():
            self._wait(self._dist.all_reduce(x, group=self._group, async_op=True), "all_reduce")
        return x

    def all_reduce_disjoint(self, x: torch.Tensor) -> torch.Tensor:
        """Integer sum of the raw bits (int32 words, or bytes): with one non-zero contributor per
        element no bits overlap, so this is exact, -0.0 and NaN payloads included (gloo has no int16;
        NCCL has no bitwise OR, but integer sums everywhere)."""
        self._check_device(x, "all_reduce_disjoint", REDUCE_DTYPES)
        if x.numel():
            flat = x.view(-1)
            bits = flat.view(torch.int32) if x.nbytes % 4 == 0 else flat.view(torch.uint8)
            self._wait(self._dist.all_reduce(bits, group=self._group, async_op=True), "all_reduce")
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_device(x, "broadcast")
        if x.numel():
            if self._group is None:
                work = self._dist.broadcast(x, src, async_op=True)
            else:  # a re-formed comm's group is not in torch's world map: ranks are the group's
                work = self._dist.broadcast(x, group=self._group, group_src=src, async_op=True)
            self._wait(work, "broadcast")
        return x

    def barrier(self) -> None:
        self._check_usable("barrier")
        self._wait(self._dist.barrier(group=self._group, async_op=True), "barrier")

    def close(self) -> None:
        if self.failed or self.closed:
            return
        self._wait(self._dist.barrier(group=self._group, async_op=True), "close")
        self.closed = True
        if self._group is not None:  # the default group still lists the lost rank: no collective shutdown
            atexit.register(_hard_exit, 0, 0.0)
            return
        self._dist.destroy_process_group()

    def mark_failed(self, exit_code: int = EXIT_CODE_FAILED) -> None:
        self.failed = True
        if not self._hard_exit_armed:  # a dead peer would hang destroy_process_group / gloo
            self._hard_exit_armed = True
            # Rank 0 hosts the store: it lingers so that peers can still read the heartbeats.
            linger = self._probe_s + 0.5 if self._store_host == "rank 0" == f"rank {self.rank}" else 0
            atexit.register(_hard_exit, exit_code, linger)

    def _check_device(self, x: torch.Tensor, what: str, dtypes: tuple | None = None) -> None:
        self._check(x, what, dtypes)
        if x.device.type != self.device.type:
            raise ValueError(f"{what}: tensor on {x.device}, this comm works on {self.device}")

    def _wait(self, work, op: str) -> None:
        """Wait 50 ms; then post a heartbeat (this rank is in collective #n) and wait the rest."""
        self._num_ops += 1
        t0 = time.perf_counter()
        try:
            work.wait(self._first_wait)
            return
        except RuntimeError as e:
            if "timed out" not in str(e).lower():
                self._fail_named(op, e)
        try:
            self._store.set(self._hb_key(self.rank), str(self._num_ops))
            while True:
                remaining = t0 + self.timeout_s - time.perf_counter()
                if not self.watch_reform:
                    work.wait(datetime.timedelta(seconds=max(remaining, 1e-3)))
                    return
                try:  # in short slices, to hear rank 0 start re-forming the cluster (reform.py)
                    work.wait(datetime.timedelta(seconds=min(max(remaining, 1e-3), REFORM_POLL_S)))
                    return
                except RuntimeError as e:
                    if remaining <= REFORM_POLL_S or "timed out" not in str(e).lower():
                        raise
                    self._check_reform(op)
        except RuntimeError as e:
            self._fail_named(op, None if "timed out" in str(e).lower() else e)

    def _check_reform(self, op: str) -> None:
        """Raise CommError if rank 0 has started re-forming the cluster without the ranks it lost."""
        key = "moecluster/reform"
        if self._store.check([key]) and int(self._store.get(key)) > self.generation:
            self.last_missing = []
            self._fail(f"left {op} (collective #{self._num_ops}): rank 0 is re-forming the cluster")

    def _fail_named(self, op: str, error: Exception | None) -> None:
        """Read the peers' heartbeats: ranks not at this collective are the missing ones."""
        num = self._num_ops
        what = f"{op} (collective #{num})"
        try:
            self._store.set_timeout(datetime.timedelta(seconds=self._probe_s))
            self._store.set(self._hb_key(self.rank), str(num))
            # After an error (not a timeout) give live peers a moment to reach this collective.
            deadline = time.perf_counter() + (self._probe_s if error is not None else 0.0)
            while True:
                seen = {r: int(self._store.get(self._hb_key(r))) for r in range(self.world_size)}
                missing = [r for r, n in seen.items() if n < num]
                if not missing or time.perf_counter() >= deadline:
                    break
                time.sleep(0.05)
        except RuntimeError:
            self._fail(
                f"{what} failed and the rendezvous store of {self._store_host} is "
                f"unreachable: {self._store_host} may have died"
                + (f" ({_short(error)})" if error else "")
                + "; stopping"
            )
        self.last_missing = missing
        notes = _waiting_note([r for r in seen if r not in missing])
        notes += [f"rank {r} last waited in collective #{seen[r]}" for r in missing if seen[r]]
        self._fail(missing_message(what, self.timeout_s, missing, notes, _short(error)))
