"""Grammar engines compared on this machine: compile time of a JSON schema and per-token mask time (compute the
mask + advance by one token) over the demo model's vocabulary (4096 byte-level BPE tokens), the grammar walked
by random allowed tokens. How llguidance was chosen (engine/structured.py); the others are not dependencies:

    pip install xgrammar outlines-core --no-deps && pip install apache-tvm-ffi   # (xgrammar wants triton)
    python benchmarks/grammar_engines.py [--rounds 3]

Engines that are not installed are reported as such. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moecluster.builtin import DEMO_MODEL_DIR

TOKENIZER_JSON = (Path(DEMO_MODEL_DIR) / "tokenizer.json").read_text()
V, EOS = 4096, 2
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 4},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


def _allowed(words_W: torch.Tensor) -> list[int]:
    bits = (words_W.view(-1)[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(-1)[:V].nonzero().view(-1).tolist()


def walk(make: Callable, mask: Callable, advance: Callable, seed: int) -> tuple[float, list[float], bool]:
    """Compile, then walk the grammar with random allowed tokens; (compile s, per-token s, valid JSON at the end)."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    state = make()
    compile_s, times, ids = time.perf_counter() - t0, [], []
    for _ in range(400):
        t0 = time.perf_counter()
        allowed = mask(state)
        dt = time.perf_counter() - t0
        if not allowed or allowed == [EOS]:
            break
        token = rng.choice([t for t in allowed if t != EOS])
        t0 = time.perf_counter()
        advance(state, token)
        times.append(dt + time.perf_counter() - t0)
        ids.append(token)
    try:
        json.loads(Tokenizer.from_str(TOKENIZER_JSON).decode(ids))
        valid = True
    except ValueError:
        valid = False
    return compile_s, times, valid


def llguidance_engine():
    import llguidance
    import llguidance.torch

    tok = llguidance.LLTokenizer(TOKENIZER_JSON, n_vocab=V, eos_token=EOS)
    style = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=style)  # type: ignore[arg-type]
    words = llguidance.torch.allocate_token_bitmask(1, V)

    def mask(m) -> list[int]:
        llguidance.torch.fill_next_token_bitmask(m, words)
        return _allowed(words)

    return lambda: llguidance.LLMatcher(tok, grammar), mask, lambda m, t: m.consume_token(t)


def xgrammar_engine():
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(TOKENIZER_JSON), eos_token="<|im_end|>")
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=V, stop_token_ids=[EOS]))
    words = xgrammar.allocate_token_bitmask(1, V)

    def make():
        return xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))

    def mask(m) -> list[int]:
        m.fill_next_token_bitmask(words)
        return _allowed(words)

    return make, mask, lambda m, t: m.accept_token(t)


def outlines_engine():
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    byte_of = _byte_decoder()
    vocab: dict[bytes, list[int]] = {}
    for text, i in Tokenizer.from_str(TOKENIZER_JSON).get_vocab().items():
        if i != EOS and not text.startswith("<|"):
            vocab.setdefault(bytes(byte_of[c] for c in text), []).append(i)
    voc = outlines_core.Vocabulary(EOS, vocab)  # type: ignore[arg-type]
    words = torch.zeros(1, (V + 31) // 32, dtype=torch.int32)

    def make():
        return outlines_core.Guide(outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), voc))

    def mask(g) -> list[int]:
        g.write_mask_into(words.data_ptr(), words.numel(), 4)
        return _allowed(words)

    return make, mask, lambda g, t: g.advance(t)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: each printable stand-in character -> its byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + n): b for n, b in enumerate(extra)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {[round(x, 2) for x in os.getloadavg()]}")
    print("| engine | schema compile ms (median) | mask+advance µs/token median | p90 | valid JSON |")
    print("|---|---:|---:|---:|---|")
    for name, engine in (
        ("llguidance", llguidance_engine),
        ("xgrammar", xgrammar_engine),
        ("outlines-core", outlines_engine),
    ):
        try:
            parts = engine()
        except ImportError as e:
            print(f"| {name} | not installed ({e.name}) | | | |")
            continue
        runs = [walk(*parts, seed=r) for r in range(args.rounds)]
        per_token = sorted(t for _, times, _ in runs for t in times)
        compile_ms = 1e3 * statistics.median(c for c, _, _ in runs)
        p90 = per_token[int(0.9 * len(per_token))]
        valid = all(v for _, _, v in runs)
        print(f"| {name} | {compile_ms:.1f} | {1e6 * statistics.median(per_token):.0f} | {1e6 * p90:.0f} | {valid} |")
    print(f"load average after: {[round(x, 2) for x in os.getloadavg()]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
