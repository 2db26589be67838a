"""Structured outputs on the bundled SmolLM2 tokenizer: random walks through xgrammar's masks produce text that
parses and validates (jsonschema is the oracle); regex / choice / grammar outputs match; bad input raises
GrammarError with the compiler's message; compiled grammars are cached."""

from __future__ import annotations

import json
import random
import re
import threading

import jsonschema
import pytest
import torch

from kubellm.runtime.structured_outputs import (
    GrammarBackend,
    GrammarError,
    GrammarState,
    StructuredOutputsParams,
    allocate_bitmask,
    apply_bitmask,
)
from kubellm.runtime.tokenizer import Tokenizer

SCHEMAS: dict[str, dict] = {
    "flat_required": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["id", "tags"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "array_bounds": {
        "type": "object",
        "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}},
        "required": ["xs"],
    },
    "enum_const": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "v": {"const": 2}},
        "required": ["color", "v"],
    },
    "integer_range": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99}, "m": {"type": "integer", "minimum": -5}},
        "required": ["n", "m"],
    },
    "defs_ref": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/point"},
            "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3},
        },
        "required": ["a", "path"],
    },
    "anyof_nullable": {
        "type": "object",
        "properties": {
            "v": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^[a-z]{1,5}$"}]},
            "w": {"type": ["string", "null"], "maxLength": 6},
        },
        "required": ["v", "w"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["a"],
    },
    "top_level_array": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 5},
}


@pytest.fixture(scope="module")
def backend(smollm2_tokenizer: Tokenizer) -> GrammarBackend:
    return GrammarBackend(smollm2_tokenizer, 49152)


def allowed_ids(state: GrammarState, vocab_size: int) -> list[int]:
    bitmask = allocate_bitmask(1, vocab_size)
    state.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, vocab_size)
    apply_bitmask(logits, bitmask, [0], vocab_size)
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def walk(backend: GrammarBackend, tokenizer: Tokenizer, params: StructuredOutputsParams, rng: random.Random) -> str:
    """A random path through the grammar that prefers closing it: the stop token when allowed, structural tokens
    half the time, any allowed token otherwise. Returns the decoded text; asserts the grammar terminated."""
    state = backend.compile(params).new_state()
    structural = {tokenizer.token_to_id(t) for t in ['"', "}", "]", ",", '",', '"}', "],", "}]", " "]} - {None}
    ids: list[int] = []
    for _ in range(300):
        allowed = allowed_ids(state, backend.vocab_size)
        assert allowed, f"the grammar allows no token after {tokenizer.decode(ids)!r}"
        stops = [t for t in allowed if t in backend.stop_token_ids]
        closing = [t for t in allowed if t in structural]
        if stops and rng.random() < 0.9:
            token = stops[0]
        elif closing and rng.random() < 0.5:
            token = rng.choice(closing)
        else:
            token = rng.choice(allowed)
        assert state.accept(token), token
        if state.is_terminated():
            break
        ids.append(token)
    assert state.is_terminated(), f"no end after 300 tokens: {tokenizer.decode(ids)!r}"
    return tokenizer.decode(ids)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_walks_validate(name: str, backend: GrammarBackend, smollm2_tokenizer: Tokenizer) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    schema = SCHEMAS[name]
    params = StructuredOutputsParams(json=schema)
    for _ in range(4):
        text = walk(backend, smollm2_tokenizer, params, rng)
        jsonschema.validate(json.loads(text), schema)


def test_a_length_bounded_string_admits_no_raw_control_character(
    backend: GrammarBackend, smollm2_tokenizer: Tokenizer
) -> None:
    """JSON forbids U+0000-U+001F unescaped in a string; xgrammar 0.2.8's own lowering of maxLength admits them
    (a walk once produced a raw \\x18 that json.loads refused), so the backend rewrites the bound."""
    decode = smollm2_tokenizer.decode
    control = [t for t in range(smollm2_tokenizer.vocab_size) if any(ord(c) < 0x20 for c in decode([t]))]
    assert control
    for schema in ({"type": "string", "maxLength": 10}, {"type": ["string", "null"], "minLength": 1}):
        state = backend.compile(StructuredOutputsParams(json=schema)).new_state()
        assert state.accept(smollm2_tokenizer.encode('"')[0])
        allowed = set(allowed_ids(state, backend.vocab_size))
        assert allowed and not allowed & set(control), schema


def test_strict_forbids_undeclared_properties(backend: GrammarBackend, smollm2_tokenizer: Tokenizer) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    strict = backend.compile(StructuredOutputsParams(json=schema)).new_state()
    loose = backend.compile(StructuredOutputsParams(json=schema, strict=False)).new_state()
    for token in smollm2_tokenizer.encode('{"b'):
        assert loose.accept(token)
    prefix = smollm2_tokenizer.encode("{")
    assert all(strict.accept(t) for t in prefix)
    b = smollm2_tokenizer.encode('"b')
    assert not all(strict.accept(t) for t in b)


