"""DeepSeek-V2/V3 routers (grouped, scaled; models/mla.py) under the expert tools: fewer
experts per token equals transformers with its router's top_k lowered, and an extracted
expert equals transformers with the router rigged to that expert, weight 1 (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from experts_factory import IDS
from test_deepseek_mla import make_mla_folder, reference_logits

from model_factory import export_tiny_package


class RiggedRouter(torch.nn.Module):
    def __init__(self, expert: int) -> None:
        super().__init__()
        self.expert = expert

    def forward(self, x: torch.Tensor):
        n = x.reshape(-1, x.shape[-1]).shape[0]
        return None, torch.ones(n, 1), torch.full((n, 1), self.expert, dtype=torch.long)


@pytest.mark.slow
@pytest.mark.parametrize("kind, impl", [("deepseek_v2", "ops"), ("deepseek_v3", "contrib")])
def test_grouped_routers_top_k_and_extract(tmp_path, kind, impl):
    from moechat.export.experts.extract import run_extract
    from moechat.runtime.model import load_model

    model = make_mla_folder(kind, tmp_path / "ckpt")
    pkg = export_tiny_package(tmp_path / "ckpt", tmp_path / "pkg", "--moe-impl", impl)
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    for gate in gates:
        gate.top_k = 1
    got = load_model(pkg, "cpu", experts_per_token=1).decoder.forward(IDS, logits_for="all")
    assert np.abs(got - reference_logits(model, IDS)).max() <= 1e-5
    run_extract(str(pkg), str(tmp_path / "x"), 5, progress=lambda _: None)
    got = load_model(tmp_path / "x", "cpu").decoder.forward(IDS, logits_for="all")
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.gate = RiggedRouter(5)
    assert np.abs(got - reference_logits(model, IDS)).max() <= 1e-5
