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

from .backend import CompiledGrammar, GrammarBackend, GrammarStats
from .params import GrammarError, StructuredOutputsParams
from .state import GrammarState, allocate_bitmask, apply_bitmask

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
