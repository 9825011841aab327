"""Tool calling on /v1/chat/completions (issue 17): each family's call format parsed from scripted outputs,
tools and past calls rendered through the model's own template exactly as transformers renders them, and
end to end with the official openai client over an in-process app whose tiny model is scripted to emit calls."""

from __future__ import annotations

import json
from types import SimpleNamespace

import openai
import pytest
import torch
from starlette.testclient import TestClient
from test_tokenizer import QWEN3_LIKE, TOOLS, _bytelevel
from tiny_models import VOCAB

from moecluster.builtin import train_tokenizer
from moecluster.engine import batching
from moecluster.engine.batching import Scheduler
from moecluster.engine.generate import Engine
from moecluster.loading import load_model
from moecluster.server import tools as T
from moecluster.server.app import create_app
from moecluster.server.tool_parsers import call_prefix, detect_format, parse
from moecluster.tokenizer import Tokenizer

ARGS = {"city": "Zürich", "days": 2}
# Modeled on Mistral's v3 tool template: tools before the last user turn, calls as a JSON list, results by id
MISTRAL_TOOLS = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'user' %}{% if tools and loop.last %}[AVAILABLE_TOOLS] {{ tools | tojson }}"
    "[/AVAILABLE_TOOLS]{% endif %}[INST] {{ message.content }}[/INST]"
    "{% elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS] ["
    "{% for call in message.tool_calls %}{{ {'name': call.function.name, 'arguments': call.function.arguments, "
    "'id': call.id} | tojson }}{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{% elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}"
    "{% elif message.role == 'tool' %}[TOOL_RESULTS] {{ {'content': message.content, 'call_id': "
    "message.tool_call_id} | tojson }}[/TOOL_RESULTS]{% endif %}{% endfor %}"
)
DEEPSEEK_V3_TOOLS = "{{ '<｜tool▁calls▁begin｜>' }}{{ '```json' }}"  # only what detect_format reads
HARMONY = "{{ '<|start|>assistant<|channel|>final<|message|>' }}"

SCRIPTED = {  # format -> (model output, content, calls)
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.\n\n",
        [("get_weather", ARGS), ("get_time", {})],
    ),
    "mistral": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}, '
        '{"name": "get_time", "arguments": {}}]',
        "",
        [("get_weather", ARGS), ("get_time", {})],
    ),
    "deepseek_v3": (
        "Sure<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Zürich", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "Sure",
        [("get_weather", ARGS)],
    ),
    "harmony": (
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Zürich", "days": 2}<|call|>',
        "",
        [("get_weather", ARGS)],
    ),
}


def _calls(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("fmt", list(SCRIPTED))
def test_each_format_parses(fmt):
    text, content, calls = SCRIPTED[fmt]
    parsed = parse(fmt, text)
    assert (parsed.content, _calls(parsed)) == (content, calls)


def test_format_variants_and_garbage():
    assert _calls(parse("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich", "days": 2}')) == [
        ("get_weather", ARGS)
    ]
    v31 = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"tz": "UTC"}<｜tool▁call▁end｜>'
    assert _calls(parse("deepseek_v3", v31)) == [("get_time", {"tz": "UTC"})]
    final = parse(
        "harmony",
        "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>Hi!<|return|>",
    )
    assert (final.content, final.reasoning, final.calls) == ("Hi!", "think", [])
    for fmt, bad in [
        ("hermes", '<tool_call>\n{"name": "f", "argu'),
        ("hermes", "<tool_call>[1]</tool_call>"),
        ("mistral", '[TOOL_CALLS][{"nam'),
        ("deepseek_v3", "<｜tool▁calls▁begin｜>junk"),
        ("harmony", "<|channel|>commentary to=functions.f<|message|>{oops"),
    ]:
        assert parse(fmt, bad).content == bad and not parse(fmt, bad).calls, (fmt, bad)
    assert parse("hermes", "no calls here").content == "no calls here"


def test_detect_format_and_call_prefixes():
    assert [detect_format(t) for t in (QWEN3_LIKE, MISTRAL_TOOLS, DEEPSEEK_V3_TOOLS, HARMONY)] == [
        "hermes",
        "mistral",
        "deepseek_v3",
        "harmony",
    ]
    for fmt, template in [
        ("hermes", QWEN3_LIKE),
        ("mistral", MISTRAL_TOOLS),
        ("deepseek_v3", DEEPSEEK_V3_TOOLS),
        ("harmony", HARMONY),
    ]:  # a named call's opening plus what the model writes parses
        rest = (
            '{"city": "Zürich", "days": 2}'
            + {"hermes": "}\n</tool_call>", "mistral": "}]", "deepseek_v3": "\n```<｜tool▁call▁end｜>", "harmony": ""}[
                fmt
            ]
        )
        assert _calls(parse(fmt, call_prefix(fmt, template, "get_weather") + rest)) == [("get_weather", ARGS)], fmt


OPENAI_CHAT = [  # what an OpenAI client sends back after a tool call: arguments as a JSON string
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}
        ],
    },
    {"role": "tool", "tool_call_id": "abcdefghi", "content": "12°C"},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("template", [QWEN3_LIKE, MISTRAL_TOOLS], ids=["qwen3", "mistral"])
