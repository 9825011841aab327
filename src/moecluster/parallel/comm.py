"""Comm: the collectives between ranks (MPI via mpi4py, torch.distributed), each with a timeout.

Legend: T tokens, D model dim, W world size (ranks), N values.

The engine calls one `all_reduce_sum(partial_TD)` per MoE layer; it is the latency-critical path,
so the MPI fast path is one nonblocking Iallreduce polled with Test(). Every wait has a deadline:
near it, the waiting rank asks its peers (MPI: pings on a control communicator; torch: heartbeat
keys in the rendezvous store) which of them are in the collective, and raises CommError naming
the ranks that did not join.

After a CommError (or `mark_failed`) the process must not run the collective shutdown: MPI's
Finalize would wait forever for the missing rank. MPI ranks therefore end in MPI_Abort at Python
exit (mpi4py's abort status: mpiexec then stops every rank of the job, on every host, at once);
torch ranks end in os._exit after flushing (the launcher stops the others). Using the comm as a
context manager (`with init_comm(...) as comm:`) does this for any exception.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import time

import numpy as np
import torch

from moecluster.errors import MoeClusterError

EXIT_CODE_FAILED = 2  # the CLI's exit code for MoeClusterError
REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.int64)
SPIN_S = 1e-3  # busy-poll this long: the per-layer exchange stays at MPI latency
YIELD_S = 20e-3  # then poll with sched_yield; later sleep (<= MAX_SLEEP_S: ~1% of such a wait)
MAX_SLEEP_S = 2e-4
OPS = ("idle", "all_reduce", "broadcast", "barrier", "close")  # codes sent in MPI pongs
_TAG_PING, _TAG_PONG = 7001, 7002
_MPICH_BFLOAT16 = 0x4C00024C  # MPIX_BFLOAT16 in MPICH's mpi.h (ABI-stable builtin handle)
NATIVE_BF16_MAX_BYTES = 12 * 1024  # above this MPICH's bf16 SUM loop is slower than our op


class CommError(MoeClusterError):
    """A collective failed or timed out; the message names the ranks that were missing."""


class Comm:
    """The collectives every backend provides. Tensors: contiguous, on the backend's device."""

    rank: int = 0
    world_size: int = 1
    timeout_s: float = 30.0
    backend: str = "single"
    failed: bool = False
    closed: bool = False

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x (e.g. partial_TD; fp32 or bf16, also fp64/int64) over all ranks in place; x."""
        raise NotImplementedError

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy x from rank src to every rank, in place (any dtype); returns x."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank has called barrier (with the timeout)."""
        raise NotImplementedError

    def close(self) -> None:
        """Leave cleanly: a last barrier (a stuck peer is named, not waited for), then free."""

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """Send bytes (e.g. utf-8 JSON) from src to every rank: the length, then the payload."""
        if self.rank == src and data is None:
            raise ValueError("broadcast_bytes: the source rank must pass bytes, not None")
        n_1 = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64)
        num_bytes = int(self.broadcast(n_1, src)[0])
        if num_bytes == 0:
            return b""
        if self.rank == src:
            buf_N = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf_N = torch.empty(num_bytes, dtype=torch.uint8)
        return self.broadcast(buf_N, src).numpy().tobytes()

    def gather_floats(self, values: list[float]) -> list[list[float]] | None:
        """Collect each rank's small list of floats on rank 0 ([rank][i]); None on other ranks."""
        # Two tiny sum-reductions over zero-padded slots: simple and identical on every backend.
        n_W = torch.zeros(self.world_size, dtype=torch.int64)
        n_W[self.rank] = len(values)
        self.all_reduce_sum(n_W)
        v_WN = torch.zeros(self.world_size, max(int(n_W.max()), 1), dtype=torch.float64)
        v_WN[self.rank, : len(values)] = torch.tensor(values, dtype=torch.float64)
        self.all_reduce_sum(v_WN)
        if self.rank != 0:
            return None
        return [v_WN[r, : int(n_W[r])].tolist() for r in range(self.world_size)]

    def mark_failed(self, exit_code: int = EXIT_CODE_FAILED) -> None:
        """Record that this rank stops on an error: at exit, skip the collective shutdown."""
        self.failed = True

    def __enter__(self) -> Comm:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or (issubclass(exc_type, SystemExit) and not exc.code):
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.mark_failed(130)
        elif issubclass(exc_type, SystemExit):
            self.mark_failed(exc.code if isinstance(exc.code, int) else 1)
        else:
            self.mark_failed(EXIT_CODE_FAILED if isinstance(exc, MoeClusterError) else 1)

    def _check_usable(self, what: str) -> None:
        if self.failed or self.closed:
            why = "a communication failure" if self.failed else "close()"
            raise CommError(f"rank {self.rank}: {what} called after {why}")

    def _check(self, x: torch.Tensor, what: str, dtypes: tuple | None = None) -> None:
        self._check_usable(what)
        if not x.is_contiguous():
            raise ValueError(f"{what} needs a contiguous tensor (call .contiguous() first)")
        if dtypes is not None and x.dtype not in dtypes:
            raise ValueError(f"{what} supports {', '.join(map(str, dtypes))}, got {x.dtype}")

    def _fail(self, message: str) -> None:
        self.mark_failed(EXIT_CODE_FAILED)
        raise CommError(f"rank {self.rank}: {message}")


