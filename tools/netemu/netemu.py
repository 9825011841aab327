"""Emulated network links on one machine: two network namespaces joined by a userspace TAP forwarder
that adds a fixed one-way delay (this kernel has no `tc netem`; see docs/design.md).
A repository tool (not in the wheel): import it with tools/netemu on sys.path.

    with EmulatedLink(delay_us=50) as link:
        subprocess.run(link.netns_cmd(1, ["python", "server.py"]))   # runs in namespace 1
        link.addr(0)                                                  # "10.231.0.1"

Every frame crossing the link is held `delay_us` by the forwarder (a small C program compiled
here with the system gcc, cached), so round trips grow by exactly 2 x delay. The forwarder runs
SCHED_FIFO with 1 ns timer slack, so busy cores do not make it late, and dies with its parent.
Namespaces are named `mcemu<pid>h<i>`: `cleanup_leftovers()` deletes those whose creating
process is gone; `close()` (also run at exit) deletes this process's own. Needs root.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moecluster.errors import MoeClusterError

PREFIX = "mcemu"
SUBNET = "10.231.0."
TAP = "mcemutap"
MTU = 1500
START_TIMEOUT_S = 10.0
C_SOURCE = Path(__file__).with_name("netemu_fwd.c")
_LIVE: list[EmulatedLink] = []


def require_root() -> None:
    """Raise (with what to do) unless this process may create namespaces and TAP devices."""
    if os.geteuid() != 0:
        raise MoeClusterError(
            "emulated links need root (network namespaces and TAP devices); "
            "run as root, e.g. sudo -E .venv/bin/python ..."
        )
    if not os.path.exists("/dev/net/tun"):
        raise MoeClusterError("/dev/net/tun is missing: load the tun module (modprobe tun)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS`; with check, a failure raises with ip's message."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise MoeClusterError(f"ip {' '.join(args)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of existing network namespaces that start with `prefix`."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def cleanup_leftovers() -> list[str]:
    """Delete namespaces left by EmulatedLinks whose process is gone (crash, SIGKILL); their names."""
    removed = []
    for name in list_namespaces():
        pid_part = name[len(PREFIX) :].split("h")[0]
        if pid_part.isdigit() and not _pid_alive(int(pid_part)):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


def forwarder_binary() -> Path:
    """Compile netemu_fwd.c once per source version (cached under ~/.cache/moecluster)."""
    src = C_SOURCE.read_bytes()
    root = Path(os.environ.get("MOECLUSTER_CACHE", Path.home() / ".cache" / "moecluster"))
    exe = root / f"netemu-fwd-{hashlib.sha256(src).hexdigest()[:12]}"
    if exe.exists():
        return exe
    root.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(f".tmp{os.getpid()}")
    try:
        res = subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", str(tmp), str(C_SOURCE)], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise MoeClusterError("emulated links need a C compiler: install gcc (apt-get install gcc)") from None
    if res.returncode != 0:
        raise MoeClusterError(f"compiling the TAP forwarder failed:\n{res.stderr}")
    os.replace(tmp, exe)
    return exe


class EmulatedLink:
    """Two namespaces (hosts 0 and 1, addresses 10.231.0.1 and .2) joined with `delay_us` one way."""

    def __init__(self, delay_us: float = 0.0, tag: str = "") -> None:
        if delay_us < 0:
            raise MoeClusterError(f"link delay must be >= 0 us, got {delay_us}")
        self.delay_us = float(delay_us)
        self.names = [f"{PREFIX}{os.getpid()}h{i}{tag}" for i in range(2)]
        self.forwarder: subprocess.Popen | None = None
        self.scheduling = ""
        self.report = ""  # the forwarder's last words: frames sent, dropped, lateness

    def __enter__(self) -> EmulatedLink:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def addr(self, host: int) -> str:
        return f"{SUBNET}{host + 1}"

    def netns_cmd(self, host: int, cmd: list[str]) -> list[str]:
        """`cmd` prefixed to run inside host's namespace."""
        return ["ip", "netns", "exec", self.names[host], *cmd]

    def open(self) -> None:
        """Create the namespaces, start the forwarder, configure the taps; undone on any error."""
        require_root()
        cleanup_leftovers()
        exe = forwarder_binary()
        _LIVE.append(self)
        try:
            for name in self.names:
                _ip("netns", "add", name)
            paths = [f"/var/run/netns/{n}" for n in self.names]
            self.forwarder = subprocess.Popen(
                [str(exe), *paths, TAP, str(int(self.delay_us * 1000))],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.scheduling = self._wait_ready()
            for i, name in enumerate(self.names):
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "link", "set", TAP, "mtu", str(MTU), "up")
                _ip("-n", name, "addr", "add", f"{self.addr(i)}/24", "dev", TAP)
                _ip("-n", name, "neigh", "flush", "all")
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> str:
        assert self.forwarder is not None and self.forwarder.stdout is not None
        ready, _, _ = select.select([self.forwarder.stdout], [], [], START_TIMEOUT_S)
        line = self.forwarder.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            err = self.forwarder.stderr.read() if self.forwarder.poll() is not None else "no answer"
            raise MoeClusterError(f"the TAP forwarder did not start within {START_TIMEOUT_S:.0f} s: {err.strip()}")
        return line.split()[1] if len(line.split()) > 1 else ""

    def close(self) -> None:
        """Stop the forwarder (its taps vanish with it) and delete both namespaces. Idempotent."""
        if self.forwarder is not None:
            if self.forwarder.poll() is None:
                self.forwarder.terminate()
                try:
                    self.forwarder.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.forwarder.kill()
                    self.forwarder.wait(timeout=5)
            self.report = self.forwarder.stderr.read().strip() if self.forwarder.stderr else ""
            for stream in (self.forwarder.stdout, self.forwarder.stderr):
                if stream is not None:
                    stream.close()
            self.forwarder = None
        for name in self.names:
            if name in list_namespaces():
                _ip("netns", "delete", name, check=False)
        if self in _LIVE:
            _LIVE.remove(self)

    # -- running the ranks of one job on the two hosts ------------------------------------------

    def mpi_command(self, cmd: list[str], workdir: str | Path) -> list[str]:
        """mpiexec (run in host 0) starting rank r of `cmd` in host r, pinned to core r.

        Hydra reaches host 1 through an "ssh" launcher that is `ip netns exec` (a script written
        to workdir); the ranks talk over the link because UCX is limited to TCP (MPI_ENV).
        """
        from moecluster.distributed.launch_mpi import find_mpiexec

        script = Path(workdir) / "netns-launcher.sh"
        cases = "\n".join(f"  {self.addr(i)}) ns={self.names[i]} ;;" for i in range(2))
        script.write_text(LAUNCHER.format(cases=cases))
        script.chmod(0o755)
        pin = ["sh", "-c", 'exec taskset -c "$((PMI_RANK % $(nproc)))" "$@"', "pin"]
        return self.netns_cmd(
            0,
            [
                find_mpiexec(),
                "-launcher",
                "ssh",
                "-launcher-exec",
                str(script),
                "-hosts",
                f"{self.addr(0)},{self.addr(1)}",
                "-localhost",
                self.addr(0),
                "-n",
                "2",
                "-ppn",
                "1",
                *pin,
                *cmd,
            ],
        )

    def torch_commands(self, cmd: list[str], port: int = 29731) -> list[tuple[list[str], dict]]:
        """(argv, extra env) of rank 0 and rank 1 for torch.distributed over the link, pinned."""
        env = {"WORLD_SIZE": "2", "MASTER_ADDR": self.addr(0), "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": TAP}
        return [(self.netns_cmd(r, _taskset(r) + cmd), {**env, "RANK": str(r), "LOCAL_RANK": "0"}) for r in range(2)]


