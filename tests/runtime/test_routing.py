"""runtime/routing.py against the PyTorch reference routers (models/ops.py, models/mla.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moechat.models.mla import route_grouped
from moechat.models.ops import route as route_softmax
from moechat.runtime.errors import MoechatError
from moechat.runtime.routing import RouterSpec, moe_layers, package_routing, route

CASES = [
    RouterSpec(num_experts=8, top_k=2, normalize=True),
    RouterSpec(num_experts=8, top_k=2, normalize=False),
    RouterSpec(num_experts=64, top_k=8, normalize=False),
    RouterSpec(num_experts=16, top_k=3, normalize=False, scale=2.5),
    RouterSpec(num_experts=16, top_k=4, normalize=False, topk_method="group_limited_greedy",
               n_group=4, topk_group=2, scale=16.0),
    RouterSpec(num_experts=16, top_k=4, normalize=True, scoring="sigmoid",
               topk_method="noaux_tc", n_group=4, topk_group=2, scale=2.5),
    RouterSpec(num_experts=32, top_k=6, normalize=True, scoring="sigmoid",
               topk_method="noaux_tc", n_group=8, topk_group=3),
]  # fmt: skip


def _reference(logits: torch.Tensor, bias: torch.Tensor, spec: RouterSpec):
    grouped = spec.topk_method != "greedy" or spec.scoring != "softmax" or spec.scale != 1.0
    if not grouped:
        return route_softmax(logits, spec.top_k, spec.normalize)
    return route_grouped(
        logits, bias, spec.top_k, spec.scoring, spec.topk_method, spec.n_group,
        spec.topk_group, spec.normalize, spec.scale,
    )  # fmt: skip


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.topk_method}-{s.num_experts}-{s.top_k}")
def test_route_matches_the_torch_routers(spec):
    gen = torch.Generator().manual_seed(spec.num_experts + spec.top_k)
    logits = 2.0 * torch.randn(500, spec.num_experts, generator=gen)
    bias = 0.3 * torch.randn(spec.num_experts, generator=gen)
    weights, experts = _reference(logits, bias, spec)
    ours = route(logits.numpy(), spec, bias.numpy())
    assert ours.experts.shape == (500, spec.top_k) and ours.experts.dtype == np.int64
    # same experts in the same rank order (best first)
    np.testing.assert_array_equal(ours.experts, experts.numpy())
    np.testing.assert_allclose(ours.weights, weights.numpy(), rtol=1e-5, atol=1e-6)
    if spec.topk_method == "noaux_tc":  # the bias changes the choice: it is really used
        unbiased = route(logits.numpy(), spec, np.zeros(spec.num_experts, np.float32))
        assert (unbiased.experts != ours.experts).any()


def test_spec_from_arch_and_moe_layers():
    arch = {"use_moe": True, "num_hidden_layers": 4, "dense_layers": [0], "n_routed_experts": 8,
            "num_experts_per_tok": 2, "norm_topk_prob": False}  # fmt: skip
    assert moe_layers(arch) == [1, 2, 3]
    assert moe_layers({**arch, "use_moe": False}) == []
    spec = RouterSpec.from_arch(arch)
    assert (spec.num_experts, spec.top_k, spec.normalize, spec.topk_method) == (
        8,
        2,
        False,
        "greedy",
    )
    with pytest.raises(MoechatError, match="inconsistent router"):
        RouterSpec.from_arch({**arch, "num_experts_per_tok": 9})


def test_package_routing_section_is_checked():
    arch = {"use_moe": True, "num_hidden_layers": 2, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "n_group": 2, "topk_group": 1}  # fmt: skip
    section = {"layers": [0, 1], "outputs": ["router_logits.0", "router_logits.1"],
               "correction_bias": {"0": [0.0, 0.1, 0.2, 0.3], "1": [0.0] * 4}}  # fmt: skip
    routing = package_routing(arch, section, "pkg")
    assert routing is not None and routing.correction_bias[0][3] == np.float32(0.3)
    assert package_routing(arch, None, "pkg") is None
    with pytest.raises(MoechatError, match="needs a correction bias for every layer"):
        package_routing(arch, {**section, "correction_bias": {"0": [0.0] * 4}}, "pkg")
    with pytest.raises(MoechatError, match="lists of equal length"):
        package_routing(arch, {**section, "outputs": ["router_logits.0"]}, "pkg")


def test_collect_routing_routes_each_token_once(tiny_package):
    from moechat.runtime.model import load_model
    from moechat.runtime.routing import collect_routing, require_routing

    model = load_model(tiny_package, max_context=64)
    routing = require_routing(model)
    ids = np.random.default_rng(1).integers(3, 300, size=150).tolist()
    whole = collect_routing(model.decoder, routing, ids[:60], chunk=64)
    chunked = collect_routing(model.decoder, routing, ids[:60], chunk=7)
    windowed = collect_routing(model.decoder, routing, ids, window=50, chunk=16)
    k = routing.spec.top_k
    for a, b, w in zip(whole, chunked, windowed, strict=True):
        assert a.experts.shape == b.experts.shape == (60, k) and w.experts.shape == (150, k)
        np.testing.assert_array_equal(a.experts, b.experts)
        np.testing.assert_allclose(a.weights, b.weights, atol=1e-5)
        # the first window is the same text with the same context
        np.testing.assert_array_equal(w.experts[:50], a.experts[:50])
        counts = np.bincount(w.experts.ravel(), minlength=routing.spec.num_experts)
        assert counts.sum() == 150 * k
