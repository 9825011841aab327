"""Tokenizer: chat templates rendered exactly as transformers renders them (the oracle), and incremental
detokenization whose deltas add up to a full decode, on tokenizers trained here (ByteLevel BPE, and
sentencepiece-style BPE with byte fallback)."""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from moecluster import tokenizer as tokmod
from moecluster.engine.generate import TextTracker
from moecluster.engine.sampling import SamplingParams
from moecluster.errors import MoeClusterError
from moecluster.tokenizer import IncrementalDecoder, Tokenizer

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Mixture of experts route every token to a few experts.",
    "Café, naïve, résumé, déjà vu, señor, Über, façade. Hello world! How are you today?",
    "你好世界，专家混合模型。こんにちは世界。 Emoji: 😀 🎉 🚀 👋🏽 and ✓ ✗ → ∑ ≠ ∞.",
    'def f(x):\n    return {"a": [1, 2, 3]}  # code\n\ttabs and  double  spaces\n',
] * 3
TEXTS = CORPUS[:4] + [
    "",
    " ",
    "  leading spaces",
    "a\nb\n\nc",
    "🚀🚀🚀",
    "ünïcödé 你好 😀!",
    "<0x41> is not a byte",
    "x" * 50,
    "end with emoji 🎉",
    "\n\nnewlines first",
]


# ---- tokenizers trained on the spot ----