def test_json_object_is_any_object(backend: GrammarBackend, smollm2_tokenizer: Tokenizer) -> None:
    rng = random.Random(seed := random.randrange(2**32))
    print(f"seed={seed}")
    for _ in range(3):
        assert isinstance(
            json.loads(walk(backend, smollm2_tokenizer, StructuredOutputsParams(json_object=True), rng)), dict
        )
    state = backend.compile(StructuredOutputsParams(json_object=True)).new_state()
    assert not state.accept(smollm2_tokenizer.encode("[")[0])  # an array is JSON, not an object


def test_regex_choice_and_grammar_match(backend: GrammarBackend, smollm2_tokenizer: Tokenizer) -> None:
    rng = random.Random(seed := random.randrange(2**32))
    print(f"seed={seed}")
    regex = r"[A-Z][a-z]{2,6}-\d{3}"
    choices = ["yes", "no", 'say "maybe"', "naïve\nline"]
    ebnf = 'root ::= "(" item (", " item)* ")"\nitem ::= [0-9]+ | "x"'
    for _ in range(4):
        assert re.fullmatch(regex, walk(backend, smollm2_tokenizer, StructuredOutputsParams(regex=regex), rng))
        assert walk(backend, smollm2_tokenizer, StructuredOutputsParams(choice=choices), rng) in choices
        text = walk(backend, smollm2_tokenizer, StructuredOutputsParams(grammar=ebnf), rng)
        assert re.fullmatch(r"\((\d+|x)(, (\d+|x))*\)", text), text


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        (dict(json='{"type": "object"'), "json", "not JSON"),
        (dict(json={"type": "objekt"}), "json", 'Unsupported type "objekt"'),
        (dict(json={"$ref": "#/$defs/missing"}), "json", "$defs"),
        (dict(json={"type": "string", "pattern": "(("}), "json", "parenthesis"),
        (dict(json={"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "json", "uniqueItems"),
        (dict(json={"allOf": [{"type": "integer"}, {"minimum": 3}]}), "json", "allOf"),
        (dict(json={"type": "object", "properties": {"a": {"not": {"const": 1}}}}), "json", "#/properties/a/not"),
        (dict(json={"type": "number", "multipleOf": 0.5}), "json", "multipleOf"),
        (dict(json={"if": {"required": ["a"]}, "then": {"required": ["b"]}}), "json", "'if'"),
        (dict(json={"$ref": "https://example.com/s.json"}), "json", "local references"),
        (dict(json={"type": "string", "pattern": "^a+$", "maxLength": 3}), "json", "#/pattern: 'pattern' combined"),
        (dict(json={"type": "string", "format": "email", "minLength": 3}), "json", "#/format: 'format' combined"),
        (dict(regex="(("), "regex", "parenthesis is not closed"),
        (dict(grammar='root ::= "a" | b'), "grammar", 'Rule "b" is not defined'),
    ],
)
def test_bad_input_raises_grammar_error(backend: GrammarBackend, params: dict, field: str, words: str) -> None:
    with pytest.raises(GrammarError) as info:
        backend.compile(StructuredOutputsParams(**params))
    assert info.value.field == field
    assert words in info.value.message, info.value.message
    assert "/project/cpp" not in info.value.message


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (dict(), "exactly one"),
        (dict(json={"type": "object"}, regex="a"), "exactly one"),
        (dict(choice=[]), "choice"),
        (dict(choice=["a", 3]), "choice"),
        (dict(regex=""), "regex"),
        (dict(json=3), "json"),
    ],
)
def test_params_validation(params: dict, words: str) -> None:
    with pytest.raises(GrammarError, match=words):
        StructuredOutputsParams(**params)


def test_the_cache_key_is_stable_and_order_sensitive() -> None:
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {}, "y": {}}})
    assert a.key == StructuredOutputsParams(json='{"type": "object", "properties": {"x": {}, "y": {}}}').key
    assert a.key != StructuredOutputsParams(json={"type": "object", "properties": {"y": {}, "x": {}}}).key
    assert a.key != StructuredOutputsParams(json=a.json, strict=False).key
    assert StructuredOutputsParams(regex="a").kind == "regex"


def test_cache_hit_and_one_compile_under_concurrency(smollm2_tokenizer: Tokenizer) -> None:
    backend = GrammarBackend(smollm2_tokenizer, 49152, max_cached=2)
    params = StructuredOutputsParams(json=SCHEMAS["nested"])
    results = []
    threads = [threading.Thread(target=lambda: results.append(backend.compile(params))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in results}) == 1
    stats = backend.stats()
    assert (stats.num_compiles, stats.num_hits) == (1, 5)
    assert stats.compile_time_s[params.key] == results[0].compile_time_s > 0
    # LRU: two more grammars push the first one out
    backend.compile(StructuredOutputsParams(regex="a"))
    backend.compile(StructuredOutputsParams(regex="b"))
    assert backend.compile(params) is not results[0]
    assert backend.stats().num_compiles == 4
    # an error is not cached, and is raised again
    for _ in range(2):
        with pytest.raises(GrammarError):
            backend.compile(StructuredOutputsParams(regex="(("))
    assert backend.stats().num_errors == 2


