"""The grammar engine: xgrammar compiles a :class:`StructuredOutputsParams` against OUR tokenizer's vocabulary.

    backend = GrammarBackend(tokenizer, vocab_size=model_config.vocab_size, stop_token_ids=engine_eos_ids)
    compiled = backend.compile(params)       # thread-safe, LRU-cached by params.key; GrammarError on bad input
    state = compiled.new_state()             # one GrammarState per sequence (see state.py)

``compile`` takes milliseconds to ~a second for a large schema: call it off the engine's step loop (a thread
pool); concurrent calls for the same key compile once, the others wait for that result. ``vocab_size`` is the
model's (the width of its logits), which may exceed the tokenizer's: the extra ids are never allowed.
``backend.stats()`` reports hits, compiles and the compile time of each grammar (``CompiledGrammar.compile_time_s``).

Vocabulary: byte-level BPE (GPT-2 / Llama 3 / SmolLM2 / Qwen: the decoder is ``ByteLevel``), byte-fallback BPE
(Llama 2 / Mistral SentencePiece: ``<0x0A>`` pieces) or raw. Special tokens are blanked so that a grammar never
spells ``<|im_start|>`` inside a JSON string; the stop ids are what the grammar emits when it is complete.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xgrammar as xg

from .params import GrammarError, StructuredOutputsParams
from .schema_check import bounded_strings_as_patterns, unsupported_schema_feature

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer
    from .state import GrammarState

# xgrammar's C++ errors start with "[hh:mm:ss] /project/cpp/file.cc:123: "
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar compiled for one vocabulary; immutable and shared by every sequence that uses it."""

    key: str
    kind: str
    compiled: xg.CompiledGrammar = field(repr=False)
    vocab_size: int
    compile_time_s: float

    def new_state(self) -> GrammarState:
        from .state import GrammarState

        return GrammarState(self)


@dataclass
class GrammarStats:
    num_compiles: int = 0
    num_hits: int = 0
    num_errors: int = 0
    compile_time_s: dict[str, float] = field(default_factory=dict)  # key -> seconds, of the grammars compiled


def detect_vocab_type(tokenizer: Tokenizer) -> tuple[xg.VocabType, bool]:
    """(vocab type, add_prefix_space) from the ``tokenizers`` JSON (its decoder) and from encoding one letter."""
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    decoder = json.dumps(spec.get("decoder") or {})
    vocab = backend.get_vocab(with_added_tokens=True)
    if '"ByteLevel"' in decoder:
        vocab_type = xg.VocabType.BYTE_LEVEL
    elif '"ByteFallback"' in decoder or "<0x0A>" in vocab:
        vocab_type = xg.VocabType.BYTE_FALLBACK
    else:
        vocab_type = xg.VocabType.RAW
    # a SentencePiece tokenizer encodes "a" as "▁a": the grammar must know the leading space is not text
    first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False)[:1])
    add_prefix_space = bool(first) and first[0].startswith("▁" if vocab_type is xg.VocabType.BYTE_FALLBACK else "Ġ")
    return vocab_type, add_prefix_space


def build_tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> xg.TokenizerInfo:
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    size = max(vocab_size, max(vocab.values()) + 1)
    encoded = [""] * size  # an empty token is a special token to xgrammar: never allowed inside the grammar
    for token, token_id in vocab.items():
        encoded[token_id] = token
    for token_id in tokenizer.all_special_ids:
        encoded[token_id] = ""
    stops = sorted(set(stop_token_ids))
    if not stops:
        raise ValueError("the grammar engine needs at least one stop token id (the tokenizer has no EOS)")
    vocab_type, add_prefix_space = detect_vocab_type(tokenizer)
    return xg.TokenizerInfo(
        encoded, vocab_type, vocab_size=size, stop_token_ids=stops, add_prefix_space=add_prefix_space
    )


class GrammarBackend:
    """Compiles StructuredOutputsParams for one tokenizer; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int | None = None,
        *,
        stop_token_ids: Iterable[int] | None = None,
        max_cached: int = 256,
        max_threads: int = 2,
    ) -> None:
        self.vocab_size = max(vocab_size or 0, tokenizer.vocab_size)
        stops = tokenizer.eos_token_ids if stop_token_ids is None else stop_token_ids
        self.tokenizer_info = build_tokenizer_info(tokenizer, self.vocab_size, stops)
        self.stop_token_ids: list[int] = list(self.tokenizer_info.stop_token_ids)
        # our own LRU (by params.key) replaces xgrammar's cache, which keys on the schema text alone
        self._compiler = xg.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._max_cached = max_cached
        self._cache: OrderedDict[str, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._stats = GrammarStats()

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar for ``params`` (cached). Raises GrammarError with the compiler's message."""
        with self._lock:
            cached = self._cache.get(params.key)
            if cached is not None:
                self._cache.move_to_end(params.key)
                self._stats.num_hits += 1
            else:
                future: Future[CompiledGrammar] = Future()
                self._cache[params.key] = future
                while len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
        if cached is not None:
            return cached.result()  # compiled, or being compiled by another thread: wait for it
        try:
            compiled = self._compile_uncached(params)
        except BaseException as e:
            with self._lock:
                self._stats.num_errors += 1
                if self._cache.get(params.key) is future:
                    del self._cache[params.key]  # a bad input is not remembered: its error is cheap to redo
            future.set_exception(e)
            raise
        with self._lock:
            self._stats.num_compiles += 1
            self._stats.compile_time_s[params.key] = compiled.compile_time_s
        future.set_result(compiled)
        return compiled

    def stats(self) -> GrammarStats:
        with self._lock:
            s = self._stats
            return GrammarStats(s.num_compiles, s.num_hits, s.num_errors, dict(s.compile_time_s))

    def _compile_uncached(self, params: StructuredOutputsParams) -> CompiledGrammar:
        kind = params.kind
        start = time.perf_counter()
        try:
            compiled = self._xgrammar_compile(params, kind)
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"invalid {_WHAT[kind]}: {_clean(e)}", kind) from e
        return CompiledGrammar(params.key, kind, compiled, self.vocab_size, time.perf_counter() - start)

    def _xgrammar_compile(self, params: StructuredOutputsParams, kind: str) -> xg.CompiledGrammar:
        ws = params.any_whitespace
        if kind == "json":
            schema: Any = params.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise GrammarError(f"invalid JSON schema: not JSON ({e})", kind) from e
            if not isinstance(schema, dict | bool):
                raise GrammarError(f"invalid JSON schema: must be an object, got {type(schema).__name__}", kind)
            if (why := unsupported_schema_feature(schema)) is not None:
                raise GrammarError(f"unsupported JSON schema: {why}", kind)
            schema = bounded_strings_as_patterns(schema)
            return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=ws, strict_mode=params.strict)
        if kind == "json_object":
            # any object (not any JSON value): an object schema that declares nothing and allows everything
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=ws, strict_mode=False)
        if kind == "regex":
            assert params.regex is not None
            return self._compiler.compile_regex(params.regex)
        if kind == "choice":
            assert params.choice is not None
            # EBNF string literals take JSON's escapes
            ebnf = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return self._compiler.compile_grammar(ebnf)
        assert params.grammar is not None
        return self._compiler.compile_grammar(params.grammar)


_WHAT = {
    "json": "JSON schema",
    "json_object": "JSON object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


def _clean(error: BaseException) -> str:
    """xgrammar's message without its C++ source location."""
    return _CPP_PREFIX.sub("", str(error)).strip()
