"""Packages shared by the expert-tool tests (extract, prune, runtime top-k): each is
exported once per session, on first use; and the checks of a pruned package. Each family
is written with 4 experts, 3 per token, so that both fewer experts per token and pruning
below 4 have room."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from family_factory import make_family_folder

from model_factory import export_tiny_package

FAMILIES = ["mixtral", "qwen2_moe"]
IDS = [5, 17, 99, 3, 250, 42, 7, 311, 64, 128, 9, 200]  # token ids the logits are compared on
HELDOUT = Path(__file__).resolve().parents[1] / "export" / "data" / "heldout.txt"


def short_text(folder: Path) -> str:
    """A short text file (the start of the held-out text): keeps perplexity runs fast."""
    path = folder / "short.txt"
    path.write_text(HELDOUT.read_text(encoding="utf-8")[:1200], encoding="utf-8")
    return str(path)


LOWERING = {"mixtral": "contrib", "qwen2_moe": "ops"}  # one of each MoE lowering
TOP_K = 3


def transformers_model(folder: Path):
    """A fresh copy of the checkpoint's transformers model (tests rig and edit it)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    return model.eval()


class FamilyPackages:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, tuple[Path, Path]] = {}

    def get(self, family: str) -> tuple[Path, Path]:
        """(checkpoint folder, fp32 package) of ``family``."""
        if family not in self._made:
            root = self.root / family
            make_family_folder(family, root / "ckpt", num_experts_per_tok=TOP_K)
            pkg = export_tiny_package(root / "ckpt", root / "pkg", "--moe-impl", LOWERING[family])
            self._made[family] = (root / "ckpt", pkg)
        return self._made[family]


@pytest.fixture(scope="session")
def family_packages(tmp_path_factory) -> FamilyPackages:
    return FamilyPackages(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def int8_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny MiniMind MoE as int8 QMoE (4 experts, 2 per token)."""
    return export_tiny_package(tiny_checkpoint, tmp_path_factory.mktemp("int8") / "pkg", "--int8")


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


def check_pruned(package: Path, tmp_path: Path, keep: int | None = None) -> None:
    """Prune ``package`` to ``keep`` experts (default: 2 fewer) and check the result:
    sizes and records, and a routing trace that only ever chooses kept experts."""
    src = json.loads((package / "moechat.json").read_text())["architecture"]
    num = src["n_routed_experts"]
    keep = keep or max(src["num_experts_per_tok"], num - 2)
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
