"""Tool calls parsed out of generated text, in the format each model family was trained to emit.

hermes (Qwen2.5/Qwen3, Hermes, many others):  <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
mistral:  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]  or (v11+ tokenizers)  [TOOL_CALLS]name[ARGS]{...}
deepseek_v3:  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name\\n```json\\n{...}\\n```
    <｜tool▁call▁end｜> ... <｜tool▁calls▁end｜>
    (V3.1: <｜tool▁call▁begin｜>name<｜tool▁sep｜>{...}<｜tool▁call▁end｜>)
harmony (gpt-oss):  <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>commentary
    to=functions.name <|constrain|>json<|message|>{...}<|call|>   (final text in the "final" channel)

A call that does not parse leaves the whole output as plain content (as vLLM does): a half-written call
is text the client can read, never a 500.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

FORMATS = ("hermes", "mistral", "deepseek_v3", "harmony")
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
# the text that opens a tool call: content before it streams as text, everything after is held for parsing
START_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "deepseek_v3": DS_CALLS_BEGIN}


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


@dataclass
class Parsed:
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    reasoning: str | None = None


def detect_format(template: str) -> str:
    """Which format a chat template teaches (it renders past tool calls the way the model writes them)."""
    if "<|channel|>" in template:
        return "harmony"
    if DS_CALLS_BEGIN in template or "tool▁calls▁begin" in template:
        return "deepseek_v3"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    return "hermes"


def _load_object(text: str) -> dict | None:
    """A JSON object at the start of text (trailing text ignored), or None."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _call(name, arguments) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        parsed = _load_object(arguments)
        if parsed is None:
            return None
        arguments = parsed
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _hermes(text: str) -> Parsed:
    calls, content, pos = [], [], 0
    for m in re.finditer(r"<tool_call>(.*?)(?:</tool_call>|\Z)", text, re.S):
        obj = _load_object(m.group(1))
        call = obj and _call(obj.get("name"), obj.get("arguments", obj.get("parameters", {})))
        if not call:
            return Parsed(text)
        content.append(text[pos : m.start()])
        calls.append(call)
        pos = m.end()
    content.append(text[pos:])
    return Parsed("".join(content), calls)


def _mistral(text: str) -> Parsed:
    head, *parts = text.split("[TOOL_CALLS]")
    calls = []
    for part in parts:
        if "[ARGS]" in part:  # v11+: name[ARGS]{json} (an optional [CALL_ID]id between them)
            name, args = part.split("[ARGS]", 1)
            call = _call(name.split("[CALL_ID]")[0].strip(), _load_object(args))
            if not call:
                return Parsed(text)
            calls.append(call)
            continue
        try:
            items, _ = json.JSONDecoder().raw_decode(part.strip())
        except ValueError:
            return Parsed(text)
        for item in items if isinstance(items, list) else [items]:
            call = isinstance(item, dict) and _call(item.get("name"), item.get("arguments", {}))
            if not call:
                return Parsed(text)
            calls.append(call)
    return Parsed(head, calls)


def _deepseek_v3(text: str) -> Parsed:
    if DS_CALLS_BEGIN not in text:
        return Parsed(text)
    head, rest = text.split(DS_CALLS_BEGIN, 1)
    rest, _, tail = rest.partition(DS_CALLS_END)
    calls = []
    for m in re.finditer(re.escape(DS_CALL_BEGIN) + r"(.*?)(?:" + re.escape(DS_CALL_END) + r"|\Z)", rest, re.S):
        left, sep, right = m.group(1).partition(DS_SEP)
        if not sep:
            return Parsed(text)
        if left.strip() == "function":  # V3: type<sep>name\n```json\n{...}\n```
            name, _, body = right.partition("\n")
            body = re.sub(r"^\s*```(?:json)?|```\s*$", "", body.strip())
            call = _call(name.strip(), _load_object(body))
        else:  # V3.1: name<sep>{...}
            call = _call(left.strip(), _load_object(right))
        if not call:
            return Parsed(text)
        calls.append(call)
    return Parsed(head + tail, calls) if calls else Parsed(text)


_HARMONY_MESSAGE = re.compile(r"(?:<\|start\|>)?(.*?)<\|message\|>(.*?)(?:<\|end\|>|<\|call\|>|<\|return\|>|\Z)", re.S)


def _harmony(text: str) -> Parsed:
    """Messages of the harmony format after the prompt's `<|start|>assistant`: the analysis channel is
    reasoning, `to=functions.NAME` a tool call, the final (and a commentary preamble) the content."""
    if "<|message|>" not in text:
        return Parsed(text)
    content, reasoning, calls = [], [], []
    for m in _HARMONY_MESSAGE.finditer(text):
        header, body = m.group(1), m.group(2)
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        recipient = re.search(r"to=([^\s<]+)", header)
        if recipient and recipient.group(1).startswith("functions."):
            call = _call(recipient.group(1).removeprefix("functions."), _load_object(body))
            if not call:
                return Parsed(text)
            calls.append(call)
        elif channel and channel.group(1) == "analysis":
            reasoning.append(body)
        else:
            content.append(body)
    return Parsed("".join(content), calls, "".join(reasoning) or None)


PARSERS = {"hermes": _hermes, "mistral": _mistral, "deepseek_v3": _deepseek_v3, "harmony": _harmony}


def parse(fmt: str, text: str) -> Parsed:
    return PARSERS[fmt](text)


def call_prefix(fmt: str, template: str, name: str | None) -> str:
    """Text that opens a tool call (of `name`, if given), appended to the prompt for tool_choice
    "required" or a named function, so that the model continues inside a call; the parser sees it too."""
    if fmt == "hermes":
        return "<tool_call>\n" + (f'{{"name": {json.dumps(name)}, "arguments": ' if name else "")
    if fmt == "mistral":
        if "[ARGS]" in template:
            return "[TOOL_CALLS]" + (f"{name}[ARGS]" if name else "")
        return "[TOOL_CALLS][" + (f'{{"name": {json.dumps(name)}, "arguments": ' if name else "")
    if fmt == "deepseek_v3":
        begin = DS_CALLS_BEGIN + DS_CALL_BEGIN
        if not name:
            return begin
        return begin + (f"function{DS_SEP}{name}\n```json\n" if "```json" in template else f"{name}{DS_SEP}")
    return "<|channel|>commentary to=functions." + (f"{name} <|constrain|>json<|message|>" if name else "")


def call_parts(fmt: str, template: str, name: str) -> tuple[str, str]:
    """A whole call of `name` is head + arguments (a JSON object) + tail; head starts with call_prefix(fmt,
    template, None) and call_prefix(fmt, template, name). Special tokens appear as their text (as the parser
    reads them). Used to force a well-formed call by constrained decoding."""
    quoted = json.dumps(name)
    if fmt == "hermes":
        return f'<tool_call>\n{{"name": {quoted}, "arguments": ', "}\n</tool_call>"
    if fmt == "mistral":
        if "[ARGS]" in template:
            return f"[TOOL_CALLS]{name}[ARGS]", ""
        return f'[TOOL_CALLS][{{"name": {quoted}, "arguments": ', "}]"
    if fmt == "deepseek_v3":
        end = DS_CALL_END + DS_CALLS_END
        if "```json" in template:
            return f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n", "\n```" + end
        return f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}{name}{DS_SEP}", end
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>", ""
