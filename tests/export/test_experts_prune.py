"""`moechat experts prune` (issue 19): a pruned package runs, its routers only choose kept
experts, it is smaller by the dropped experts' bytes, and keeping all experts changes
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import experts_factory
import numpy as np
import onnx
import pytest
from experts_factory import FAMILIES, IDS, short_text

family_packages = experts_factory.family_packages  # session fixture (tests/experts_factory.py)
int8_package = experts_factory.int8_package  # session fixture (tests/experts_factory.py)


def initializer_bytes(pkg) -> int:
    """Bytes of the graph's matrices (pruning adds a few scalar expert indices)."""
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=True)
    arrays = (onnx.numpy_helper.to_array(t) for t in model.graph.initializer)
    return sum(a.nbytes for a in arrays if a.ndim >= 2)


def expected_saving(pkg, dropped: dict[str, list[int]]) -> int:
    """Bytes of the dropped experts' rows (every per-expert tensor) and router columns,
    read from the source graph independently of the pruning code."""
    from moechat.export.graph_rewrites import find_routers, initializers

    model = onnx.load(str(pkg / "model.onnx"), load_external_data=True)
    inits = initializers(model.graph)
    routers = find_routers(model)
    per_layer = []
    for router in routers:
        w = onnx.numpy_helper.to_array(inits[router.input[1]])
        per_layer.append(w.nbytes // w.shape[1])  # one column
    nodes = [n for n in model.graph.node if n.op_type in ("MoE", "QMoE")]
    for i, node in enumerate(nodes):
        for name in node.input[2:]:
            if name:
                a = onnx.numpy_helper.to_array(inits[name])
                per_layer[i] += a.nbytes // a.shape[0]
    if not nodes:  # standard ops: each expert's fp32 gate, up and down matrices
        arch = json.loads((pkg / "moechat.json").read_text())["architecture"]
        per_expert = 3 * arch["hidden_size"] * arch["intermediate_size"] * 4
        per_layer = [p + per_expert for p in per_layer]
    return sum(per * len(d) for per, d in zip(per_layer, dropped.values(), strict=True))


def prune(package: Path, out: Path, keep: int) -> dict:
    from moechat.export.experts.prune import run_prune

    text = short_text(out.parent)
    return run_prune(str(package), str(out), keep, calibration=text, textfile=text,
                     progress=lambda _: None)  # fmt: skip


def routed(pkg, ids=IDS):
    from moechat.runtime.model import load_model

    model = load_model(pkg, "cpu")
    logits, routers = model.decoder.forward_routed(ids, logits_for="all")
    return model, logits, routers


def check_pruned(package: Path, tmp_path: Path) -> None:
    src = json.loads((package / "moechat.json").read_text())["architecture"]
    num = src["n_routed_experts"]
    keep = max(src["num_experts_per_tok"], num - 2)
    record = prune(package, tmp_path / "p", keep)
    done = record["prune"]
    kept = {int(k): v for k, v in done["kept"].items()}
    assert all(len(v) == keep and len(set(v)) == keep for v in kept.values())
    assert all(len(d) == num - keep for d in done["dropped"].values())
    model, logits, routers = routed(tmp_path / "p")
    assert np.isfinite(logits).all()
    assert model.package.spec.architecture.fields["n_routed_experts"] == keep
    # the trace: every choice of the pruned routers is a kept expert of the source,
    # and the first MoE layer's scores are the source's for those experts
    assert model.routing is not None
    _, _, source_routers = routed(package)
    for index, layer in enumerate(model.routing.layers):
        choice = model.routing.route_layer(index, routers[index])
        original = np.asarray(kept[layer])[choice.experts]
        assert set(original.ravel()) <= set(kept[layer])
    first = model.routing.layers[0]
    np.testing.assert_allclose(routers[0], source_routers[0][:, kept[first]], atol=1e-6)
    saved = initializer_bytes(package) - initializer_bytes(tmp_path / "p")
    assert saved == expected_saving(package, done["dropped"])
    assert record["bytes"]["before"] - record["bytes"]["after"] >= saved * 0.95
    assert record["perplexity"]["new"]["perplexity"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_family(family, family_packages, tmp_path):
    check_pruned(family_packages.get(family)[1], tmp_path)


def test_prune_int8_qmoe(int8_package, tmp_path):
    check_pruned(int8_package, tmp_path)


@pytest.mark.parametrize("which", ["mixtral", "int8"])
def test_prune_to_all_experts_is_exact(which, family_packages, int8_package, tmp_path):
    package = family_packages.get(which)[1] if which != "int8" else int8_package
    from moechat.runtime.model import load_model

    num = json.loads((package / "moechat.json").read_text())["architecture"]["n_routed_experts"]
    prune(package, tmp_path / "all", num)
    a = load_model(package, "cpu").decoder.forward(IDS, logits_for="all")
    b = load_model(tmp_path / "all", "cpu").decoder.forward(IDS, logits_for="all")
    np.testing.assert_array_equal(a, b)


def test_prune_errors(tiny_package, tmp_path, capsys):
    from moechat.app.cli import main

    for keep, message in ((1, "between the experts per token (2)"), (5, "routed experts (4)")):
        rc = main(["experts", "prune", str(tiny_package), str(tmp_path / "p"), "--keep", str(keep)])
        assert rc == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
