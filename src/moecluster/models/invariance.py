"""Batch-invariant decode attention: in a batched decode step (T = 1, B > 1) each row attends exactly as it
would decoding alone (B = 1, no mask, over its own cached positions only), so its bits do not depend on the
other rows. A masked attention over the batch's longest span rounds differently (other reduction lengths).

Plain KV caches take layers.decode_rows_attention (projections batched, one decode_attention per row). Attention kinds
with other caches (gpt-oss' sink attention over a sliding ring, DeepSeek's latent attention) call `rowwise`
at the top of their forward: the whole attention forward per row, with the Step a lone row gets.
`ENABLED = False` (serve --no-batch-invariance) takes the batched masked path everywhere: faster at large
batches, and a row's output may then depend on its batch. Shape legend: B rows, T new tokens, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moecluster.models.layers import Step

ENABLED = True


def set_enabled(on: bool) -> None:
    """Turn batch-invariant decode attention on or off for every model in this process."""
    global ENABLED
    ENABLED = on


def rowwise(
    forward: Callable[[torch.Tensor, Step], torch.Tensor], x_BTD: torch.Tensor, step: Step
) -> torch.Tensor | None:
    """forward(x_1TD, step of row b) for each row of a batched decode step, concatenated (out_BTD); None when
    this is not one (a prefill, a lone row) or invariance is off: the caller runs its batched path."""
    B, T, _ = x_BTD.shape
    if not ENABLED or T != 1 or B == 1:
        return None
    from moecluster.models.layers import CacheRows, Step  # layers imports this module

    rows = step.rows
    return torch.cat(
        [
            forward(
                x_BTD[b : b + 1],
                Step(
                    CacheRows.of(rows.slots_t[b : b + 1], rows.pos_t[b : b + 1]),
                    step.cos_BTHd[b : b + 1],
                    step.sin_BTHd[b : b + 1],
                    None,  # a lone row with one new token attends to every cached position: no mask
                    rows.pos[b] + 1,
                ),
            )
            for b in range(B)
        ]
    )
