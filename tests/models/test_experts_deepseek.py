"""DeepSeek-V2/V3 routers (grouped, scaled; models/mla.py) under the expert tools: fewer
experts per token equals transformers with its router's top_k lowered, and an extracted
expert equals transformers with the router rigged to that expert, weight 1, and a pruned
package equals transformers with the same experts cut out (issue 19)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from experts_factory import IDS, check_pruned, prune
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


def pruned_reference(model, kept: dict[int, list[int]], keep: int):
    """transformers' model with each MoE layer cut to experts ``kept[layer]`` (router
    rows, correction bias, expert tensors) and a config of ``keep`` routed experts."""
    config = copy.deepcopy(model.config)
    config.n_routed_experts = keep
    ref = type(model)(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".mlp.experts." in name or name.endswith((".mlp.gate.weight", "correction_bias")):
            tensor = tensor[kept[int(name.split(".")[2])]]
        state[name] = tensor
    ref.load_state_dict(state)
    return ref.eval()


# 2 groups of 4 experts, 1 group chosen: room to prune within the groups (V2 top-3
# needs 3 per group, V3 scores a group by its best 2); int8: QMoE rows, checked on the
# trace and keep-all (its logits differ from transformers' by the quantisation)
@pytest.mark.parametrize(
    "kind, option, keep",
    [("deepseek_v2", "ops", 6), ("deepseek_v3", "contrib", 4), ("deepseek_v3", "int8", 4)],
)
def test_prune_grouped_routers(tmp_path, capsys, kind, option, keep):
    from moechat.app.cli import main
    from moechat.runtime.model import load_model

    model = make_mla_folder(kind, tmp_path / "ckpt", n_group=2, topk_group=1)
    args = ["--int8"] if option == "int8" else ["--moe-impl", option]
    pkg = export_tiny_package(tmp_path / "ckpt", tmp_path / "pkg", *args)
    check_pruned(pkg, tmp_path, keep)
    manifest = json.loads((tmp_path / "p" / "moechat.json").read_text())
    kept = {int(k): v for k, v in manifest["experts"]["prune"]["kept"].items()}
    for experts in kept.values():  # the same number from each contiguous group of 4
        assert [sum(e // 4 == g for e in experts) for g in (0, 1)] == [keep // 2] * 2
    assert (manifest["architecture"]["n_group"], manifest["architecture"]["topk_group"]) == (2, 1)
    if option != "int8":
        got = load_model(tmp_path / "p", "cpu").decoder.forward(IDS, logits_for="all")
        want = reference_logits(pruned_reference(model, kept, keep), IDS)
        assert np.abs(got - want).max() <= 1e-5
    prune(pkg, tmp_path / "all", 8)
    a = load_model(pkg, "cpu").decoder.forward(IDS, logits_for="all")
    b = load_model(tmp_path / "all", "cpu").decoder.forward(IDS, logits_for="all")
    np.testing.assert_array_equal(a, b)
    rc = main(["experts", "prune", str(pkg), str(tmp_path / "bad"), "--keep", "5"])
    valid = "[6, 8]" if kind == "deepseek_v2" else "[4, 6, 8]"
    assert rc == 1 and f"one of {valid}; got 5" in capsys.readouterr().err
