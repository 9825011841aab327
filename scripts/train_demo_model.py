"""Train the built-in demo model: a small Qwen3-MoE on the Python documentation, on CPU, seeded.

Corpus: the reStructuredText sources of the Python 3 documentation as Debian's `python3-doc` installs
them (/usr/share/doc/python3.11/html/_sources; PSF License, see /usr/share/doc/python3-doc/copyright):
`apt-get install -y python3-doc`. Only needed to retrain: the trained checkpoint ships with the package
(src/moecluster/demo_model/).

Files are split by name (every 40th file, sorted, is held out) before the tokenizer is trained, so no
held-out text is seen by the tokenizer or the model. The model is transformers' own Qwen3MoeForCausalLM
(so save_pretrained writes the Hub layout: per-expert tensors) with its router load-balancing loss,
which keeps every expert in use while routing stays skewed per layer.

    python scripts/train_demo_model.py [--out DIR] [--steps N]

writes DIR (config.json, model.safetensors in bf16, tokenizer.json, tokenizer_config.json,
chat_template.jinja) and --data-dir/demo_heldout.txt (the held-out text), and prints the held-out
perplexity of the trained fp32 weights (token-level, sliding windows of the context, stride half of it).
`moecluster eval --model DIR --text DIR/../demo_heldout.txt` measures the saved (bf16) checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch

DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
HELD_OUT_EVERY = 40
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL = dict(
    vocab_size=4096,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    intermediate_size=512,
    max_position_embeddings=256,
    norm_topk_prob=True,
    rope_theta=10000.0,
)

_ROLE = re.compile(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`len` -> len, :ref:`text <label>` -> text
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")  # `text <url>`_ -> text
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"\*\*?([^*\n]+)\*\*?")
_HEADING = re.compile(r"^\s*([=\-~^*#+\"'`.:_])\1{2,}\s*$")


def clean_rst(text: str) -> str:
    """reST source -> plain text: directives, their options, heading rules and doctest prompts dropped."""
    out: list[str] = []
    in_directive = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(".. "):
            in_directive = not stripped.startswith(".. note") and not stripped.startswith(".. versionadded")
            continue
        if in_directive and stripped.startswith(":"):
            continue  # directive options (":synopsis: ...", ":noindex:")
        if stripped and not line.startswith(" "):
            in_directive = False
        if _HEADING.match(line) or stripped.startswith((">>>", "... ", "|")):
            continue
        line = _LINK.sub(r"\1", _ROLE.sub(r"\1", line))
        out.append(_EMPH.sub(r"\1", _LITERAL.sub(r"\1", line)).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def load_corpus(src: Path) -> tuple[str, str]:
    """(train text, held-out text): whole files, every HELD_OUT_EVERY-th (sorted by path) held out."""
    files = sorted(src.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no *.rst.txt under {src}: apt-get install -y python3-doc")
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2 else train).append(clean_rst(f.read_text(errors="replace")))
    return "\n".join(train), "\n".join(held)


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (no U+FFFD on decode of whole sequences; streaming holds partial characters back)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def make_model(eos: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    m = dict(MODEL)
    cfg = Qwen3MoeConfig(
        **{k: v for k, v in m.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]},
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
        mlp_only_layers=[],
    )
    return Qwen3MoeForCausalLM(cfg)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, ctx: int, stride: int | None = None, batch: int = 16) -> float:
    """Token-level perplexity with sliding windows of ctx tokens: each token scored once, with >= ctx - stride
    tokens of left context (except at the start)."""
    stride = stride or ctx // 2
    n = ids.numel()
    starts = list(range(0, max(n - ctx, 0) + 1, stride))
    if starts[-1] + ctx < n:
        starts.append(n - ctx)
    nll, count, scored = 0.0, 0, 0  # scored: tokens [0, scored) already counted
    for b in range(0, len(starts), batch):
        group = starts[b : b + batch]
        x = torch.stack([ids[s : s + ctx] for s in group])
        logp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)
        for row, s in enumerate(group):
            first = max(scored, s + 1)  # a token needs a left neighbour in the window
            tgt = ids[first : s + ctx]
            nll -= logp[row, first - s - 1 : ctx - 1].gather(-1, tgt[:, None]).sum().item()
            count += tgt.numel()
            scored = s + ctx
    return math.exp(nll / count)


def write_checkpoint(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "model_max_length": MODEL["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = out / "generation_config.json"
    gen.unlink(missing_ok=True)  # defaults only; config.json carries eos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="src/moecluster/demo_model")
    ap.add_argument("--data-dir", default="benchmarks/data", help="where demo_train.txt / demo_heldout.txt go")
    ap.add_argument("--src", default=str(DOC_SOURCES))
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.set_num_threads(a.threads)
    train_text, held_text = load_corpus(Path(a.src))
    data = Path(a.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    (data / "demo_heldout.txt").write_text(held_text)
    tok = train_tokenizer(train_text, MODEL["vocab_size"])
    eos = tok.token_to_id("<|im_end|>")
    train_ids = torch.tensor(tok.encode(train_text).ids)
    held_ids = torch.tensor(tok.encode(held_text).ids)
    print(
        f"corpus: {len(train_text) / 1e6:.2f} M chars train ({train_ids.numel()} tokens), "
        f"{len(held_text) / 1e6:.2f} M held out ({held_ids.numel()} tokens)",
        flush=True,
    )
    model = make_model(eos)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    ctx = MODEL["max_position_embeddings"]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(a.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0)))) * 0.95 + 0.05
    )
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    model.train()
    for step in range(a.steps):
        starts = torch.randint(0, train_ids.numel() - ctx - 1, (a.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + ctx] for s in starts.tolist()])
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(
                f"step {step:5d}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                f"{(step + 1) * a.batch * ctx / (time.time() - t0):.0f} tok/s  {time.time() - t0:.0f} s",
                flush=True,
            )
    model.eval()
    model.config.output_router_logits = False
    ppl = perplexity(model, held_ids, ctx)
    write_checkpoint(model, tok, Path(a.out))
    print(
        f"held-out perplexity (fp32 weights): {ppl:.2f}  ({held_ids.numel()} tokens, window {ctx}, "
        f"stride {ctx // 2}); train time {time.time() - t0:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