LAUNCHER = """#!/bin/sh
# hydra "ssh" launcher for emulated hosts: [-x] HOST COMMAND -> COMMAND in HOST's namespace
[ "$1" = "-x" ] && shift
host=$1; shift
case "$host" in
{cases}
  *) echo "netemu launcher: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" sh -c "$*"
"""
MPI_ENV = {"UCX_TLS": "tcp,self", "UCX_RNDV_THRESH": "inf"}  # over the link; eager (1 latency/message)


def run_job(jobs: list[tuple[list[str], dict]], timeout_s: float) -> int:
    """Run processes (argv, extra env) together; 0 if all succeed. On the first failure or the
    timeout every process group is killed, so nothing is left behind."""
    procs = [
        subprocess.Popen(argv, env={**os.environ, **env}, start_new_session=True, stdin=subprocess.DEVNULL)
        for argv, env in jobs
    ]
    deadline, code = time.monotonic() + timeout_s, 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                code = failed[0] if failed else 124
                if not failed:
                    print(f"netemu: job did not finish within {timeout_s:.0f} s; killing it", file=sys.stderr)
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p.pid)
        for p in procs:
            p.wait(timeout=10)
    return code or next((p.returncode for p in procs if p.returncode), 0)


def _kill_tree(pid: int) -> None:
    """SIGTERM, then SIGKILL, the process group of `pid` and every descendant (hydra proxies)."""
    import signal

    import psutil

    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in tree:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=2)
        if not alive:
            return


