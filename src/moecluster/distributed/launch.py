"""Start N local ranks (MPI via MPICH's gforker, or torch.distributed env), watch them, leave nothing behind.

Multi-host jobs use the standard launchers instead (see README): `mpiexec -hosts a,b -n 2 CMD` or
`torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr A --master-port P -m ...`;
the ranks join them through `comm.init_comm`.

If a rank exits non-zero or is killed, the others get `timeout_s` to stop on their own (their
collectives time out and name the missing rank), then their whole process groups are killed (MPI
without keep_survivors: at once, see launch_mpi).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from moecluster.errors import MoeClusterError

LAUNCHER_PID_ENV = "MOECLUSTER_LAUNCHER_PID"  # "pid:start time" of the launcher, for watch_launcher
LOOPBACK_ENV = {  # a one-machine job talks over loopback only, whatever MPI transport is built in
    "UCX_NET_DEVICES": "lo",
    "FI_TCP_IFACE": "lo",
    "FI_SOCKETS_IFACE": "lo",
    "MPIR_CVAR_CH3_INTERFACE_HOSTNAME": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
}
WATCH_S = 0.5  # how often a rank checks that its launcher is alive
POLL_S = 0.02
SCAN_S = 0.5  # between scans of the process tree (each costs ~1.5 ms of CPU the ranks may need)
TERM_GRACE_S = 2.0  # after SIGTERM, before SIGKILL


class _Terminated(Exception):
    """The launcher itself received SIGTERM."""


PROGRESS_DIR_ENV = "MOECLUSTER_PROGRESS_DIR"  # read by checkpoint_io.LoadProgress


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    """'exited with code 3' / 'was killed by signal 9 (SIGKILL)' from a Popen returncode."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


def _die_with_parent_fn() -> Callable[[], None] | None:
    """A preexec_fn: the kernel SIGKILLs the child when its parent dies, even by SIGKILL
    (PR_SET_PDEATHSIG, kept across exec). prctl is looked up here, in the parent: between fork and
    exec the child only calls it (no import, no lock). Deeper descendants run watch_launcher.
    None off Linux (macOS has no prctl): there the ranks' watch_launcher alone ends them."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1

    def set_pdeathsig() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return set_pdeathsig


def _launcher_id() -> str:
    return f"{os.getpid()}:{psutil.Process().create_time()}"


def watch_launcher() -> None:
    """Under moecluster's launcher: a daemon thread that ends this process (SIGKILL: at once, ports
    freed) when the launcher is gone however it ended, so that no rank outlives it."""
    spec = os.environ.get(LAUNCHER_PID_ENV, "")
    pid, _, started = spec.partition(":")
    if not pid.isdigit():
        return

    def alive() -> bool:
        try:
            return f"{psutil.Process(int(pid)).create_time()}" == started
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(WATCH_S)
        os.kill(os.getpid(), signal.SIGKILL)

    import threading

    threading.Thread(target=watch, name="moecluster-launcher-watch", daemon=True).start()


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_procs(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            if p.is_running():
                p.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


class _Job:
    """Processes of one launch: top-level Popens (each leads its own process group)."""

    def __init__(self, popens: list[subprocess.Popen]) -> None:
        self.popens = popens
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever seen, by pid
        self._next_scan = 0.0

    def remember_descendants(self, every_s: float = 0.0) -> None:
        """Record the tree (at most once per every_s), so orphans can still be found and killed."""
        now = time.monotonic()
        if every_s and now < self._next_scan:
            return
        self._next_scan = now + every_s
        for p in self.popens:
            try:
                for child in psutil.Process(p.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass

    def stop(self, launchers: bool = True) -> None:
        """SIGTERM every group and known descendant, wait a little, then SIGKILL what is left.
        launchers=False: only the descendants of the top-level processes (mpiexec may then relay
        the ranks' last output and end by itself)."""
        self.remember_descendants()
        alive = [p for p in self.popens if p.poll() is None] if launchers else []
        tops = self.popens if launchers else []
        for p in tops:
            _kill_group(p.pid, signal.SIGTERM)
        _kill_procs(list(self.seen.values()), signal.SIGTERM)
        deadline = time.monotonic() + (TERM_GRACE_S if alive or self.seen else 0)
        while time.monotonic() < deadline and (
            any(p.poll() is None for p in tops) or any(_running(q) for q in self.seen.values())
        ):
            time.sleep(POLL_S)
        for p in tops:
            _kill_group(p.pid, signal.SIGKILL)
        _kill_procs(list(self.seen.values()), signal.SIGKILL)
        for p in tops:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _rank_env(base: dict, rank: int, world_size: int, port: int) -> dict:
    env = dict(base)
    env.update(
        RANK=str(rank),
        MLX_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    return env


def _mlx_hostfile(directory: str, world_size: int) -> str:
    """Write MLX's ring hostfile (JSON: per rank a list of "ip:port" it listens on); returns its path."""
    path = os.path.join(directory, "mlx-hosts.json")
    Path(path).write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(world_size)]))
    return path


