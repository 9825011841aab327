"""Tokenizer from a HF checkpoint directory (tokenizer.json + tokenizer_config.json), chat template,
and incremental detokenization for streaming."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from moecluster.errors import MoeClusterError


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict, eos_ids: list[int], bos_id: int | None):
        self.tok = tok
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        self.eos_ids = eos_ids
        self.bos_id = bos_id
        self.add_bos = bool(config.get("add_bos_token", False)) and bos_id is not None

    @classmethod
    def from_dir(cls, model_dir: Path, args) -> "Tokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise MoeClusterError(f"{path} not found; the checkpoint needs a tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad files
            raise MoeClusterError(f"{path} could not be read: {e}") from None
        config = {}
        cfg_path = Path(model_dir) / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise MoeClusterError(f"{cfg_path} is not valid JSON: {e}") from None
        eos_ids = list(args.eos_token_ids)
        eos_text = _token_text(config.get("eos_token"))
        if eos_text is not None and tok.token_to_id(eos_text) is not None:
            eos_ids.append(tok.token_to_id(eos_text))
        bos_text = _token_text(config.get("bos_token"))
        bos_id = tok.token_to_id(bos_text) if bos_text else args.bos_token_id
        return cls(tok, config, sorted(set(eos_ids)), bos_id)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's Jinja chat template (sandboxed, as transformers does)."""
        if not self.chat_template:
            raise MoeClusterError("this tokenizer has no chat_template in tokenizer_config.json; "
                                  "use a plain prompt instead of --chat")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise MoeClusterError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=_token_text(self.config.get("bos_token")) or "",
                eos_token=_token_text(self.config.get("eos_token")) or "")
        except TemplateError as e:
            raise MoeClusterError(f"chat template failed: {e}") from None


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)
