"""OpenAI-compatible request models, response builders and error bodies.

Requests are validated strictly (no silent coercion of "5" to 5) so that a client mistake gets a 400
naming the parameter, never a 500. Unknown fields are accepted and ignored (the app logs their names,
as vLLM does), except those in REFUSED whose meaning we would silently get wrong; parameters that
OpenAI defines but this server does not implement are accepted only at their neutral values.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moecluster.engine.sampling import MAX_LOGPROBS, MAX_N, MAX_STOP_CHARS, MAX_STOP_STRINGS, Sample

MAX_JSON_DEPTH = 32  # nesting of the request body (OpenAI requests need about 5)
MAX_JSON_INT = 2**64  # larger integers are no valid value of any parameter
# Unknown fields that change what a client gets back (vLLM and OpenAI extensions we do not implement): refused,
# since ignoring them would silently give a wrong answer. Any other unknown field is ignored.
REFUSED = frozenset(
    {
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "structured_outputs",
        "min_tokens",
        "allowed_token_ids",
        "bad_words",
        "prompt_logprobs",
        "use_beam_search",
        "length_penalty",
        "truncate_prompt_tokens",
        "add_generation_prompt",
        "continue_final_message",
        "echo",
        "prediction",
        "audio",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "stop_token_ids",
        "min_p_tokens",
        "logits_processors",
    }
)


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Lenient(BaseModel):
    """A request body: strict types, unknown fields kept aside (model_extra) to be refused or ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Lenient):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension (as in vLLM); 0 = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # extension (as in vLLM); 0 = off
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)  # extension (as in vLLM); 1 = off
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    ignore_eos: bool = False  # extension: keep generating past the end-of-sequence token
    # Fields some clients always send: accepted and ignored.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for parameters set to values this server does not implement."""
        refused = sorted(REFUSED & set(self.model_extra or {}))
        out = [(name, f"{name} is not supported by this server") for name in refused]
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or len(key) > 12 or not -100.0 <= bias <= 100.0:
                out.append(
                    (
                        "logit_bias",
                        f"logit_bias maps token ids (strings of digits) to biases in [-100, 100]; "
                        f"got {key[:20]!r}: {bias!r}",
                    )
                )
                break
        return out

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must be non-empty", param="stop")
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(
                400,
                f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each",
                param="stop",
            )
        return stops


RequestT = TypeVar("RequestT", bound=_Sampling)  # a request model: CompletionRequest or ChatRequest


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    response_format: dict[str, Any] | None = None  # extension (as in vLLM): json_object / json_schema

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "best_of must be 1"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        return out


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # "name", "tool_calls", "tool_call_id"; others refused
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            try:
                parts.append(TextPart.model_validate(part).text)
            except ValidationError:
                raise ApiError(
                    400,
                    f"messages[{index}].content[{j}]: only text parts are supported (got type {part.get('type')!r})",
                    param=f"messages[{index}].content",
                ) from None
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.functions or self.function_call not in (None, "none", "auto"):  # tools/tool_choice: server/tools.py
            param = "functions" if self.functions else "function_call"
            out.append((param, "the deprecated functions/function_call are not supported; use tools/tool_choice"))
        if self.modalities and self.modalities != ["text"]:
            out.append(("modalities", "only text output is supported"))
        for i, m in enumerate(self.messages):
            extra = set(m.model_extra or {}) - {"name", "tool_calls", "tool_call_id"}
            if extra:
                out.append((f"messages[{i}]", f"message fields {sorted(extra)} are not supported"))
        return out


def _no_constant(name: str) -> Any:
    raise ApiError(400, f"could not parse the JSON body: {name} is not valid JSON")


def decode_json(raw: bytes) -> Any:
    """A JSON body; 400 for invalid JSON or UTF-8, NaN/Infinity, nesting deeper than MAX_JSON_DEPTH,
    integers beyond MAX_JSON_INT and unpaired surrogates (\\ud800), so that nothing later meets them."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints past Python's digit limit
        raise ApiError(400, f"could not parse the JSON body: {str(e)[:200]}") from None
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    400,
                    "a string in the JSON body contains an unpaired surrogate escape "
                    "(such as \\ud800); send valid Unicode",
                ) from None
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_JSON_INT:
            raise ApiError(400, f"an integer in the JSON body is out of range (|n| > 2**64): {str(value)[:20]}...")
    return body


def parse(model: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body; a 400 naming the first bad parameter otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # JSON null means "the default", as in OpenAI's API
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {param}", param=param) from None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required parameter: {param}", param=param) from None
        raise ApiError(
            400, f"invalid value for {param}: {err['msg']} (got {err.get('input')!r:.80})", param=param
        ) from None
    for param, why in req.unsupported():
        raise ApiError(400, why, param=param, code="unsupported_parameter")
    return req


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out: dict = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:  # prompt tokens whose keys came from the prefix cache
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def completion_body(
    rid: str,
    model: str,
    text: str,
    finish: str | None,
    use: dict | None,
    created: int | None = None,
    chunk: bool = False,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict:
    """A /v1/completions response, or one stream chunk of it."""
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(
    rid: str,
    model: str,
    text: str,
    finish: str | None,
    use: dict | None,
    created: int | None = None,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        ],
        "usage": use,
    }


def chat_chunk(
    rid: str,
    model: str,
    delta: dict,
    finish: str | None,
    use: dict | None,
    created: int,
    with_choice: bool = True,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        if with_choice
        else [],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_logprobs(samples: list[Sample], text_of) -> dict:
    """Chat's {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}; text_of(id) -> token text."""

    def entry(token: int, logprob: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(s.token, s.logprob or 0.0), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in samples
        ]
    }


def completion_logprobs(samples: list[Sample], text_of, offset: int = 0) -> dict:
    """Completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; offset: of the first token."""
    tokens = [text_of(s.token) for s in samples]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [s.logprob for s in samples],
        "top_logprobs": [{text_of(t): lp for t, lp in s.top} for s in samples],
        "text_offset": offsets,
    }


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "moecluster", "max_model_len": max_model_len}


def request_body(model: str) -> dict:
    """The OpenAPI requestBody of a POST endpoint whose handler reads the raw body (see openapi_schema)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
        }
    }


def openapi_schema(app, model_name: str) -> dict:
    """FastAPI's schema of the routes plus the request models (for clients and fuzzers, /openapi.json)."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title="moecluster", version="1", routes=app.routes)
    defs = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (CompletionRequest, ChatRequest):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(body.pop("$defs", {}))
        body["properties"]["model"] = {"type": "string", "enum": [model_name]}  # this server's one model
        defs[model.__name__] = body
    app.openapi_schema = schema
    return schema
