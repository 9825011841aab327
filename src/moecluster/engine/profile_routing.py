"""Run prompts through the model and record which experts each layer picks (`moecluster profile-routing`)."""

from __future__ import annotations

from typing import Any

from moecluster.engine.sampling import SamplingParams
from moecluster.planning.routing_stats import RoutingStats


def profile(engine: Any, prompts: list[str], max_tokens: int) -> RoutingStats:
    """Routing statistics of prefill and decode over the prompts. engine: either engine's (a ServingEngine of
    engine/interface.py with generate(prompt_ids, params), as the torch Engine and the MLX engine have)."""
    num_layers, num_experts = engine.routing_shape()
    stats = RoutingStats(num_layers, num_experts)  # top_k: from the first routing recorded
    engine.set_routing_recorder(stats)
    try:
        for prompt in prompts:
            ids = engine.tokenizer.encode(prompt)[: engine.max_seq_len - max_tokens - 1]
            engine.generate(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    finally:
        engine.set_routing_recorder(None)
    return stats
