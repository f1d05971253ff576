"""GGUF tokenizers of the MoE families against the tokenizers they were converted from.

Byte-level BPE (``tokenizer.ggml.model = "gpt2"``): one tiny BPE vocabulary is trained
with ``tokenizers`` on varied text, without any pre-split (so merges run across digits,
spaces and words and a wrong split shows), and wrapped in each family's own pipeline:
transformers' ``Qwen2Tokenizer`` (Qwen1.5/2/3-MoE) and ``GPTNeoXTokenizer`` (OLMoE), and
for DeepSeek-MoE and Granite the normalizer / pre-tokenizer of their published
``tokenizer.json`` files (DeepSeek's regexes as llama.cpp's ``llama-vocab.cpp`` spells
them; Granite's is StarCoder's, named ``refact`` by llama.cpp's converter). Each is
written to a GGUF as llama.cpp's converter lays out a BPE vocabulary, read back through
moechat, and must give the original's ids and text.

SentencePiece (``"llama"``, Mixtral): a tiny BPE ``tokenizer.model`` is trained with
``sentencepiece`` (Llama's settings: byte fallback, split digits, no normalisation),
written as llama.cpp's converter does (pieces, scores, token types), and moechat's
tokenizer must give SentencePiece's own ids, its decoded text, and transformers'
``LlamaTokenizer`` ids with BOS.

The same originals are also written to GGUF by llama.cpp's converter's own vocabulary
code (tests/llamacpp_vocab.py; the converter comes from the llama-cpp-python sdist,
as in test_gguf_families.py) and must read back the same. Real vocabularies (Qwen,
DeepSeek LLM, Refact/StarCoder, GPT-NeoX, Llama 2 SentencePiece) come from llama.cpp's
tokenizer test files, whose expected ids Hugging Face's tokenizers wrote.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

import gguf  # noqa: E402
from llamacpp_sdist import CACHE, LLAMA_CPP_PYTHON, download_sdist  # noqa: E402
from test_gguf_families import llama_cpp  # noqa: E402, F401
from tokenizers import (  # noqa: E402
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    trainers,  # noqa: E402
)
from tokenizers import pre_tokenizers as pre  # noqa: E402

from moechat.models.gguf import open_gguf, write_tokenizer_files  # noqa: E402
from moechat.runtime.errors import MoechatError  # noqa: E402
from moechat.runtime.streaming import StreamDecoder  # noqa: E402
from moechat.runtime.tokenizer import TextTokenizer  # noqa: E402

CONTROL, USER_DEFINED, NORMAL = 3, 4, 1
SPECIALS = ["<|endoftext|>", "<|padding|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Don't you think so? I'LL see.",
    "In 2024 there were 12345 visitors; 3.14159 x 2 = 6.28318, and 1000000 more.",
    "def add(a, b):\n    return a + b  # adds\n\n\nprint(add(12, 34))",
    "naïve café résumé façade Ærøskøbing déjà vu — “quotes” ½ ②",
    "日本語のテキストです。中文文本，还有更多的中文。한국어 텍스트입니다.",
    "We've, they're, it's, he'd, she'll, I'm — DON'T, WON'T, they'VE",
    "   leading spaces and    runs   of spaces\t\ttabs\r\nwindows lines",
    "Numbers: 1, 22, 333, 4444, 55555, 0.5, 99%, #42, $3.50, 2^10=1024",
    "Ελληνικά κείμενα και Кириллица текст, עברית, العربية",
    "emoji 😀 👍 🎉 and symbols © ® ™ → ← ≠ ≤ ≥",
]
TEXTS = [
    "12345 and 3.14159, 2024-06-01: 1000000",
    "日本語のテキスト 中文 한국어, 漢字かな交じり文",
    "naïve café, résumé, Ærøskøbing, ½ ②",
    "don't I'LL we've They'RE it's HE'D",
    "line one\n\nline two\r\n  indented   runs   \t tab\n",
    "emoji 😀👍🏽 and ✨ sparkles",
    "decomposed e\u0301 and A\u030a (not NFC)",
    "  leading spaces",
    "trailing spaces   ",
    "<|im_start|>user\nhi<|im_end|>",
]

# deepseek-ai/deepseek-llm-7b-base tokenizer.json (DeepSeek-MoE 16B uses the same): five
# isolated regex splits, digits one by one, byte-level without GPT-2's regex. The regexes
# are llama.cpp's (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM), characters as
# written there.
DEEPSEEK_SPLITS = [
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
]


def _with_specials(tok: Tokenizer) -> Tokenizer:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def qwen2(vocab: dict, merges: list[tuple[str, str]]) -> Tokenizer:
    from transformers import Qwen2Tokenizer

    return _with_specials(Qwen2Tokenizer(vocab=vocab, merges=merges).backend_tokenizer)


def olmo(vocab: dict, merges: list[tuple[str, str]]) -> Tokenizer:
    from transformers import GPTNeoXTokenizer

    return _with_specials(GPTNeoXTokenizer(vocab=vocab, merges=merges).backend_tokenizer)


def _plain(vocab: dict, merges: list, steps: list, normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return _with_specials(tok)


def deepseek(vocab: dict, merges: list[tuple[str, str]]) -> Tokenizer:
    splits = [pre.Split(Regex(r), behavior="isolated") for r in DEEPSEEK_SPLITS]
    steps = [*splits, pre.Digits(individual_digits=True), pre.ByteLevel(False, use_regex=False)]
    return _plain(vocab, merges, steps, normalizers.Sequence([]))


def granite(vocab: dict, merges: list[tuple[str, str]]) -> Tokenizer:
    steps = [pre.Digits(individual_digits=True), pre.ByteLevel(False, use_regex=True)]
    return _plain(vocab, merges, steps)


def gpt2(vocab: dict, merges: list[tuple[str, str]]) -> Tokenizer:
    return _plain(vocab, merges, [pre.ByteLevel(False, use_regex=True)])


# tokenizer.ggml.pre as llama.cpp's converter names each family's tokenizer
FAMILIES = {
    "qwen2": ("qwen2moe", qwen2, False),
    "olmo": ("olmoe", olmo, False),
    "deepseek-llm": ("deepseek", deepseek, True),
    "refact": ("granitemoe", granite, False),
    "gpt2": ("llama", gpt2, False),
}


def train_byte_level(texts: list[str], size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges trained on ``texts`` without any pre-split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=SPECIALS,
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


@pytest.fixture(scope="module")
def byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return train_byte_level(CORPUS * 4, 1200)


def _writer(path: Path, arch: str, model: str, tokens: list[str], types: list[int]):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(1024)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    return w


def _close(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_bpe_gguf(path: Path, arch: str, pre_name: str, tok: Tokenizer, add_bos: bool) -> Path:
    """convert_hf_to_gguf.py's _set_vocab_gpt2 layout: tokens by id, added special tokens
    CONTROL, merges as "a b", the pre-tokenizer's name."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    added = tok.get_added_tokens_decoder()
    types = [
        (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL
        for i in range(len(tokens))
    ]
    merges = json.loads(tok.to_str())["model"]["merges"]
    w = _writer(path, arch, "gpt2", tokens, types)
    w.add_tokenizer_pre(pre_name)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{{ messages }}")
    _close(w)
    return path


@pytest.fixture(scope="module")
def converted(byte_level_vocab, tmp_path_factory) -> dict[str, tuple[Tokenizer, Path]]:
    """pre-tokenizer name -> (the original tokenizer, moechat's folder from the GGUF)."""
    vocab, merges = byte_level_vocab
    root = tmp_path_factory.mktemp("gguf-bpe")
    out = {}
    for name, (arch, build, add_bos) in FAMILIES.items():
        original = build(dict(vocab), list(merges))
        path = write_bpe_gguf(root / f"{name}.gguf", arch, name, original, add_bos)
        out[name] = original, write_tokenizer_files(open_gguf(path), root / name)
    return out


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "gpt2"])
def test_byte_level_family_matches_its_original(converted, name) -> None:
    original, folder = converted[name]
    built = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        ids = original.encode(text, add_special_tokens=False).ids
        assert built.encode(text, add_special_tokens=False).ids == ids, text
        assert built.decode(ids, skip_special_tokens=False) == original.decode(
            ids, skip_special_tokens=False
        )
    # the torch-free runtime: control tokens typed in the text stay text, as with the
    # original told to encode them as text
    runtime = TextTokenizer.from_file(folder)
    original.encode_special_tokens = True
    try:
        for text in TEXTS:
            assert runtime.encode_text(text) == original.encode(text, add_special_tokens=False).ids
    finally:
        original.encode_special_tokens = False


