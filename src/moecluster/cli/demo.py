"""`moecluster demo`: the built-in DBRX-architecture model on N ranks, then on 1, same output."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from moecluster.errors import MoeClusterError

DEMO_PROMPT = "Expert parallelism places different experts on different machines"


def register(sub) -> None:
    d = sub.add_parser("demo", help="built-in DBRX-architecture model on 2 ranks vs 1 rank")
    d.add_argument("--nodes", type=int, default=2)
    d.add_argument("--backend", choices=["mpi", "torch"], default="mpi")
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--cache-dir", default=None, help="where the built-in model is cached")
    d.set_defaults(func=run_demo)


def demo_model_dir(cache_dir: str | None) -> Path:
    """Build the built-in demo checkpoint once; later runs reuse it."""
    from moecluster.builtin import build_dbrx_checkpoint

    root = Path(cache_dir or os.environ.get("MOECLUSTER_CACHE", Path.home() / ".cache" / "moecluster"))
    path = root / "demo-dbrx"
    if not (path / "config.json").is_file():
        print(f"building the built-in DBRX-architecture demo model in {path} ...", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(dir=root if root.exists() else None))
        build_dbrx_checkpoint(tmp, "demo")
        root.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path) if not path.exists() else None
    return path


def run_demo(args) -> int:
    model = demo_model_dir(args.cache_dir)
    results = {}
    for nodes in (args.nodes, 1):
        how = f"expert parallel, {args.backend}" if nodes > 1 else "single process"
        print(f"\n=== {nodes} rank{'s' if nodes > 1 else ''} ({how}) ===", file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as report:
            argv = ["generate", "--model", str(model), "--prompt", args.prompt, "--max-tokens", str(args.max_tokens),
                    "--ignore-eos", "--nodes", str(nodes), "--backend", args.backend, "--report", report.name]
            from moecluster.cli import main

            code = main(argv)
            if code != 0:
                raise MoeClusterError(f"the {nodes}-rank run failed (exit {code}); see the messages above")
            results[nodes] = json.loads(Path(report.name).read_text())
    many, one = results[args.nodes], results[1]
    same = many["tokens"] == one["tokens"]
    print(f"\n{args.nodes} ranks: {many['stats']['decode_tok_s']:.1f} tok/s   "
          f"1 rank: {one['stats']['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    print(f"outputs identical: {'yes' if same else 'NO'} ({len(one['tokens'])} tokens)", file=sys.stderr)
    print("note: local ranks share this machine's memory bandwidth, so on one machine they cannot beat one "
          "process; across machines each node adds bandwidth and memory (see `moecluster plan`)", file=sys.stderr)
    return 0 if same else 1