def test_padded_vocab_and_special_tokens_are_masked(smollm2_tokenizer: Tokenizer) -> None:
    backend = GrammarBackend(smollm2_tokenizer, 49152 + 64)
    state = backend.compile(StructuredOutputsParams(json_object=True)).new_state()
    for token in smollm2_tokenizer.encode('{"a": "'):
        assert state.accept(token)
    bitmask = allocate_bitmask(3, backend.vocab_size)
    state.fill_bitmask(bitmask, 1)
    logits = torch.zeros(3, backend.vocab_size)
    apply_bitmask(logits, bitmask, [1], backend.vocab_size)
    assert torch.isfinite(logits[[0, 2]]).all()  # the other rows are untouched
    allowed = torch.isfinite(logits[1])
    assert not allowed[49152:].any()  # padding ids
    assert not allowed[sorted(smollm2_tokenizer.all_special_ids)].any()  # <|im_start|> is not text
    assert allowed[smollm2_tokenizer.encode("hello", add_special_tokens=False)[0]]


def test_rollback_and_fork(backend: GrammarBackend, smollm2_tokenizer: Tokenizer) -> None:
    state = backend.compile(StructuredOutputsParams(json=SCHEMAS["flat_required"])).new_state()
    tokens = smollm2_tokenizer.encode('{"name": "Bo", "age": 3', add_special_tokens=False)
    for token in tokens[:3]:
        assert state.accept(token)
    before = allowed_ids(state, backend.vocab_size)
    child = state.fork()
    for token in tokens[3:]:
        assert state.accept(token)
    state.rollback(len(tokens) - 3)
    assert allowed_ids(state, backend.vocab_size) == before == allowed_ids(child, backend.vocab_size)
    with pytest.raises(ValueError, match="roll back"):
        state.rollback(4)
    rejected = next(t for t in range(backend.vocab_size) if t not in set(before))
    assert not state.accept(rejected)  # a rejected token leaves the state as it was
    assert allowed_ids(state, backend.vocab_size) == before


@pytest.mark.parametrize("parallel", [False, True])
def test_forced_tool_calls_validate_against_each_functions_parameters(
    parallel: bool, backend: GrammarBackend, smollm2_tokenizer: Tokenizer
) -> None:
    from kubellm.runtime.tool_parsers import forced_tool_calls_schema, parse_forced_tool_calls

    weather = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"],
    }
    route = {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
        "type": "object",
        "properties": {"stops": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 2}},
        "required": ["stops"],
    }
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": weather}},
        {"type": "function", "function": {"name": "route", "parameters": route}},
    ]
    schema = forced_tool_calls_schema(tools, "required", parallel_tool_calls=parallel)
    rng = random.Random(seed := random.randrange(2**32))
    print(f"seed={seed}")
    by_name = {"get_weather": weather, "route": route}
    for _ in range(4):
        text = walk(backend, smollm2_tokenizer, StructuredOutputsParams(json=schema), rng)
        calls = parse_forced_tool_calls(text)
        assert calls and (parallel or len(calls) == 1), repr(text)
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), by_name[call.name])


def test_vocab_types(smollm2_tokenizer: Tokenizer) -> None:
    """SmolLM2 is byte-level BPE; a SentencePiece-style vocabulary (Llama 2 / Mistral: ``▁`` for a space,
    ``<0xC3>`` byte pieces) is byte-fallback with a prefix space, and its grammar walks decode right."""
    import xgrammar as xg
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from kubellm.runtime.structured_outputs.backend import detect_vocab_type

    assert detect_vocab_type(smollm2_tokenizer) == (xg.VocabType.BYTE_LEVEL, False)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz0123456789", "▁a", "ab", "▁ab", "12"]:
        vocab[piece] = len(vocab)
    hf = HFTokenizer(
        models.BPE(vocab, [("▁", "a"), ("a", "b"), ("▁a", "b"), ("1", "2")], byte_fallback=True, unk_token="<unk>")
    )
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tokenizer = Tokenizer(hf, special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    assert detect_vocab_type(tokenizer) == (xg.VocabType.BYTE_FALLBACK, True)
    backend = GrammarBackend(tokenizer)
    assert backend.stop_token_ids == [2]
    rng = random.Random(seed := random.randrange(2**32))
    print(f"seed={seed}")
    regex = "[a-z]{2,4} [0-9]{2}é"
    for _ in range(5):
        assert re.fullmatch(regex, walk(backend, tokenizer, StructuredOutputsParams(regex=regex), rng))
