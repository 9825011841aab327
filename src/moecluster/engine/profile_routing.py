"""Run prompts through the model and record which experts each layer picks (`moecluster profile-routing`)."""

from __future__ import annotations

from typing import Any

from moecluster.engine.generate import Engine
from moecluster.engine.sampling import SamplingParams
from moecluster.planning.routing_stats import RoutingStats


def profile(engine: Engine, prompts: list[str], max_tokens: int) -> RoutingStats:
    """Routing statistics of prefill and decode over the prompts."""
    args = engine.loaded.args
    stats = RoutingStats(args.n_layers, args.num_experts, args.top_k)
    # MoE blocks of models/layers.py; their `recorder` slot is declared as None there, hence Any
    blocks: list[Any] = [layer.moe for layer in engine.model.layers]
    for moe in blocks:
        moe.recorder = stats
    try:
        for prompt in prompts:
            ids = engine.tokenizer.encode(prompt)[: engine.max_seq_len - max_tokens - 1]
            engine.generate(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    finally:
        for moe in blocks:
            moe.recorder = None
    return stats
