"""The one entry point: `moecluster <subcommand> ...` (also `python -m moecluster.cli`, which starts ranks).

Each subcommand lives in a module of this package that exposes `register(subparsers)`; `register` adds a parser
and sets `func=callable(args) -> int` on it. Errors a user can cause raise MoeClusterError and are
printed as one line (traceback only with --debug).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moecluster import __version__
from moecluster.errors import MoeClusterError

# Modules that add subcommands (one line each).
COMMAND_MODULES = [
    "moecluster.cli.plan",
    "moecluster.cli.generate",
    "moecluster.cli.demo",
    "moecluster.cli.profile_routing",
    "moecluster.cli.place",
    "moecluster.cli.serve",
    "moecluster.cli.calibrate",
    "moecluster.cli.eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecluster", description=(__doc__ or "moecluster").splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"moecluster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the subcommand
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    args.argv = argv + (["--debug"] if debug else [])  # for commands that relaunch themselves on N ranks
    try:
        return int(args.func(args) or 0)
    except MoeClusterError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
