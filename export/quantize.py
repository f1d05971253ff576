"""fp32 decoder graph -> int8 decoder graph for onnxruntime.

Weights are quantised symmetrically to int8; activations stay float32 between ops.

- Routed experts, one of two lowerings (``moe``):
  - ``qmoe``: each ``com.microsoft.MoE`` node becomes ``com.microsoft.QMoE`` with 8-bit
    weights and block-wise scales (block 64/32/16 along the reduction axis, the
    largest that divides both hidden and intermediate sizes; per row otherwise);
  - ``ops``: the standard-op lowering's per-expert MatMuls are quantised like every
    other matmul (below).
- Other matmuls (attention, shared experts, dense FFN, lm_head), ``dense``:
  - ``dynamic``: ``quantize_dynamic`` (MatMulInteger, per-channel int8 weights,
    activations quantised per tensor at run time);
  - ``nbits``: 8-bit ``MatMulNBits`` with ``accuracy_level=4`` (int8 compute; without
    it the 8-bit kernel is many times slower than fp32 on CPU).
  Gemm nodes are rewritten to MatMul first (the quantisers only convert MatMul).
- Routers stay float32: every MatMul/Gemm that produces the router logits (input 1 of
  a MoE node, or the input of a Softmax that feeds a TopK) is excluded, so expert
  choice does not flip needlessly.
- The token embedding becomes an int8 table with one scale per row behind a Gather
  (Gather -> Cast -> Mul by the gathered row scale; standard ops only).

See docs/benchmarks.md for the measurements behind the default choice.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moechat.export.onnx_graph import save_model

INT8_MOE_IMPLS = ("qmoe", "ops")
DENSE_METHODS = ("dynamic", "nbits")
QMOE_BLOCK_SIZES = (64, 32, 16)
NBITS_BLOCK_SIZE = 32
MSFT_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantizeOptions:
    moe: str = "ops"  # how routed experts are quantised: "qmoe" or "ops"
    dense: str = "dynamic"  # the other matmuls: "dynamic" or "nbits"
    embedding: bool = True  # int8 token-embedding table

    def __post_init__(self) -> None:
        if self.moe not in INT8_MOE_IMPLS:
            raise ValueError(f"moe must be one of {INT8_MOE_IMPLS}")
        if self.dense not in DENSE_METHODS:
            raise ValueError(f"dense must be one of {DENSE_METHODS}")


# --------------------------------------------------------------------------- graph helpers


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                users.setdefault(name, []).append(node)
    return users


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _ensure_node_names(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_routers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul/Gemm nodes that compute router logits, in graph order.

    A router feeds input 1 (``router_probs``) of a ``MoE``/``QMoE`` node, or a Softmax
    whose output goes into a TopK (the standard-op lowering). Only a MatMul/Gemm with a
    constant weight counts (a Reshape/Cast in between is looked through).
    """
    graph = model.graph
    producers = _producers(graph)
    users = _consumers(graph)
    inits = _initializers(graph)
    logits: list[str] = []
    for node in graph.node:
        if node.op_type in ("MoE", "QMoE") and node.domain == MSFT_DOMAIN and len(node.input) > 1:
            logits.append(node.input[1])
        elif node.op_type == "Softmax" and any(
            u.op_type == "TopK" for u in users.get(node.output[0], [])
        ):
            logits.append(node.input[0])
    found: dict[str, onnx.NodeProto] = {}
    for name in logits:
        node = producers.get(name)
        while node is not None and node.op_type in ("Reshape", "Cast", "Identity"):
            node = producers.get(node.input[0])
        if node is not None and node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            found[node.name] = node
    order = {id(n): i for i, n in enumerate(graph.node)}
    return sorted(found.values(), key=lambda n: order[id(n)])


# --------------------------------------------------------------------------- rewrites