def test_families_are_told_apart_by_these_texts(converted) -> None:
    """Same vocabulary and merges, different pipelines: every pair of pre-tokenizers gives
    different ids on some text, so a wrong mapping fails the test above."""
    ids = {
        name: [original.encode(t, add_special_tokens=False).ids for t in TEXTS]
        for name, (original, _) in converted.items()
    }
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert ids[a] != ids[b], (a, b)


def test_deepseek_adds_bos_like_its_original(converted) -> None:
    original, folder = converted["deepseek-llm"]
    built = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = original.token_to_id("<|endoftext|>")
    assert built.encode("hi 12").ids == [bos, *original.encode("hi 12").ids]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 1024  # deepseek.context_length


def test_transformers_loads_the_folder_as_written(converted) -> None:
    from transformers import AutoTokenizer

    original, folder = converted["qwen2"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == original.encode(text).ids


def test_deepseek_regexes_are_not_unicode_folded() -> None:
    """NFC would turn three Greek range ends into lookalikes below their range starts."""
    for regex in DEEPSEEK_SPLITS:
        ranges = [(regex[i - 1], regex[i + 1]) for i, c in enumerate(regex) if c == "-" and i]
        assert ranges and all(a <= b for a, b in ranges) or "-" not in regex


def test_unknown_pre_tokenizer_is_one_line(converted, byte_level_vocab, tmp_path) -> None:
    original, _ = converted["gpt2"]
    path = write_bpe_gguf(tmp_path / "x.gguf", "llama", "tekken", original, False)
    with pytest.raises(MoechatError) as err:
        write_tokenizer_files(open_gguf(path), tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "'tekken'" in message
    assert all(name in message for name in ("qwen2", "olmo", "deepseek-llm", "refact"))


# -- SentencePiece (Mixtral) ------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=proto,
        model_type="bpe",
        vocab_size=700,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (root / "tokenizer.model").write_bytes(proto.getvalue())
    return spm.SentencePieceProcessor(model_proto=proto.getvalue()), root


def write_spm_gguf(sp, path: Path, **metadata) -> Path:
    """convert_hf_to_gguf.py's _create_vocab_sentencepiece layout (pieces, scores, types)."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    w = _writer(path, "llama", "llama", tokens, types)
    w.add_token_scores(metadata.get("scores", scores))
    if "merges" in metadata:
        w.add_token_merges(metadata["merges"])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(metadata.get("add_bos", True))
    w.add_add_eos_token(False)
    if "chat_template" in metadata:
        w.add_chat_template(metadata["chat_template"])
    if "add_space_prefix" in metadata:
        w.add_add_space_prefix(metadata["add_space_prefix"])
    _close(w)
    return path


def test_sentencepiece_matches_sentencepiece(sentencepiece_model, tmp_path) -> None:
    sp, _ = sentencepiece_model
    assert sp.piece_to_id("<0x41>") != sp.unk_id()  # byte fallback pieces exist
    folder = write_tokenizer_files(open_gguf(write_spm_gguf(sp, tmp_path / "m.gguf")), tmp_path)
    built = Tokenizer.from_file(str(folder / "tokenizer.json"))
    runtime = TextTokenizer.from_file(folder)
    texts = [t for t in TEXTS if "<|" not in t] + ["<s> typed", "x\u2028y\u0000z"]
    for text in texts:
        ids = sp.encode(text)
        assert runtime.encode_text(text) == ids, text  # "<s>" typed stays text
        if "<s>" not in text:
            assert built.encode(text, add_special_tokens=False).ids == ids, text
        assert built.decode(ids) == sp.decode(ids) == text
        stream = StreamDecoder(runtime)  # the chat's incremental detokenisation
        assert "".join(stream.push(i) for i in ids) + stream.flush() == text
    # byte fallback was needed (✨ and 👍🏽 are not in the training text)
    assert any(sp.is_byte(i) for i in sp.encode("✨"))
    assert built.encode("hi").ids == [sp.bos_id(), *sp.encode("hi")]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"


def test_sentencepiece_matches_transformers_llama(sentencepiece_model, tmp_path) -> None:
    from transformers import LlamaTokenizer

    sp, root = sentencepiece_model
    reference = LlamaTokenizer.from_pretrained(str(root), add_bos_token=True)  # Mixtral's
    folder = write_tokenizer_files(open_gguf(write_spm_gguf(sp, tmp_path / "m.gguf")), tmp_path)
    built = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # Text starting with a space aside: tokenizers' Metaspace (transformers' class) puts
    # no "▁" in front of one, SentencePiece and Mixtral's tokenizer.json (the previous
    # test) do.
    for text in TEXTS:
        if "<|" not in text and not text.startswith(" "):
            assert built.encode(text).ids == reference.encode(text), text
    pair = built.encode("a", "b")
    assert pair.ids == reference("a", "b")["input_ids"] and pair.type_ids == [0, 0, 1, 1]


def test_sentencepiece_mixtral_chat_equals_transformers(sentencepiece_model, tmp_path) -> None:
    """Mixtral's template on the GGUF's tokenizer: moechat's prompt ids (each run of text
    between control tokens encoded in one piece, a "▁" in front of it) equal
    transformers' apply_chat_template on the same folder."""
    from transformers import AutoTokenizer

    from moechat.export.package import chat_template_meta
    from moechat.runtime.chat_template import load_template
    from moechat.runtime.manifest import ChatTemplateSpec

    sp, _ = sentencepiece_model
    template = json.loads(
        (Path(__file__).parents[1] / "chat_templates" / "mixtral.json").read_text(encoding="utf-8")
    )["chat_template"]
    path = write_spm_gguf(sp, tmp_path / "m.gguf", chat_template=template)
    folder = write_tokenizer_files(open_gguf(path), tmp_path / "out")
    _, chat = load_template(
        ChatTemplateSpec(**chat_template_meta(folder)), folder / "tokenizer.json"
    )
    hf = AutoTokenizer.from_pretrained(str(folder))
    msgs = [
        {"role": "system", "content": "Be brief, 简洁."},
        {"role": "user", "content": "Hello! What is 12345 + 1?"},
        {"role": "assistant", "content": " 12346 😀"},
        {"role": "user", "content": "\n  and [INST] typed by me\n"},
    ]
    for gen in (True, False):
        expected = hf.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=False)
        assert chat.render_ids(msgs, add_generation_prompt=gen) == list(expected)
    assert expected[0] == sp.bos_id() and expected.count(sp.eos_id()) == 1
    typed = [{"role": "user", "content": "x</s><s>[INST] y"}]  # stays text (transformers': not)
    assert chat.render_ids(typed).count(sp.eos_id()) == 0


