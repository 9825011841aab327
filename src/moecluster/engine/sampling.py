"""Sampling parameters and samplers (plain callables: logits_V -> token id).

Shape legend: V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moecluster.errors import MoeClusterError

if TYPE_CHECKING:
    from moecluster.engine.structured import Constraint

MAX_STOP_STRINGS = 16  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string (matching is linear in the text, see TextTracker)


class SamplingError(MoeClusterError):
    """This request cannot be sampled (e.g. the model produced NaN logits); other requests go on."""


MAX_N = 8  # choices per request (they share one prefill)
MAX_LOGPROBS = 20  # most likely tokens reported per position


@dataclass
class SamplingParams:
    """What to sample. Penalties follow vLLM's definitions: presence/frequency subtract from the logits of
    tokens already generated (once / once per occurrence); repetition divides positive and multiplies
    negative logits of tokens in the prompt or the output. logprobs: None off, k >= 0: the sampled token's
    log-probability (log_softmax of the model's logits) and the k most likely tokens'."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0  # 0: off; else drop tokens less likely than min_p x the most likely one
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    constraint: Constraint | None = None  # structured output: a grammar that masks the logits (engine/structured.py)

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
        if not 0.0 <= float(self.min_p) <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        elif len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            problems.append(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            problems.append(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= float(getattr(self, name)) <= 2.0:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < float(self.repetition_penalty) <= 10.0:
            problems.append(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if any(not -100.0 <= float(b) <= 100.0 for b in self.logit_bias.values()):
            problems.append("logit_bias values must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            problems.append(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if problems:
            raise MoeClusterError("invalid sampling parameters: " + "; ".join(problems))
        return self

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class Sample:
    """A sampled token; with logprobs, its log-probability and the most likely (token, logprob) pairs."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """logit_bias -> penalties -> greedy when temperature is 0, else temperature -> min-p -> top-k -> top-p ->
    multinomial with a seeded generator (choice `index` of a request uses seed + index). Keeps the
    output so far (for the penalties)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int] | None = None, index: int = 0):
        self.params = params
        self.prompt_ids = list(prompt_ids or [])
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed + index if params.seed is not None else torch.seed() % (2**63))
        self.counts_V: torch.Tensor | None = None  # fp64 occurrences of each token in the output (penalties)
        self.prompt_V: torch.Tensor | None = None  # bool: in the prompt
        self.mask = params.constraint.mask() if params.constraint is not None else None  # this choice's grammar state

    def __call__(self, logits_V: torch.Tensor) -> int:
        return self.sample(logits_V).token

    def sample(self, logits_V: torch.Tensor) -> Sample:
        """Raises SamplingError on NaN/Inf logits; finite for every temperature > 0 and top_p > 0."""
        if not bool(torch.isfinite(logits_V).all()):
            bad = int((~torch.isfinite(logits_V)).sum())
            raise SamplingError(
                f"the model produced {bad} NaN/Inf logits (broken weights or an overflow); "
                "this request cannot be sampled"
            )
        processed_V = self._process(logits_V.double())  # fp64: a temperature of 1e-300 is not 0 here
        if self.mask is not None:  # after bias and penalties, so neither can bring back a forbidden token
            processed_V = self.mask.apply(processed_V)
        token = self._choose(processed_V)
        if self.mask is not None:
            self.mask.accept(token)
        out = Sample(token)
        if self.params.logprobs is not None:
            lp_V = torch.log_softmax(logits_V.float(), dim=-1)
            out.logprob = float(lp_V[token])
            if self.params.logprobs:
                top = torch.topk(lp_V, min(self.params.logprobs, lp_V.numel()))
                out.top = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        if self.counts_V is not None:
            self.counts_V[token] += 1
        return out

    @property
    def finished(self) -> bool:
        """Structured output: the grammar is complete, so the sequence must end here."""
        return self.mask is not None and self.mask.done

    def _process(self, logits_V: torch.Tensor) -> torch.Tensor:
        """logit_bias, then the penalties (vLLM's formulas), on fp64 logits."""
        p = self.params
        if p.logit_bias:
            ids = torch.tensor([i for i in p.logit_bias if 0 <= i < logits_V.numel()], dtype=torch.long)
            vals = torch.tensor([p.logit_bias[i] for i in ids.tolist()], dtype=logits_V.dtype)
            logits_V = logits_V.index_add(0, ids, vals)
        if not p.penalized:
            return logits_V
        if self.counts_V is None or self.prompt_V is None:
            V = logits_V.numel()
            self.counts_V = torch.zeros(V, dtype=torch.float64)
            self.prompt_V = torch.zeros(V, dtype=torch.bool)
            self.prompt_V[[i for i in self.prompt_ids if 0 <= i < V]] = True
        out_V = self.counts_V > 0
        if p.repetition_penalty != 1.0:
            seen_V = self.prompt_V | out_V
            penalized = torch.where(logits_V > 0, logits_V / p.repetition_penalty, logits_V * p.repetition_penalty)
            logits_V = torch.where(seen_V, penalized, logits_V)
        return logits_V - p.frequency_penalty * self.counts_V - p.presence_penalty * out_V.double()

    def _choose(self, logits_V: torch.Tensor) -> int:
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits_V))
        # Shift before dividing: the best token gets 0, the others <= 0, so a tiny temperature gives
        # -inf (never inf - inf = NaN) and the softmax always has one finite 1 at the maximum.
        logits_V = (logits_V - logits_V.max()) / p.temperature
        if p.min_p > 0:  # p_i < min_p * p_max  <=>  logit_i < log(min_p) (the maximum is 0 here)
            logits_V = logits_V.masked_fill(logits_V < math.log(p.min_p), float("-inf"))
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