class SingleComm(Comm):
    """One rank: every collective is a no-op."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return x

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        if data is None:
            raise ValueError("broadcast_bytes: the source rank must pass bytes, not None")
        return bytes(data)

    def gather_floats(self, values: list[float]) -> list[list[float]] | None:
        return [[float(v) for v in values]]

    def barrier(self) -> None:
        pass


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def missing_message(what: str, timeout_s: float, missing: list[int], notes: list[str],
                    error: str = "") -> str:
    """The CommError text: which ranks did not join `what`, and what the others were doing."""
    if missing and error:
        msg = f"{_ranks(missing)} did not join {what} ({error}; it may have died)"
    elif missing:
        msg = f"{_ranks(missing)} did not join {what} within {timeout_s:.1f} s " \
              f"(it may have died or hung)"
    elif error:
        msg = f"{what} failed: {error}"
    else:
        msg = f"{what} did not complete within {timeout_s:.1f} s although every rank is in it"
    return "; ".join([msg, *notes, "stopping"])


def _waiting_note(ranks: list[int]) -> list[str]:
    ranks = sorted(ranks)
    return [f"{_ranks(ranks)} {'is' if len(ranks) == 1 else 'are'} waiting in it"] if ranks else []


def _bf16_add(in_buf, inout_buf, datatype) -> None:
    """MPI user op: inout += in on bf16 (MPI has no bf16: the buffers travel as int16)."""
    if len(in_buf):
        a_N = torch.frombuffer(in_buf, dtype=torch.bfloat16)
        torch.frombuffer(inout_buf, dtype=torch.bfloat16).add_(a_N)


def native_bf16_type(MPI):
    """This MPI's own bf16 datatype if it can SUM it (MPICH >= 4.2: MPIX_BFLOAT16), else None."""
    dtype = getattr(MPI, "BFLOAT16_T", MPI.DATATYPE_NULL)
    try:
        if dtype == MPI.DATATYPE_NULL and MPI.get_vendor()[0] == "MPICH":
            dtype = MPI.Datatype.fromhandle(_MPICH_BFLOAT16)  # mpi4py may not name it
            if dtype.Get_name() != "MPIX_BFLOAT16":
                return None
        if dtype == MPI.DATATYPE_NULL or dtype.Get_size() != 2:
            return None
        a_2 = torch.tensor([1.0, 2.5], dtype=torch.bfloat16)
        b_2 = torch.tensor([1.0, 0.25], dtype=torch.bfloat16)
        MPI.SUM.Reduce_local([MPI.buffer.fromaddress(a_2.data_ptr(), 4), dtype],
                             [MPI.buffer.fromaddress(b_2.data_ptr(), 4), dtype])
        return dtype if b_2.tolist() == [2.0, 2.75] else None
    except Exception:  # noqa: BLE001 - any failure means: not supported here, use a fallback
        return None


