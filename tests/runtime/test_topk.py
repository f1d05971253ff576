"""--experts-per-token K: the runtime edits k in the graph bytes (runtime/topk.py); the
result equals transformers' model with its routers' top_k set to K (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_factory import make_family_folder

from model_factory import export_tiny_package

IDS = [5, 17, 99, 3, 250, 42, 7, 311, 64, 128, 9, 200]


def logits(path, k=None) -> np.ndarray:
    from moechat.runtime.model import load_model

    return load_model(path, "cpu", experts_per_token=k).decoder.forward(IDS, logits_for="all")


@pytest.fixture(scope="module", params=[("mixtral", "contrib"), ("qwen2_moe", "ops")])
def family_package(request, tmp_path_factory):
    family, impl = request.param
    root = tmp_path_factory.mktemp(family)
    model = make_family_folder(family, root / "ckpt", num_experts_per_tok=3)
    return family, model, export_tiny_package(root / "ckpt", root / "pkg", "--moe-impl", impl)


@pytest.mark.parametrize("k", [1, 2])
def test_fewer_experts_equal_transformers_top_k(family_package, k):
    family, model, pkg = family_package
    got = logits(pkg, k)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k"):
                layer.mlp.gate.top_k = k
        want = model(torch.tensor([IDS])).logits[0].numpy()
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k"):
                layer.mlp.gate.top_k = 3
    assert np.abs(got - want).max() <= 1e-4, family
    assert np.abs(got - logits(pkg)).max() > 1e-3  # K experts is not the trained 3


def test_trained_k_is_the_original_graph(family_package):
    _, _, pkg = family_package
    np.testing.assert_array_equal(logits(pkg, 3), logits(pkg))


def test_int8_qmoe(tiny_checkpoint, tmp_path):
    pkg = export_tiny_package(tiny_checkpoint, tmp_path / "q", "--int8")
    np.testing.assert_array_equal(logits(pkg, 2), logits(pkg))
    assert np.abs(logits(pkg, 1) - logits(pkg)).max() > 1e-3


def test_errors_and_environment(tiny_package, monkeypatch, capsys):
    from moechat.app.cli import main
    from moechat.runtime.errors import MoechatError
    from moechat.runtime.model import load_model

    with pytest.raises(MoechatError, match="between 1 and the trained 2"):
        load_model(tiny_package, "cpu", experts_per_token=3)
    monkeypatch.setenv("MOECHAT_EXPERTS_PER_TOKEN", "1")
    assert np.abs(logits(tiny_package) - logits(tiny_package, 2)).max() > 1e-3
    monkeypatch.delenv("MOECHAT_EXPERTS_PER_TOKEN")
    rc = main(["run", str(tiny_package), "hi", "-n", "2", "--greedy", "--experts-per-token", "0"])
    assert rc == 1 and "between 1 and the trained 2" in capsys.readouterr().err
