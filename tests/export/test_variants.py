"""Per-provider graph variants: the DirectML graph uses only ops DirectML implements."""

import json

import onnx
import pytest

from moechat.runtime import model as runtime_model
from moechat.runtime.model import load_model

from model_factory import export_tiny_package

# ONNX-domain operators registered by onnxruntime's DirectML provider
# (onnxruntime/core/providers/dml/.../OperatorRegistration.cpp) that our graphs may use.
DML_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Sigmoid", "Softmax",
    "MatMul", "Gemm", "Gather", "GatherND", "GatherElements", "ScatterND", "ScatterElements",
    "TopK", "NonZero", "Range", "Expand", "Concat", "Reshape", "Squeeze", "Unsqueeze", "Slice",
    "Shape", "Transpose", "ReduceSum", "ReduceMean", "Cast", "Where", "Equal", "Greater", "Less",
    "ConstantOfShape", "Constant", "Identity", "Cos", "Sin", "Trilu", "Split",
}  # fmt: skip


@pytest.fixture(scope="module")
def dml_package(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("dml") / "pkg"
    return export_tiny_package(tiny_checkpoint, out, "--variant", "dml")


def test_dml_variant_uses_only_directml_ops(dml_package):
    manifest = json.loads((dml_package / "moechat.json").read_text())
    assert manifest["graph"]["variants"] == {"dml": "model.dml.onnx"}
    assert manifest["graph"]["variant_parity"]["dml"]["relative"] < 1e-4
    graph = onnx.load(dml_package / "model.dml.onnx", load_external_data=False).graph
    ops = {(n.domain or "ai.onnx", n.op_type) for n in graph.node}
    assert {d for d, _ in ops} == {"ai.onnx"}, ops  # no com.microsoft contrib ops
    assert {o for _, o in ops} <= DML_OPS, {o for _, o in ops} - DML_OPS
    for node in graph.node:  # DirectML's ScatterND has no reduction
        reductions = [a.s for a in node.attribute if a.name == "reduction"]
        assert reductions in ([], [b"none"]), (node.op_type, reductions)
    default = onnx.load(dml_package / "model.onnx", load_external_data=False).graph
    assert "MoE" in {n.op_type for n in default.node}


def test_runtime_picks_the_variant_for_its_provider(dml_package, monkeypatch):
    package = runtime_model.load_package(dml_package)
    assert runtime_model._graph_variant(package, "DmlExecutionProvider") == "dml"
    assert runtime_model._graph_variant(package, "CPUExecutionProvider") is None
    # The dml graph (growing cache, standard-op attention) gives the same greedy text.
    opened = []
    real_create = runtime_model.create_session
    monkeypatch.setattr(runtime_model, "_graph_variant", lambda p, prov: "dml")
    monkeypatch.setattr(
        runtime_model,
        "create_session",
        lambda path, *a: opened.append(path.name) or real_create(path, *a),
    )
    via_dml = load_model(dml_package, device="cpu")
    assert opened == ["model.dml.onnx"] and not via_dml.decoder.static_cache
    monkeypatch.undo()
    plain = load_model(dml_package, device="cpu")
    ids = list(range(5, 30))
    a, b = via_dml.decoder.forward(ids), plain.decoder.forward(ids)
    assert abs(a - b).max() < 1e-3