class MPIComm(Comm):
    """MPI via mpi4py buffer methods (never the pickle-based lowercase ones).

    bf16_mode: "native" sums with MPI's own bf16 type (MPICH's MPIX_BFLOAT16; MPICH rounds ties
    away from zero where torch rounds them to even); "op" with a user MPI.Op calling torch (bf16
    on the wire, Python callback overhead); "fp32" converts to fp32 for the reduction (twice the
    bytes). "auto" (default): native up to NATIVE_BF16_MAX_BYTES, op above, where MPICH's scalar
    bf16 loop is slower than torch's (benchmarks/results/allreduce.md).
    """

    backend = "mpi"

    def __init__(self, mpi_comm, timeout_s: float = 30.0, bf16_mode: str = "auto") -> None:
        from mpi4py import MPI

        self._MPI, self._comm = MPI, mpi_comm
        self._bf16_native = native_bf16_type(MPI)
        self.bf16_mode = bf16_mode
        self._ctl = mpi_comm.Dup()  # control plane: pings/pongs only, never a collective
        self.rank, self.world_size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.timeout_s = timeout_s
        self._probe_s = min(2.0, 0.25 * timeout_s)
        self._num_ops = 0
        self._state_2 = np.zeros(2, dtype=np.int64)  # [op code, collective number] for pongs
        self._sends: list = []  # (request, buffer) of control messages in flight
        self._pongs: dict[int, tuple[int, int]] = {}
        self._status = MPI.Status()
        self._bf16_op = MPI.Op.Create(_bf16_add, commute=True)
        self._scratch: dict[torch.Size, tuple] = {}

    @property
    def bf16_mode(self) -> str:
        return self._bf16_mode

    @bf16_mode.setter
    def bf16_mode(self, mode: str) -> None:
        if mode not in ("auto", "native", "op", "fp32"):
            raise ValueError(f"bf16_mode must be auto, native, op or fp32, got {mode!r}")
        if mode == "native" and self._bf16_native is None:
            raise CommError(f"this MPI ({self._MPI.Get_library_version().splitlines()[0]}) "
                            f"cannot sum bf16 natively: use bf16_mode 'op' or 'fp32'")
        MPI, unlimited = self._MPI, sys.maxsize
        # dtype -> (MPI type, largest message for the fast path); others go _all_reduce_other.
        self._sum_types = {torch.float32: (MPI.FLOAT, unlimited),
                           torch.float64: (MPI.DOUBLE, unlimited),
                           torch.int64: (MPI.INT64_T, unlimited)}
        if mode in ("auto", "native") and self._bf16_native is not None:
            limit = NATIVE_BF16_MAX_BYTES if mode == "auto" else unlimited
            self._sum_types[torch.bfloat16] = (self._bf16_native, limit)
        self._bf16_mode = mode

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        # Fast path in few, cheap calls: a raw-address buffer costs ~1 us less than x.numpy().
        entry = self._sum_types.get(x.dtype)
        if entry is None or self.failed or not x.is_cpu or not x.is_contiguous():
            return self._all_reduce_other(x)
        nbytes = x.nbytes
        if nbytes > entry[1]:
            return self._all_reduce_other(x)
        if nbytes:
            buf = [self._MPI.buffer.fromaddress(x.data_ptr(), nbytes), entry[0]]
            self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, buf, self._MPI.SUM), 1)
        return x

    def _all_reduce_other(self, x: torch.Tensor) -> torch.Tensor:
        """Checks with clear messages, and bf16 by user op or via fp32."""
        self._check(x, "all_reduce_sum", REDUCE_DTYPES)
        if not x.is_cpu:
            raise ValueError(f"the MPI backend sums CPU tensors, got one on {x.device}")
        if x.numel() == 0:
            return x
        if self._bf16_mode != "fp32":  # bf16 on the wire as int16, summed by our MPI.Op
            buf = [self._MPI.buffer.fromaddress(x.data_ptr(), x.nbytes), self._MPI.INT16_T]
            self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, buf, self._bf16_op), 1)
            return x
        scratch = self._scratch.get(x.shape)  # fp32 copy of x and its MPI buffer, per shape
        if scratch is None:
            if len(self._scratch) > 16:
                self._scratch.clear()
            s = torch.empty(x.shape, dtype=torch.float32)
            buf = [self._MPI.buffer.fromaddress(s.data_ptr(), s.nbytes), self._MPI.FLOAT]
            scratch = self._scratch[x.shape] = (s, buf)
        s, buf = scratch
        s.copy_(x)
        self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, buf, self._MPI.SUM), 1)
        x.copy_(s)
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check(x, "broadcast")
        if not x.is_cpu or not 0 <= src < self.world_size:
            raise ValueError(f"broadcast: needs a CPU tensor and 0 <= src < {self.world_size}")
        if x.nbytes:
            buf = [self._MPI.buffer.fromaddress(x.data_ptr(), x.nbytes), self._MPI.BYTE]
            self._wait(self._comm.Ibcast(buf, root=src), 2)
        return x

    def barrier(self) -> None:
        self._check_usable("barrier")
        self._wait(self._comm.Ibarrier(), 3)

    def close(self) -> None:
        if self.failed or self.closed:
            return
        self._wait(self._comm.Ibarrier(), 4)  # a stuck peer is named here, not in MPI_Finalize
        self.closed, self._sum_types = True, {}  # later calls take the checked path and raise
        for req, _ in self._sends:
            req.Free()
        self._sends = []
        self._ctl.Free()
        self._bf16_op.Free()

    def mark_failed(self, exit_code: int = EXIT_CODE_FAILED) -> None:
        from mpi4py.run import set_abort_status

        self.failed = True
        set_abort_status(exit_code)  # MPI_Abort at exit: mpiexec stops every rank of the job

    def _wait(self, req, op_code: int) -> None:
        """Poll req: spin SPIN_S, then back off while answering pings, until the deadline."""
        self._num_ops += 1
        t0 = time.perf_counter()
        spin_end = t0 + SPIN_S
        try:
            while not req.Test():
                if time.perf_counter() > spin_end:
                    self._wait_slow(req, op_code, t0)
                    return
        except self._MPI.Exception as e:  # e.g. a peer's host vanished (if MPI reports it)
            self._fail(f"{OPS[op_code]} (collective #{self._num_ops}) failed: "
                       f"{e.Get_error_string()}; stopping")

    def _wait_slow(self, req, op_code: int, t0: float) -> None:
        """Past SPIN_S: Test + sched_yield (a pinned rank returns at once, a shared core is
        given away) until YIELD_S, then sleeps; every ms answer pings, near the deadline ping."""
        self._state_2[:] = (op_code, self._num_ops)
        deadline, yield_end = t0 + self.timeout_s, t0 + YIELD_S
        pinged, sleep_s, next_serve = False, 50e-6, 0.0
        try:
            while not req.Test():
                now = time.perf_counter()
                if now >= next_serve:
                    self._serve_ctl()
                    next_serve = now + 1e-3
                    if now >= deadline:
                        break
                    if not pinged and now >= deadline - self._probe_s:
                        self._send_pings()
                        pinged = True
                if now < yield_end:
                    os.sched_yield()
                else:
                    time.sleep(sleep_s)
                    sleep_s = min(2 * sleep_s, MAX_SLEEP_S)
            else:
                return
        finally:
            self._state_2[:] = (0, self._num_ops)
        self._fail(self._timeout_message(op_code))

    def _serve_ctl(self) -> None:
        """Answer peers' pings with where we are; collect pongs for our current probe."""
        MPI, st = self._MPI, self._status
        while self._ctl.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, st):
            src, tag = st.Get_source(), st.Get_tag()
            msg_3 = np.empty(3, dtype=np.int64)
            self._ctl.Recv([msg_3, MPI.INT64_T], src, tag)
            if tag == _TAG_PING:
                reply_3 = np.array([msg_3[0], *self._state_2], dtype=np.int64)
                req = self._ctl.Isend([reply_3, MPI.INT64_T], src, _TAG_PONG)
                self._sends.append((req, reply_3))
            elif tag == _TAG_PONG and msg_3[0] == self._num_ops:
                self._pongs[src] = (int(msg_3[1]), int(msg_3[2]))
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]

    def _send_pings(self) -> None:
        self._pongs = {}
        for peer in range(self.world_size):
            if peer != self.rank:
                ping_3 = np.array([self._num_ops, 0, 0], dtype=np.int64)
                req = self._ctl.Isend([ping_3, self._MPI.INT64_T], peer, _TAG_PING)
                self._sends.append((req, ping_3))

    def _timeout_message(self, op_code: int) -> str:
        num = self._num_ops
        peers = [r for r in range(self.world_size) if r != self.rank]
        missing = [r for r in peers if r not in self._pongs]
        waiting = [r for r in peers if self._pongs.get(r) == (op_code, num)]
        notes = _waiting_note(waiting + [self.rank])
        for r in sorted(set(self._pongs) - set(waiting)):
            code, n = self._pongs[r]
            where = "between collectives" if code == 0 else f"{OPS[code]} (collective #{n})"
            odd = " - the ranks' call sequences differ (a bug)" if n == num and code else ""
            notes.append(f"rank {r} answered from {where}{odd}")
        return missing_message(f"{OPS[op_code]} (collective #{num})", self.timeout_s, missing,
                               notes)


