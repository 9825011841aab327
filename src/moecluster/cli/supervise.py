"""`moecluster serve --restart N`: run the whole job as a child and start it again when it fails.

The child is the same command without --restart (for --nodes > 1: the local launcher, which starts and
stops every rank). It dies with the supervisor however the supervisor dies (PR_SET_PDEATHSIG), and
SIGTERM / Ctrl-C of the supervisor is passed on. A clean exit (0) or a signal to stop ends supervision;
any other end restarts the job after a backoff (1, 2, 4 ... s, at most BACKOFF_MAX_S), at most N times.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from moecluster.errors import MoeClusterError

BACKOFF_MAX_S = 30.0
SUPERVISED_ENV = "MOECLUSTER_SUPERVISED"  # set in the child: it must not supervise itself again


def without_restart(argv: list[str]) -> list[str]:
    """argv without --restart N / --restart=N."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--restart":
            skip = True
        elif not a.startswith("--restart="):
            out.append(a)
    return out


def supervise(cmd: list[str], max_restarts: int, env: dict | None = None, first_backoff_s: float = 1.0) -> int:
    """Run cmd until it exits 0 or is told to stop; restart it at most max_restarts times; its last exit code."""
    if max_restarts < 0:
        raise MoeClusterError(f"--restart must be >= 0, got {max_restarts}")
    from moecluster.distributed.launch import _die_with_parent_fn, describe_exit

    child_env = dict(os.environ, **(env or {}), **{SUPERVISED_ENV: "1"})
    stopping: list[int] = []
    child: subprocess.Popen | None = None

    def stop(signum, frame) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for attempt in range(max_restarts + 1):
            child = subprocess.Popen(cmd, env=child_env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent_fn())
            code = _wait(child)
            if code == 0 or stopping:
                return 0 if stopping and code in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else _exit_code(code)
            if attempt == max_restarts:
                print(
                    f"moecluster: supervisor: the job {describe_exit(code)}; gave up after {max_restarts} restarts",
                    file=sys.stderr,
                    flush=True,
                )
                return _exit_code(code)
            backoff = min(BACKOFF_MAX_S, first_backoff_s * 2**attempt)
            print(
                f"moecluster: supervisor: the job {describe_exit(code)}; restart {attempt + 1} of {max_restarts} "
                f"in {backoff:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not stopping:
                time.sleep(0.1)
            if stopping:
                return 0
        return 1  # not reached: the loop returns on its last attempt
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        for s, h in previous.items():
            signal.signal(s, h)


def _wait(child: subprocess.Popen) -> int:
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # passed on by the handler: wait for the child to end
            continue


def _exit_code(code: int) -> int:
    return code if code >= 0 else 128 - code
