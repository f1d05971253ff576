"""int8 export: runs through the runtime, stays close to fp32, routers stay fp32."""

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from moechat.export.int8.fidelity import measure_fidelity
from moechat.export.int8.quantize import (
    QuantizeOptions,
    default_nbits_block,
    find_routers,
    quantize_decoder,
)
from moechat.export.int8.smoothing import smooth
from moechat.export.onnx_graph import export_decoder
from moechat.models.modeling import random_model
from moechat.runtime.decoder import Decoder
from moechat.runtime.providers import create_session

from model_factory import TINY_DENSE, TINY_MOE


def _arch(cfg):
    return {
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_experts_per_tok": cfg.num_experts_per_tok,
    }


def _logits(path, cfg, ids, prefill=24):
    """Teacher-forced logits: a prefill chunk, then one token at a time (static cache)."""
    session = create_session(path, "CPUExecutionProvider")
    dec = Decoder(session, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 128, True)
    out = [dec.forward(ids[:prefill], logits_for="all")]
    out += [dec.forward([t]) for t in ids[prefill:]]
    return np.concatenate(out)


def _close(ref, got, top1_min=0.9, rel=0.05):
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    rms = float(np.sqrt(((ref - got) ** 2).mean()) / np.sqrt((ref**2).mean()))
    assert top1 >= top1_min, top1
    assert rms < rel, rms


def _ids(cfg, n=48, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).tolist()


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory, tiny_checkpoint):
    from moechat.app.cli import main

    out = tmp_path_factory.mktemp("int8") / "tiny-moe-int8"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["export", str(tiny_checkpoint), str(out), "--int8"])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue()


def test_int8_package_records_quantization_fidelity_and_sizes(int8_package):
    path, printed = int8_package
    manifest = json.loads((path / "moechat.json").read_text())
    q, f = manifest["graph"]["quantization"], manifest["fidelity"]
    assert q["method"] == "int8" and q["routers"] == "float32"
    assert manifest["graph"]["moe_impl"] == "qmoe"
    assert q["float_matmuls"] == q["router_nodes"] and len(q["router_nodes"]) == 2
    assert q["int8_package_bytes"] < q["fp32_package_bytes"]
    assert manifest["parity"]["graph"].startswith("float32")  # fp32-vs-torch, before quantising
    for key in ("top1_agreement", "mean_kl", "perplexity_ratio", "routing_agreement", "tokens"):
        assert key in f
    assert f["tokens"] > 1000 and 0.8 <= f["routing_agreement"] <= 1.0
    assert sorted(p.name for p in path.iterdir()) == [
        "model.onnx", "model.onnx.data", "moechat.json", "tokenizer.json",
    ]  # fmt: skip
    assert "fp32 package" in printed and "int8 package" in printed
    assert "top-1 agreement" in printed and "expert-routing agreement" in printed


def test_int8_moe_package_runs_and_stays_close_to_fp32(int8_package, tiny_checkpoint):
    import torch

    from moechat.models.loading import load_checkpoint
    from moechat.runtime.generator import generate
    from moechat.runtime.model import load_model
    from moechat.runtime.sampling import SamplingParams

    fp32 = load_checkpoint(tiny_checkpoint).model  # the fp32 reference the package came from
    int8 = load_model(int8_package[0])
    ids = _ids(TINY_MOE)
    ref, _ = fp32.step(torch.tensor([ids]), fp32.empty_cache())
    got = int8.decoder.forward(ids, logits_for="all")
    _close(ref[0].numpy(), got)
    int8.decoder.reset()
    events = list(generate(int8, ids[:10], SamplingParams(temperature=0.0, max_new_tokens=8)))
    assert len(events[-1].token_ids) == 8


