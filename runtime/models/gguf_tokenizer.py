"""A GGUF file's tokenizer: its vocabulary and merges (``tokenizer.ggml.*``) as a ``tokenizers.Tokenizer``, and what a
``tokenizer_config.json`` would say (special tokens, chat template)."""

from __future__ import annotations

from typing import Any

from .gguf import GGUFFile
from .gguf_blocks import GGUFError

# Pre-tokenizer split patterns, by `tokenizer.ggml.pre` (the same regexes the models' tokenizer.json files use).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def gguf_to_tokenizer(f: GGUFFile) -> Any:
    """The GGUF vocabulary + merges -> a ``tokenizers.Tokenizer`` (byte-level BPE, the ``gpt2`` tokenizer model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = f.get("tokenizer.ggml.model")
    if kind is None:
        raise GGUFError(f"{f.path}: no tokenizer (metadata key 'tokenizer.ggml.model' is missing)")
    if kind != "gpt2":
        raise GGUFError(
            f"{f.path}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use the model's Hugging Face directory instead"
        )
    tokens: list[str] = list(f.get("tokenizer.ggml.tokens") or [])
    merges_raw: list[str] = list(f.get("tokenizer.ggml.merges") or [])
    if not tokens:
        raise GGUFError(f"{f.path}: metadata key 'tokenizer.ggml.tokens' is missing or empty")
    token_types: list[int] = list(f.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for i, merge in enumerate(merges_raw):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise GGUFError(f"{f.path}: tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens separated by a space")
        merges.append((left, right))

    pre = str(f.get("tokenizer.ggml.pre") or "default")
    # Llama 3 style vocabularies skip merging when a whole word is already a token.
    ignore_merges = pre in {"llama-bpe", "llama3", "llama-v3"}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in {"smollm", "starcoder", "refact"}:
        # digits one by one, then GPT-2's split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"}:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level]
        )
    elif pre in {"qwen2", "deepseek-r1-qwen"}:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"), byte_level]
        )
    else:  # "default", "gpt2" and unknown names: GPT-2's split
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()

    special: list[AddedToken] = []
    user_defined: list[AddedToken] = []
    for token, kind_id in zip(tokens, token_types, strict=False):
        if kind_id == TOKEN_TYPE_CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind_id == TOKEN_TYPE_USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    if special:
        tokenizer.add_special_tokens(special)
    if user_defined:
        tokenizer.add_tokens(user_defined)

    bos_id = f.get("tokenizer.ggml.bos_token_id")
    if f.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[int(bos_id)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def gguf_tokenizer_config(f: GGUFFile) -> dict[str, Any]:
    """What a ``tokenizer_config.json`` would say: special tokens as strings and the chat template."""
    tokens: list[str] = list(f.get("tokenizer.ggml.tokens") or [])
    config: dict[str, Any] = {}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        value = f.get(f"tokenizer.ggml.{key}")
        if value is not None and 0 <= int(value) < len(tokens):
            config[name] = tokens[int(value)]
    template = f.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    config["add_bos_token"] = bool(f.get("tokenizer.ggml.add_bos_token", False))
    return config