class TorchComm(Comm):
    """torch.distributed: gloo on CPU, NCCL on CUDA; laggards named by heartbeat store keys."""

    backend = "torch"

    def __init__(self, rank: int, world_size: int, addr: str, port: int, timeout_s: float = 30.0,
                 *, device: str = "cpu", local_rank: int = 0, agent_store: str | None = None
                 ) -> None:
        """agent_store: torchrun's agent already serves the store at addr:port; our keys go under
        this prefix (else rank 0 hosts the store)."""
        import torch.distributed as dist

        self._dist, self.rank, self.world_size = dist, rank, world_size
        self.timeout_s, self.device = timeout_s, torch.device(device)
        self._probe_s = min(2.0, 0.25 * timeout_s)
        self._num_ops, self._hard_exit_armed = 0, False
        self._first_wait = datetime.timedelta(milliseconds=50)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            self._store = dist.TCPStore(addr, port, world_size, timeout=timeout,
                                        is_master=(rank == 0 and agent_store is None))
            if agent_store is not None:
                self._store = dist.PrefixStore(agent_store, self._store)
            self._store_host = "rank 0" if agent_store is None else "torchrun's agent"
            self._store.set(self._hb_key(rank), "0")
            if self.device.type == "cuda":
                torch.cuda.set_device(local_rank)
            # gloo's own timeout is a backstop behind ours, so our named message comes first.
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    store=self._store, rank=rank, world_size=world_size,
                                    timeout=timeout + datetime.timedelta(seconds=10))
        except (RuntimeError, ValueError) as e:
            raise CommError(f"rank {rank}: could not join the {world_size} ranks at {addr}:{port}"
                            f" within {timeout_s:.1f} s ({_short(e)}); check that "
                            f"every rank started and MASTER_ADDR/MASTER_PORT agree") from e

    def _hb_key(self, rank: int) -> str:
        return f"moecluster/hb/{rank}"

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        self._check_device(x, "all_reduce_sum", REDUCE_DTYPES)
        if x.numel():
            self._wait(self._dist.all_reduce(x, async_op=True), "all_reduce")
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_device(x, "broadcast")
        if x.numel():
            self._wait(self._dist.broadcast(x, src, async_op=True), "broadcast")
        return x

    def barrier(self) -> None:
        self._check_usable("barrier")
        self._wait(self._dist.barrier(async_op=True), "barrier")

    def close(self) -> None:
        if self.failed or self.closed:
            return
        self._wait(self._dist.barrier(async_op=True), "close")
        self.closed = True
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
            remaining = t0 + self.timeout_s - time.perf_counter()
            work.wait(datetime.timedelta(seconds=max(remaining, 1e-3)))
        except RuntimeError as e:
            self._fail_named(op, None if "timed out" in str(e).lower() else e)

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
            self._fail(f"{what} failed and the rendezvous store of {self._store_host} is "
                       f"unreachable: {self._store_host} may have died"
                       + (f" ({_short(error)})" if error else "") + "; stopping")
        notes = _waiting_note([r for r in seen if r not in missing])
        notes += [f"rank {r} last waited in collective #{seen[r]}" for r in missing if seen[r]]
        self._fail(missing_message(what, self.timeout_s, missing, notes, _short(error)))


