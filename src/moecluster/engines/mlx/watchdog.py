"""The watchdog MLX collectives lack: they never time out, so a rank whose peer died would wait forever.

Each rank starts a small helper process (pure Python; a thread would not do: MLX holds the GIL while it
evaluates, collectives included). The helpers keep a TCP link to rank 0's helper (a star beside the
collectives' own connections). The kernel closes a link when its process ends, however it ends, so rank 0's
helper learns at once which rank stopped and tells the others; every helper then prints one line naming that
rank and stops its own rank (SIGTERM, then SIGKILL). A rank that waits in one collective longer than the
timeout while every link is up (a stuck peer, a dead network) is stopped the same way. The rank tells its
helper what it waits in through a small shared memory map (no system call per collective).

With keep_rank (rank 0 of `serve`: it must stay up to answer 503 naming the rank) the helper does not stop its
rank: it writes the message into the map, where `Watchdog.failure()` reads it, and ends.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

POLL_S = 0.1
TERM_GRACE_S = 1.0
_STATE = struct.Struct("d120p")  # since (monotonic seconds, 0 = not waiting), what (Pascal string)
_FAILURE = struct.Struct("240p")  # after _STATE: the helper's failure message ("" while all is well)


class Watchdog:
    """The rank's side: starts the helper; `waiting(what)` brackets every blocking collective; `close()` at a
    clean end (so peers do not take this rank's exit for a failure)."""

    def __init__(self, rank: int, world_size: int, address: tuple[str, int], timeout_s: float, keep_rank: bool = False):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # memory-backed where there is one
        fd, path = tempfile.mkstemp(prefix="moecluster-watchdog-", dir=shm)
        os.ftruncate(fd, _STATE.size + _FAILURE.size)
        self._buf = mmap.mmap(fd, _STATE.size + _FAILURE.size)  # the helper maps the same file, then unlinks it
        os.close(fd)
        _STATE.pack_into(self._buf, 0, 0.0, b"")
        _FAILURE.pack_into(self._buf, _STATE.size, b"")
        cmd = [
            sys.executable,
            "-m",
            "moecluster.engines.mlx.watchdog",
            path,
            str(rank),
            str(world_size),
            address[0],
            str(address[1]),
            str(timeout_s),
            str(os.getpid()),
            "keep" if keep_rank else "stop",
        ]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        _STATE.pack_into(self._buf, 0, time.monotonic(), what.encode()[:119])
        try:
            yield
        finally:
            _STATE.pack_into(self._buf, 0, 0.0, b"")

    def failure(self) -> str:
        """The helper's message once a peer failed or a wait timed out ("" while all is well)."""
        if self._buf.closed:
            return ""
        return _FAILURE.unpack_from(self._buf, _STATE.size)[0].decode(errors="replace")

    def close(self) -> None:
        if self._buf.closed:
            return
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(b"bye\n")
            self._proc.stdin.close()
            # generous: killed before it passed the bye on, the helper's closed link reads as a failure to
            # the peers (seen once at load ~10 with a 5 s wait)
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
        self._buf.close()


class _Helper:
    """The helper process: links, the wait timer, and stopping the rank."""

    def __init__(
        self,
        path: str,
        rank: int,
        world_size: int,
        address: tuple[str, int],
        timeout_s: float,
        parent: int,
        keep_rank: bool,
    ):
        self.keep_rank = keep_rank
        with open(path, "r+b") as f:
            self.buf = mmap.mmap(f.fileno(), _STATE.size + _FAILURE.size)
        os.unlink(path)  # both sides hold the map: nothing is left behind however they end
        self.rank, self.world_size, self.timeout_s, self.parent = rank, world_size, timeout_s, parent
        self.links: dict[socket.socket, int] = {}  # link -> peer rank (-1 until it said hello)
        self.buffers: dict[socket.socket, bytes] = {}
        self.done: set[int] = set()  # peers that said bye
        self.server: socket.socket | None = None
        self.started = time.monotonic()
        if rank == 0:
            self.server = socket.create_server(address)
            self.server.listen(world_size)
        else:
            self.links[self._connect(address)] = 0

    def _connect(self, address: tuple[str, int]) -> socket.socket:
        while True:
            try:
                s = socket.create_connection(address, timeout=1.0)
                s.sendall(f"hello {self.rank}\n".encode())
                return s
            except OSError as e:
                # the rank may have finished (a short job) before this link was ever made: then it said bye
                # (or ended), and rank 0's watchdog may be gone already; nothing to report
                if select.select([sys.stdin], [], [], 0)[0]:
                    sys.stdin.buffer.readline()
                    os._exit(0)
                if time.monotonic() - self.started > self.timeout_s:
                    self.stop_rank(f"cannot reach rank 0's watchdog at {address[0]}:{address[1]} ({e})")
                time.sleep(POLL_S)

    def run(self) -> None:
        stdin = sys.stdin.buffer
        while True:
            socks = [*self.links, stdin] + ([self.server] if self.server else [])
            for s in select.select(socks, [], [], POLL_S)[0]:
                if s is stdin:
                    if stdin.readline().strip() == b"bye":
                        self.bye()
                    return  # EOF without bye: the rank is gone, its closed links tell the others
                if s is self.server and self.server is not None:
                    self.links[self.server.accept()[0]] = -1
                else:
                    self.read(s)
            self.check_times()

    def bye(self) -> None:
        for s in self.links:
            try:
                s.sendall(b"bye\n")
            except OSError:
                pass

    def read(self, s: socket.socket) -> None:
        try:
            data = s.recv(256)
        except OSError:
            data = b""
        peer = self.links.get(s, -1)
        if not data:
            del self.links[s]
            if peer not in self.done:
                self.fail(peer, "stopped (its watchdog link closed)")
            return
        *lines, self.buffers[s] = (self.buffers.get(s, b"") + data).split(b"\n")
        for line in lines:
            word, _, arg = line.decode(errors="replace").partition(" ")
            if word == "hello" and arg.isdigit():
                self.links[s] = int(arg)
            elif word == "bye":
                self.done.add(peer)
            elif word == "gone" and arg.lstrip("-").isdigit():
                self.fail(int(arg), "stopped (rank 0 saw its link close)")

    def check_times(self) -> None:
        now = time.monotonic()
        if (
            self.rank == 0
            and len(self.links) + len(self.done) < self.world_size - 1
            and now - self.started > self.timeout_s
        ):
            seen = set(self.links.values()) | self.done
            missing = [r for r in range(1, self.world_size) if r not in seen]
            self.fail(missing[0] if missing else -1, f"never connected within {self.timeout_s:.0f} s")
        since, what = _STATE.unpack_from(self.buf, 0)
        if since and now - since > self.timeout_s:
            others = ", ".join(str(r) for r in range(self.world_size) if r != self.rank)
            self.stop_rank(
                f"waited {now - since:.1f} s in {what.decode()} while every watchdog link is up: one "
                f"of ranks {others} is stuck or the network is down"
            )

    def fail(self, peer: int, how: str) -> None:
        if self.rank == 0:  # tell the others which rank it was
            for s in self.links:
                try:
                    s.sendall(f"gone {peer}\n".encode())
                except OSError:
                    pass
        since, what = _STATE.unpack_from(self.buf, 0)
        self.stop_rank(f"rank {peer} {how}" + (f" while this rank was in {what.decode()}" if since else ""))

    def stop_rank(self, message: str) -> None:
        _FAILURE.pack_into(self.buf, _STATE.size, message.encode()[:239])
        if self.keep_rank:  # the rank reads the message (Watchdog.failure) and reports it itself
            os._exit(3)
        print(f"moecluster: rank {self.rank}: {message}; stopping this rank", file=sys.stderr, flush=True)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.parent, sig)
            except ProcessLookupError:
                break
            time.sleep(TERM_GRACE_S)
        os._exit(3)


def _main(argv: list[str]) -> None:
    path, rank, world_size, host, port, timeout_s, parent, mode = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the rank; the helper follows via stdin EOF
    address = (host, int(port))
    _Helper(path, int(rank), int(world_size), address, float(timeout_s), int(parent), mode == "keep").run()


if __name__ == "__main__":
    _main(sys.argv[1:])
