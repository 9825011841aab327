"""`moecluster profile-routing`: run prompts through the model and record which experts each layer picks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moecluster.cli.cluster import add_engine_arg
from moecluster.engine.profile_routing import profile
from moecluster.errors import MoeClusterError


def register(sub) -> None:
    p = sub.add_parser("profile-routing", help="record per-layer expert activation statistics over prompts")
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument(
        "--prompts", required=True, help='text file with one prompt per line, or .jsonl with {"prompt": ...} per line'
    )
    p.add_argument("--out", default="stats.json")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per prompt (their routing counts too)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    add_engine_arg(p)
    p.set_defaults(func=run_profile)


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise MoeClusterError(f"prompts file {path!r} not found")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        try:
            lines = [json.loads(line)["prompt"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MoeClusterError(f'{path}: every line must be a JSON object with a "prompt" ({e})') from None
    if not lines:
        raise MoeClusterError(f"prompts file {path!r} has no prompts")
    return lines


def run_profile(args) -> int:
    prompts = read_prompts(args.prompts)
    if args.engine == "mlx":
        from moecluster.engines.mlx.generate import MlxEngine

        engine = MlxEngine(args.model, args.dtype)
    else:
        from moecluster.engine.generate import Engine
        from moecluster.loading import load_model

        engine = Engine(load_model(args.model, args.dtype))
    stats = profile(engine, prompts, args.max_tokens)
    stats.save(args.out)
    tokens = stats.to_json()["layers"][0]["tokens"]
    print(f"recorded {tokens} tokens per layer over {len(prompts)} prompts -> {args.out}", file=sys.stderr)
    return 0