def test_tools_and_calls_render_like_transformers(tmp_path, template):
    """Our messages (arguments parsed to objects) through our renderer == transformers' apply_chat_template."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=_bytelevel(), bos_token="<s>", eos_token="</s>")
    hf.chat_template = template
    hf.save_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path, SimpleNamespace(eos_token_ids=[], bos_token_id=None))
    chat = OPENAI_CHAT if "[INST]" not in template else OPENAI_CHAT[1:]
    messages = [T.template_message(m, i) for i, m in enumerate(chat)]
    assert messages[-3]["tool_calls"][0]["function"]["arguments"] == ARGS and "content" not in messages[-3]
    want = hf.apply_chat_template(
        messages,
        tools=TOOLS,
        tokenize=False,  # type: ignore[arg-type]
        add_generation_prompt=True,
    )
    got = ours.apply_chat_template(messages, tools=TOOLS)
    assert got == want and "get_weather" in got and "12°C" in got


def test_bad_tools_and_choices_get_400():
    with pytest.raises(T.P.ApiError, match="tools\\[0\\]"):
        T.check_tools([{"type": "function"}])
    with pytest.raises(T.P.ApiError, match="not in tools"):
        T.check_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(T.P.ApiError, match="needs tools"):
        T.check_choice("required", None)
    assert T.check_choice(None, TOOLS) == ("auto", None) and T.check_choice(None, None) == ("none", None)


# ---- end to end: the openai client against the app, the tiny model scripted to write given text ----

SHORT_TOOLS = [{"type": "function", "function": {"name": "f"}}]  # the tiny model's context is 256 tokens
E2E_CHAT = [
    {"role": "user", "content": "Hi"},
    {
        "role": "assistant",
        "tool_calls": [{"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    },
    {"role": "tool", "tool_call_id": "abcdefghi", "content": "12"},
]
E2E = {
    "hermes": ('Ok<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', "Ok"),
    "mistral": ('[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', ""),
    "deepseek_v3": (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"a": 1}\n```'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "",
    ),
    "harmony": ('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>', ""),
}
SCRIPT: list[int] = []  # token ids the next request generates (then EOS)


@pytest.fixture(scope="module")
def app_client(tiny_dbrx):
    engine = Engine(load_model(tiny_dbrx, "fp32"), num_slots=2)
    hf = train_tokenizer(VOCAB - 1)
    hf.add_special_tokens(["[TOOL_CALLS]"])  # as in Mistral's vocabulary: a special token, skipped by decode
    tok = engine.tokenizer = Tokenizer(hf, {}, [hf.token_to_id("<|im_end|>") or 0], None)
    real, step = batching.execute_step, {}

    def scripted(eng, msg):
        out = real(eng, msg)

        def force(logits_V: torch.Tensor, slot: int) -> torch.Tensor:
            i = step[slot] = step.get(slot, -1) + 1
            forced = torch.full_like(logits_V, -1e9)
            forced[SCRIPT[i] if i < len(SCRIPT) else tok.eos_ids[0]] = 0.0
            return forced

        for i, adm in enumerate(msg["admit"]):
            step[adm["slot"]] = -1
            out.prefill_logits[i] = force(out.prefill_logits[i], adm["slot"])
        if out.decode_logits_BV is not None:
            out.decode_logits_BV = torch.stack([force(row, s) for row, s in zip(out.decode_logits_BV, msg["slots"])])
        return out

    batching.execute_step = scripted
    scheduler = Scheduler(engine, max_batch=2, max_queue=8)
    scheduler.start()
    try:
        with TestClient(
            create_app(scheduler, "tiny", allowed_hosts=("testserver",)), raise_server_exceptions=False
        ) as client:
            yield client, tok
    finally:
        scheduler.stop()
        batching.execute_step = real


def _use(tok, template: str, output: str) -> None:
    tok.chat_templates = {"default": template}
    SCRIPT[:] = tok.encode(output, add_special=False)


@pytest.mark.parametrize(
    "fmt, template",
    [("hermes", QWEN3_LIKE), ("mistral", MISTRAL_TOOLS), ("deepseek_v3", DEEPSEEK_V3_TOOLS), ("harmony", HARMONY)],
)
def test_openai_client_gets_tool_calls(app_client, fmt, template):
    http, tok = app_client
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    text, content = E2E[fmt]
    calls = [("f", {"a": 1})]
    _use(tok, template, text)
    chat = E2E_CHAT
    r = client.chat.completions.create(model="tiny", messages=chat, tools=SHORT_TOOLS, temperature=0)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]  # type: ignore[union-attr]
    assert got == calls
    assert choice.message.content == (content.strip() or None)
    # streamed: content deltas before the call, then one tool_calls delta per call with the whole arguments
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=chat,
            tools=SHORT_TOOLS,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert streamed.strip() == content.strip()
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (i, n, a) for i, (n, a) in enumerate(calls)
    ]  # type: ignore[union-attr, arg-type]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_named_required_and_none(app_client):
    http, tok = app_client
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    user = [{"role": "user", "content": "Weather?"}]
    TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]  # noqa: N806
    _use(tok, QWEN3_LIKE, '{"city": "Zürich", "days": 2}}\n</tool_call>')  # continues the named call's opening
    r = client.chat.completions.create(
        model="tiny",
        messages=user,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"  # type: ignore[index]
    _use(tok, QWEN3_LIKE, '{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}\n</tool_call>')
    r = client.chat.completions.create(model="tiny", messages=user, tools=TOOLS, tool_choice="required")  # type: ignore[arg-type]
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == ARGS  # type: ignore[index]
    text = E2E["hermes"][0]
    _use(tok, QWEN3_LIKE, text)  # "none": the output is plain text, even if it looks like a call
    r = client.chat.completions.create(model="tiny", messages=user, tools=TOOLS, tool_choice="none")  # type: ignore[arg-type]
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == "stop"
    _use(tok, QWEN3_LIKE, "Just text, no call.")
    r = client.chat.completions.create(model="tiny", messages=user, tools=TOOLS)  # type: ignore[arg-type]
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Just text, no call.", "stop")
    bad = http.post("/v1/chat/completions", json={"model": "tiny", "messages": user, "tools": [{"type": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools[0]"