def gemm_to_matmul(model: onnx.ModelProto, keep: set[str] = frozenset()) -> int:
    """Rewrite Gemm(A, const B[, C]) as MatMul(A, B') (+ Add C); returns how many."""
    graph = model.graph
    inits = _initializers(graph)
    new_nodes = []
    count = 0
    for node in graph.node:
        if (
            node.op_type != "Gemm"
            or node.name in keep
            or node.input[1] not in inits
            or _attr(node, "transA", 0)
            or _attr(node, "alpha", 1.0) != 1.0
        ):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if _attr(node, "transB", 0):
            w = w.T
        w_name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        out = node.output[0]
        mm_out = f"{out}_matmul" if has_bias else out
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], node.name))
        if has_bias:
            c = node.input[2]
            if _attr(node, "beta", 1.0) != 1.0:
                beta = numpy_helper.to_array(inits[c]) * _attr(node, "beta", 1.0)
                c = f"{c}_beta"
                graph.initializer.append(numpy_helper.from_array(beta.astype(np.float32), c))
            new_nodes.append(helper.make_node("Add", [mm_out, c], [out], f"{node.name}_bias"))
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return count


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def quantize_rows(w: np.ndarray, block: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 along the last axis: (q int8, scale) with w ~ q * scale.

    ``block`` 0: one scale per row (scale shape ``w.shape[:-1]``); otherwise one per
    ``block`` consecutive values (scale shape ``w.shape[:-1] + (K // block,)``).
    """
    k = w.shape[-1]
    blocks = w.reshape(*w.shape[:-1], 1 if block == 0 else k // block, -1)
    scale = np.abs(blocks).max(axis=-1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int8)
    if block == 0:
        scale = scale[..., 0]
    return q.reshape(w.shape), scale


def qmoe_block_size(hidden: int, intermediate: int) -> int:
    """Largest supported block that divides both reduction sizes (0: per-row scales)."""
    return next((b for b in QMOE_BLOCK_SIZES if hidden % b == 0 and intermediate % b == 0), 0)


def moe_to_qmoe(model: onnx.ModelProto) -> dict:
    """Replace each com.microsoft.MoE with an 8-bit QMoE (uint8 weights, zero point 128)."""
    graph = model.graph
    inits = _initializers(graph)
    block = None
    count = 0
    for node in graph.node:
        if node.op_type != "MoE" or node.domain != MSFT_DOMAIN:
            continue
        if len(node.input) > 6 and any(node.input[6:]):
            raise ValueError("MoE nodes with fc3 weights are not supported")
        if (len(node.input) > 3 and node.input[3]) or (len(node.input) > 5 and node.input[5]):
            raise ValueError("MoE nodes with biases are not supported")
        fc1 = numpy_helper.to_array(inits[node.input[2]])  # [E, 2I, H]
        fc2 = numpy_helper.to_array(inits[node.input[4]])  # [E, H, I]
        block = qmoe_block_size(fc1.shape[2], fc2.shape[2])
        new_inputs = [node.input[0], node.input[1]]
        for name, w in ((node.input[2], fc1), (node.input[4], fc2)):
            q, scale = quantize_rows(w, block)
            qname, sname = f"{name}_q8", f"{name}_scale"
            graph.initializer.append(
                numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), qname)
            )
            graph.initializer.append(numpy_helper.from_array(scale, sname))
            new_inputs += [qname, sname, ""]  # weights, scales, (no) bias
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs.update(expert_weight_bits=8)
        if block:
            attrs["block_size"] = block
        del node.input[:]
        node.input.extend(new_inputs[:-1])  # drop the trailing empty fc2 bias
        node.op_type = "QMoE"
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in sorted(attrs.items()))
        count += 1
    _drop_unused_initializers(graph)
    return {"nodes": count, "block_size": block or "per-row"}


def quantize_embedding(model: onnx.ModelProto, ids_input: str = "input_ids") -> list[str]:
    """int8 rows + one float scale per row for every Gather of a float table by the ids."""
    graph = model.graph
    inits = _initializers(graph)
    new_nodes = []
    done = []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if (
            table is None
            or node.input[1] != ids_input
            or table.data_type != TensorProto.FLOAT
            or len(table.dims) != 2
            or _attr(node, "axis", 0) != 0
        ):
            new_nodes.append(node)
            continue
        q, scale = quantize_rows(numpy_helper.to_array(table))
        base = node.input[0]
        qname, sname = f"{base}_q8", f"{base}_row_scale"
        graph.initializer.append(numpy_helper.from_array(q, qname))
        graph.initializer.append(numpy_helper.from_array(scale[:, None], sname))
        out = node.output[0]
        n = node.name
        new_nodes += [
            helper.make_node("Gather", [qname, ids_input], [f"{out}_q8"], f"{n}_q8", axis=0),
            helper.make_node("Cast", [f"{out}_q8"], [f"{out}_f"], f"{n}_cast", to=TensorProto.FLOAT),
            helper.make_node("Gather", [sname, ids_input], [f"{out}_s"], f"{n}_scale", axis=0),
            helper.make_node("Mul", [f"{out}_f", f"{out}_s"], [out], f"{n}_dequant"),
        ]
        done.append(base)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return done


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs advice at WARNING level on every call."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _quantize_matmuls(model: onnx.ModelProto, dense: str, exclude: list[str]) -> onnx.ModelProto:
    if dense == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        with _quiet_quantizer():
            quantizer = MatMulNBitsQuantizer(
                model, bits=8, block_size=NBITS_BLOCK_SIZE, is_symmetric=True, accuracy_level=4,
                nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",),
            )  # fmt: skip
            quantizer.process()
        return quantizer.model.model
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(
            model, out, op_types_to_quantize=["MatMul"], per_channel=True,
            weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            use_external_data_format=True, extra_options={"MatMulConstBOnly": True},
        )  # fmt: skip
        return onnx.load(str(out), load_external_data=True)


def _matmul_count(model: onnx.ModelProto, op_types: tuple[str, ...]) -> int:
    return sum(1 for n in model.graph.node if n.op_type in op_types)


def quantize_model(model: onnx.ModelProto, options: QuantizeOptions) -> tuple[onnx.ModelProto, dict]:
    """Return the int8 model and a description for the manifest's graph.quantization."""
    graph = model.graph
    _ensure_node_names(graph)
    routers = find_routers(model)
    router_names = [n.name for n in routers]
    has_moe = any(n.op_type == "MoE" and n.domain == MSFT_DOMAIN for n in graph.node)
    if options.moe == "qmoe" and not has_moe and _is_moe_ops_graph(model):
        raise ValueError("QMoE needs a graph with com.microsoft.MoE nodes (moe_impl contrib)")
    gemm_to_matmul(model, keep=set(router_names))
    info: dict = {
        "weights": "int8",
        "scheme": "symmetric",
        "activations": "float32",
        "routers": "float32",
        "router_nodes": router_names,
    }
    if has_moe:
        if options.moe != "qmoe":
            raise ValueError("the standard-op int8 MoE needs a graph exported with moe_impl ops")
        qmoe = moe_to_qmoe(model)
        info["routed_experts"] = f"QMoE int8, block {qmoe['block_size']}"
    elif routers:
        info["routed_experts"] = f"per-expert MatMuls, {_dense_description(options.dense)}"
    if options.embedding:
        tables = quantize_embedding(model)
        info["embedding"] = "int8, one scale per row" if tables else "float32"
    else:
        info["embedding"] = "float32"
    model = _quantize_matmuls(model, options.dense, router_names)
    info["matmuls"] = _dense_description(options.dense)
    # Anything left in float32 besides the routers would be a quantiser miss: report it.
    inits = _initializers(model.graph)
    info["float_matmuls"] = sorted(
        n.name for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits
    )  # fmt: skip
    return model, info


def _dense_description(dense: str) -> str:
    if dense == "nbits":
        return f"MatMulNBits 8-bit, block {NBITS_BLOCK_SIZE}, accuracy_level 4"
    return "MatMulInteger (quantize_dynamic), per-channel int8 weights"


def _is_moe_ops_graph(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "TopK" for n in model.graph.node)


def quantize_decoder(src: Path, dst: Path, options: QuantizeOptions) -> dict:
    """Read the fp32 graph ``src`` (+ external data), write the int8 graph ``dst``."""
    model = onnx.load(str(src), load_external_data=True)
    model, info = quantize_model(model, options)
    save_model(model, Path(dst))
    return info
