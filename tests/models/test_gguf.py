"""GGUF loading: weights (q/k un-permutation, dequantisation), tokenizer, errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

import torch  # noqa: E402
from bpe_reference import ReferenceBPE  # noqa: E402
from gguf_factory import write_llama_gguf  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from moechat.models.config import ModelConfig  # noqa: E402
from moechat.models.gguf import load_gguf, open_gguf, tokenizer_json  # noqa: E402
from moechat.models.loading import load_checkpoint  # noqa: E402
from moechat.models.modeling import random_model  # noqa: E402
from moechat.runtime.errors import MoechatError  # noqa: E402

from model_factory import write_tokenizer_files  # noqa: E402

TINY_LLAMA = ModelConfig(
    model_type="llama", vocab_size=400, hidden_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, rope_theta=1e5,
    max_position_embeddings=512,
)  # fmt: skip

TEXTS = [
    "Hello, world! What's the capital of France?",
    "In 2024, 3.14159 x 12345 = 38781.9",
    "  leading spaces\n\n\ttabs  and   runs   ",
    "naïve café — “quotes” ½ ②",
    "日本語のテキスト 中文",
    "def f(x):\n    return x**2  # comment\n",
    "I'm, you're, they'll, we've, he'd, it's DON'T",
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    write_tokenizer_files(root, 400)
    model = random_model(TINY_LLAMA, seed=3)
    path = write_llama_gguf(model, root / "tokenizer.json", root / "tiny.gguf")
    return model, path, root


def _logits(model, ids):
    return model.step(torch.tensor([ids]), model.empty_cache())[0]


def test_gguf_reproduces_the_model(tiny_gguf, tmp_path):
    """Same logits as the model written: the q/k row permutation is undone."""
    model, path, _ = tiny_gguf
    ckpt = load_checkpoint(path)
    assert ckpt.config.model_type == "llama"
    assert ckpt.config.rope_theta == 1e5 and ckpt.config.tie_word_embeddings
    ids = [5, 17, 33, 101, 7, 250, 3]
    torch.testing.assert_close(_logits(ckpt.model, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_gguf_q8_0_dequantises(tiny_gguf, tmp_path):
    model, _, root = tiny_gguf
    path = write_llama_gguf(model, root / "tokenizer.json", tmp_path / "q8.gguf", quantize=True)
    ckpt = load_gguf(path, tokenizer_dir=tmp_path / "tok")
    ids = [5, 17, 33, 101, 7]
    ref = _logits(model, ids)
    diff = (_logits(ckpt.model, ids) - ref).abs().max()
    assert 0 < diff < 0.05 * ref.abs().max()  # quantised, but the same function


def test_gguf_tokenizer_matches_the_original(tiny_gguf, tmp_path):
    _, path, root = tiny_gguf
    ckpt = load_gguf(path, tokenizer_dir=tmp_path)
    built = Tokenizer.from_file(str(ckpt.tokenizer_dir / "tokenizer.json"))
    original = Tokenizer.from_file(str(root / "tokenizer.json"))
    reader = open_gguf(path)
    ref = ReferenceBPE(
        reader.fields["tokenizer.ggml.tokens"].contents(),
        reader.fields["tokenizer.ggml.merges"].contents(),
        pre="gpt2",
    )
    for text in TEXTS:
        ids = built.encode(text, add_special_tokens=False).ids
        assert ids == original.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text)
        assert built.decode(ids) == text
    assert built.token_to_id("<|im_end|>") == 2
    cfg = json.loads((ckpt.tokenizer_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]


def test_truncated_gguf_is_a_clear_error(tiny_gguf, tmp_path):
    _, path, _ = tiny_gguf
    data = path.read_bytes()
    for size in (10, 1000, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{size}.gguf"
        bad.write_bytes(data[:size])
        with pytest.raises(MoechatError, match="GGUF"):
            load_checkpoint(bad)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"\x00GGX" + bytes(range(256)) * 40)
    with pytest.raises(MoechatError, match="not a readable GGUF"):
        load_checkpoint(bad)


def test_unsupported_tokenizer_is_refused(tiny_gguf):
    _, path, _ = tiny_gguf

    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    class Reader:
        fields = {"tokenizer.ggml.model": Field("t5")}  # llama.cpp's Unigram vocabulary

    with pytest.raises(MoechatError, match="unsupported GGUF tokenizer"):
        tokenizer_json(Reader())


def test_a_large_gguf_is_exported_streamed_to_the_same_package(
    tiny_gguf, tmp_path, monkeypatch, capsys
):
    """Past STREAM_AUTO_BYTES of float32 weights `moechat export` streams a GGUF without
    being asked (a Q4_K_M MoE of 8 GB would be 60 GB loaded), and writes the whole-model
    export's graph byte for byte: Q8_0 blocks, llama.cpp's q/k permutation, a tied table."""
    import filecmp

    import moechat.export.cli as export_cli
    from moechat.app.cli import main

    model, _, root = tiny_gguf
    path = write_llama_gguf(model, root / "tokenizer.json", tmp_path / "q8.gguf", quantize=True)
    assert main(["export", str(path), str(tmp_path / "whole")]) == 0
    assert "to stream its weights" not in capsys.readouterr().err
    monkeypatch.setattr(export_cli, "STREAM_AUTO_BYTES", 0)
    assert main(["export", str(path), str(tmp_path / "streamed")]) == 0
    assert "to stream its weights" in capsys.readouterr().err
    for name in ("model.onnx", "model.onnx.data"):
        assert filecmp.cmp(tmp_path / "whole" / name, tmp_path / "streamed" / name, shallow=False)