def _bytelevel() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _byte_fallback(style: str) -> HFTokenizer:
    """BPE over a small alphabet plus <0x00>..<0xFF> tokens: rarer characters become byte tokens. "metaspace" is the
    tokenizers >= 0.14 layout (Metaspace pre-tokenizer and decoder), "llama" the Llama-2/Mixtral one (Prepend and
    Replace normalizers; Replace, ByteFallback, Fuse, Strip decoders)."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, limit_alphabet=45, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    spec = json.loads(tok.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    tok = HFTokenizer.from_str(json.dumps(spec))
    if style == "metaspace":
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace("▁", prepend_scheme="first")])
    else:
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return tok


def _load(tok: HFTokenizer, out: Path, config: dict | None = None) -> Tokenizer:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config or {}))
    return Tokenizer.from_dir(out, SimpleNamespace(eos_token_ids=[], bos_token_id=None))


@pytest.fixture(scope="module", params=["bytelevel", "metaspace", "llama"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    hf = _bytelevel() if request.param == "bytelevel" else _byte_fallback(request.param)
    return _load(hf, tmp_path_factory.mktemp(request.param))


# ---- incremental detokenization ----


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """Deltas per token (checking that emitted text is never taken back) and the flushed tail."""
    detok, deltas = IncrementalDecoder(tok), []
    for k, token in enumerate(ids):
        deltas.append(detok.push(token))
        assert tok.decode(ids[: k + 1]).startswith("".join(deltas)) or _has_open_run(tok, ids[: k + 1])
    assert detok.text() == tok.decode(ids)
    return deltas, detok.flush()


def _has_open_run(tok: Tokenizer, ids: list[int]) -> bool:
    """Whether ids end in byte tokens: their decoding is not final yet, so an emitted prefix may differ."""
    real = [i for i in ids if i not in tok.special_ids]
    return bool(real) and real[-1] in tok.byte_fallback_ids


def test_tokenizers_have_the_expected_shape(tokenizer):
    ids = tokenizer.encode("ünïcödé 你好 😀!")
    assert tokenizer.decode(ids) == "ünïcödé 你好 😀!"
    assert bool(tokenizer.byte_fallback_ids) == ("<0xF0>" in tokenizer.tok.get_vocab())
    if tokenizer.byte_fallback_ids:  # the emoji really went through byte tokens
        assert any(i in tokenizer.byte_fallback_ids for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_of_real_text_equal_decode_and_never_hold_a_replacement_char(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas, tail = _stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids) and "\ufffd" not in "".join(deltas) + tail
    assert tail == "" or _has_open_run(tokenizer, ids)  # only a final byte run waits for flush()


def test_random_token_sequences_match_decode(tokenizer):
    """Property: for random ids (special tokens, byte tokens, invalid UTF-8 included), deltas + flush == decode."""
    rng = random.Random(1234)
    vocab = tokenizer.tok.get_vocab_size()
    special, byte_ids = sorted(tokenizer.special_ids), sorted(tokenizer.byte_fallback_ids)
    for trial in range(400):
        n = rng.randint(1, 40)
        if trial % 2:  # mostly bytes and specials: stresses byte runs and characters split across tokens
            pool = byte_ids or [i for t, i in tokenizer.tok.get_vocab().items() if len(t) == 1]
            ids = [rng.choice(special) if rng.random() < 0.15 else rng.choice(pool) for _ in range(n)]
        else:
            ids = [rng.randrange(vocab) for _ in range(n)]
        deltas, tail = _stream(tokenizer, ids)
        assert "".join(deltas) + tail == tokenizer.decode(ids), ids


def test_random_splits_of_real_text_match_decode(tokenizer):
    """Property: encode random mixes of the corpus, stream the ids, get the text back with no U+FFFD."""
    rng = random.Random(99)
    chars = "".join(CORPUS)
    for _ in range(150):
        text = "".join(chars[rng.randrange(len(chars))] for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text)
        deltas, tail = _stream(tokenizer, ids)
        assert "".join(deltas) + tail == tokenizer.decode(ids) and "\ufffd" not in "".join(deltas) + tail
        assert tail == "" or _has_open_run(tokenizer, ids)


def test_mid_character_tokens_are_held_back(tokenizer):
    ids = tokenizer.encode("a🦀b")  # not in the corpus: 4 byte pieces
    detok = IncrementalDecoder(tokenizer)
    out = [detok.push(i) for i in ids]
    assert "".join(out) == "a🦀b" and not any("\ufffd" in d for d in out)
    assert out.count("") >= 1  # the emoji takes several tokens and appears once complete


def test_first_token_space_strip_matches_decode(tmp_path):
    """Metaspace and Strip decoders drop the leading space of the first token; with a skipped BOS first, or a lone
    "▁" first, the stream must still agree with decode."""
    for style in ("metaspace", "llama"):
        tok = _load(_byte_fallback(style), tmp_path / style)
        bos, space = tok.tok.token_to_id("<s>"), tok.tok.token_to_id("▁")
        hello = tok.encode("Hello world")
        for ids in (hello, [bos] + hello, [space] + hello, [bos, space, space] + hello, [space, bos, space]):
            deltas, tail = _stream(tok, ids)
            assert "".join(deltas) + tail == tok.decode(ids), (style, ids)
        assert "".join(_stream(tok, hello)[0]) == "Hello world"


def test_invalid_byte_run_is_never_emitted_early(tmp_path):
    """ByteFallback decodes a run with an invalid byte as all U+FFFD: "\\n" then a stray continuation byte decodes
    to two U+FFFD, so the newline must not be emitted before the run ends."""
    tok = _load(_byte_fallback("metaspace"), tmp_path)
    nl, cont, a = (tok.tok.token_to_id(t) for t in ("<0x0A>", "<0x8A>", "a"))
    assert tok.decode([nl, cont, a]) == "\ufffd\ufffda"
    detok = IncrementalDecoder(tok)
    assert [detok.push(i) for i in (nl, cont, a)] == ["", "", "\ufffd\ufffda"]
    detok = IncrementalDecoder(tok)
    assert [detok.push(i) for i in (nl, a)] == ["", "\na"]  # a valid run is released by the next token
    assert detok.push(nl) == "" and detok.flush() == "\n" and detok.text() == "\na\n"


def test_text_tracker_releases_a_held_run_at_eos(tmp_path):
    tok = _load(_byte_fallback("metaspace"), tmp_path)
    tok.eos_ids = [tok.tok.token_to_id("</s>")]
    tracker = TextTracker(tok, SamplingParams())
    ids = tok.encode("ok 🦀")  # not in the training corpus: four byte tokens
    assert sum(i in tok.byte_fallback_ids for i in ids) == 4
    assert "".join(tracker.push(i)[0] for i in ids) == "ok " and tracker.push(tok.eos_ids[0]) == ("🦀", True)


def test_a_non_streamable_decoder_falls_back_to_redecoding(tmp_path):
    """A decoder that rewrites text across tokens (Fuse then Replace "ab") makes DecodeStream raise; the decoder
    switches to full re-decodes and text() stays exact."""
    hf = _bytelevel()
    hf.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Replace("ab", "X")])
    tok = _load(hf, tmp_path)
    ids = [tok.tok.token_to_id(c) for c in "zabab"]
    detok = IncrementalDecoder(tok)
    deltas = [detok.push(i) for i in ids]
    assert deltas[:2] == ["z", "a"] and deltas[2:] == ["", "", ""]  # "a" cannot be taken back: "b" made it "X"
    assert detok._stream is None and detok.text() == tok.decode(ids) == "zXX"


def test_push_does_constant_work_per_token(tokenizer, monkeypatch):
    """push() never decodes the history: Tokenizer.decode is not called, and each DecodeStream.step gets only the
    new token (plus an open byte run)."""
    steps, real = [], tokmod.DecodeStream

    class CountingStream:
        def __init__(self, **kwargs):
            self.inner = real(**kwargs)

        def step(self, tok, ids):
            steps.append(len(ids) if isinstance(ids, list) else 1)
            return self.inner.step(tok, ids)

    monkeypatch.setattr(tokmod, "DecodeStream", CountingStream)
    ids = tokenizer.encode(" ".join(CORPUS * 5))
    assert len(ids) > 500
    detok = IncrementalDecoder(tokenizer)
    with monkeypatch.context() as m:
        m.setattr(Tokenizer, "decode", lambda self, ids: pytest.fail("push() re-decoded the history"))
        text = "".join(detok.push(i) for i in ids)
    assert text == tokenizer.decode(ids)
    runs = "".join("b" if i in tokenizer.byte_fallback_ids else "." for i in ids).split(".")
    assert sum(steps) == len(ids) and max(steps) == max(len(r) for r in runs) + 1


def test_duck_typed_tokenizer_uses_redecoding():
    class Tok:
        def decode(self, ids):
            return "".join("_ab"[i] for i in ids)

    detok = IncrementalDecoder(Tok())
    assert [detok.push(i) for i in (1, 2, 1)] == ["a", "b", "a"] and detok.text() == "aba" and detok.flush() == ""


# ---- chat templates: transformers is the oracle ----

# Shaped like Qwen3's: tools as JSON, a reverse scan with namespace/loop controls, thinking blocks, tool calls
QWEN3_LIKE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" + tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}{%- continue %}{%- endif %}
    {%- if message.role == "user" or message.role == "system" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content or '' %}
        {%- set reasoning = message.reasoning_content or '' %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- set call = call.function or call %}
            {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments | tojson(separators=(',', ':')) + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content | tojson(indent=2) + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""
# Mixtral's, verbatim in spirit: one line, BOS/EOS from the special tokens, raise_exception on bad role order
MISTRAL_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
# ChatML with indented block tags: exercises trim_blocks and lstrip_blocks
CHATML_LIKE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo d'une ville",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CHATS = {
    "one": [{"role": "user", "content": "Hi 👋 ça va? <b>&</b>"}],
    "multi": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "no_system": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
}
QWEN_CHATS = {
    "tools": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Call the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "content": "12°C, 雨"},
        {"role": "tool", "content": "wind 5 km/h"},
    ],
    "thinking": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "thinking": "r2"},
    ],
}


def _save_with_transformers(template, out: Path):
    """A tokenizer saved by transformers itself: save_pretrained writes chat_template.jinja."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=_bytelevel(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<|im_start|>"},
    )
    hf.chat_template = template
    hf.save_pretrained(out)
    return hf, Tokenizer.from_dir(out, SimpleNamespace(eos_token_ids=[], bos_token_id=None))


