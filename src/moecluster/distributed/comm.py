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

import os
import socket
import sys
import time

import torch

from moecluster.errors import MoeClusterError

EXIT_CODE_FAILED = 2  # the CLI's exit code for MoeClusterError
REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.int64)
SPIN_S = 1e-3  # busy-poll this long: the per-layer exchange stays at MPI latency
YIELD_S = 20e-3  # then poll with sched_yield; later sleep (<= MAX_SLEEP_S: ~1% of such a wait)
MAX_SLEEP_S = 2e-4
OPS = ("idle", "all_reduce", "broadcast", "barrier", "close")  # codes sent in MPI pongs


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

    def exchange_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor to fill and pass to all_reduce_disjoint. Backends may hand out the same
        storage again for the same shape (after its previous contents were consumed) to keep the
        exchange's setup off the per-layer path."""
        return torch.zeros(shape, dtype=dtype)

    def all_reduce_disjoint(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over ranks in place, when every element is non-zero on at most one rank (each
        (token, expert) pair has one holder). Backends move the raw bits (integer OR or sum, which
        cannot carry when no bits overlap), so the result is bit-exact: -0.0 and NaN payloads too."""
        return self.all_reduce_sum(x)

    def barrier(self) -> None:
        """Wait until every rank has called barrier (with the timeout)."""
        raise NotImplementedError

    def close(self) -> None:
        """Leave cleanly: a last barrier (a stuck peer is named, not waited for), then free."""

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """Send bytes (e.g. utf-8 JSON) from src to every rank: the length, then the payload."""
        if self.rank == src and data is None:
            raise ValueError("broadcast_bytes: the source rank must pass bytes, not None")
        n_1 = torch.tensor([len(data or b"") if self.rank == src else 0], dtype=torch.int64)
        num_bytes = int(self.broadcast(n_1, src)[0])
        if num_bytes == 0:
            return b""
        if self.rank == src:
            buf_N = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8)
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


def missing_message(what: str, timeout_s: float, missing: list[int], notes: list[str], error: str = "") -> str:
    """The CommError text: which ranks did not join `what`, and what the others were doing."""
    if missing and error:
        msg = f"{_ranks(missing)} did not join {what} ({error}; it may have died)"
    elif missing:
        msg = f"{_ranks(missing)} did not join {what} within {timeout_s:.1f} s (it may have died or hung)"
    elif error:
        msg = f"{what} failed: {error}"
    else:
        msg = f"{what} did not complete within {timeout_s:.1f} s although every rank is in it"
    return "; ".join([msg, *notes, "stopping"])


def _waiting_note(ranks: list[int]) -> list[str]:
    ranks = sorted(ranks)
    return [f"{_ranks(ranks)} {'is' if len(ranks) == 1 else 'are'} waiting in it"] if ranks else []


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


CPU_NOTE = [""]  # what _apply_cpu_settings chose, for the ranks' load summary line


def _apply_cpu_settings(local_rank: int, local_size: int, world_size: int) -> None:
    """Threads and pinning of one rank among local_size ranks on this host (of world_size in the job).

    Ranks sharing a host split its cores: cores // local_size intra-op threads each, and with
    MOECLUSTER_PIN=1 (the local launcher sets it when N <= cores) each is pinned to its own block of
    cores. One rank per host is never pinned and uses every core. MOECLUSTER_THREADS overrides the
    thread count. A one-rank job keeps torch's default."""
    has_affinity = hasattr(os, "sched_getaffinity")  # absent on macOS
    cores = sorted(os.sched_getaffinity(0)) if has_affinity else list(range(os.cpu_count() or 1))
    share = max(1, len(cores) // max(1, local_size))
    pinned = ""
    if os.environ.get("MOECLUSTER_PIN") == "1" and local_size > 1 and has_affinity:
        start = (local_rank * share) % len(cores)
        block = cores[start : start + share]
        os.sched_setaffinity(0, set(block))
        pinned = f", pinned to core{'s' if len(block) > 1 else ''} {','.join(map(str, block))}"
    threads = os.environ.get("MOECLUSTER_THREADS")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise MoeClusterError(f"MOECLUSTER_THREADS must be a positive integer, got {threads!r}")
        torch.set_num_threads(int(threads))
    elif world_size > 1:
        torch.set_num_threads(share)
    n = torch.get_num_threads()
    CPU_NOTE[0] = (
        f"{n} thread{'s' if n > 1 else ''}{pinned} ({local_size} rank{'s' if local_size > 1 else ''} on this host)"
    )


def _init_mpi(timeout_s: float) -> tuple[Comm, int, int]:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MoeClusterError(
            "backend 'mpi' needs mpi4py and an MPI library: pip install "
            "'moecluster[mpi]' (mpi4py + mpich), or use --backend torch"
        ) from e
    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        return SingleComm(timeout_s), 0, 1
    node_comm = world.Split_type(MPI.COMM_TYPE_SHARED)  # ranks on this host -> local rank and count
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    from moecluster.distributed.comm_mpi import MPIComm

    comm = MPIComm(world, timeout_s)
    comm.launcher_link = _link_to_launcher(comm.rank)
    return comm, local_rank, local_size


def _link_to_launcher(rank: int) -> socket.socket | None:
    """Under moecluster's launcher: connect and send our rank; the kernel closes the link when
    this process ends, which tells the launcher which rank stopped first (launch_mpi.RankLinks)."""
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
        raise MoeClusterError(
            f"backend 'torch' needs the environment variable {name} "
            f"(start the ranks with torchrun or moecluster's launcher)"
        )
    try:
        return int(value)
    except ValueError as e:
        raise MoeClusterError(f"environment variable {name}={value!r} is not an integer") from e


def _init_torch(timeout_s: float, device: str) -> tuple[Comm, int, int]:
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size == 1:
        return SingleComm(timeout_s), 0, 1
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    local_size = _env_int("LOCAL_WORLD_SIZE", 1)  # torchrun and moecluster's launcher set it
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        raise MoeClusterError(
            "backend 'torch' needs MASTER_ADDR and MASTER_PORT (start the ranks with torchrun or moecluster's launcher)"
        )
    agent_store = None  # torchrun's agent serves the store on MASTER_PORT already
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        agent_store = f"/moecluster/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    from moecluster.distributed.comm_torch import TorchComm

    comm = TorchComm(
        rank,
        world_size,
        addr,
        _env_int("MASTER_PORT"),
        timeout_s,
        device=device,
        local_rank=local_rank,
        agent_store=agent_store,
    )
    return comm, local_rank, local_size


def use_interface(iface: str) -> None:
    """Route the backends' traffic over one network interface (set before MPI or gloo starts)."""
    for name in ("UCX_NET_DEVICES", "FI_TCP_IFACE", "FI_SOCKETS_IFACE", "GLOO_SOCKET_IFNAME"):
        os.environ[name] = iface


def init_comm(backend: str = "mpi", timeout_s: float = 30.0, *, device: str = "cpu", iface: str | None = None) -> Comm:
    """Join the job this process was started in (mpiexec, torchrun, moecluster's launcher).

    The only place that reads launcher environment variables. "single", or a job of one rank,
    gives a SingleComm. Also applies MOECLUSTER_PIN / MOECLUSTER_THREADS (_apply_cpu_settings).
    """
    if timeout_s <= 0:
        raise MoeClusterError(f"the communication timeout must be positive, got {timeout_s}")
    from moecluster.distributed.launch import watch_launcher

    watch_launcher()  # under moecluster's launcher: end with it, however it ends
    if iface:
        use_interface(iface)
    if backend == "single":
        comm, local_rank, local_size = SingleComm(timeout_s), 0, 1
    elif backend == "mpi":
        comm, local_rank, local_size = _init_mpi(timeout_s)
    elif backend == "torch":
        comm, local_rank, local_size = _init_torch(timeout_s, device)
    else:
        raise MoeClusterError(f"unknown communication backend {backend!r}: use 'mpi', 'torch' or 'single'")
    _apply_cpu_settings(local_rank, local_size, comm.world_size)
    return comm
