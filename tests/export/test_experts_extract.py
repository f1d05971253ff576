"""`moechat experts extract`: the extracted package equals transformers' MoE with its
routers rigged to send every token to the expert with weight 1 (issue 19)."""

from __future__ import annotations

import json

import experts_factory
import numpy as np
import pytest
import torch
from experts_factory import FAMILIES, IDS, short_text, transformers_model

family_packages = experts_factory.family_packages  # session fixture (tests/experts_factory.py)


class RiggedRouter(torch.nn.Module):
    """transformers' router interface (logits, top-k weights, top-k experts), every token
    to ``expert`` with weight 1."""

    def __init__(self, expert: int, num_experts: int) -> None:
        super().__init__()
        self.expert, self.num_experts = expert, num_experts

    def forward(self, x: torch.Tensor):
        n = x.shape[0]
        logits = torch.zeros(n, self.num_experts)
        return logits, torch.ones(n, 1), torch.full((n, 1), self.expert, dtype=torch.long)


def rig(model, expert: int) -> int:
    layers = 0
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            mlp.gate = RiggedRouter(expert, mlp.experts.num_experts)
            layers += 1
    return layers


def package_logits(path) -> np.ndarray:
    from moechat.runtime.model import load_model

    return load_model(path, "cpu").decoder.forward(IDS, logits_for="all")


def reference_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_extracted_expert_equals_rigged_moe(family, family_packages, tmp_path):
    from moechat.export.experts.extract import run_extract

    ckpt, pkg = family_packages.get(family)
    model = transformers_model(ckpt)
    expert = 2
    original = package_logits(pkg)
    record = run_extract(
        str(pkg),
        str(tmp_path / "x"),
        expert,
        textfile=short_text(tmp_path),
        progress=lambda _: None,
    )
    got = package_logits(tmp_path / "x")
    assert rig(model, expert) >= 1
    want = reference_logits(model)
    assert np.abs(got - want).max() <= 1e-5, family
    assert np.abs(original - want).max() > 1e-2  # the routing did change something
    manifest = json.loads((tmp_path / "x" / "moechat.json").read_text())
    arch = manifest["architecture"]
    assert (arch["n_routed_experts"], arch["num_experts_per_tok"]) == (1, 1)
    assert record["extract"]["expert"] == expert
    ppl = record["perplexity"]
    assert ppl["source"]["perplexity"] > 0 and ppl["new"]["perplexity"] > 0
    assert record["bytes"]["after"] < record["bytes"]["before"]


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_experts_equal_rigged_moe_of_mean_weights(family, family_packages, tmp_path):
    from moechat.export.experts.extract import run_extract

    ckpt, pkg = family_packages.get(family)
    model = transformers_model(ckpt)
    run_extract(
        str(pkg), str(tmp_path / "m"), None, textfile=short_text(tmp_path), progress=lambda _: None
    )
    got = package_logits(tmp_path / "m")
    with torch.no_grad():
        for layer in model.model.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                for p in (experts.gate_up_proj, experts.down_proj):
                    p.copy_(p.mean(dim=0, keepdim=True).expand_as(p))
    rig(model, 0)
    assert np.abs(got - reference_logits(model)).max() <= 1e-5, family


def test_extract_cli_errors(tiny_package, tmp_path, capsys):
    from moechat.app.cli import main

    assert (
        main(["experts", "extract", str(tiny_package), str(tmp_path / "x"), "--expert", "9"]) == 1
    )
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["experts", "extract", str(tiny_package), str(tiny_package), "--expert", "0"]) == 1
    assert "differ" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [8, 4])
def test_qmoe_weights_round_trip(bits):
    """--merge on int8/int4 QMoE packages dequantises export/int8/quantize.py's layouts."""
    from moechat.export.experts.qmoe_weights import dequantize_qmoe, quantize_qmoe, unpack_uint4
    from moechat.export.int8.quantize import pack_uint4, quantize_rows

    w = np.random.default_rng(0).standard_normal((3, 8, 64)).astype(np.float32)
    q, scale = quantize_rows(w, 32, bits)
    if bits == 4:
        np.testing.assert_array_equal(unpack_uint4(pack_uint4(q)), q)
    stored, s = quantize_qmoe(w, bits, 32, np.dtype(np.float32))
    back = dequantize_qmoe(stored, s, bits, 32)
    want = (q.astype(np.float32).reshape(3, 8, 2, 32) * scale[..., None]).reshape(3, 8, 64)
    np.testing.assert_array_equal(back, want)
    assert np.abs(back - w).max() <= np.abs(w).max() / (7 if bits == 4 else 127)
