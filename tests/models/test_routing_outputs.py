"""Routing out of the graph: exported packages' router outputs, routed by runtime/routing.py,
choose the experts and weights transformers' own routers choose (prefill, decode steps
with and without fetching the routing, a chunk), and fetching changes no logit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from family_factory import VOCAB, make_family_folder
from test_deepseek_mla import make_mla_folder

from moechat.runtime.model import load_model

from model_factory import export_tiny_package


def _transformers_routing(hf_model, ids: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(experts [T, k], weights [T, k]) per MoE layer, as transformers' routers return them."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def hook(module, args, out):
        _, weights, experts = out
        seen.append((experts.numpy(), weights.float().numpy()))

    gates = [m for name, m in hf_model.named_modules() if name.endswith("mlp.gate")]
    handles = [g.register_forward_hook(hook) for g in gates]
    try:
        with torch.no_grad():
            hf_model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"])
def test_router_outputs_route_as_transformers(tmp_path, kind):
    if kind.startswith("deepseek"):
        hf_model = make_mla_folder(kind, tmp_path / "ckpt", seed=5)
    else:
        hf_model = make_family_folder(kind, tmp_path / "ckpt", seed=5)
    pkg = export_tiny_package(tmp_path / "ckpt", tmp_path / "pkg")
    manifest = json.loads((pkg / "moechat.json").read_text())
    model = load_model(pkg, max_context=128)
    routing = model.routing
    assert routing is not None and routing.outputs == manifest["routing"]["outputs"]
    if kind == "deepseek_v3":  # the correction bias travels in moechat.json
        assert routing.spec.topk_method == "noaux_tc" and routing.correction_bias
    decoder = model.decoder
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=10).tolist()
    logits, routers = decoder.forward_routed(ids, logits_for="all")
    fetched = [[r] for r in routers]
    for step in range(6):  # decode: every other step fetches the routing
        token = int(logits[-1].argmax())
        ids.append(token)
        if step % 2:
            plain = decoder.forward([token])
            decoder.truncate(decoder.length - 1)
        logits, routers = decoder.forward_routed([token])
        if step % 2:  # fetching the routing changes no logit
            np.testing.assert_array_equal(plain, logits)
        for layer, r in zip(fetched, routers, strict=True):
            layer.append(r)
    chunk = rng.integers(3, VOCAB, size=4).tolist()
    ids += chunk
    _, routers = decoder.forward_routed(chunk, logits_for="all")
    for layer, r in zip(fetched, routers, strict=True):
        layer.append(r)
    reference = _transformers_routing(hf_model, ids)
    assert len(reference) == len(routing.layers) == len(fetched)
    distinct = set()
    for index, (parts, (experts, weights)) in enumerate(zip(fetched, reference, strict=True)):
        ours = routing.route_layer(index, np.concatenate(parts))
        np.testing.assert_array_equal(np.sort(ours.experts, -1), np.sort(experts, -1))
        order, theirs = np.argsort(ours.experts, -1), np.argsort(experts, -1)
        np.testing.assert_allclose(
            np.take_along_axis(ours.weights, order, -1),
            np.take_along_axis(weights, theirs, -1),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
        distinct |= {tuple(sorted(row)) for row in ours.experts.tolist()}
    assert len(distinct) > 2  # tokens really go to different experts
