"""MPIComm: collectives over mpi4py with deadlines, a control communicator naming missing ranks.

Legend: W world size (ranks), N values.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time

import numpy as np
import torch

from moecluster.distributed.comm import (
    EXIT_CODE_FAILED,
    MAX_SLEEP_S,
    OPS,
    REDUCE_DTYPES,
    SPIN_S,
    YIELD_S,
    Comm,
    CommError,
    _waiting_note,
    missing_message,
)

_TAG_PING, _TAG_PONG = 7001, 7002
_MPICH_BFLOAT16 = 0x4C00024C  # MPIX_BFLOAT16 in MPICH's mpi.h (ABI-stable builtin handle)
NATIVE_BF16_MAX_BYTES = 12 * 1024  # above this MPICH's bf16 SUM loop is slower than our op
EXCHANGE_PERSISTENT_MAX_BYTES = 256 * 1024  # decode and small batches; prefill-sized exchanges are not kept
EXCHANGE_PERSISTENT_MAX_COUNT = 32


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
        MPI.SUM.Reduce_local(
            [MPI.buffer.fromaddress(a_2.data_ptr(), 4), dtype], [MPI.buffer.fromaddress(b_2.data_ptr(), 4), dtype]
        )
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
    launcher_link: socket.socket | None = None  # held open for the local launcher (comm._link_to_launcher)

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
        # exchange buffers by (shape, dtype), each with a persistent all-reduce (MPI_Allreduce_init),
        # created lazily at first use: every rank exchanges the same shapes in the same order, so the
        # collective init calls match. A persistent request skips building the collective's schedule
        # per call; right after a layer's expert weights have streamed through the caches that is
        # the difference between ~55 and ~80 us here (benchmarks/allreduce.py, cold rows).
        self._exchange: dict[tuple, list] = {}
        self._bits_types = {2: MPI.INT16_T, 4: MPI.INT32_T, 8: MPI.INT64_T}

    @property
    def bf16_mode(self) -> str:
        return self._bf16_mode

    @bf16_mode.setter
    def bf16_mode(self, mode: str) -> None:
        if mode not in ("auto", "native", "op", "fp32"):
            raise ValueError(f"bf16_mode must be auto, native, op or fp32, got {mode!r}")
        if mode == "native" and self._bf16_native is None:
            raise CommError(
                f"this MPI ({self._MPI.Get_library_version().splitlines()[0]}) "
                f"cannot sum bf16 natively: use bf16_mode 'op' or 'fp32'"
            )
        MPI, unlimited = self._MPI, sys.maxsize
        # dtype -> (MPI type, largest message for the fast path); others go _all_reduce_other.
        self._sum_types = {
            torch.float32: (MPI.FLOAT, unlimited),
            torch.float64: (MPI.DOUBLE, unlimited),
            torch.int64: (MPI.INT64_T, unlimited),
        }
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

    def exchange_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        entry = self._exchange.get(key)
        if entry is None:
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if nbytes > EXCHANGE_PERSISTENT_MAX_BYTES or len(self._exchange) >= EXCHANGE_PERSISTENT_MAX_COUNT:
                return torch.zeros(shape, dtype=dtype)
            entry = self._exchange[key] = [torch.zeros(shape, dtype=dtype), None]
            return entry[0]
        return entry[0].zero_()

    def all_reduce_disjoint(self, x: torch.Tensor) -> torch.Tensor:
        """Bitwise OR of the raw bits: each element is non-zero on one rank at most, so this is the
        exact sum (also for -0.0), done by MPI's built-in integer op instead of a bf16 reduction."""
        mpi_type = self._bits_types.get(x.element_size())
        if mpi_type is None or self.failed or not x.is_cpu or not x.is_contiguous() or x.dtype not in REDUCE_DTYPES:
            return self.all_reduce_sum(x)
        if not x.numel():
            return x
        MPI = self._MPI
        entry = self._exchange.get((tuple(x.shape), x.dtype))
        if entry is not None and entry[0].data_ptr() == x.data_ptr():
            if entry[1] is None:
                buf = [MPI.buffer.fromaddress(x.data_ptr(), x.nbytes), mpi_type]
                entry[1] = self._comm.Allreduce_init(MPI.IN_PLACE, buf, MPI.BOR)
            req = entry[1]
            req.Start()
            self._wait(req, 1)
            return x
        buf = [MPI.buffer.fromaddress(x.data_ptr(), x.nbytes), mpi_type]
        self._wait(self._comm.Iallreduce(MPI.IN_PLACE, buf, MPI.BOR), 1)
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
        for _, req in self._exchange.values():
            if req is not None:
                req.Free()
        self._exchange = {}

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
            self._fail(f"{OPS[op_code]} (collective #{self._num_ops}) failed: {e.Get_error_string()}; stopping")

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
        return missing_message(f"{OPS[op_code]} (collective #{num})", self.timeout_s, missing, notes)