@atexit.register
def _close_all() -> None:
    for link in list(_LIVE):
        link.close()


# -- measuring the link: a TCP ping-pong between the two namespaces --------------------------------

PING_PORT = 47631


def pingpong_server(port: int = PING_PORT, size: int = 64) -> None:
    """Echo `size`-byte messages on one TCP connection (run inside a namespace)."""
    with socket.create_server(("0.0.0.0", port), reuse_port=False) as srv:
        srv.settimeout(20)
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(20)
            while True:
                data = _recv_exact(conn, size)
                if not data:
                    return
                conn.sendall(data)


def pingpong_client(host: str, port: int = PING_PORT, rounds: int = 2000, size: int = 64) -> list[float]:
    """Round-trip seconds of `rounds` ping-pongs (after 100 warm-up rounds)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg, rtts = b"x" * size, []
        for i in range(rounds + 100):
            t0 = time.perf_counter()
            conn.sendall(msg)
            _recv_exact(conn, size)
            if i >= 100:
                rtts.append(time.perf_counter() - t0)
    return rtts


def _recv_exact(conn: socket.socket, size: int, timeout_s: float = 20.0) -> bytes:
    """Busy-poll for `size` bytes (b"" when the peer closed): a sleeping receiver would add its
    wake-up latency (tens of us on a virtual machine) to the link's; MPI ranks busy-poll too."""
    buf, deadline = b"", time.monotonic() + timeout_s
    while len(buf) < size:
        try:
            chunk = conn.recv(size - len(buf), socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer over the emulated link within {timeout_s:.0f} s") from None
            continue
        if not chunk:
            return b""
        buf += chunk
    return buf


def measure_rtt(link: EmulatedLink, rounds: int = 2000) -> dict:
    """TCP round trip host 0 -> host 1 -> host 0 over the link (host i on core i): median/p10/p90 us."""
    server = _python_in(link, 1, "netemu.pingpong_server()")
    client = _python_in(link, 0, f"print(json.dumps(netemu.pingpong_client({link.addr(1)!r}, rounds={rounds})))")
    srv = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        res = subprocess.run(client, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise MoeClusterError(f"TCP ping-pong over the emulated link failed: {res.stderr.strip()[-500:]}")
        rtts = sorted(json.loads(res.stdout.strip().splitlines()[-1]))
    finally:
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait(timeout=5)
    us = [r * 1e6 for r in rtts]
    return {
        "median_us": statistics.median(us),
        "p10_us": us[len(us) // 10],
        "p90_us": us[len(us) * 9 // 10],
        "min_us": us[0],
        "rounds": len(us),
    }


def _python_in(link: EmulatedLink, host: int, call: str) -> list[str]:
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import netemu; {call}"
    return link.netns_cmd(host, _taskset(host) + [sys.executable, "-c", code])


def _taskset(core: int | None) -> list[str]:
    cores = sorted(os.sched_getaffinity(0))
    return [] if core is None or len(cores) < 2 else ["taskset", "-c", str(cores[core % len(cores)])]
