"""Run `moecluster ...` in the test process: the same `main(argv)` the console script calls, without paying
a Python + torch start-up (~2 s) per call. Commands that start ranks still start real processes.

Returns a `subprocess.CompletedProcess` so tests read the same fields as for a real subprocess. An exception
that escapes `main` is reported as a traceback on stderr with return code 1, as the interpreter would.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import traceback

import torch

from moecluster.cli import main


def run_cli(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`moecluster *args` in-process; timeout is accepted for call compatibility (nothing here may block)."""
    del timeout
    out, err = io.StringIO(), io.StringIO()
    threads, environ = torch.get_num_threads(), dict(os.environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse errors and --version
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what a subprocess would print before dying
                traceback.print_exc()
                code = 1
    finally:  # commands set process-wide state; restore it so later tests see what they would in a fresh process
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(["moecluster", *args], code, out.getvalue(), err.getvalue())
