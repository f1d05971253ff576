"""fp32 decoder graph -> int8 decoder graph for onnxruntime.

Weights are quantised symmetrically to int8 with float scales per block along the
reduction axis; activations stay float32 between ops (the int8 kernels quantise
them per block on the fly).

- Routed experts, one of two lowerings (``moe``):
  - ``qmoe``: each ``com.microsoft.MoE`` node becomes ``com.microsoft.QMoE`` with 8-bit
    weights and block-wise scales (block 32, or 16, along the reduction axis: one
    that divides both hidden and intermediate sizes; per row otherwise);
  - ``ops``: the standard-op lowering's per-expert MatMuls are quantised like every
    other matmul (below).
- Other matmuls (attention, shared experts, dense FFN, lm_head), ``dense``:
  - ``nbits`` (default): 8-bit ``MatMulNBits``, ``accuracy_level=4`` (int8 compute
    with activations quantised per block; without it the 8-bit kernel is 40-90x
    slower than fp32 at decode on CPU), one block size along K for every matmul
    (``block``; ``moechat export`` takes :func:`default_nbits_block`: 32 for MoE models,
    64 for dense ones, unless ``--int8-block`` says). The kernel costs less per token with
    larger blocks and errs more (SmolLM2: the block-64 graph costs 11-17% less per
    decode step than onnxruntime-genai's block-32 graph; block 32, the anchors'
    granularity, has a third less KL; with smoothing both stay below the anchors' KL:
    docs/decisions/0003-int8-block-sizes.md);
  - ``dynamic``: ``quantize_dynamic`` (MatMulInteger, per-channel int8 weights,
    activations quantised per tensor at run time: fastest prefill, but far less
    accurate on trained models).
  Gemm nodes are rewritten to MatMul first (the quantisers only convert MatMul).
- Routers stay float32: every MatMul/Gemm that produces the router logits (input 1 of
  a MoE node, or the input of a Softmax that feeds a TopK) is excluded, so expert
  choice does not flip needlessly.
- Activation smoothing before quantisation (``moechat.export.int8.smoothing``), when
  calibration tokens are given.
- The token embedding becomes an int8 table with block scales behind a Gather
  (Gather -> Cast -> Mul by the gathered scales; standard ops only). A tied lm_head
  (unsmoothed) lends its 8-bit MatMulNBits weights to the embedding instead, so the
  package stores the vocabulary once, and its 32 best int8 logits are recomputed from
  float activations and those rows (``moechat.export.int8.tables``).
- 4-bit levels (``dense_bits`` 4): GPTQ chooses the 4-bit MatMulNBits values from the
  calibration tokens (``moechat.export.int8.gptq``; the kernel and layout stay those of
  round-to-nearest), the lm_head and, as llama.cpp's Q4_K_M does, the FFN down projections
  of :func:`more_bits_layers` stay 8-bit (docs/decisions/0014-int4-levels.md).
- Optionally (``residual_pass``) each MatMulNBits but the lm_head also runs over its
  activations' int8 rounding error (``moechat.export.int8.residual_pass``).

See docs/decisions/0001-0003 for the measurements behind the default choice.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moechat.export.graph_rewrites import (
    MSFT_DOMAIN,
    drop_unused_initializers,
    ensure_node_names,
    find_routers,
    gemm_to_matmul,
    initializers,
    producers,
)
from moechat.export.int8.residual_pass import add_residual_passes
from moechat.export.int8.smoothing import ALPHA, smooth
from moechat.export.int8.tables import (
    RESCORE_TOP,
    QuantizedTable,
    add_lm_head_rescoring,
    embed_from_lm_head,
    find_tied_lm_head,
    lm_head_input_chain,
    quantize_embedding,
)
from moechat.export.lazy_weights import map_rows
from moechat.export.onnx_graph import save_model
from moechat.runtime.errors import MoechatError

INT8_MOE_IMPLS = ("qmoe", "ops")
WEIGHT_BITS = (4, 8)
DENSE_METHODS = ("dynamic", "nbits")
INT4_METHODS = ("gptq", "rtn")
QMOE_BLOCK_SIZES = (32, 16)  # the default: the first dividing both reduction sizes
QMOE_BLOCK_CHOICES = (16, 32, 64, 128)  # what --expert-block may ask
NBITS_BLOCK_SIZE = 64  # default MatMulNBits block along K for dense models
MOE_NBITS_BLOCK_SIZE = 32  # ... and for MoE models (their routing amplifies the error)
NBITS_BLOCK_SIZES = (16, 32, 64, 128)


def default_nbits_block(arch: dict, bits: int = 8) -> int:
    """The MatMulNBits block ``moechat export --int8/--int4`` uses when none is given.

    A MoE's routers turn small upstream errors into a different expert, so MoE models
    get the finer block: on the demo MoE it cuts the int8 mean KL by 29% for a few % of
    decode speed; dense models keep the faster block 64 (docs/decisions/0003-*). 4-bit
    weights take block 32 (llama.cpp's Q4_0 granularity): 16 levels need the finer scales.
    """
    if bits == 4:
        return MOE_NBITS_BLOCK_SIZE
    return MOE_NBITS_BLOCK_SIZE if arch.get("use_moe") else NBITS_BLOCK_SIZE


@dataclass(frozen=True)
class QuantizeOptions:
    moe: str = "qmoe"  # how routed experts are quantised: "qmoe" or "ops"
    dense: str = "nbits"  # the other matmuls: "nbits" or "dynamic"
    embedding: bool = True  # int8 token-embedding table
    smooth: bool = True  # activation smoothing (needs calibration tokens)
    alpha: float = ALPHA  # smoothing strength: 0 none, 1 all onto the weights
    symmetric: bool = True  # MatMulNBits weights without zero points
    block: int = NBITS_BLOCK_SIZE  # MatMulNBits block along the reduction axis
    residual_pass: bool = False  # second MatMulNBits pass over the activation rounding error
    expert_bits: int = 8  # routed experts (QMoE, or the per-expert MatMuls of "ops")
    dense_bits: int = 8  # the other MatMulNBits; the lm_head stays 8-bit at 4
    int4_method: str = "gptq"  # 4-bit matmuls and experts: "gptq" (needs calibration) or "rtn"
    int4_down8: bool = True  # 4-bit: the down projections of Q4_K_M's wider layers at 8 bits
    expert_block: int | None = None  # QMoE block along the reduction axis (None: 32, else 16)

    def __post_init__(self) -> None:
        if self.expert_bits not in WEIGHT_BITS or self.dense_bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {WEIGHT_BITS}")
        if self.dense_bits == 4 and self.dense != "nbits":
            raise ValueError("4-bit matmuls are MatMulNBits (dense='nbits')")
        if self.moe not in INT8_MOE_IMPLS:
            raise ValueError(f"moe must be one of {INT8_MOE_IMPLS}")
        if self.dense not in DENSE_METHODS:
            raise ValueError(f"dense must be one of {DENSE_METHODS}")
        if self.block not in NBITS_BLOCK_SIZES:
            raise ValueError(f"block must be one of {NBITS_BLOCK_SIZES}")
        if self.int4_method not in INT4_METHODS:
            raise ValueError(f"int4_method must be one of {INT4_METHODS}")
        if self.expert_block is not None and self.expert_block not in QMOE_BLOCK_CHOICES:
            raise ValueError(f"expert_block must be one of {QMOE_BLOCK_CHOICES}")
        if self.residual_pass and self.dense != "nbits":
            raise ValueError("the residual pass needs MatMulNBits (dense='nbits')")


def quantize_rows(w: np.ndarray, block: int = 0, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric ``bits``-bit integers along the last axis: (q int8, scale), w ~ q * scale.

    ``block`` 0: one scale per row (scale shape ``w.shape[:-1]``); otherwise one per
    ``block`` consecutive values (scale shape ``w.shape[:-1] + (K // block,)``). 8 bits
    use [-127, 127]; 4 bits [-8, 7] with the block's largest magnitude at 7.
    """
    k = w.shape[-1]
    top = 127 if bits == 8 else 7
    blocks = w.reshape(*w.shape[:-1], 1 if block == 0 else k // block, -1)
    scale = np.abs(blocks).max(axis=-1) / top
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -top - (bits == 4), top).astype(np.int8)
    if block == 0:
        scale = scale[..., 0]
    return q.reshape(w.shape), scale


def qmoe_block_size(hidden: int, intermediate: int) -> int:
    """The first supported block (32, 16) dividing both reduction sizes (0: per row)."""
    return next((b for b in QMOE_BLOCK_SIZES if hidden % b == 0 and intermediate % b == 0), 0)


def pack_uint4(q: np.ndarray) -> np.ndarray:
    """int4 values [..., K] -> uint8 [..., K/2]: offset 8, the even index in the low nibble
    (QMoE's 4-bit layout; checked against the kernel in tests/test_int4.py)."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _qmoe_part(w: np.ndarray, block: int, bits: int, part: int) -> np.ndarray:
    """QMoE's stored weights (part 0: uint8, zero point 128 or two 4-bit values per byte)
    or scales (part 1) of expert weights ``w``."""
    q, scale = quantize_rows(w, block, bits)
    if part:
        return scale
    return (q.astype(np.int16) + 128).astype(np.uint8) if bits == 8 else pack_uint4(q)


def _stored_experts(
    w: onnx.TensorProto, block: int, chosen: list[tuple[np.ndarray, np.ndarray] | None]
) -> tuple[np.ndarray, np.ndarray]:
    """4-bit QMoE weights and scales of the stacked experts ``w``: each expert's values as
    ``chosen`` (GPTQ's), or round to nearest where it has none."""
    experts = numpy_helper.to_array(w)
    parts = [c or quantize_rows(e, block, 4) for e, c in zip(experts, chosen, strict=True)]
    return np.stack([pack_uint4(q) for q, _ in parts]), np.stack([s for _, s in parts])


def moe_to_qmoe(
    model: onnx.ModelProto,
    bits: int = 8,
    block: int | None = None,
    chosen: dict[str, list[tuple[np.ndarray, np.ndarray] | None]] | None = None,
) -> dict:
    """Replace each com.microsoft.MoE with a QMoE of ``bits``-bit weights (uint8 storage:
    zero point 128 at 8 bits, two values per byte with zero point 8 at 4 bits), in blocks
    of ``block`` along the reduction axis (None: :func:`qmoe_block_size`). ``chosen``: 4-bit
    values per expert by weight name (gptq_experts.py); the others round to nearest."""
    asked = block
    graph = model.graph
    inits = initializers(graph)
    block = None
    count = 0
    for node in graph.node:
        if node.op_type != "MoE" or node.domain != MSFT_DOMAIN:
            continue
        if len(node.input) > 6 and any(node.input[6:]):
            raise ValueError("MoE nodes with fc3 weights are not supported")
        if (len(node.input) > 3 and node.input[3]) or (len(node.input) > 5 and node.input[5]):
            raise ValueError("MoE nodes with biases are not supported")
        fc1, fc2 = inits[node.input[2]], inits[node.input[4]]  # [E, 2I, H], [E, H, I]
        block = asked or qmoe_block_size(fc1.dims[2], fc2.dims[2])
        if asked and (fc1.dims[2] % asked or fc2.dims[2] % asked):
            raise MoechatError(
                f"expert block {block} does not divide the experts' sizes "
                f"({fc1.dims[2]}, {fc2.dims[2]})"
            )
        new_inputs = [node.input[0], node.input[1]]
        if bits == 4 and not block:
            raise ValueError("4-bit QMoE needs hidden and intermediate sizes divisible by 16")
        for w in (fc1, fc2):
            qname, sname = f"{w.name}_q{bits}", f"{w.name}_scale"
            if bits == 4 and chosen and w.name in chosen:
                q, scale = _stored_experts(w, block, chosen[w.name])
                graph.initializer.append(numpy_helper.from_array(q, qname))
                graph.initializer.append(numpy_helper.from_array(scale, sname))
            else:  # per expert (rows of the stack): a streamed export's weights stay lazy
                for part, part_name in ((0, qname), (1, sname)):
                    fn = partial(_qmoe_part, block=block, bits=bits, part=part)
                    graph.initializer.append(map_rows(w, part_name, fn))
            new_inputs += [qname, sname, ""]  # weights, scales, (no) bias
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # accuracy_level 4: int8 activations, onnxruntime's MatMulNBits kernels for the
        # experts. At the default level its CPU QMoE runs 4-bit experts with fp32
        # activations, 2.2-2.4x slower per token than with int8 ones (decision 0021);
        # 8-bit experts take int8 activations at every level.
        attrs.update(expert_weight_bits=bits, accuracy_level=4)
        if block:
            attrs["block_size"] = block
        del node.input[:]
        node.input.extend(new_inputs[:-1])  # drop the trailing empty fc2 bias
        node.op_type = "QMoE"
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in sorted(attrs.items()))
        count += 1
    drop_unused_initializers(graph)
    return {"nodes": count, "block_size": block or "per-row"}


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
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


def lm_head_node(model: onnx.ModelProto) -> str | None:
    """The MatMul that produces the logits (through Granite's division, if any)."""
    producer_of = producers(model.graph)
    name = "logits"
    while name in producer_of:
        node = producer_of[name]
        if node.op_type in ("MatMul", "Gemm"):
            return node.name
        if node.op_type not in ("Div", "Mul", "Reshape", "Cast"):
            return None
        name = node.input[0]
    return None


def _nbits(
    model: onnx.ModelProto, options: QuantizeOptions, bits: int, exclude: list[str]
) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=options.block, is_symmetric=options.symmetric,
            accuracy_level=4, nodes_to_exclude=list(exclude), op_types_to_quantize=("MatMul",),
        )  # fmt: skip
        quantizer.process()
    return quantizer.model.model


