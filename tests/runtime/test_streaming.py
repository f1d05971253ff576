from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

from moechat.runtime.streaming import StreamDecoder
from moechat.runtime.tokenizer import TextTokenizer

from tokenizer_factory import train_tiny_tokenizer

MINIMIND_DIR = (
    Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "minimind-tokenizer"
)

TEXTS = [
    "你好，世界！今天天气很好。",
    "长城非常有名，每年都有很多游客。",
    "emoji 😀👍🏽👨‍👩‍👧 🇨🇳 done",
    "Mixed English 和中文 text, with numbers 12345 and ｆｕｌｌｗｉｄｔｈ.",
    "e\u0301 combining, ß, Ω, ＠, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \t tabs\n\nnewlines",
    "",
]


def _sentencepiece_style() -> TextTokenizer:
    """Metaspace-style BPE with byte fallback (Llama-like decoders)."""
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzEM,.!0123456789你":
        vocab.setdefault(c, len(vocab))
    vocab["▁h"] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[("▁", "h")], unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return TextTokenizer(tok)


@pytest.fixture(scope="module", params=["tiny", "minimind", "sentencepiece"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    if request.param == "tiny":
        return TextTokenizer.from_file(train_tiny_tokenizer(tmp_path_factory.mktemp("tiny")))
    if request.param == "sentencepiece":
        return _sentencepiece_style()
    if not (MINIMIND_DIR / "tokenizer.json").is_file():
        pytest.skip("MiniMind tokenizer fixture not available")
    return TextTokenizer.from_file(MINIMIND_DIR / "tokenizer.json")


def _stream(tok: TextTokenizer, ids: list[int], skip: bool = True) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode_text(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_chunks_arrive_promptly(tok: TextTokenizer) -> None:
    ids = tok.encode_text("你好 hello 世界")
    chunks = _stream(tok, ids)
    assert chunks[-1] == ""  # nothing held back once characters are complete
    assert "".join(chunks[:-1]).startswith("你")


def test_special_tokens(tok: TextTokenizer) -> None:
    ids = [1, *tok.encode_text("你好"), 2, *tok.encode_text(" ok")]
    assert "".join(_stream(tok, ids)) == tok.decode(ids)
    shown = "".join(_stream(tok, ids, skip=False))
    assert shown == tok.decode(ids, skip_special_tokens=False)
    assert "<|im_end|>" in shown


def test_invalid_bytes_appear_where_decode_has_them(tok: TextTokenizer) -> None:
    emoji = tok.encode_text("😀")
    if len(emoji) < 2:
        pytest.skip("emoji is a single token here")
    ids = tok.encode_text("ab") + emoji[:-1] + tok.encode_text("cd")
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert "\ufffd" in tok.decode(ids)
    tail = emoji[:-1]  # an incomplete character at the very end is released by flush
    chunks = _stream(tok, tok.encode_text("x") + tail)
    assert "".join(chunks) == tok.decode(tok.encode_text("x") + tail)
    assert "\ufffd" not in "".join(chunks[:-1])


def test_random_id_sequences(tok: TextTokenizer) -> None:
    # ByteFallback decodes an invalid run of <0xNN> tokens as all-U+FFFD, retroactively, so
    # exact equality for invalid byte runs is only promised for ByteLevel tokenizers.
    pool = [i for i in range(tok.vocab_size) if not (tok.id_to_token(i) or "").startswith("<0x")]
    rng = random.Random(1234)
    for _ in range(40):
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
        assert "".join(_stream(tok, ids, skip=False)) == tok.decode(ids, skip_special_tokens=False)


def test_reuse_after_flush(tok: TextTokenizer) -> None:
    dec = StreamDecoder(tok)
    for text in ["第一句。", "second 句子 😀"]:
        out = "".join(dec.push(i) for i in tok.encode_text(text)) + dec.flush()
        assert out == text


class _CountingTokenizer(TextTokenizer):
    def __init__(self, inner: TextTokenizer) -> None:
        super().__init__(inner.backend)
        self.decoded_ids = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_ids += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_work_per_token_is_bounded(tok: TextTokenizer) -> None:
    counting = _CountingTokenizer(tok)
    ids = counting.encode_text("长城非常有名，每年都有很多游客。Hello there! 😀 " * 60)
    assert len(ids) > 500
    chunks = _stream(counting, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert counting.decoded_ids / len(ids) < 20  # a short window, not the whole sequence