def _watch_torch(job: _Job, timeout_s: float, lead: bool = False) -> tuple[int, str]:
    """Wait for N rank processes; return (exit code, one line naming the first failed rank).
    lead: the job is rank 0's (`serve`): another rank's end is reported and the others go on (they may
    re-form without it); rank 0's end, however it ends, gives the others timeout_s to end too."""
    first: tuple[int, int] | None = None
    deadline, reported = None, set()
    while True:
        codes = [p.poll() for p in job.popens]
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if lead and codes[0] is None:
            for r, c in bad:
                if r not in reported:
                    reported.add(r)
                    print(f"moecluster: rank {r} {describe_exit(c)}; the others go on", file=sys.stderr, flush=True)
        if first is None and bad and (not lead or bad[0][0] == 0):
            first = bad[0]
        if deadline is None and (codes[0] is not None if lead else first is not None):
            deadline = time.monotonic() + timeout_s
        if all(c is not None for c in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            left = [r for r, c in enumerate(codes) if c is None]
            job.stop()
            was = "was" if len(left) == 1 else "were"
            what = f"rank {first[0]} {describe_exit(first[1])}" if first else "rank 0 ended"
            return _code(first[1]) if first else 0, (
                f"{what}; {_plural(left)} {was} still running {timeout_s:.1f} s later and {was} killed"
            )
        job.remember_descendants(SCAN_S)
        time.sleep(POLL_S)
    if first is None:
        return 0, ""
    return _code(first[1]), f"rank {first[0]} {describe_exit(first[1])}"


def _code(returncode: int) -> int:
    """A process exit code for a Popen returncode (-N for signal N -> 128 + N, as shells do)."""
    return returncode if returncode > 0 else 128 - returncode


def _plural(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def launch_local(
    cmd: list[str],
    world_size: int,
    backend: str,
    *,
    pin: bool = True,
    timeout_s: float = 30.0,
    env: dict | None = None,
    keep_survivors: bool = False,
) -> int:
    """Run `cmd` as world_size local ranks of one job; 0 if every rank succeeded.

    backend "mpi": `mpiexec.gforker -n N cmd` (each rank under launch_mpi._wrap_rank); "torch": N
    processes with RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT; "mlx": the same plus MLX_RANK and MLX_HOSTFILE (MLX's ring backend on
    127.0.0.1); "single": cmd once. MOECLUSTER_PIN=1 when pin and N <= cores.
    stdout/stderr are inherited; on failure one line on stderr names the rank and how it ended.

    keep_survivors (mpi; torch ranks always stay): when a rank dies, leave the others running
    (`moecluster serve`: rank 0 answers 503 until it gives up); without it an MPI rank's failure
    stops every rank at once. MPI runs under MPICH's gforker (nothing listens beyond loopback; see
    launch_mpi), or hydra's mpiexec where gforker is missing.
    Either way every rank is killed timeout_s after the first one stopped, and on SIGTERM/Ctrl-C.
    """
    if world_size < 1:
        raise MoeClusterError(f"the number of ranks must be >= 1, got {world_size}")
    if backend not in ("mpi", "torch", "single", "mlx"):
        raise MoeClusterError(f"unknown backend {backend!r}: use 'mpi', 'torch', 'mlx' or 'single'")
    if backend == "single" and world_size != 1:
        raise MoeClusterError("backend 'single' runs one rank: use 'mpi' or 'torch' for more")
    base = dict(LOOPBACK_ENV, **os.environ, **(env or {}))  # the user's own settings win
    base[LAUNCHER_PID_ENV] = _launcher_id()
    if pin and hasattr(os, "sched_getaffinity") and world_size <= len(os.sched_getaffinity(0)):  # macOS: no pinning
        base["MOECLUSTER_PIN"] = "1"
    popen: dict[str, Any] = dict(
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # own group: killable whole
        preexec_fn=_die_with_parent_fn(),
    )
    # ranks share their load progress here, for rank 0's progress line (checkpoint_io.LoadProgress)
    progress_dir = tempfile.mkdtemp(prefix="moecluster-progress-") if world_size > 1 else ""
    if progress_dir:
        base[PROGRESS_DIR_ENV] = progress_dir
    previous = _install_sigterm()
    job, links, tmp = _Job([]), None, ""
    try:
        if backend == "mpi":
            from moecluster.distributed import launch_mpi

            tmp = tempfile.mkdtemp(prefix="moecluster-")
            links = launch_mpi.RankLinks(tmp)
            full, mpi_env = launch_mpi.mpi_command(cmd, world_size, base, links, keep_survivors)
            # gforker's ranks write to our stdout/stderr directly: its relay cuts a rank's output at its first
            # non-ASCII byte (and the rank then fails on a broken pipe). hydra relays whole output and its proxy
            # does not keep our fds (their numbers could name another file in the wrapper).
            stdio = (os.dup(1), os.dup(2)) if links.wrapped else ()
            try:
                if stdio:
                    mpi_env = dict(mpi_env, **launch_mpi.stdio_env(*stdio))
                job.popens = [subprocess.Popen(full, env=mpi_env, pass_fds=stdio, **popen)]
            finally:
                for fd in stdio:
                    os.close(fd)
            code, line = launch_mpi.watch_mpi(job, links, timeout_s, keep_survivors)
        else:
            port = free_port()
            if backend == "mlx":  # MLX's ring backend: a hostfile of one listening address per rank
                tmp = tempfile.mkdtemp(prefix="moecluster-")
                base = dict(base, MLX_HOSTFILE=_mlx_hostfile(tmp, world_size))
            job.popens = [
                subprocess.Popen(cmd, env=_rank_env(base, r, world_size, port), **popen) for r in range(world_size)
            ]
            code, line = _watch_torch(job, timeout_s, lead=keep_survivors)
    except _Terminated:
        code, line = 128 + signal.SIGTERM, "launcher received SIGTERM; stopped every rank"
    finally:
        job.stop()  # also on KeyboardInterrupt: nothing is left behind
        _restore_sigterm(previous)
        if links is not None:
            links.close()
        for directory in (tmp, progress_dir):
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
    if line:
        print(f"moecluster: {line}", file=sys.stderr, flush=True)
    return code


def _install_sigterm():
    def handler(signum, frame):
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
