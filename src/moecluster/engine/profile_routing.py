"""Run prompts through the model and record which experts each layer picks (`moecluster profile-routing`)."""

from __future__ import annotations

from moecluster.engine.generate import Engine
from moecluster.engine.sampling import SamplingParams
from moecluster.planning.routing_stats import RoutingStats


def profile(engine: Engine, prompts: list[str], max_tokens: int) -> RoutingStats:
    """Routing statistics of prefill and decode over the prompts."""
    shape = engine.loaded.shape
    stats = RoutingStats(shape.num_moe_layers, shape.num_experts, shape.top_k)
    for moe in engine.model.moe_layers():
        moe.recorder = stats
    try:
        for prompt in prompts:
            ids = engine.tokenizer.encode(prompt)[: engine.max_seq_len - max_tokens - 1]
            engine.generate(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    finally:
        for moe in engine.model.moe_layers():
            moe.recorder = None
    return stats
