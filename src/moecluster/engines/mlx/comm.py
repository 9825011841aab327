"""The mx.distributed group of an MLX job, and the watchdog its collectives lack.

MLX collectives never time out: a rank whose peer died may wait forever. Every rank therefore keeps a TCP
link to rank 0 (a star beside the collectives' own connections) watched by a thread. The kernel closes a
link when its process ends, however it ends, so rank 0 learns at once which rank stopped, tells the others,
and every rank prints one line naming it and exits. A rank that waits in a collective longer than the
timeout while every link is up (a stuck peer, a dead network) exits too, after `timeout_s`.

Link address: MOECLUSTER_MLX_WATCHDOG=host:port (the local launcher sets it; with `mlx.launch` pass
`--env MOECLUSTER_MLX_WATCHDOG=<rank 0 ip>:<port>`), else rank 0's first ring address with port + 1000.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx

from moecluster.errors import MoeClusterError

POLL_S = 0.1
EXIT_CODE = 3


def init_group() -> Any:
    """The job's group: ring (MLX_HOSTFILE, as written by `mlx.launch` or our launcher), jaccl
    (MLX_JACCL_COORDINATOR), else a single-rank group."""
    if os.environ.get("MLX_JACCL_COORDINATOR"):
        backend = "jaccl"
    elif os.environ.get("MLX_HOSTFILE"):
        backend = "ring"
    else:
        return mx.distributed.init()
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise MoeClusterError(f"mx.distributed could not start the {backend} backend: {e}") from None


def watchdog_address() -> tuple[str, int] | None:
    spec = os.environ.get("MOECLUSTER_MLX_WATCHDOG")
    if not spec and os.environ.get("MLX_HOSTFILE"):
        try:
            with open(os.environ["MLX_HOSTFILE"]) as f:
                host, port = json.load(f)[0][0].rsplit(":", 1)
            spec = f"{host}:{int(port) + 1000}"
        except (OSError, ValueError, IndexError, KeyError):
            spec = None
    if not spec:
        return None
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        raise MoeClusterError(f"MOECLUSTER_MLX_WATCHDOG={spec!r}: expected host:port")
    return host, int(port)


class Watchdog:
    """Star of links to rank 0 + the wait timer; `waiting(what)` brackets every blocking collective."""

    def __init__(self, rank: int, world_size: int, address: tuple[str, int], timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self._waiting: tuple[str, float] | None = None
        self._closing = False
        self._links: dict[socket.socket, int] = {}  # rank 0: link -> peer rank (-1 until it said hello)
        self._buffers: dict[socket.socket, bytes] = {}
        self._done: set[int] = set()  # ranks that said bye (a clean end, not a failure)
        self._server: socket.socket | None = None
        if rank == 0:
            self._server = socket.create_server(address, reuse_port=False)
            self._server.listen(world_size)
        else:
            self._links[self._connect(address)] = 0
        self._started = time.monotonic()
        threading.Thread(target=self._run, name="moecluster-watchdog", daemon=True).start()

    def _connect(self, address: tuple[str, int]) -> socket.socket:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                s = socket.create_connection(address, timeout=1.0)
                s.sendall(f"hello {self.rank}\n".encode())
                return s
            except OSError as e:
                if time.monotonic() > deadline:
                    raise MoeClusterError(f"rank {self.rank}: cannot reach rank 0's watchdog at "
                                          f"{address[0]}:{address[1]} within {self.timeout_s:.0f} s ({e})") from None
                time.sleep(POLL_S)

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        self._waiting = (what, time.monotonic())
        try:
            yield
        finally:
            self._waiting = None

    def close(self) -> None:
        """A clean end: say bye on every link so peers do not take our exit for a failure."""
        self._closing = True
        for s in list(self._links):
            try:
                s.sendall(b"bye\n")
                s.close()
            except OSError:
                pass

    # ---- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing:
            socks: list[socket.socket] = [*self._links] + ([self._server] if self._server else [])
            readable, _, _ = select.select(socks, [], [], POLL_S)
            for s in readable:
                if s is self._server:
                    self._links[s.accept()[0]] = -1
                else:
                    self._read(s)
            self._check_times()

    def _read(self, s: socket.socket) -> None:
        try:
            data = s.recv(256)
        except OSError:
            data = b""
        peer = self._links.get(s, -1)
        if not data:
            del self._links[s]
            if peer not in self._done and not self._closing:
                self._fail(peer, "stopped (its watchdog link closed)")
            return
        self._buffers[s] = self._buffers.get(s, b"") + data
        *lines, self._buffers[s] = self._buffers[s].split(b"\n")
        for line in lines:
            word, _, arg = line.decode(errors="replace").partition(" ")
            if word == "hello" and arg.isdigit():
                self._links[s] = int(arg)
            elif word == "bye":
                self._done.add(peer)
            elif word == "gone" and arg.isdigit():
                self._fail(int(arg), "stopped (rank 0 saw its link close)")

    def _check_times(self) -> None:
        now = time.monotonic()
        if self.rank == 0 and len(self._links) + len(self._done) < self.world_size - 1 \
                and now - self._started > self.timeout_s:
            seen = set(self._links.values()) | self._done
            missing = [r for r in range(1, self.world_size) if r not in seen]
            self._fail(missing[0] if missing else -1, f"never connected within {self.timeout_s:.0f} s")
        waiting = self._waiting
        if waiting is not None and now - waiting[1] > self.timeout_s:
            others = ", ".join(str(r) for r in range(self.world_size) if r != self.rank)
            self._exit(f"waited {now - waiting[1]:.1f} s in {waiting[0]} while every watchdog link is up: "
                       f"one of ranks {others} is stuck or the network is down")

    def _fail(self, peer: int, how: str) -> None:
        if self.rank == 0:  # tell the others which rank it was before leaving
            for s in list(self._links):
                try:
                    s.sendall(f"gone {peer}\n".encode())
                except OSError:
                    pass
        where = f" while in {self._waiting[0]}" if self._waiting else ""
        self._exit(f"rank {peer} {how}{where}")

    def _exit(self, message: str) -> None:
        print(f"moecluster: rank {self.rank}: {message}; exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_CODE)  # the main thread may be blocked inside an MLX collective: no clean way out