def _short(error: Exception | None) -> str:
    """First sentence of a backend error, without gloo's '[path/file.cc:123] ' prefix."""
    if error is None:
        return ""
    text = str(error).strip().splitlines()[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0][:200]


def _hard_exit(code: int, linger_s: float = 0.0) -> None:
    """atexit hook: flush, wait linger_s, leave without the backend's (collective) shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    time.sleep(linger_s)
    os._exit(code)


def _apply_cpu_settings(local_rank: int, world_size: int) -> None:
    """MOECLUSTER_PIN=1: pin to one core; one intra-op thread per rank unless MOECLUSTER_THREADS."""
    if os.environ.get("MOECLUSTER_PIN") == "1":
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[local_rank % len(cores)]})
    threads = os.environ.get("MOECLUSTER_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif world_size > 1:
        torch.set_num_threads(1)


def _init_mpi(timeout_s: float) -> tuple[Comm, int]:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MoeClusterError("backend 'mpi' needs mpi4py and an MPI library: pip install "
                              "'moecluster[mpi]' (mpi4py + mpich), or use --backend torch") from e
    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        return SingleComm(timeout_s), 0
    node_comm = world.Split_type(MPI.COMM_TYPE_SHARED)  # ranks on this host -> local rank
    local_rank = node_comm.Get_rank()
    node_comm.Free()
    comm = MPIComm(world, timeout_s)
    comm.launcher_link = _link_to_launcher(comm.rank)
    return comm, local_rank


def _link_to_launcher(rank: int) -> socket.socket | None:
    """Under moecluster's launcher: connect and send our rank; the kernel closes the link when
    this process ends, which tells the launcher which rank stopped first (launch.RankLinks)."""
    path = os.environ.get("MOECLUSTER_LAUNCH_SOCKET")
    if not path:
        return None
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        link.connect(path)
        link.sendall(f"{rank}\n".encode())
    except OSError:  # only diagnostics are lost
        link.close()
        return None
    return link


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    if value is None:
        raise MoeClusterError(f"backend 'torch' needs the environment variable {name} "
                              f"(start the ranks with torchrun or moecluster's launcher)")
    try:
        return int(value)
    except ValueError as e:
        raise MoeClusterError(f"environment variable {name}={value!r} is not an integer") from e


def _init_torch(timeout_s: float, device: str) -> tuple[Comm, int]:
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size == 1:
        return SingleComm(timeout_s), 0
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        raise MoeClusterError("backend 'torch' needs MASTER_ADDR and MASTER_PORT "
                              "(start the ranks with torchrun or moecluster's launcher)")
    agent_store = None  # torchrun's agent serves the store on MASTER_PORT already
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        agent_store = f"/moecluster/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    comm = TorchComm(rank, world_size, addr, _env_int("MASTER_PORT"), timeout_s,
                     device=device, local_rank=local_rank, agent_store=agent_store)
    return comm, local_rank


def init_comm(backend: str = "mpi", timeout_s: float = 30.0, *, device: str = "cpu") -> Comm:
    """Join the job this process was started in (mpiexec, torchrun, moecluster's launcher).

    The only place that reads launcher environment variables. "single", or a job of one rank,
    gives a SingleComm. Also applies MOECLUSTER_PIN / MOECLUSTER_THREADS (_apply_cpu_settings).
    """
    if timeout_s <= 0:
        raise MoeClusterError(f"the communication timeout must be positive, got {timeout_s}")
    if backend == "single":
        comm, local_rank = SingleComm(timeout_s), 0
    elif backend == "mpi":
        comm, local_rank = _init_mpi(timeout_s)
    elif backend == "torch":
        comm, local_rank = _init_torch(timeout_s, device)
    else:
        raise MoeClusterError(f"unknown communication backend {backend!r}: "
                              f"use 'mpi', 'torch' or 'single'")
    _apply_cpu_settings(local_rank, comm.world_size)
    return comm
