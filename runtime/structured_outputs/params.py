"""What a request constrains its output to: ``StructuredOutputsParams`` (torch-free, vLLM's field names).

Exactly one of ``json`` (a JSON schema, dict or string), ``regex``, ``choice`` (a list of literal strings),
``grammar`` (EBNF / GBNF, xgrammar's dialect) or ``json_object`` (any JSON object) is set. ``strict`` (OpenAI's
``json_schema.strict``): an object schema allows no property it does not declare (xgrammar's ``strict_mode``);
``strict=False`` follows JSON Schema's default (undeclared properties allowed unless
``additionalProperties: false``). ``any_whitespace``: JSON may put any whitespace between tokens; the default is
compact one-line JSON (``", "`` and ``": "``), because a small model that may emit whitespace freely can loop on
newlines until ``max_tokens`` and never close the object.

``key`` is the stable cache key of the compiled grammar (the schema's property order is kept: it is the order
the grammar emits properties in). Every bad value raises :class:`GrammarError` naming the field.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


class GrammarError(ValueError):
    """An invalid or unsupported constraint. ``field`` is the StructuredOutputsParams field it concerns ("json",
    "regex", "choice", "grammar", "json_object"); the message carries the grammar compiler's own words."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    strict: bool = True
    any_whitespace: bool = False
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chosen = [
            k
            for k in KINDS
            if (getattr(self, k) is not None and k != "json_object") or (k == "json_object" and self.json_object)
        ]
        if len(chosen) != 1:
            raise GrammarError(
                f"structured_outputs must set exactly one of {', '.join(KINDS)}; got "
                f"{', '.join(chosen) if chosen else 'none'}",
                chosen[1] if len(chosen) > 1 else None,
            )
        if self.json is not None and not isinstance(self.json, dict | str):
            raise GrammarError(
                f"json must be a JSON schema (an object or a string), got {type(self.json).__name__}", "json"
            )
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise GrammarError("regex must be a non-empty string", "regex")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise GrammarError("grammar must be a non-empty string", "grammar")
        if self.choice is not None:
            if not isinstance(self.choice, list | tuple) or not self.choice:
                raise GrammarError("choice must be a non-empty list of strings", "choice")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise GrammarError("choice must contain non-empty strings only", "choice")
            object.__setattr__(self, "choice", list(self.choice))
        object.__setattr__(self, "key", self._make_key(chosen[0]))

    @property
    def kind(self) -> str:
        """Which constraint: one of KINDS."""
        return self.key.split("\x00", 1)[0]

    def _make_key(self, kind: str) -> str:
        value: Any = getattr(self, kind)
        if kind == "json" and isinstance(value, str):
            # '{"a": 1}' and {"a": 1} are the same schema; an unparseable string keys by itself
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        return "\x00".join((kind, text, f"strict={self.strict}", f"ws={self.any_whitespace}"))