def test_routers_stay_fp32_in_the_int8_graph(int8_package):
    model = onnx.load(str(int8_package[0] / "model.onnx"), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    ops = [n.op_type for n in graph.node]
    assert ops.count("QMoE") == TINY_MOE.num_hidden_layers and "MoE" not in ops
    routers = find_routers(model)
    assert len(routers) == TINY_MOE.num_hidden_layers
    for node in routers:
        weight = inits[node.input[1]]
        assert weight.data_type == onnx.TensorProto.FLOAT
        assert sorted(weight.dims) == sorted([TINY_MOE.hidden_size, TINY_MOE.n_routed_experts])
        qmoe = next(n for n in graph.node if n.op_type == "QMoE" and node.output[0] in n.input)
        assert list(qmoe.input).index(node.output[0]) == 1  # feeds router_probs directly
    # every other matmul is int8, and so are the expert weights and the embedding table
    float_matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert sorted(n.name for n in float_matmuls) == sorted(n.name for n in routers)
    # per layer: fused q/k/v, o_proj, fused shared gate/up, shared down; then lm_head
    assert ops.count("MatMulNBits") == 4 * TINY_MOE.num_hidden_layers + 1
    for node in graph.node:
        if node.op_type == "QMoE":
            assert inits[node.input[2]].data_type == onnx.TensorProto.UINT8
    # the tied embedding reads the lm_head's 8-bit weights: the vocabulary is stored once
    lm_head = next(n for n in graph.node if "logits_int8" in n.output)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    assert {n.input[0] for n in gathers} == {lm_head.input[1], lm_head.input[2]}
    assert inits[lm_head.input[1]].data_type == onnx.TensorProto.UINT8


def test_a_tied_embedding_is_the_lm_heads_weights(tmp_path):
    """Tied: the embedding Gathers and the rescoring read the lm_head's MatMulNBits
    weights (unsmoothed), one table in the package; untied: an int8 table of its own."""
    import onnxruntime as ort

    from moechat.export.int8.tables import NBITS_ZERO

    sizes = {}
    for name, cfg in (
        ("tied", TINY_DENSE),
        ("untied", TINY_DENSE.with_changes(tie_word_embeddings=False)),
    ):
        export_decoder(
            random_model(cfg, seed=1, max_positions=256), tmp_path / f"{name}.onnx", "contrib"
        )
        info = quantize_decoder(
            tmp_path / f"{name}.onnx",
            tmp_path / f"{name}-int8.onnx",
            QuantizeOptions(),
            _ids(cfg, 64, seed=7),
        )
        graph = onnx.load(str(tmp_path / f"{name}-int8.onnx"), load_external_data=True).graph
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        sizes[name] = sum(a.nbytes for a in inits.values())
        tables = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].shape[0] == cfg.vocab_size and inits[n.input[0]].ndim == 3]  # fmt: skip
        lm_head = next(
            n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0].startswith("logits")
        )
        if name == "untied":
            assert info["embedding"].startswith("int8, scales per block")
            assert set(tables) != {lm_head.input[1]} and info["lm_head_rescoring"] is None
            continue
        assert info["embedding"].startswith("int8, the lm_head's 8-bit MatMulNBits weights")
        assert set(tables) == {lm_head.input[1]}  # embedding and rescoring rows
        assert info["lm_head_rescoring"] is not None
        # the embedding node's output is the lm_head's dequantised rows
        block = next(a.i for a in lm_head.attribute if a.name == "block_size")
        rows = (inits[lm_head.input[1]].astype(np.float32) - NBITS_ZERO) * inits[lm_head.input[2]][
            ..., None
        ]
        ids = np.array([[3, 17, 40]], np.int64)
        embedding = next(
            n
            for n in graph.node
            if n.op_type == "Reshape" and n.input[0].endswith("_b") and "rescore" not in n.name
        )
        prefix = embedding.name.removesuffix("_reshape")
        nodes = [n for n in graph.node if n.name.startswith(prefix + "_")]
        used = {i for n in nodes for i in n.input}
        sub = onnx.helper.make_graph(
            nodes, "embedding",
            [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 3])],
            [onnx.helper.make_tensor_value_info(embedding.output[0], onnx.TensorProto.FLOAT, None)],
            [t for t in graph.initializer if t.name in used],
        )  # fmt: skip
        part = onnx.helper.make_model(sub, opset_imports=[onnx.helper.make_opsetid("", 17)])
        session = ort.InferenceSession(part.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input_ids": ids})[0]
        np.testing.assert_allclose(got[0], rows[ids[0]].reshape(3, -1), rtol=1e-6)
        assert rows.shape[-1] == block
    vocab_table = TINY_DENSE.vocab_size * TINY_DENSE.hidden_size  # an int8 table's bytes
    assert sizes["untied"] - sizes["tied"] > 0.9 * vocab_table


def _nbits_blocks(graph_path) -> dict[int, int]:
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    blocks: dict[int, int] = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            assert a["bits"] == 8 and a["accuracy_level"] == 4, (node.name, a)
            blocks[a["block_size"]] = blocks.get(a["block_size"], 0) + 1
    return blocks


def test_every_matmul_of_a_moe_gets_block_32_by_default(int8_package):
    # per layer: fused q/k/v, o_proj, shared gate/up, shared down; then the lm_head
    assert _nbits_blocks(int8_package[0] / "model.onnx") == {32: 4 * TINY_MOE.num_hidden_layers + 1}
    assert default_nbits_block({"use_moe": True}) == 32
    assert default_nbits_block({"use_moe": False}) == default_nbits_block({}) == 64


def test_int8_block_option_sets_every_matmul_block(tmp_path, tiny_checkpoint):
    from moechat.app.cli import main

    out = tmp_path / "block64"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["export", str(tiny_checkpoint), str(out), "--int8", "--int8-block", "64"]) == 0
    assert _nbits_blocks(out / "model.onnx") == {64: 4 * TINY_MOE.num_hidden_layers + 1}
    quantization = json.loads((out / "moechat.json").read_text())["graph"]["quantization"]
    assert "block 64" in quantization["matmuls"]


