"""The tokenizer: Hugging Face ``tokenizers`` for text <-> ids, and the model's chat template rendered with jinja2
the way ``transformers``' ``apply_chat_template`` renders it (sandboxed; ``raise_exception``, ``strftime_now``,
a ``tojson`` that does not escape HTML).

Built from a Hugging Face directory (``tokenizer.json`` + ``tokenizer_config.json`` [+ ``chat_template.jinja``])
or from a GGUF file's vocabulary (:func:`kubellm.runtime.models.gguf_tokenizer.gguf_to_tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        # bos_token / eos_token / unk_token / pad_token as strings (what chat templates see)
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_template = chat_template
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = self._id_of(self.special_tokens.get("bos_token"))
        self.pad_token_id: int | None = self._id_of(self.special_tokens.get("pad_token"))
        eos = self._id_of(self.special_tokens.get("eos_token"))
        self.eos_token_ids: set[int] = {*([eos] if eos is not None else []), *extra_eos_token_ids}
        self.all_special_ids: set[int] = {
            token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special
        }

    # ------------------------------------------------------------------------------------------------ build

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From a Hugging Face model directory (``tokenizer.json`` is required)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json (only the fast-tokenizer format is supported)")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot be read as a tokenizer ({e})") from e
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            config = _read_json(config_path)
        special = {name: token for name in SPECIAL_TOKEN_NAMES if (token := _token_content(config.get(name)))}
        template = _chat_template_from(config, directory)
        return cls(tokenizer, special_tokens=special, chat_template=template, extra_eos_token_ids=extra_eos_token_ids)

    @classmethod
    def from_gguf(cls, f: Any, *, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From an opened GGUF file (:class:`kubellm.runtime.models.gguf.GGUFFile`)."""
        from .models.gguf_tokenizer import gguf_to_tokenizer, gguf_tokenizer_config

        config = gguf_tokenizer_config(f)
        special = {name: config[name] for name in SPECIAL_TOKEN_NAMES if name in config}
        return cls(
            gguf_to_tokenizer(f),
            special_tokens=special,
            chat_template=config.get("chat_template"),
            extra_eos_token_ids=extra_eos_token_ids,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template) so that
        :meth:`from_pretrained` (and transformers' ``AutoTokenizer``) read the same tokenizer back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------------------------------- text <-> ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        out: list[str] = []
        for token_id in ids:
            token = self._tokenizer.id_to_token(int(token_id))
            if token is None:
                raise ValueError(f"token id {token_id} is out of range (vocab_size {self.vocab_size})")
            out.append(token)
        return out

    def token_to_id(self, token: str) -> int | None:
        return self._id_of(token)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tokenizer.token_to_id(token)
        return None if token_id is None else int(token_id)

    # ----------------------------------------------------------------------------------------- chat template

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text (not tokenized: encode it with ``add_special_tokens=False``
        when the template writes the BOS token itself).

        ``continue_final_message`` leaves the last (assistant) message open for the model to continue.
        Extra keyword arguments reach the template as variables (e.g. ``enable_thinking=False`` for Qwen3).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json has no 'chat_template')")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"messages[{i}] must be a dict with a 'role'")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        chat = [dict(m) for m in messages]
        marker = "\x00CONTINUE_FINAL_MESSAGE\x00"
        if continue_final_message:
            content = chat[-1].get("content")
            if not isinstance(content, str):
                raise ValueError("continue_final_message needs the last message's 'content' to be a string")
            chat[-1]["content"] = content + marker
        variables = {**self.special_tokens, **kwargs}
        rendered = str(
            _compile(template).render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        )
        if continue_final_message:
            cut = rendered.rfind(marker)
            if cut < 0:
                raise ValueError("continue_final_message: the template dropped the final message's content")
            rendered = rendered[:cut]
        return rendered


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """Compile a chat template in jinja2's immutable sandbox (templates come from model repositories: untrusted)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # jinja's own tojson escapes HTML characters, which chat templates do not want
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not valid jinja2 (line {e.lineno}: {e.message})") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _chat_template_from(config: dict[str, Any], directory: Path) -> str | None:
    """The default chat template: ``chat_template.jinja`` (transformers >= 4.43 writes it there), else
    tokenizer_config.json's ``chat_template`` (a string, or a list of ``{"name", "template"}``)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
