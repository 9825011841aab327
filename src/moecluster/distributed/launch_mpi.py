"""The local MPI launch of `launch_local`: MPICH's forker (`mpiexec.gforker`) with a small wrapper per rank.

gforker forks the ranks on this machine and serves their PMI over inherited socketpairs: it opens no
TCP port (hydra's mpiexec listens on every interface, HYDU_sock_listen binds INADDR_ANY), and with
LOOPBACK_ENV the ranks' own UCX/libfabric listeners stay on 127.0.0.1. gforker gives a rank that
ended abnormally no exit code we can trust (a rank killed by a signal counts as 0) and answers it by
SIGINT then SIGQUIT to every other rank, so each rank runs under `_wrap_rank`, which reports the
rank's exit status to the launcher (RankLinks) and then ends normally for gforker; the launcher
applies the policy (at once, or after timeout_s with keep_survivors). Where gforker is missing (an
MPICH without it), hydra's mpiexec runs the job as before (its control port on every interface).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from moecluster.distributed.launch import (
    POLL_S,
    SCAN_S,
    _code,
    _die_with_parent_fn,
    _Job,
    describe_exit,
    watch_launcher,
)
from moecluster.errors import MoeClusterError

WRAP_RANK = "--wrap-rank"
LAUNCH_SOCKET_ENV = "MOECLUSTER_LAUNCH_SOCKET"  # RankLinks' path, read by comm._link_to_launcher
ENV_FILE_ENV = "MOECLUSTER_ENV_FILE"  # gforker: the ranks' environment, restored by _wrap_rank
# gforker refuses an environment of more than ~190 variables ("Environment is too large"): it gets only
# what starting the wrappers' Python needs; the rest travels in a private file (the API key among it).
_GFORKER_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "VIRTUAL_ENV")
_GFORKER_ENV_PREFIXES = ("PYTHON", "LD_", "LC_", "MPIEXEC_")
FINALIZE_WAIT_S = 2.0


def find_mpiexec() -> str:
    """The mpiexec next to this Python (pip's mpich wheel installs it there), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and os.access(Path(d) / "mpiexec", os.X_OK):
            return str(Path(d) / "mpiexec")
    raise MoeClusterError("backend 'mpi' needs mpiexec: pip install 'moecluster[mpi]' (mpich), or use --backend torch")


def find_gforker(mpiexec: str) -> str | None:
    """MPICH's forker process manager beside mpiexec (the mpich wheel has it), else None."""
    path = Path(mpiexec).with_name("mpiexec.gforker")
    return str(path) if os.access(path, os.X_OK) else None


class RankLinks:
    """A UNIX socket each MPI rank connects to from init_comm (MOECLUSTER_LAUNCH_SOCKET), sending
    its rank once. The kernel closes a connection when its process ends, however it ends, so the
    first rank to stop is known exactly, even when mpiexec kills the others a millisecond later.
    A rank's wrapper sends "rank returncode" when the rank has ended (`exits`).
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "ranks.sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(1024)
        self._conns: dict[socket.socket, bytes] = {}
        self.stopped: list[int] = []  # ranks in the order their processes ended
        self.exits: dict[int, int] = {}  # rank -> Popen-style returncode, in the order reported
        self.wrapped = False  # every rank's wrapper reports its end (gforker): `exits` is exact

    def wait(self, timeout_s: float) -> None:
        """Accept, read rank numbers, record closed links; returns after at most timeout_s."""
        readable, _, _ = select.select([self._server, *self._conns], [], [], timeout_s)
        for s in readable:
            if s is self._server:
                self._conns[s.accept()[0]] = b""
                continue
            try:
                data = s.recv(64)
            except OSError:
                data = b""
            if data:
                self._conns[s] += data
                continue
            words = self._conns.pop(s).decode(errors="replace").split()
            s.close()
            if words and words[0].isdigit():
                self.stopped.append(int(words[0]))
                if len(words) > 1 and words[1].lstrip("-").isdigit():
                    self.exits.setdefault(int(words[0]), int(words[1]))

    def first_stopped(self) -> int | None:
        """The rank whose process ended first. A rank's own link closes while its interpreter shuts down,
        which can take long on a busy machine: with wrappers, their reports of the process's end count."""
        ended = list(self.exits) if self.wrapped else self.stopped
        return ended[0] if ended else None

    def first_failure(self) -> tuple[int, int] | None:
        return next(((r, c) for r, c in self.exits.items() if c != 0), None)

    def close(self) -> None:
        for s in [*self._conns, self._server]:
            s.close()


def mpi_command(cmd: list[str], world_size: int, base: dict, links: RankLinks, keep_survivors: bool) -> tuple:
    """(argv, env) of the local mpiexec: gforker with a wrapper per rank, else hydra as before."""
    mpiexec = find_mpiexec()
    gforker = find_gforker(mpiexec)
    env = dict(base, **{LAUNCH_SOCKET_ENV: links.path})
    wrapped = [sys.executable, "-m", "moecluster.distributed.launch_mpi", WRAP_RANK, *cmd]
    if gforker is not None:
        env_file = os.path.join(os.path.dirname(links.path), "env.json")
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(env, f)
        small = {k: v for k, v in env.items() if k in _GFORKER_ENV or k.startswith(_GFORKER_ENV_PREFIXES)}
        links.wrapped = True
        return [gforker, "-n", str(world_size), *wrapped], dict(small, **{ENV_FILE_ENV: env_file})
    # hydra: -localhost: the proxies reach mpiexec over loopback (hydra still listens on every interface)
    if keep_survivors:  # see _wrap_rank
        return [mpiexec, "-localhost", "127.0.0.1", "-disable-auto-cleanup", "-n", str(world_size), *wrapped], env
    return [mpiexec, "-localhost", "127.0.0.1", "-n", str(world_size), *cmd], env


STDIO_ENV = "MOECLUSTER_RANK_STDIO"  # "out,err": the launcher's stdout/stderr, inherited through mpiexec


def stdio_env(out_fd: int, err_fd: int) -> dict[str, str]:
    return {STDIO_ENV: f"{out_fd},{err_fd}"}


def _launcher_stdio() -> tuple[int | None, int | None]:
    """The launcher's stdout and stderr fds passed down to this wrapper (None, None if not given)."""
    spec = os.environ.pop(STDIO_ENV, "")
    fds = [int(x) for x in spec.split(",") if x.isdigit()]
    if len(fds) != 2:
        return None, None
    try:
        for fd in fds:
            os.fstat(fd)
    except OSError:  # not inherited (a process manager that closes extra fds): keep its relay
        return None, None
    return fds[0], fds[1]


def watch_mpi(job: _Job, links: RankLinks, timeout_s: float, keep_survivors: bool) -> tuple[int, str]:
    """Wait for mpiexec; name the first rank that stopped if the job failed. Without keep_survivors a
    rank's failure stops every rank at once (as hydra does); with it the others go on, until timeout_s
    after the first rank stopped."""
    proc, deadline, told = job.popens[0], None, set()
    while proc.poll() is None:
        job.remember_descendants(SCAN_S)
        failed = links.first_failure()
        if failed is not None and not keep_survivors:
            job.stop(launchers=False)  # mpiexec relays the ranks' last output, then ends
            _wait_for(proc, 5.0)
            how = describe_exit(failed[1])
            return _code(failed[1]), f"rank {failed[0]} stopped first ({how}); every rank was stopped"
        for rank, code in links.exits.items():
            if code != 0 and rank not in told:
                told.add(rank)
                print(f"moecluster: rank {rank} {describe_exit(code)}; the others go on", file=sys.stderr, flush=True)
        if deadline is None and links.first_stopped() is not None:
            deadline = time.monotonic() + timeout_s
        if deadline is not None and time.monotonic() > deadline:
            job.stop()
            return 1, (
                f"{_first(links)}; mpiexec did not end the job within {timeout_s:.1f} s, so every rank was killed"
            )
        links.wait(POLL_S)
    links.wait(0)  # links closed just before mpiexec ended
    failed = links.first_failure()
    code = proc.returncode
    if failed is not None:
        return _code(failed[1]), f"rank {failed[0]} stopped first ({describe_exit(failed[1])})"
    if code == 0:
        return 0, ""
    who = f"; {_first(links)}" if links.first_stopped() is not None else " (see the ranks' errors above)"
    return _code(code), f"mpiexec {describe_exit(code)}{who}"


def _first(links: RankLinks) -> str:
    """'rank 1 stopped first (exited with code 3)'."""
    rank = links.first_stopped()
    code = links.exits.get(rank) if rank is not None else None
    return f"rank {rank} stopped first" + (f" ({describe_exit(code)})" if code else "")


def _wait_for(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass


def _wrap_rank(cmd: list[str]) -> int:
    """Run one MPI rank as a child; report its end to the launcher; exit with its status as a plain
    exit code (128 + N for signal N), so that a killed rank does not take the whole job down.

    gforker (MOECLUSTER_ENV_FILE set): the rank's environment comes from the launcher's file plus
    what gforker added (PMI_*); the wrapper keeps the rank's PMI socket and, once the rank has ended,
    sends PMI `finalize` for it, so that gforker sees a normal end and leaves the other ranks alone;
    its SIGINT/SIGQUIT (sent to every rank after an MPI_Abort) end the rank.

    hydra (`mpiexec -disable-auto-cleanup`): its proxy still SIGKILLs every rank as soon as it reaps
    one that a signal ended (hydra/proxy/pmip.c: WIFSIGNALED -> PMIP_bcast_signal(SIGKILL)), at the
    next event it sees. Its child is this wrapper instead, which exits normally. Only the rank's PMI
    socket (PMI_FD) is passed on, and the wrapper closes its copy, so hydra notices the rank's end
    when it happens (and sends SIGUSR1 to the survivors: MPICH's handler only asks hydra which ranks
    died; the wrapper ignores it).
    """
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # not SIG_IGN: that is inherited
    out, err = _launcher_stdio()
    env_file = os.environ.get(ENV_FILE_ENV)
    env = _rank_env(env_file) if env_file else None
    if env is not None:
        os.environ.update(env)  # watch_launcher and _report_stopped read it
    watch_launcher()
    pmi_fd = os.environ.get("PMI_FD", "")
    keep = (int(pmi_fd),) if pmi_fd.isdigit() else ()
    child = subprocess.Popen(  # dies with its wrapper
        cmd, env=env, pass_fds=keep, stdout=out, stderr=err, preexec_fn=_die_with_parent_fn()
    )
    for fd in (out, err):
        if fd is not None:
            os.close(fd)
    if env_file:  # end normally for gforker (a signalled wrapper is printed as a failure): the rank gets the signal
        signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
        signal.signal(signal.SIGQUIT, lambda signum, frame: child.kill())  # gforker's KillWorld: SIGINT, 1 s, SIGQUIT
    else:
        for fd in keep:
            os.close(fd)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:  # Ctrl-C reaches the rank too; gforker's SIGINT is followed by SIGQUIT
            continue
    rank = os.environ.get("PMI_RANK", "")
    if env_file:
        _report_stopped(rank, code)
        for fd in keep:
            _pmi_finalize(fd)
    elif code != 0:  # also a rank that ended before MPI_Init, which never linked itself: the others
        _report_stopped(rank, code)  # would wait there forever otherwise
    return code if code >= 0 else 128 - code


def _rank_env(env_file: str) -> dict[str, str]:
    """The launcher's environment for the rank, plus what the process manager added (PMI_FD, PMI_RANK ...)."""
    with open(env_file) as f:
        env = json.load(f)
    small = {k for k in env if k in _GFORKER_ENV or k.startswith(_GFORKER_ENV_PREFIXES)} | {ENV_FILE_ENV}
    added = {k: v for k, v in os.environ.items() if k not in small}
    return dict(env, **added)


def _pmi_finalize(fd: int) -> None:
    """Tell gforker that this rank finalized (a second finalize after the rank's own one is harmless)."""
    try:
        with socket.socket(fileno=fd) as s:
            s.settimeout(FINALIZE_WAIT_S)
            s.sendall(b"cmd=finalize\n")
            s.recv(256)  # cmd=finalize_ack
    except OSError:
        pass  # gforker is gone


def _report_stopped(rank: str, code: int) -> None:
    """Tell the launcher (RankLinks) that `rank` stopped and how (its own link says only when)."""
    path = os.environ.get(LAUNCH_SOCKET_ENV)
    if not path or not rank.isdigit():
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(path)
            s.sendall(f"{rank} {code}".encode())
    except OSError:
        pass  # the launcher is gone: nobody to tell


if __name__ == "__main__" and sys.argv[1:2] == [WRAP_RANK]:
    sys.exit(_wrap_rank(sys.argv[2:]))
