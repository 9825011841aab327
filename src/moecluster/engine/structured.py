"""Constrained decoding (structured output): a grammar compiled per request by llguidance masks the logits
of each of its sequences before sampling, so the output always matches it, and the sequence ends as soon as
the grammar is complete.

Sampling happens on rank 0 only (the other ranks receive the sampled token in the next step message), so
the mask is computed and applied there and every rank sees the same tokens. Each choice of a request (n > 1)
gets its own matcher state (a copy of the request's compiled matcher).

Why llguidance (benchmarks/results/grammar_engines.md): one wheel with no dependencies (xgrammar drags triton and
a torch of its own), lazy lexer/parser so a schema compiles in about a millisecond on the request path
(outlines-core builds a whole-vocabulary automaton first), clear errors for schemas it cannot compile, and
Lark grammars with embedded JSON schemas for tool calls. Its mask costs tens to a few hundred microseconds per
token here (benchmarks/results/structured.md).

Shape legend: V vocab, W = ceil(V / 32) 32-bit mask words.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import llguidance
import numpy as np
import torch

from moecluster.engine.sampling import SamplingError
from moecluster.errors import MoeClusterError
from moecluster.tokenizer import Tokenizer

# JSON as models usually write it on one line: no free whitespace (a model could emit blanks forever),
# json.dumps' separators. A schema may override these with llguidance's "x-guidance" key.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(MoeClusterError):
    """A schema or grammar the engine cannot compile (the message names the problem)."""


_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, dict[int, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary (token bytes), built once per tokenizer (~50 ms)."""
    with _LOCK:
        per_size = _LL_TOKENIZERS.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            n_vocab = max(vocab_size, tokenizer.tok.get_vocab_size(with_added_tokens=True))
            try:
                per_size[vocab_size] = llguidance.LLTokenizer(
                    tokenizer.tok.to_str(), n_vocab=n_vocab, eos_token=list(tokenizer.eos_ids)
                )
            except Exception as e:  # noqa: BLE001 - the Rust side raises plain exceptions
                raise GrammarError(f"structured output is not available for this model's tokenizer: {e}") from None
        return per_size[vocab_size]


def json_schema_grammar(schema: Any) -> str:
    """The grammar of JSON values matching `schema` (a JSON Schema object)."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)  # pyright: ignore[reportArgumentType]
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def tool_call_grammar(calls: list[tuple[str, dict, str]]) -> str:
    """The grammar of exactly one of `calls`: (text before the arguments, arguments' JSON schema, text after)."""
    if not calls:
        raise GrammarError("a tool call grammar needs at least one tool")
    rules = []
    for i, (head, schema, tail) in enumerate(calls):
        if not isinstance(schema, dict):
            raise GrammarError(f"tool {i}: parameters must be a JSON Schema object")
        schema = {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}
        parts = [_lark_literal(head)] if head else []
        parts.append("%json " + json.dumps(schema, ensure_ascii=False))
        if tail:
            parts.append(_lark_literal(tail))
        rules.append(f"call_{i}: " + " ".join(parts))
    lark = "start: " + " | ".join(f"call_{i}" for i in range(len(calls))) + "\n" + "\n".join(rules) + "\n"
    return llguidance.LLMatcher.grammar_from_lark(lark)


class Constraint:
    """A request's compiled grammar; `mask()` gives each of its sequences a fresh TokenMask."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, vocab_size: int):
        self.vocab_size = vocab_size
        matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {matcher.get_error()}")
        self._matcher = matcher

    def mask(self) -> TokenMask:
        return TokenMask(self._matcher.deep_copy(), self.vocab_size)


class TokenMask:
    """One sequence's grammar state: `apply` masks the tokens the grammar forbids next, `accept` advances.
    (Computing the next mask on a helper thread during the forward was tried: on the small demo model the helper
    waits for the GIL, whose switch interval (5 ms) is longer than the mask, so it is computed in line.)"""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.words_W = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.done = False  # the grammar is complete and allows nothing more (not even EOS): the sequence must end

    def forbidden_V(self) -> torch.Tensor:
        """bool_V: the tokens the grammar forbids next."""
        self.matcher.unsafe_compute_mask_ptr(self.words_W.ctypes.data, self.words_W.nbytes)
        if self.matcher.is_error() or not self.words_W.any():
            raise SamplingError(f"structured output: the grammar allows no next token ({self.matcher.get_error()})")
        bits = np.unpackbits((~self.words_W).view(np.uint8), bitorder="little")  # token i: bit i % 32 of word i // 32
        return torch.from_numpy(bits[: self.vocab_size].view(np.bool_))

    def apply(self, logits_V: torch.Tensor) -> torch.Tensor:
        return logits_V.masked_fill(self.forbidden_V()[: logits_V.numel()], float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise SamplingError(f"structured output: token {token} broke the grammar ({self.matcher.get_error()})")
        self.done = self.matcher.is_stopped()
