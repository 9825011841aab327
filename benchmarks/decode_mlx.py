"""The MLX engine's side of benchmarks/decode.py (`--engine mlx`): the same measurements through MlxEngine, with
the streaming bandwidth measured by MLX on its default device (Metal's unified memory on a Mac, the CPU here)
and mlx-lm's own decoding of the same weights as the comparison (in place of transformers).

MLX's Linux CPU build is for correctness only: numbers measured here say nothing about a Mac.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import mlx.core as mx

from moecluster.engine.sampling import SamplingParams
from moecluster.engines.mlx.expert_parallel import expert_parallel_layers
from moecluster.engines.mlx.generate import MlxEngine


def mlx_streaming_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """Best-of and median GB/s of an fp32 sum over a buffer much larger than cache, on MLX's default device."""
    n = int(gib * 2**30)
    buf = mx.random.normal((n // 4,))
    mx.eval(buf)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        mx.eval(buf.sum())
        times.append(time.perf_counter() - t0)
    times = times[1:]  # the first compiles the reduction
    return {"mlx fp32 sum": {"best_gbs": n / min(times) / 1e9, "median_gbs": n / statistics.median(times) / 1e9}}


def _median_gap(stamps: list[float]) -> float:
    """Median seconds between consecutive decode tokens (prefill and the first token excluded)."""
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def run_ours_mlx(model_dir: Path, tokens: int, rounds: int, prompt: str, gib: float = 1.0) -> dict:
    """As decode.run_ours: `rounds` times bandwidth, a decode of `tokens` tokens, bandwidth again."""
    engine = MlxEngine(model_dir)
    ids = engine.tokenizer.encode(prompt)
    top_k = int(engine.config["num_experts_per_tok"])

    def s_per_token(n: int) -> float:
        _, _, stats = engine.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True).validate())
        return 1 / stats.decode_tok_s  # the decode steps after the first token, timed inside generate

    s_per_token(4)  # warm-up
    # batch 1: every decode token evaluates top_k distinct experts per MoE layer
    bytes_per_token = engine.dense_bytes + sum(top_k * m.expert_bytes() for m in expert_parallel_layers(engine.model))
    runs = []
    after = mlx_streaming_bandwidth(gib, repeats=3)
    for _ in range(rounds):
        before = after
        s = s_per_token(tokens)
        after = mlx_streaming_bandwidth(gib, repeats=3)
        ref = (before["mlx fp32 sum"]["median_gbs"] + after["mlx fp32 sum"]["median_gbs"]) / 2
        achieved = bytes_per_token / s / 1e9
        runs.append(
            {
                "reference_gbs": ref,
                "bandwidth_after": after,
                "s_per_token": s,
                "achieved_gbs": achieved,
                "ratio": achieved / ref,
            }
        )
    return {
        "bytes_per_token": bytes_per_token,
        "rounds": runs,
        "median_s_per_token": statistics.median(r["s_per_token"] for r in runs),
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "reference_gbs": statistics.median(r["reference_gbs"] for r in runs),
        "dtype": "as stored" if mx.metal.is_available() else "fp32: MLX's CPU gather_mm",
    }


def run_mlx_lm(model_dir: Path, tokens: int, prompt: str) -> dict:
    """mlx-lm's own greedy decoding (generate_step) of the same checkpoint, in the engine's dtype."""
    from mlx_lm.generate import generate_step

    from moecluster.engines.mlx.generate import load_tokenizer
    from moecluster.engines.mlx.loading import load_mlx_model

    model, _ = load_mlx_model(model_dir, dtype=None if mx.metal.is_available() else "fp32")
    ids = mx.array(load_tokenizer(model_dir).encode(prompt))

    def stamps(n: int) -> list[float]:
        return [time.perf_counter() for _ in generate_step(ids, model, max_tokens=n)]

    stamps(4)  # warm-up
    return {"s_per_token": _median_gap(stamps(tokens + 2))}
