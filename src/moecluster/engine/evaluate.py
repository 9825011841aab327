"""Perplexity of a model on a text (`moecluster eval`): token-level, over sliding windows of the context.

Legend: B windows in a batch, T window length (tokens), V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moecluster.errors import MoeClusterError
from moecluster.models.layers import DecoderModel


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll_per_token: float  # mean negative log-likelihood, nats
    tokens_scored: int
    window: int
    stride: int


def window_starts(num_tokens: int, window: int, stride: int) -> list[int]:
    """Start of each window: every `stride` tokens, plus one ending at the last token."""
    starts = list(range(0, max(num_tokens - window, 0) + 1, stride))
    if starts[-1] + window < num_tokens:
        starts.append(num_tokens - window)
    return starts


@torch.inference_mode()
def perplexity(
    model: DecoderModel, ids: list[int], window: int, stride: int | None = None, batch: int = 8
) -> Perplexity:
    """exp(mean NLL) of ids[1:] given what precedes them. Windows of `window` tokens start every `stride`
    (default window // 2); each token is scored once, in the first window that holds it and its left
    neighbour, so every token after the first window sees at least window - stride tokens of context."""
    stride = stride or max(window // 2, 1)
    if len(ids) < 2:
        raise MoeClusterError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    if not 1 <= stride <= window:
        raise MoeClusterError(f"stride must be between 1 and the window ({window}), got {stride}")
    window = min(window, len(ids))
    ids_t = torch.tensor(ids)
    starts = window_starts(len(ids), window, stride)
    model.setup_cache(min(batch, len(starts)), window)
    nll, count, scored = 0.0, 0, 1  # tokens [0, scored) are already counted (token 0 never is)
    for b in range(0, len(starts), batch):
        group = starts[b : b + batch]
        x_BT = torch.stack([ids_t[s : s + window] for s in group])
        logp_BTV = torch.log_softmax(model(x_BT, torch.zeros(len(group), dtype=torch.long)), dim=-1)
        for row, s in enumerate(group):
            first = max(scored, s + 1)
            targets = ids_t[first : s + window]
            nll -= logp_BTV[row, first - s - 1 : window - 1].gather(-1, targets[:, None]).sum().item()
            count += targets.numel()
            scored = max(scored, s + window)
    return Perplexity(math.exp(nll / count), nll / count, count, window, stride)