@pytest.mark.parametrize(
    "cfg,lowering,options",
    [
        (TINY_DENSE, "contrib", QuantizeOptions()),
        (TINY_DENSE.with_changes(tie_word_embeddings=False), "contrib", QuantizeOptions()),
        (TINY_MOE, "ops", QuantizeOptions(moe="ops")),
        (TINY_MOE, "contrib", QuantizeOptions(dense="dynamic")),
    ],
    ids=["dense", "dense-untied", "moe-standard-ops", "moe-qmoe-dynamic"],
)
def test_int8_graphs_stay_close_to_fp32(tmp_path, cfg, lowering, options):
    model = random_model(cfg, seed=1, max_positions=256)
    export_decoder(model, tmp_path / "fp32.onnx", lowering)
    calibration = _ids(cfg, 64, seed=7)
    info = quantize_decoder(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", options, calibration)
    ids = _ids(cfg)
    _close(_logits(tmp_path / "fp32.onnx", cfg, ids), _logits(tmp_path / "int8.onnx", cfg, ids))
    q = onnx.load(str(tmp_path / "int8.onnx"), load_external_data=False)
    routers = find_routers(q)
    assert [n.name for n in routers] == info["router_nodes"]
    assert info["float_matmuls"] == info["router_nodes"]
    assert len(routers) == (cfg.num_hidden_layers if cfg.use_moe else 0)
    if cfg.use_moe:
        report = measure_fidelity(
            tmp_path / "fp32.onnx", tmp_path / "int8.onnx", _arch(cfg), _ids(cfg, 200, 3)
        )
        assert report.routing_agreement > 0.8
        assert len(report.routing_agreement_per_layer) == cfg.num_hidden_layers


def test_fidelity_of_a_graph_against_itself_is_perfect(tmp_path):
    cfg = TINY_MOE
    export_decoder(random_model(cfg, seed=2, max_positions=256), tmp_path / "m.onnx", "contrib")
    report = measure_fidelity(
        tmp_path / "m.onnx", tmp_path / "m.onnx", _arch(cfg), _ids(cfg, 300), window=128, chunk=50
    )
    assert report.tokens == 299
    assert report.top1_agreement == 1.0 and report.routing_agreement == 1.0
    assert abs(report.perplexity_ratio - 1.0) < 1e-6 and abs(report.mean_kl) < 1e-9
    assert not report.misses and report.to_dict()["passed"]


def test_smoothing_leaves_the_fp32_function_unchanged(tmp_path):
    cfg = TINY_MOE
    export_decoder(random_model(cfg, seed=4, max_positions=256), tmp_path / "m.onnx", "contrib")
    from moechat.export.int8.quantize import gemm_to_matmul
    from moechat.export.onnx_graph import save_model

    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=True)
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    gemm_to_matmul(model)
    scales = smooth(model, tmp_path / "m.onnx", _ids(cfg, 64, seed=5))
    # per layer: input norm, attention output (v -> o_proj), post-attention norm,
    # shared-expert down; and the final norm
    assert len(scales) == 4 * cfg.num_hidden_layers + 1
    attention = [n.output[0] for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == cfg.num_hidden_layers and all(a in scales for a in attention)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for a in attention:  # query heads that share a kv head share its scales
        per_head = scales[a].reshape(cfg.num_key_value_heads, group, cfg.head_dim)
        assert np.array_equal(per_head, np.repeat(per_head[:, :1], group, axis=1))
        assert not np.allclose(per_head[0], per_head[1])
    assert any(not np.allclose(s, 1.0) for s in scales.values())
    changed = [
        t.name for t in model.graph.initializer
        if t.name in before and not np.array_equal(numpy_helper.to_array(t), before[t.name])
    ]  # fmt: skip
    assert changed
    save_model(model, tmp_path / "s.onnx")
    ids = _ids(cfg)
    ref, got = _logits(tmp_path / "m.onnx", cfg, ids), _logits(tmp_path / "s.onnx", cfg, ids)
    assert np.abs(ref - got).max() < 1e-3 * np.abs(ref).max()


def test_smoothing_keeps_the_weights_it_is_told_to(tmp_path):
    cfg = TINY_DENSE
    export_decoder(random_model(cfg, seed=4, max_positions=256), tmp_path / "m.onnx", "contrib")
    from moechat.export.int8.quantize import gemm_to_matmul, lm_head_node

    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=True)
    gemm_to_matmul(model)
    lm_weight = next(n.input[1] for n in model.graph.node if n.name == lm_head_node(model))
    before = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == lm_weight))
    every = smooth(model.__deepcopy__(), tmp_path / "m.onnx", _ids(cfg, 64, seed=5))
    kept = smooth(model, tmp_path / "m.onnx", _ids(cfg, 64, seed=5), keep=[lm_weight])
    assert len(kept) == len(every) - 1  # the final norm feeds only the lm_head
    after = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == lm_weight))
    assert np.array_equal(before, after)
