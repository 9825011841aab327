"""Tokenizer from a HF checkpoint directory (tokenizer.json, tokenizer_config.json, chat_template.jinja), chat
templates rendered the way transformers renders them, and incremental detokenization for streaming."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from moecluster.errors import MoeClusterError

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.43 saves templates here; it wins over the config
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named templates besides the default one
# The named special tokens transformers passes to every template (SPECIAL_TOKENS_ATTRIBUTES); model-specific
# `*_token` keys of tokenizer_config.json are passed too.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is the one templates read


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeClusterError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MoeClusterError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def load_chat_templates(model_dir: Path, config: dict) -> tuple[dict[str, str], str]:
    """Named chat templates and where they came from. As in transformers, chat_template.jinja (and
    additional_chat_templates/*.jinja) take precedence over tokenizer_config.json's `chat_template`, which is a
    string or a list of {"name", "template"} dicts."""
    templates = {}
    if (model_dir / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (model_dir / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((model_dir / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates, str(model_dir / (CHAT_TEMPLATE_FILE if "default" in templates else CHAT_TEMPLATE_DIR))
    source = str(model_dir / "tokenizer_config.json")
    value = config.get("chat_template")
    if value is None:
        return {}, source
    if isinstance(value, str):
        return {"default": value}, source
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}, source
    raise MoeClusterError(
        f'{source}: chat_template must be a string or a list of {{"name", "template"}} '
        f"objects, not {type(value).__name__}"
    )


def special_tokens_map(config: dict, legacy: dict) -> dict[str, str]:
    """The special tokens transformers passes to a chat template: the named ones and model-specific `*_token`
    keys; special_tokens_map.json is only read when tokenizer_config.json has no added_tokens_decoder."""
    merged = dict(config) if "added_tokens_decoder" in config else {**config, **legacy}
    tokens = {key: _token_text(value) for key, value in merged.items() if key.endswith("_token")}
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, dict):  # the v5 form of named model-specific tokens
        tokens.update({key: _token_text(value) for key, value in extra.items()})
    return {key: value for key, value in tokens.items() if value is not None}


class Tokenizer:
    """A tokenizers.Tokenizer plus what tokenizer_config.json adds: BOS/EOS, special tokens, chat templates."""

    def __init__(
        self,
        tok: HFTokenizer,
        config: dict,
        eos_ids: list[int],
        bos_id: int | None,
        chat_templates: dict[str, str] | None = None,
        template_source: str = "tokenizer_config.json",
        special_tokens: dict[str, str] | None = None,
    ):
        self.tok = tok
        self.config = config
        if chat_templates is None:
            value = config.get("chat_template")
            chat_templates = {"default": value} if isinstance(value, str) else {}
        self.chat_templates = chat_templates
        self.chat_template: str | None = chat_templates.get("default")
        self.template_source = template_source
        self.special_tokens = special_tokens if special_tokens is not None else special_tokens_map(config, {})
        self.eos_ids = eos_ids
        self.bos_id = bos_id
        self.add_bos = bool(config.get("add_bos_token", False)) and bos_id is not None
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        # <0xNN> tokens only decode as bytes through a ByteFallback decoder (sentencepiece-style vocabularies)
        decoder = tok.decoder.__getstate__() if tok.decoder is not None else b""
        byte_ids = (tok.token_to_id(f"<0x{b:02X}>") for b in range(256)) if b'"ByteFallback"' in decoder else ()
        self.byte_fallback_ids = frozenset(i for i in byte_ids if i is not None)

    @classmethod
    def from_dir(cls, model_dir: Path, args) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise MoeClusterError(f"{path} not found; the checkpoint needs a tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad files
            raise MoeClusterError(f"{path} could not be read: {e}") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        legacy = _read_json(model_dir / "special_tokens_map.json")
        templates, source = load_chat_templates(model_dir, config)
        eos_ids = list(args.eos_token_ids)
        eos_text = _token_text(config.get("eos_token"))
        if eos_text is not None and tok.token_to_id(eos_text) is not None:
            eos_ids.append(tok.token_to_id(eos_text))
        bos_text = _token_text(config.get("bos_token"))
        bos_id = tok.token_to_id(bos_text) if bos_text else args.bos_token_id
        return cls(tok, config, sorted(set(eos_ids)), bos_id, templates, source, special_tokens_map(config, legacy))

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids: list[int] = self.tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_vars: Any,
    ) -> str:
        """Render messages with the checkpoint's Jinja chat template as transformers'
        `apply_chat_template(..., tokenize=False)` does; extra keyword args (enable_thinking=...) reach the template."""
        template = self._pick_template(tools)
        if not messages:
            raise MoeClusterError("cannot apply the chat template to an empty conversation; send at least one message")
        if not all(isinstance(m, Mapping) for m in messages):
            raise MoeClusterError("chat messages must be objects with a role and a content")
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and not all(isinstance(v, Mapping) for v in value):
                raise MoeClusterError(f"chat {name} must be a list of JSON objects")
        # transformers drops None values (OpenAI clients send content=None), and passes only plain JSON data
        chat = _alias_reasoning(_plain([{k: v for k, v in m.items() if v is not None} for m in messages]))
        variables = _plain({**self.special_tokens, **template_vars})  # explicit variables win over special tokens
        compiled = _compile(template, self.template_source)
        try:
            return compiled.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _TemplateRaised as e:  # the template's own check of the messages, e.g. role order
            raise MoeClusterError(f"chat template rejected the messages: {e.message}") from None
        except Exception as e:  # TemplateError, SecurityError, or a Python error inside a template expression
            raise MoeClusterError(
                f"chat template from {self.template_source} failed: {type(e).__name__}: {e}"
            ) from None

    def _pick_template(self, tools) -> str:
        """The default template, or "tool_use" when tools are given and the checkpoint has one (as transformers)."""
        if not self.chat_templates:
            raise MoeClusterError(
                "this tokenizer has no chat template (no chat_template.jinja and no chat_template "
                "in tokenizer_config.json); use a plain prompt instead of --chat"
            )
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" not in self.chat_templates:
            raise MoeClusterError(
                f'{self.template_source} has chat templates {sorted(self.chat_templates)} but none named "default"'
            )
        return self.chat_templates["default"]


# ---- the sandboxed Jinja environment of transformers' chat templates (utils/chat_template_utils.py) ----


class _TemplateRaised(jinja2.TemplateError):
    """raise_exception() called by a template."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters and takes no separators; templates expect json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes, which could reach CPython internals."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers in training templates) and renders
    the body unchanged, so such templates compile here as they do in transformers."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str, source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_Namespace
    )
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise MoeClusterError(
            f"chat template from {source} has a syntax error at line {e.lineno}: {e.message}"
        ) from None


def _plain(value: Any) -> Any:
    """Template inputs as plain JSON data: the sandbox does not know which methods of rich objects are dangerous
    (transformers does the same; anything else becomes a "<TypeName>" placeholder)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy scalars) lose their extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):  # pydantic models (the server's request types)
        return _plain(model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    """Fill `reasoning_content` (and `thinking`, which gpt-oss templates read) from any of their names."""
    out = []
    for message in chat:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out


# ---- incremental detokenization ----

STREAM_CONTEXT = 8  # tokens of context a restarted DecodeStream decodes with (after flush)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas whose concatenation equals `decode(ids)`, with O(1)
    work per token: tokenizers' DecodeStream decodes only a window of a few recent tokens.

    Held back, never emitted as U+FFFD: a token that ends mid-character (DecodeStream waits while its text ends
    in U+FFFD), and an open run of byte-fallback tokens (<0xE2>...) until a non-byte token closes it, because
    ByteFallback decodes a whole run as U+FFFDs if any byte of it is invalid, so a later byte can change how the
    earlier ones decode. `flush()` returns the held-back tail at the end of a stream."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._parts: list[str] = []  # the deltas returned so far
        self._settled = 0  # len(ids) when the deltas last covered every id
        self._run: list[int] = []  # an open byte-fallback run (with special tokens inside it) not yet streamed
        # test doubles without a tokenizers.Tokenizer, and decoders DecodeStream cannot follow, re-decode instead
        streamable = isinstance(getattr(tokenizer, "tok", None), HFTokenizer)
        self._stream = DecodeStream(skip_special_tokens=True) if streamable else None
        self._last = ""  # re-decode path: the text of the last decode that was not mid-character

    def push(self, token: int) -> str:
        """Add a token; returns the new text (may be empty while a character or byte run is incomplete)."""
        self.ids.append(token)
        if self._stream is None:
            return self._redecode()
        tok = self.tokenizer
        if token in tok.byte_fallback_ids or (self._run and token in tok.special_ids):
            self._run.append(token)  # skipped special tokens do not close a run: decode drops them first
            return ""
        ids, self._run = self._run + [token], []
        try:
            chunk = self._stream.step(tok.tok, ids)
        except Exception:  # DecodeStream saw text it already returned change: this decoder is not streamable
            self._stream, self._last = None, "".join(self._parts)
            return self._redecode()
        if chunk is None:
            return ""
        self._parts.append(chunk)
        self._settled = len(self.ids)
        return chunk

    def flush(self) -> str:
        """The held-back text at the end of a stream: an unfinished character decodes to U+FFFD, as in decode()."""
        if self._stream is not None and self._settled == len(self.ids):
            return ""  # the usual case: nothing held back
        full = self.tokenizer.decode(self.ids)  # once per stream, so a full decode is affordable here
        done = "".join(self._parts) if self._stream is not None else self._last
        tail = full[len(done) :] if full.startswith(done) else ""
        if self._stream is not None:
            # restart the stream after everything flushed; a short context keeps later deltas consistent
            self._stream = DecodeStream(ids=self.ids[-STREAM_CONTEXT:], skip_special_tokens=True)
            self._run, self._settled = [], len(self.ids)
            self._parts.append(tail)
        self._last = full
        return tail

    def text(self) -> str:
        """The full text of the ids so far, including anything held back."""
        if self._stream is not None and self._settled == len(self.ids):
            return "".join(self._parts)
        return self.tokenizer.decode(self.ids)

    def _redecode(self) -> str:
        """The quadratic fallback: decode everything, emit what is new unless it ends mid-character."""
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self._last) :] if text.startswith(self._last) else ""
        self._last = text
        return delta