def more_bits_layers(layers: int) -> list[int]:
    """The layers whose ffn_down llama.cpp's Q4_K_M keeps at 6 bits (``use_more_bits``):
    the first and last eighth, and every third layer between."""
    return [
        i for i in range(layers)
        if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2
    ]  # fmt: skip


def down_projections(model: onnx.ModelProto) -> list[str]:
    """MatMuls with a constant weight fed by a SwiGLU product (a Mul of two computed
    tensors): the FFN down projections, in graph (layer) order."""
    graph = model.graph
    inits = initializers(graph)
    producer_of = producers(graph)
    out = []
    for node in graph.node:
        src = producer_of.get(node.input[0]) if node.op_type == "MatMul" else None
        if (
            src is not None and node.input[1] in inits and src.op_type == "Mul"
            and not any(i in inits for i in src.input)
        ):  # fmt: skip
            out.append(node.name)
    return out


def eight_bit_matmuls(model: onnx.ModelProto, options: QuantizeOptions) -> list[str]:
    """The MatMuls a 4-bit level keeps at 8 bits: the lm_head (its errors reach every logit
    directly; llama.cpp's 4-bit types keep the output matrix wider too) and, with
    ``int4_down8``, the down projections of :func:`more_bits_layers`."""
    if options.dense_bits != 4 or options.dense != "nbits":
        return []
    wide = [name for name in [lm_head_node(model)] if name]
    if options.int4_down8:
        downs = down_projections(model)
        wide += [downs[i] for i in more_bits_layers(len(downs))]
    return wide


