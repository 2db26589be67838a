"""A GGUF with a SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``: Llama 2, Mistral, TinyLlama) tokenizes
as transformers' GGUF loader does, and serves. The vocabulary is trained in the test (tokenizers' BPE trainer over a
fixed corpus, SentencePiece-style: "▁" for spaces, ``<0xNN>`` byte pieces, pieces scored by merge rank, no merges in
the file) and written with the ``gguf`` package."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import gguf
import pytest

from kubellm.runtime.llm import LLM
from kubellm.runtime.models.gguf import open_gguf
from kubellm.runtime.models.gguf_blocks import GGUFError
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.tokenizer import Tokenizer

CORPUS = """The quick brown fox jumps over the lazy dog. Kubernetes schedules pods onto nodes; an operator reconciles
custom resources into deployments, services and autoscalers. Large language models predict the next token.
def greet(name: str) -> str:
    return f"Hello, {name}!"  # a comment
for i in range(10):
    print(i * i)
SELECT id, name FROM users WHERE active = 1 ORDER BY name;
Naïve café owners serve crème brûlée in Zürich. Ein schönes Haus. Привет, мир. 日本語のテキスト。
Numbers: 3.14159, 2718, 1e-9 and 42. Emails like ops@example.com and paths like /var/lib/kubelet.
"""
SPECIAL = ["<unk>", "<s>", "</s>"]
CONTROL_EXTRA = ["<|im_start|>", "<|im_end|>"]  # chat markers, as fine-tunes add them
USER_DEFINED = ["<think>", "</think>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and   three inside",
    "new\nlines\n\nand\ttabs\r\n",
    "naïve café — 日本語 😀 ∑ ß",
    'def greet(name):\n    return f"Hello, {name}!"',
    "<s>a literal BOS</s> and <|im_end|> inside text",
    "<think>hm</think> then the answer",
    "",
    " ",
    "12345 3.14159 1e-9",
    "▁already▁spaced",
]


def sentencepiece_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, token types) in SentencePiece's order: special, 256 bytes, merged pieces by rank (score
    -rank), single characters last, then added control and user-defined tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    trainee = HFTokenizer(models.BPE())
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainee.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=420, show_progress=False))
    trained = sorted(trainee.get_vocab().items(), key=lambda item: item[1])
    singles = [p for p, _ in trained if len(p) == 1]
    merged = [p for p, _ in trained if len(p) > 1]  # the trainer numbers merged pieces in merge order
    pieces = SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + merged + singles + CONTROL_EXTRA + USER_DEFINED
    scores = [0.0] * (len(SPECIAL) + 256) + [-float(i) for i in range(len(merged))]
    scores += [-1e4 - i for i in range(len(singles))] + [0.0] * (len(CONTROL_EXTRA) + len(USER_DEFINED))
    types = [2, 3, 3] + [6] * 256 + [1] * (len(merged) + len(singles)) + [3] * len(CONTROL_EXTRA)
    types += [4] * len(USER_DEFINED)  # 2 unknown, 3 control, 6 byte, 1 normal, 4 user-defined (llama_token_type)
    return pieces, scores, types


def write_sentencepiece_gguf(path: Path, **flags: Any) -> Path:
    pieces, scores, types = sentencepiece_vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(pieces))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    if flags.get("scores", True):
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if "add_space_prefix" in flags:
        writer.add_add_space_prefix(flags["add_space_prefix"])
    if "add_bos" in flags:  # absent: llama.cpp (and transformers) add BOS for a SentencePiece vocabulary
        writer.add_add_bos_token(flags["add_bos"])
    writer.add_chat_template(TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_tokenizer(path: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def random_texts(count: int) -> list[str]:
    seed = int(os.environ.get("KUBELLM_TEST_SEED") or random.randrange(2**31))
    print(f"text seed={seed} (replay with KUBELLM_TEST_SEED={seed})")
    rng = random.Random(seed)
    alphabet = list(CORPUS) + list(" \n\t") * 4 + ["é", "😀", "中", "<s>", "<|im_end|>", "<think>", "▁"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(count)]


@pytest.mark.parametrize("flags", [{}, {"add_bos": False}], ids=["default", "no-bos"])
def test_sentencepiece_gguf_tokenizes_like_transformers(tmp_path: Path, flags: dict[str, Any]) -> None:
    path = write_sentencepiece_gguf(tmp_path / "sp.gguf", **flags)
    ours = Tokenizer.from_gguf(open_gguf(path))
    theirs = transformers_tokenizer(path)
    for text in TEXTS + random_texts(200):
        expected = theirs.encode(text)
        assert ours.encode(text) == expected, text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(expected, skip) == theirs.decode(expected, skip_special_tokens=skip), (text, skip)
    # the premises: BOS leads exactly when the file says so, bytes fall back, and merged pieces are used
    ids = ours.encode("Kubernetes 😀")
    assert (ids[0] == 1) == flags.get("add_bos", True)
    pieces = [ours.backend.id_to_token(i) for i in ids]
    assert "<0xF0>" in pieces and any(len(p) > 3 and not p.startswith("<") for p in pieces), pieces


def test_add_space_prefix_false_prepends_no_space(tmp_path: Path) -> None:
    """llama.cpp's meaning of the flag: the text is not given a leading "▁". (transformers' GGUF loader ignores the
    flag and prepends anyway, so it is no oracle here.) A leading space then does what the prefix did."""
    default = Tokenizer.from_gguf(open_gguf(write_sentencepiece_gguf(tmp_path / "a.gguf")))
    bare = Tokenizer.from_gguf(open_gguf(write_sentencepiece_gguf(tmp_path / "b.gguf", add_space_prefix=False)))
    assert bare.backend.id_to_token(bare.encode("Kubernetes", add_special_tokens=False)[0])[0] != "▁"
    # a literal "▁" decodes as a space (SentencePiece's own loss), so the round trip leaves it out
    texts = [
        t for t in TEXTS + random_texts(100) if t and not t[0].isspace() and not t.startswith("<") and "▁" not in t
    ]
    for text in texts:
        assert bare.encode(" " + text, add_special_tokens=False) == default.encode(text, add_special_tokens=False)
        assert bare.decode(bare.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_a_sentencepiece_gguf_serves_chat_with_its_template(tmp_path: Path) -> None:
    path = write_sentencepiece_gguf(tmp_path / "sp.gguf")
    llm = LLM(str(path), device="cpu", dtype="float32", load_format="dummy", max_model_len=128,
              kv_cache_memory_bytes=1 << 22)  # fmt: skip
    messages = [{"role": "user", "content": "Naïve question: what is a pod?"}]
    prompt = llm.tokenizer.apply_chat_template(messages)
    theirs = transformers_tokenizer(path)
    assert llm.tokenizer.encode(prompt) == theirs.encode(prompt)
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt_token_ids == theirs.encode(prompt) and len(out.outputs[0].token_ids) == 5
    assert out.outputs[0].text == theirs.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_a_sentencepiece_gguf_without_scores_or_merges_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = write_sentencepiece_gguf(tmp_path / "sp.gguf", scores=False)
    with pytest.raises(GGUFError, match=r"needs 'tokenizer\.ggml\.scores', one per token"):
        Tokenizer.from_gguf(open_gguf(path))