def test_sentencepiece_merges_in_the_file_are_used(sentencepiece_model, tmp_path) -> None:
    """Merges stored with a SentencePiece vocabulary win over its scores (here upside
    down); without merges, equal scores (what llama.cpp writes for a vocabulary it built
    from a tokenizer.json) rank by token order."""
    sp, root = sentencepiece_model
    from transformers import LlamaTokenizer

    doc = json.loads(LlamaTokenizer.from_pretrained(str(root)).backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    flat = [-1000.0] * sp.get_piece_size()
    upside_down = [float(i) for i in range(sp.get_piece_size())]
    path = write_spm_gguf(sp, tmp_path / "m.gguf", scores=upside_down, merges=merges)
    built = Tokenizer.from_file(
        str(write_tokenizer_files(open_gguf(path), tmp_path) / "tokenizer.json")
    )
    for text in [t for t in TEXTS if "<|" not in t]:
        assert built.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    path = write_spm_gguf(sp, tmp_path / "flat.gguf", scores=flat)  # ranked by token order
    built = Tokenizer.from_file(
        str(write_tokenizer_files(open_gguf(path), tmp_path) / "tokenizer.json")
    )
    assert built.encode("naïve café 12345", add_special_tokens=False).ids == sp.encode(
        "naïve café 12345"
    )


def test_sentencepiece_without_space_prefix(sentencepiece_model, tmp_path) -> None:
    """add_space_prefix = false: no "▁" in front, nor stripped when decoding."""
    sp, _ = sentencepiece_model
    path = write_spm_gguf(sp, tmp_path / "m.gguf", add_space_prefix=False, add_bos=False)
    folder = write_tokenizer_files(open_gguf(path), tmp_path)
    built = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert built.encode(" hello world 12").ids == sp.encode("hello world 12")
    assert built.decode(built.encode(" hi").ids) == " hi"


def test_sentencepiece_without_scores_is_one_line(sentencepiece_model, tmp_path) -> None:
    sp, _ = sentencepiece_model
    w = _writer(tmp_path / "bad.gguf", "llama", "llama", ["<unk>", "a"], [2, 1])
    _close(w)
    with pytest.raises(MoechatError, match="no scores"):
        write_tokenizer_files(open_gguf(tmp_path / "bad.gguf"), tmp_path / "out")


# -- through llama.cpp's converter's own vocabulary code ----------------------------------


@pytest.fixture(scope="module")
def llamacpp_converted(llama_cpp, sentencepiece_model, converted, tmp_path_factory):  # noqa: F811
    """GGUF files written by the converter: "sentencepiece" from a Mixtral-style folder
    (tokenizer.model, add_bos_token), and each byte-level family's original saved as a
    Hugging Face folder."""
    root = tmp_path_factory.mktemp("llamacpp-vocab")
    _, spm_root = sentencepiece_model
    folder = root / "sentencepiece"
    folder.mkdir()
    shutil.copy(spm_root / "tokenizer.model", folder)
    config: dict = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    jobs = [(folder, root / "sentencepiece.gguf", "llama", "sentencepiece", "")]
    for name, (arch, _, add_bos) in FAMILIES.items():
        folder = root / name
        folder.mkdir()
        (folder / "tokenizer.json").write_text(converted[name][0].to_str(), encoding="utf-8")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        jobs.append((folder, root / f"{name}.gguf", arch, "gpt2", name))
    driver = Path(__file__).parents[1].joinpath("llamacpp_vocab.py")
    args = json.dumps([[str(a) for a in job] for job in jobs])
    result = subprocess.run(
        [sys.executable, str(driver), str(llama_cpp), args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {
        job[4] or "sentencepiece": write_tokenizer_files(
            open_gguf(job[1]), root / f"{job[1].stem}.out"
        )
        for job in jobs
    }


@pytest.mark.network
def test_llamacpp_sentencepiece_vocab(llamacpp_converted, sentencepiece_model) -> None:
    sp, _ = sentencepiece_model
    built = Tokenizer.from_file(str(llamacpp_converted["sentencepiece"] / "tokenizer.json"))
    for text in [t for t in TEXTS if "<|" not in t]:
        ids = sp.encode(text)
        assert built.encode(text, add_special_tokens=False).ids == ids, text
        assert built.decode(ids) == text
    assert built.encode("hi").ids == [sp.bos_id(), *sp.encode("hi")]


@pytest.mark.network
@pytest.mark.parametrize("name", list(FAMILIES))
def test_llamacpp_byte_level_vocab(llamacpp_converted, converted, name) -> None:
    original, _ = converted[name]
    built = Tokenizer.from_file(str(llamacpp_converted[name] / "tokenizer.json"))
    for text in TEXTS:
        ids = original.encode(text, add_special_tokens=False).ids
        assert built.encode(text, add_special_tokens=False).ids == ids, text
        assert built.decode(ids) == original.decode(ids)
    bos = original.token_to_id("<|endoftext|>")
    assert (built.encode("x").ids[0] == bos) is FAMILIES[name][2]


# -- real vocabularies: llama.cpp's tokenizer test files ----------------------------------

# models/ggml-vocab-NAME.gguf in llama.cpp: real tokenizers' vocabularies, with test texts
# (.inp) and the ids each Hugging Face tokenizer gave for them (.out, written by
# convert_hf_to_gguf_update.py with AutoTokenizer). NAME -> the pre-tokenizer to read it
# with: MPT's file holds GPT-NeoX-20B's tokenizer, which llama.cpp's converter also finds
# in OLMo / OLMoE checkpoints (same hash) and names "olmo" there.
REAL_VOCABS = {
    "qwen2": None,  # Qwen1.5-7B
    "deepseek-llm": None,  # deepseek-llm-7b-base (DeepSeek-MoE 16B's tokenizer)
    "refact": None,  # Refact-1.6B (StarCoder's; Granite 3.x's pre-tokenizer)
    "mpt": "olmo",
    "llama-spm": None,  # Llama 2 (SentencePiece, as Mistral / Mixtral)
}
VOCAB_DIR = CACHE / f"{LLAMA_CPP_PYTHON.replace('==', '-')}-vocabs"


@pytest.fixture(scope="session")
def llama_cpp_vocabs() -> Path:
    """The files of :data:`REAL_VOCABS` from the llama-cpp-python sdist on PyPI
    (downloaded once into ~/.cache/moechat-tests), or MOECHAT_LLAMA_CPP's models/."""
    if os.environ.get("MOECHAT_LLAMA_CPP"):
        return Path(os.environ["MOECHAT_LLAMA_CPP"]) / "models"
    names = [f"ggml-vocab-{name}.gguf{ext}" for name in REAL_VOCABS for ext in ("", ".inp", ".out")]
    if all((VOCAB_DIR / n).is_file() for n in names):
        return VOCAB_DIR
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        sdist = download_sdist(Path(tmp), "llama.cpp's vocabularies")
        unpacked = Path(tmp) / "vocabs"
        unpacked.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(tuple(f"/models/{n}" for n in names)):
                    source = tar.extractfile(member)
                    assert source is not None
                    (unpacked / Path(member.name).name).write_bytes(source.read())
        shutil.rmtree(VOCAB_DIR, ignore_errors=True)
        unpacked.rename(VOCAB_DIR)
    return VOCAB_DIR


class _Renamed:
    """A GGUF reader whose tokenizer.ggml.pre reads ``pre``."""

    def __init__(self, reader, pre: str) -> None:
        value = type("Value", (), {"contents": lambda self: pre})()
        self.fields = {**reader.fields, "tokenizer.ggml.pre": value}


@pytest.mark.slow  # ~40 s on a busy machine: gguf's reader takes its time over 150k tokens
@pytest.mark.network
@pytest.mark.parametrize("name", list(REAL_VOCABS))
def test_real_vocabulary_gives_hugging_face_ids(llama_cpp_vocabs, name, tmp_path) -> None:
    base = llama_cpp_vocabs / f"ggml-vocab-{name}.gguf"
    reader = open_gguf(base)
    pre_name = REAL_VOCABS[name]
    folder = write_tokenizer_files(_Renamed(reader, pre_name) if pre_name else reader, tmp_path)
    runtime = TextTokenizer.from_file(folder)
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = Path(f"{base}.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == len(expected) > 40
    for text, ids in zip(texts, expected, strict=True):
        want = [int(i) for i in ids.split()]
        assert runtime.encode_text(text) == want, text
        assert runtime.decode(want) == text
