"""Structured output for the HTTP APIs: `response_format` (json_object, json_schema) and forced tool calls
(tool_choice "required" or a named function; Anthropic's {"type": "any"} / {"type": "tool"}) turned into a
grammar that constrains decoding (engine/structured.py). A schema the engine cannot compile gets a 400."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from moecluster.engine.sampling import SamplingParams
from moecluster.engine.structured import Constraint, GrammarError, json_schema_grammar, tool_call_grammar
from moecluster.server import protocol as P
from moecluster.server.tool_parsers import call_parts

FORMATS = ("text", "json_object", "json_schema")
T = TypeVar("T")


def response_format_grammar(rf: dict[str, Any] | None) -> str | None:
    """The grammar of a response_format: None for text; 400 for a malformed one."""
    kind = rf.get("type") if rf else "text"
    if kind not in FORMATS:
        raise P.ApiError(400, f"response_format.type must be one of {', '.join(FORMATS)}", param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compiled(lambda: json_schema_grammar({"type": "object"}), "response_format")
    spec = (rf or {}).get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise P.ApiError(
            400,
            'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}, "strict": true}',
            param="response_format.json_schema",
        )
    if not isinstance(spec.get("strict", False), bool):
        raise P.ApiError(400, "response_format.json_schema.strict must be a boolean", param="response_format")
    # strict or not, the schema is enforced (OpenAI enforces it only with strict: true)
    return _compiled(lambda: json_schema_grammar(spec.get("schema", {})), "response_format.json_schema.schema")


def tool_grammar(tools: list[dict], fmt: str, template: str, name: str | None, prefix: str) -> str:
    """Exactly one call (of `name`, else of any tool) in the format `fmt`, written after `prefix` (the call's
    opening already in the prompt, tool_parsers.call_prefix); its arguments match the tool's parameters."""
    calls = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        head, tail = call_parts(fmt, template, fn["name"])
        if not head.startswith(prefix):  # cannot happen: call_prefix is the start of call_parts' head
            raise P.ApiError(500, f"tool call format {fmt}: the call's opening {prefix!r} does not start {head!r}")
        schema = fn.get("parameters") or {}
        calls.append((head[len(prefix) :], {"type": "object", **schema} if "type" not in schema else schema, tail))
    return _compiled(lambda: tool_call_grammar(calls), "tools")


def _compiled(build: Callable[[], T], param: str) -> T:
    try:
        return build()
    except GrammarError as e:
        raise P.ApiError(400, str(e), param=param, code="invalid_schema") from None


def constrain(srv, params: SamplingParams, grammar: str | None, param: str | None = None) -> SamplingParams:
    """Attach the grammar to the request's sampling (compiled against the served vocabulary); 400 if it fails."""
    if grammar is not None:
        tokenizer, vocab = srv.engine.tokenizer, srv.engine.loaded.shape.vocab_size
        params.constraint = _compiled(lambda: Constraint(tokenizer, grammar, vocab), param or "response_format")
    return params
