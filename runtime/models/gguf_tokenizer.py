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


# The tokenizer models we build, by `tokenizer.ggml.model`.
BYTE_LEVEL_BPE = "gpt2"  # GPT-2 style byte-level BPE: Llama 3, Qwen, SmolLM
SENTENCEPIECE_BPE = "llama"  # SentencePiece BPE with byte fallback: Llama 2, Mistral, TinyLlama
SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def gguf_to_tokenizer(f: GGUFFile) -> Any:
    """The GGUF vocabulary -> a ``tokenizers.Tokenizer``: byte-level BPE (``gpt2``) or SentencePiece BPE (``llama``)."""
    kind = f.get("tokenizer.ggml.model")
    if kind is None:
        raise GGUFError(f"{f.path}: no tokenizer (metadata key 'tokenizer.ggml.model' is missing)")
    tokens: list[str] = list(f.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise GGUFError(f"{f.path}: metadata key 'tokenizer.ggml.tokens' is missing or empty")
    if kind == BYTE_LEVEL_BPE:
        tokenizer = _byte_level_bpe(f, tokens)
    elif kind == SENTENCEPIECE_BPE:
        tokenizer = _sentencepiece_bpe(f, tokens)
    else:
        raise GGUFError(
            f"{f.path}: tokenizer.ggml.model {kind!r} is not supported (supported: {BYTE_LEVEL_BPE!r}, "
            f"{SENTENCEPIECE_BPE!r}); use the model's Hugging Face directory instead"
        )
    _add_special_tokens(f, tokenizer, tokens)
    return tokenizer


def _file_merges(f: GGUFFile) -> list[tuple[str, str]] | None:
    """``tokenizer.ggml.merges`` as pairs; None when the file has none (SentencePiece files usually have none)."""
    merges_raw: list[str] = list(f.get("tokenizer.ggml.merges") or [])
    if not merges_raw:
        return None
    merges: list[tuple[str, str]] = []
    for i, merge in enumerate(merges_raw):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise GGUFError(f"{f.path}: tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens separated by a space")
        merges.append((left, right))
    return merges


def _byte_level_bpe(f: GGUFFile, tokens: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    pre = str(f.get("tokenizer.ggml.pre") or "default")
    # Llama 3 style vocabularies skip merging when a whole word is already a token.
    ignore_merges = pre in {"llama-bpe", "llama3", "llama-v3"}
    merges = _file_merges(f) or []
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
    return tokenizer


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str]) -> Any:
    """SentencePiece BPE as llama.cpp runs it: spaces are "▁", one "▁" is prepended to the text (unless
    ``tokenizer.ggml.add_space_prefix`` is false), adjacent pieces merge best-score first, and a character with no
    piece falls back to its UTF-8 bytes' ``<0xNN>`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    merges = _file_merges(f)
    if merges is None:
        scores = f.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise GGUFError(
                f"{f.path}: a SentencePiece vocabulary without merges needs 'tokenizer.ggml.scores', one per token "
                f"({len(tokens)}), got {'none' if scores is None else len(scores)}"
            )
        merges = merges_from_scores(tokens, [float(s) for s in scores])
    unk_id = f.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces of the vocabulary is
    a merge, ranked by the merged piece's score (best first; SentencePiece merges the pair whose result scores
    highest), then by longer left, then longer right part; equal ranks keep vocabulary order (the piece's id, then
    its parts' ids). transformers' GGUF loader ranks them the same way, so both tokenize alike."""
    ids = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, int, int, int, tuple[str, str]]] = []
    for token_id, (piece, score) in enumerate(zip(tokens, scores, strict=True)):
        if ids.get(piece) != token_id:
            continue  # a repeated piece: the first one stands
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, -len(left), -len(right), token_id, ids[left], ids[right], (left, right)))
    ranked.sort(key=lambda r: r[:6])
    return [r[6] for r in ranked]


def _add_special_tokens(f: GGUFFile, tokenizer: Any, tokens: list[str]) -> None:
    """Control tokens become special added tokens, user-defined ones (``<think>``) plain added tokens, so that both
    are matched whole in text; BOS (and EOS) are added around the text where the file says so."""
    from tokenizers import AddedToken, processors

    token_types: list[int] = list(f.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens))
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

    bos, eos = (_added_token(f, tokens, flag, key) for flag, key in (("bos", "bos_token_id"), ("eos", "eos_token_id")))
    if bos or eos:
        b, e = [t for t, _ in bos], [t for t, _ in eos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join([*b, "$A", *e]),
            pair=" ".join([*b, "$A", *e, *b, "$B", *e]),
            special_tokens=list({*bos, *eos}),
        )
    elif f.get("tokenizer.ggml.model") == BYTE_LEVEL_BPE:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)


def _added_token(f: GGUFFile, tokens: list[str], which: str, key: str) -> list[tuple[str, int]]:
    """[(the BOS / EOS token, its id)] when the file adds it around the text, else []."""
    token_id = f.get(f"tokenizer.ggml.{key}")
    if not _adds(f, f"add_{which}_token") or token_id is None or not 0 <= int(token_id) < len(tokens):
        return []
    return [(tokens[int(token_id)], int(token_id))]


def _adds(f: GGUFFile, flag: str) -> bool:
    """``tokenizer.ggml.add_bos_token`` / ``add_eos_token``; when absent, llama.cpp adds BOS for a SentencePiece
    vocabulary and nothing else."""
    default = flag == "add_bos_token" and f.get("tokenizer.ggml.model") == SENTENCEPIECE_BPE
    return bool(f.get(f"tokenizer.ggml.{flag}", default))


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
    config["add_bos_token"] = _adds(f, "add_bos_token")
    return config
