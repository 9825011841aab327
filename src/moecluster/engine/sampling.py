"""Sampling parameters and samplers (plain callables: logits_V -> token id).

Shape legend: V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moecluster.errors import MoeClusterError

MAX_STOP_STRINGS = 16  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string (matching is linear in the text, see TextTracker)


class SamplingError(MoeClusterError):
    """This request cannot be sampled (e.g. the model produced NaN logits); other requests go on."""


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            problems.append(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        elif len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            problems.append(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each")
        if problems:
            raise MoeClusterError("invalid sampling parameters: " + "; ".join(problems))
        return self


class Sampler:
    """Greedy when temperature is 0, else temperature -> top-k -> top-p -> multinomial with a seeded generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed() % (2**63))

    def __call__(self, logits_V: torch.Tensor) -> int:
        """Raises SamplingError on NaN/Inf logits; finite for every temperature > 0 and top_p > 0."""
        p = self.params
        logits_V = logits_V.double()  # fp64: a temperature of 1e-300 is not 0 here, so never 0 / 0
        if not bool(torch.isfinite(logits_V).all()):
            bad = int((~torch.isfinite(logits_V)).sum())
            raise SamplingError(f"the model produced {bad} NaN/Inf logits (broken weights or an overflow); "
                                "this request cannot be sampled")
        if p.temperature == 0:
            return int(torch.argmax(logits_V))
        # Shift before dividing: the best token gets 0, the others <= 0, so a tiny temperature gives
        # -inf (never inf - inf = NaN) and the softmax always has one finite 1 at the maximum.
        logits_V = (logits_V - logits_V.max()) / p.temperature
        if p.top_k:
            kth = torch.topk(logits_V, min(p.top_k, logits_V.numel())).values[-1]
            logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
        probs_V = torch.softmax(logits_V, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs_V, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly before each token
            drop = before >= p.top_p  # a top_p below fp32's smallest value rounds to 0 here...
            drop[0] = False  # ...so the most likely token is always kept
            sorted_probs[drop] = 0.0
            probs_V = torch.zeros_like(probs_V).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs_V, 1, generator=self.generator))