def _quantize_matmuls(
    model: onnx.ModelProto, options: QuantizeOptions, exclude: list[str], wide: Sequence[str] = ()
) -> onnx.ModelProto:
    """Quantise the MatMuls (but ``exclude``); at 4 bits, ``wide`` ones get 8 bits."""
    if options.dense == "nbits":
        if not wide:
            return _nbits(model, options, options.dense_bits, exclude)
        model = _nbits(model, options, 4, [*exclude, *wide])
        return _nbits(model, options, 8, exclude)
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


def quantize_model(
    model: onnx.ModelProto,
    options: QuantizeOptions,
    calibration: tuple[Path, Sequence[int]] | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """Return the int8 model and a description for the manifest's graph.quantization.

    ``calibration``: (the fp32 graph file ``model`` was loaded from, token ids) for
    activation smoothing; without it nothing is smoothed.
    """
    graph = model.graph
    ensure_node_names(graph)
    routers = find_routers(model)
    router_names = [n.name for n in routers]
    has_moe = any(n.op_type == "MoE" and n.domain == MSFT_DOMAIN for n in graph.node)
    if options.moe == "qmoe" and not has_moe and _is_moe_ops_graph(model):
        raise ValueError("QMoE needs a graph with com.microsoft.MoE nodes (moe_impl contrib)")
    gemm_to_matmul(model, keep=set(router_names))
    if options.expert_bits != options.dense_bits and not has_moe:
        raise ValueError("experts and matmuls at different bits need a MoE graph with QMoE")
    bits = {options.expert_bits, options.dense_bits}
    info: dict = {
        "weights": "int8" if bits == {8} else "int4" if bits == {4} else "int4 experts, int8",
        "weight_bits": {"experts": options.expert_bits, "matmuls": options.dense_bits},
        "scheme": "symmetric" if options.symmetric else "asymmetric (matmuls), symmetric (rest)",
        "activations": "float32",
        "routers": "float32",
        "router_nodes": router_names,
    }
    tied = find_tied_lm_head(model) if options.embedding and options.dense == "nbits" else None
    # A tied lm_head lends its 8-bit weights to the embedding (tables.py), so they must
    # stay the table's: its input is not smoothed.
    share = tied is not None and options.symmetric
    lm_weight = next((n.input[1] for n in graph.node if tied and n.name == tied[0]), None)
    scales: dict[str, np.ndarray] = {}
    if options.smooth and calibration is not None:
        keep = [lm_weight] if share and lm_weight else []
        scales = smooth(model, calibration[0], calibration[1], options.alpha, keep)
    info["smoothing"] = (
        f"{len(scales)} activations (alpha {options.alpha}, {len(calibration[1])} calibration tokens)"
        if scales and calibration is not None
        else None
    )
    chain = lm_head_input_chain(model, tied[0]) if tied else []
    lm_input = next((name for name in chain if name in scales), None)
    calibration_ids = calibration[1] if calibration is not None else []
    if has_moe:
        if options.moe != "qmoe":
            raise ValueError("the standard-op int8 MoE needs a graph exported with moe_impl ops")
        chosen = {}
        if options.expert_bits == 4 and options.int4_method == "gptq" and len(calibration_ids):
            from moechat.export.int8.gptq_experts import gptq_experts  # it imports this module

            chosen = gptq_experts(model, calibration_ids, options.expert_block)
        qmoe = moe_to_qmoe(model, options.expert_bits, options.expert_block, chosen)
        info["routed_experts"] = (
            f"QMoE {options.expert_bits}-bit, block {qmoe['block_size']}, int8 activations"
        )
        if chosen:
            done = sum(c is not None for v in chosen.values() for c in v)
            info["routed_experts"] += (
                f"; {done} of {sum(map(len, chosen.values()))} expert weights by GPTQ"
                f" ({len(calibration_ids)} calibration tokens)"
            )
    elif routers:
        info["routed_experts"] = f"per-expert MatMuls, {_dense_description(options)}"
    skip = tied[1] if share and tied else None
    tables = quantize_embedding(model, skip=skip) if options.embedding else []
    gptq = 0
    wide = eight_bit_matmuls(model, options)
    downs8 = [w for w in down_projections(model) if w in wide]
    if options.dense_bits == 4 and options.int4_method == "gptq" and len(calibration_ids):
        from moechat.export.int8.gptq import gptq_matmuls  # it imports this module

        gptq = gptq_matmuls(model, calibration_ids, options.block, [*router_names, *wide])
    model = _quantize_matmuls(model, options, router_names, wide)
    shared = embed_from_lm_head(model, skip) if skip else None
    if skip and shared is None:  # the lm_head did not become an 8-bit MatMulNBits
        tables = quantize_embedding(model)
    tables = [shared] if shared else tables
    info["embedding"] = (
        f"int8, the lm_head's 8-bit MatMulNBits weights (block {shared.block})" if shared
        else f"int8, scales per block of {tables[0].block}" if tables
        else "float32"
    )  # fmt: skip
    info["matmuls"] = _dense_description(options)
    if downs8:
        info["matmuls"] += f"; {len(downs8)} down projections 8-bit (Q4_K_M's layers)"
    if gptq:
        info["matmuls"] += f"; {gptq} 4-bit by GPTQ ({len(calibration_ids)} calibration tokens)"
    if options.residual_pass:
        passes = add_residual_passes(model)
        info["matmuls"] += f"; {passes} with a second pass over the activation rounding error"
    info["lm_head_rescoring"] = None
    if tied and tables:
        top = min(RESCORE_TOP, _vocab(model, tables[0]))
        add_lm_head_rescoring(model, tables[0], scales.get(lm_input or ""), top)
        info["lm_head_rescoring"] = (
            f"top {top} logits recomputed from float activations and the tied int8 table"
        )
    # Anything left in float32 besides the routers would be a quantiser miss: report it.
    inits = initializers(model.graph)
    info["float_matmuls"] = [
        n.name for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits
    ]  # fmt: skip
    return model, info


def _vocab(model: onnx.ModelProto, table: QuantizedTable) -> int:
    return int(initializers(model.graph)[table.q].dims[0])


def _dense_description(options: QuantizeOptions) -> str:
    if options.dense == "nbits":
        text = f"MatMulNBits {options.dense_bits}-bit, accuracy_level 4, block {options.block}"
        return text + ("; lm_head 8-bit" if options.dense_bits == 4 else "")
    return "MatMulInteger (quantize_dynamic), per-channel int8 weights"


def _is_moe_ops_graph(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "TopK" for n in model.graph.node)


def quantize_decoder(
    src: Path, dst: Path, options: QuantizeOptions, calibration_ids: Sequence[int] = ()
) -> dict:
    """Read the fp32 graph ``src`` (+ external data), write the int8 graph ``dst``."""
    model = onnx.load(str(src), load_external_data=True)
    calibration = (Path(src), calibration_ids) if len(calibration_ids) else None
    model, info = quantize_model(model, options, calibration)
    save_model(model, Path(dst))
    return info
