"""Structured outputs on xgrammar: constrain a request's tokens to a JSON schema, regex, choice or grammar.

Interface (what the server and the engine use):

- :class:`StructuredOutputsParams` (torch-free; ``params.py``): ``json`` | ``regex`` | ``choice`` | ``grammar`` |
  ``json_object``, plus ``strict`` and ``any_whitespace``; ``.key`` is its cache key. Bad values raise
  :class:`GrammarError` (a ``ValueError`` whose ``.field`` names the field, message from the compiler).
- :class:`GrammarBackend` ``(tokenizer, vocab_size, stop_token_ids=None)``: ``compile(params) -> CompiledGrammar``
  (thread-safe, LRU-cached; call it from a thread pool, never on the step loop), ``stats()``.
- :class:`CompiledGrammar`: ``new_state() -> GrammarState``, ``compile_time_s``.
- :class:`GrammarState`: ``accept(token_id) -> bool``, ``is_terminated()``, ``rollback(n)``,
  ``fill_bitmask(bitmask, row)``, ``fork()``.
- ``allocate_bitmask(num_rows, vocab_size)``, ``apply_bitmask(logits, bitmask, rows, vocab_size)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .params import GrammarError, StructuredOutputsParams

if TYPE_CHECKING:
    from .backend import CompiledGrammar, GrammarBackend, GrammarStats
    from .state import GrammarState, allocate_bitmask, apply_bitmask

# backend and state import xgrammar (and with it pydantic): loaded on first use, so that the engine and the
# params stay importable where xgrammar is absent (the GPU benchmark machine) and cost nothing until asked for
_LAZY = {
    "CompiledGrammar": "backend",
    "GrammarBackend": "backend",
    "GrammarStats": "backend",
    "GrammarState": "state",
    "allocate_bitmask": "state",
    "apply_bitmask": "state",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarError",
    "GrammarState",
    "GrammarStats",
    "StructuredOutputsParams",
    "allocate_bitmask",
    "apply_bitmask",
]
