"""`moecluster eval`: perplexity of a checkpoint on a text file (token-level, sliding windows of the context)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from moecluster.cli.cluster import add_quant_args, quant_options
from moecluster.errors import MoeClusterError

MAX_DEFAULT_WINDOW = 2048  # long-context models: windows past this cost memory, not information, here


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a checkpoint on a text file",
        description="Token-level perplexity over sliding windows: windows of the model's context "
        f"(at most {MAX_DEFAULT_WINDOW} unless --window), every window/2 tokens; each "
        "token is scored once with at least window/2 tokens of context.",
    )
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 unless the checkpoint is fp32"
    )
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window/2)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    add_quant_args(p)
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from moecluster.engine.evaluate import perplexity
    from moecluster.loading import load_model

    path = Path(args.text)
    if not path.is_file():
        raise MoeClusterError(f"text file {args.text!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoeClusterError(f"{args.text} is not UTF-8 text ({e})") from None
    for name in ("window", "stride", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MoeClusterError(f"--{name} must be at least 1, got {value}")
    quant = quant_options(args)
    loaded = load_model(args.model, args.dtype, quant=quant)
    dtype = "bf16" if str(loaded.dtype) == "torch.bfloat16" else "fp32"
    experts = next((str(getattr(m.experts, "fmt", "")) for m in loaded.model.moe_layers()), "") or dtype
    if experts != dtype:  # quantized: score what generate / serve compute, the quantized kernels
        from moecluster.kernels.apply import apply_kernels

        apply_kernels(loaded.model)
    context = loaded.model.max_seq_len
    if args.window is not None and args.window > context:
        raise MoeClusterError(f"--window {args.window} is longer than the model's context ({context})")
    window = args.window or min(context, MAX_DEFAULT_WINDOW)
    ids = loaded.tokenizer.encode(text)  # with BOS if the model uses one
    t0 = time.perf_counter()
    result = perplexity(loaded.model, ids, window, args.stride, args.batch)
    seconds = time.perf_counter() - t0
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "text": str(args.text),
                    "dtype": dtype,
                    "experts": experts,
                    "quantize_dense": bool(quant and quant.dense),
                    "perplexity": result.perplexity,
                    "nll_per_token": result.nll_per_token,
                    "tokens_scored": result.tokens_scored,
                    "window": result.window,
                    "stride": result.stride,
                    "seconds": seconds,
                }
            )
        )
    else:
        print(f"perplexity: {result.perplexity:.3f}")
        print(
            f"{result.tokens_scored} tokens scored ({len(text)} chars), {dtype}, experts {experts}, "
            f"window {result.window}, stride {result.stride}, "
            f"mean NLL {result.nll_per_token:.4f} nats/token, {seconds:.1f} s",
            file=sys.stderr,
        )
    return 0