@pytest.mark.parametrize(
    "name, template, chats",
    [
        ("qwen3", QWEN3_LIKE, {**CHATS, **QWEN_CHATS}),
        ("mistral", MISTRAL_LIKE, {"one": CHATS["one"], "no_system": CHATS["no_system"]}),
        ("chatml", CHATML_LIKE, CHATS),
    ],
)
def test_saved_checkpoint_renders_like_transformers(tmp_path, name, template, chats):
    hf, ours = _save_with_transformers(template, tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file() and ours.chat_template == template
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key, messages in chats.items():
        for extra in ({}, {"tools": TOOLS}, {"enable_thinking": False}):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
            assert ours.apply_chat_template(messages, **extra) == want, (key, extra)
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=False) == want
    if name == "mistral":
        assert ours.apply_chat_template(CHATS["one"]).startswith("<s>[INST] Hi")


def test_special_tokens_and_tojson_reach_the_template(tmp_path):
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ image_token }}|{{ pad_token is defined }}|"
        "{{ messages | tojson }}|{{ tools }}|{{ documents }}|"
        "{{ messages[0] | tojson(indent=1, sort_keys=true) }}"
    )
    hf, ours = _save_with_transformers(template, tmp_path)
    messages = [{"role": "user", "content": 'é<&>"', "n": 1.5, "flags": [True, None], "name": None}]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == want
    assert want.startswith("<s>|</s>|<unk>|<|im_start|>|False|") and "é<&>" in want and "|None|None|" in want


