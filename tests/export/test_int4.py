"""4-bit packages: QMoE's 4-bit layout against the kernel, and --int4 / --int4-experts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moechat.app.cli import main
from moechat.export.int8.quantize import pack_uint4, quantize_rows

from model_factory import TINY_MOE, export_tiny_package, make_hf_folder


def test_quantize_rows_4bit_range_and_error():
    w = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    q, scale = quantize_rows(w, 32, bits=4)
    assert q.min() >= -8 and q.max() <= 7
    deq = (q.reshape(6, 2, 32) * scale[..., None]).reshape(6, 64)
    assert np.abs(deq - w).max() <= scale.max() / 2 + 1e-6


def _qmoe_session(
    fc1: np.ndarray, fc2: np.ndarray, block: int, level: int = 0
) -> ort.InferenceSession:
    """One 4-bit QMoE node over moechat's packing of fc1 [E, 2I, H] and fc2 [E, H, I]
    (``level``: its accuracy_level; 4 = int8 activations, as moechat exports)."""
    inits = []
    for name, w in (("w1", fc1), ("w2", fc2)):
        q, scale = quantize_rows(w, block, bits=4)
        inits += [
            numpy_helper.from_array(pack_uint4(q), name),
            numpy_helper.from_array(scale, f"{name}_scale"),
        ]
    tokens, hidden, experts = 5, fc1.shape[2], fc1.shape[0]
    node = helper.make_node(
        "QMoE", ["x", "router", "w1", "w1_scale", "", "w2", "w2_scale"], ["y"],
        domain="com.microsoft", activation_type="swiglu", k=1, normalize_routing_weights=1,
        swiglu_fusion=1, expert_weight_bits=4, block_size=block, accuracy_level=level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "qmoe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden]),
         helper.make_tensor_value_info("router", TensorProto.FLOAT, [tokens, experts])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, hidden])], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("level,tolerance", [(0, 1e-4), (4, 2e-2)])
def test_qmoe_4bit_packing_is_the_kernels_layout(level, tolerance):
    # level 4 quantises the activations to int8 per block: close, not exact
    rng = np.random.default_rng(1)
    experts, hidden, inter, block = 2, 64, 32, 32
    fc1 = (rng.normal(size=(experts, 2 * inter, hidden)) * 0.2).astype(np.float32)
    fc2 = (rng.normal(size=(experts, hidden, inter)) * 0.2).astype(np.float32)
    x = rng.normal(size=(5, hidden)).astype(np.float32)
    router = np.zeros((5, experts), np.float32)
    router[:, 1] = 10.0  # every token to expert 1, weight 1
    y = _qmoe_session(fc1, fc2, block, level).run(None, {"x": x, "router": router})[0]

    def dequantized(w: np.ndarray) -> np.ndarray:
        q, scale = quantize_rows(w, block, bits=4)
        blocks = q.reshape(*w.shape[:-1], -1, block) * scale[..., None]
        return blocks.reshape(w.shape)

    h = x @ dequantized(fc1)[1].T
    gate, up = h[:, 0::2], h[:, 1::2]
    ref = (gate / (1 + np.exp(-gate)) * up) @ dequantized(fc2)[1].T
    assert np.abs(y - ref).max() < tolerance * np.abs(ref).max()


@pytest.fixture(scope="module")
def moe_source(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("int4") / "ckpt", TINY_MOE, seed=4)


@pytest.mark.parametrize(
    "flag,bits,weights", [("--int4", 4, "int4"), ("--int4-experts", 8, "int4 experts, int8")]
)
def test_int4_packages_export_and_run(tmp_path, capsys, moe_source, flag, bits, weights):
    pkg = export_tiny_package(moe_source, tmp_path / "pkg", flag)
    manifest = json.loads((pkg / "moechat.json").read_text())
    quant = manifest["graph"]["quantization"]
    assert quant["weight_bits"] == {"experts": 4, "matmuls": bits}
    assert quant["weights"] == weights and quant["method"] == "int4"
    assert "QMoE 4-bit" in quant["routed_experts"]
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph
    qmoe = [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "QMoE"]
    # int8 activations: the 4-bit experts' fast kernels (decision 0021)
    assert qmoe and all(a["expert_weight_bits"] == 4 and a["accuracy_level"] == 4 for a in qmoe)
    assert ("by GPTQ" in quant["matmuls"]) == (bits == 4)  # the calibrated 4-bit matmuls
    # Q4_K_M's choice: layer 1 of 2 keeps its (shared expert's) down projection at 8 bits
    assert ("1 down projections 8-bit" in quant["matmuls"]) == (bits == 4)
    assert manifest["fidelity"]["tokens"] > 100
    assert f"{weights} package" in capsys.readouterr().out
    assert main(["run", str(pkg), "Hello", "-n", "4", "--json", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"]


def test_int4_is_smaller_than_int8(tmp_path, moe_source):
    from moechat.runtime.package import package_bytes

    int8 = export_tiny_package(moe_source, tmp_path / "int8", "--int8")
    int4 = export_tiny_package(moe_source, tmp_path / "int4", "--int4")
    assert package_bytes(int4) < package_bytes(int8)


def test_expert_block_sets_the_qmoe_blocks(tmp_path, moe_source):
    pkg = export_tiny_package(moe_source, tmp_path / "pkg", "--int8", "--expert-block", "16")
    manifest = json.loads((pkg / "moechat.json").read_text())
    routed = manifest["graph"]["quantization"]["routed_experts"]
    assert routed == "QMoE 8-bit, block 16, int8 activations"
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph
    attrs = [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "QMoE"]
    assert attrs and {a["block_size"] for a in attrs} == {16}
    assert {a["accuracy_level"] for a in attrs} == {4}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--int4", "--int8"], "--int8 and --int4 are alternatives"),
        (["--int4", "--int4-experts"], "--int4 and --int4-experts are alternatives"),
        (["--int4-experts", "--moe-impl", "ops"], "not with ops"),
        (["--int4", "--int8-matmuls", "dynamic"], "not with --int8-matmuls dynamic"),
        (["--expert-block", "32"], "--expert-block sets the QMoE op's blocks"),
        (["--int8", "--expert-block", "64"], "expert block 64 does not divide"),  # 96 wide
    ],
)
def test_int4_option_errors(tmp_path, capsys, moe_source, args, message):
    assert main(["export", str(moe_source), str(tmp_path / "pkg"), *args]) != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "weights,precision",
    [("int4", "int4"), ("int4 experts, int8", "int8"), ("int8", "int8"), (None, "int8")],
)
def test_genai_anchor_precision_follows_the_package(tmp_path, weights, precision):
    from moechat.export.bench_anchors import genai

    graph = {"quantization": {"weights": weights}} if weights else {}
    assert genai.precision({"graph": graph}) == precision
    cmd = genai.builder_command(tmp_path / "hf", tmp_path / "out", tmp_path / "cache", precision)
    assert cmd[cmd.index("-p") + 1] == precision
    # a 4-bit anchor at moechat's 4-bit granularity: block 32, int8 compute
    assert ("int4_block_size=32" in cmd and "int4_accuracy_level=4" in cmd) == (precision == "int4")


def test_int4_summary_points_to_int8_not_the_residual_pass(capsys):
    from moechat.export.cli import print_int8_summary

    fidelity = {
        "tokens": 100, "top1_agreement": 0.7, "mean_kl": 0.2, "perplexity_ratio": 1.2,
        "routing_agreement": None, "thresholds": {"perplexity_ratio_max": 1.02, "top1_agreement_min": 0.97},
    }  # fmt: skip
    quantization = {
        "weights": "int4", "fp32_package_bytes": 100, "int8_package_bytes": 21, "size_ratio": 0.21,
        "matmuls": "MatMulNBits 4-bit, accuracy_level 4, block 32; lm_head 8-bit",
    }  # fmt: skip
    print_int8_summary({"graph": {"quantization": quantization}, "fidelity": fidelity})
    err = capsys.readouterr().err
    assert "--int8 stays closer to fp32" in err and "--int8-residual-pass" not in err
    print_int8_summary(
        {"graph": {"quantization": {**quantization, "weights": "int8"}}, "fidelity": fidelity}
    )
    err = capsys.readouterr().err
    assert "--int8-residual-pass" in err and "--int8 stays closer" not in err
