"""--experts-per-token K: the runtime edits k in the graph bytes (runtime/topk.py); the
result equals transformers' model with its routers' top_k set to K (issue 19)."""

from __future__ import annotations

import experts_factory
import numpy as np
import pytest
import torch
from experts_factory import FAMILIES, IDS, transformers_model

family_packages = experts_factory.family_packages  # session fixture (tests/experts_factory.py)
int8_package = experts_factory.int8_package  # session fixture (tests/experts_factory.py)


def logits(path, k=None) -> np.ndarray:
    from moechat.runtime.model import load_model

    return load_model(path, "cpu", experts_per_token=k).decoder.forward(IDS, logits_for="all")


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_experts_equal_transformers_top_k(family, family_packages, k):
    ckpt, pkg = family_packages.get(family)
    model = transformers_model(ckpt)
    got = logits(pkg, k)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k"):
                layer.mlp.gate.top_k = k
        want = model(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-4, family
    assert np.abs(got - logits(pkg)).max() > 1e-3  # K experts is not the trained 3


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_k_is_the_original_graph(family, family_packages):
    _, pkg = family_packages.get(family)
    np.testing.assert_array_equal(logits(pkg, 3), logits(pkg))


def test_int8_qmoe(int8_package):
    pkg = int8_package
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