def test_strftime_now_and_dict(tmp_path):
    _, ours = _save_with_transformers("{{ strftime_now('%Y') }} {{ dict(a=1) | tojson }}", tmp_path)
    assert ours.apply_chat_template(CHATS["one"]) == f'{datetime.datetime.now().year} {{"a": 1}}'


def test_bad_role_order_raises_one_clear_error(tmp_path):
    from jinja2 import TemplateError

    hf, ours = _save_with_transformers(MISTRAL_LIKE, tmp_path)
    bad = [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    with pytest.raises(TemplateError, match="must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(MoeClusterError, match="^chat template rejected the messages: Conversation roles must alt"):
        ours.apply_chat_template(bad)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m.content }", "syntax error at line 1"),
        ("{{ messages.append(1) }}", "SecurityError"),
        ("{% set ns = namespace(_x=1) %}", "namespace attribute '_x'"),
        ("{{ messages[5].content.upper() }}", "UndefinedError"),
        ("{{ 1 + 'a' }}", "TypeError"),
    ],
)
def test_template_errors_are_moecluster_errors(tmp_path, template, message):
    _, ours = _save_with_transformers(template, tmp_path)
    with pytest.raises(MoeClusterError, match=message):
        ours.apply_chat_template(CHATS["one"])


def test_config_template_forms_and_precedence(tmp_path):
    hf = _bytelevel()
    args = SimpleNamespace(eos_token_ids=[], bos_token_id=None)
    one = "{{ 'config:' + messages[0].content }}"
    assert _load(hf, tmp_path / "str", {"chat_template": one}).apply_chat_template(CHATS["one"]).startswith("config:Hi")
    listed = [{"name": "tool_use", "template": "tools:{{ tools | length }}"}, {"name": "default", "template": one}]
    tok = _load(hf, tmp_path / "list", {"chat_template": listed})
    assert tok.chat_template == one and tok.apply_chat_template(CHATS["one"]).startswith("config:")
    assert tok.apply_chat_template(CHATS["one"], tools=TOOLS) == "tools:1"
    (tmp_path / "list" / "chat_template.jinja").write_text("file:{{ messages | length }}")
    assert Tokenizer.from_dir(tmp_path / "list", args).apply_chat_template(CHATS["multi"]) == "file:4"
    nodefault = _load(hf, tmp_path / "nodefault", {"chat_template": listed[:1]})
    with pytest.raises(MoeClusterError, match='none named "default"'):
        nodefault.apply_chat_template(CHATS["one"])
    with pytest.raises(MoeClusterError, match="no chat template"):
        _load(hf, tmp_path / "none", {}).apply_chat_template(CHATS["one"])
    with pytest.raises(MoeClusterError, match="chat_template must be a string"):
        _load(hf, tmp_path / "bad", {"chat_template": 3})
    with pytest.raises(MoeClusterError, match="empty conversation"):
        tok.apply_chat_template([])
