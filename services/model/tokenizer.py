"""Tokenizer without torch: HF ``tokenizer.json`` via ``tokenizers`` and the chat
template from ``tokenizer_config.json`` rendered with jinja2 the way transformers
renders it. Also the incremental detokenizer with stop-string handling.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def _raise(message: str) -> None:
    raise ValueError(message)


class TextTokenizer:
    def __init__(self, path: Path) -> None:
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_path = path / "tokenizer_config.json"
        self._cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = self._cfg.get("chat_template")
        tpl_file = path / "chat_template.jinja"
        if template is None and tpl_file.exists():
            template = tpl_file.read_text()
        self.chat_template: str | None = template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template) if template else None

    def _special(self, key: str) -> str:
        v = self._cfg.get(key)
        if isinstance(v, dict):
            return str(v.get("content", ""))
        return str(v or "")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def apply_chat_template(self, user_text: str) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; send a raw prompt")
        return self._template.render(
            messages=[{"role": "user", "content": user_text}],
            add_generation_prompt=True,
            bos_token=self._special("bos_token"),
            eos_token=self._special("eos_token"),
        )

    def encode_chat(self, user_text: str) -> list[int]:
        # The template already carries the special tokens, as transformers does.
        text = self.apply_chat_template(user_text)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A whole conversation ({"role", "content"} dicts) through the chat template, with
        the generation prompt (the HTTP door's /v1/chat/completions). One user message
        gives exactly ``encode_chat`` of its text."""
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        text = self._template.render(
            messages=list(messages), add_generation_prompt=True,
            bos_token=self._special("bos_token"), eos_token=self._special("eos_token"))
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    @property
    def raw(self) -> Tokenizer:
        """The ``tokenizers`` tokenizer (for ``DecodeStream``)."""
        return self._tok


class Detokenizer:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8
    and any tail that could still become a stop string.

    Incremental: ``tokenizers``' ``DecodeStream`` decodes each token against a short
    window of the ones before it (it returns nothing while a character is still
    half-written), so a token costs the same at position 10 and at 10,000; decoding
    the whole list at every token made the gateway's relay quadratic in the answer."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self._text = ""  # what the stream has decoded so far (complete characters only)
        self._emitted = 0
        self.stopped = False

    def add(self, new_ids: Sequence[int]) -> str:
        """Append tokens; return newly final text. Sets ``stopped`` on a stop string."""
        self.ids.extend(new_ids)
        if new_ids:
            chunk = self._stream.step(self._tok.raw, list(new_ids))
            if chunk:
                self._text += chunk
        text = self._text
        hits = [at for s in self._stop
                if (at := text.find(s, max(0, self._emitted - len(s) + 1))) != -1]
        if hits:  # cut at the earliest match, whichever stop string it is
            self.stopped = True
            text = text[: min(hits)]
        end = len(text) if self.stopped else max(self._emitted, len(text) - self._hold)
        delta = text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def flush(self) -> str:
        """Text still held back at the end of the stream. One whole decode per request,
        so a trailing half-written character ends as U+FFFD, as ``decode`` gives it."""
        if self.stopped:
            return ""
        text = self._tok.decode(self.ids)
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta
