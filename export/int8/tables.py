"""The token-embedding table of an int8/int4 package, and the tied lm_head's use of it.

- :func:`quantize_embedding`: an untied embedding becomes an int8 table with float
  scales per block of 32 behind its Gather (Gather -> Cast -> Mul by the gathered
  scales -> Reshape; standard ops only).
- :func:`embed_from_lm_head`: a tied embedding (SmolLM2, MiniMind, Granite) reads the
  lm_head's 8-bit MatMulNBits weights and scales instead of a table of its own, so the
  package stores the vocabulary once (SmolLM2: 32 MB of 137-176 MB). For that the
  lm_head's input is not smoothed (``lm_head_weight`` is passed to the smoothing as a
  weight to leave alone): its weights must stay the embedding's.
- :func:`add_lm_head_rescoring`: with a tied lm_head, the best int8 logits are
  recomputed from float activations and the table's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moechat.export.graph_rewrites import (
    attribute,
    drop_unused_initializers,
    initializers,
    producers,
)
from moechat.export.lazy_weights import equal_transposed, map_rows

EMBEDDING_BLOCK = 32
RESCORE_TOP = 32
NBITS_ZERO = 128  # MatMulNBits' 8-bit weights without zero points: stored value of 0


@dataclass(frozen=True)
class QuantizedTable:
    """Rows ``(q - zero) * scale`` per block of ``block`` values, ``hidden`` per row."""

    q: str  # [V, H/block, block]: int8 (zero 0) or MatMulNBits' uint8 (zero 128)
    scale: str  # float [V, H/block]
    hidden: int
    block: int
    zero: int = 0


def dequant_nodes(
    table: QuantizedTable, ids: str, rank: int, out: str, name: str
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and constants that write ``out`` [*ids.shape, hidden]: the table's rows at
    ``ids`` (of ``rank`` dimensions)."""
    consts = {
        f"{name}_axis": np.array([-1], np.int64),
        f"{name}_shape": np.array([0] * rank + [table.hidden], np.int64),
    }
    nodes = [
        helper.make_node("Gather", [table.q, ids], [f"{name}_q"], f"{name}_rows", axis=0),
        helper.make_node("Cast", [f"{name}_q"], [f"{name}_f"], f"{name}_cast", to=TensorProto.FLOAT),
    ]  # fmt: skip
    values = f"{name}_f"
    if table.zero:
        consts[f"{name}_zero"] = np.array(table.zero, np.float32)
        nodes.append(
            helper.make_node("Sub", [values, f"{name}_zero"], [f"{name}_c"], f"{name}_center")
        )
        values = f"{name}_c"
    nodes += [
        helper.make_node("Gather", [table.scale, ids], [f"{name}_s2"], f"{name}_scales", axis=0),
        helper.make_node("Unsqueeze", [f"{name}_s2", f"{name}_axis"], [f"{name}_s"], f"{name}_scales_3d"),
        helper.make_node("Mul", [values, f"{name}_s"], [f"{name}_b"], f"{name}_dequant"),
        helper.make_node("Reshape", [f"{name}_b", f"{name}_shape"], [out], f"{name}_reshape"),
    ]  # fmt: skip
    return nodes, [numpy_helper.from_array(v, k) for k, v in consts.items()]


def _table_part(w: np.ndarray, block: int, part: int) -> np.ndarray:
    """The int8 embedding table's rows (part 0) or their scales (part 1)."""
    from moechat.export.int8.quantize import quantize_rows  # it imports this module

    q, scale = quantize_rows(w.reshape(len(w), -1, block))
    return scale if part else q


def _replace_gathers(
    model: onnx.ModelProto, source: str, ids_input: str, table: QuantizedTable
) -> int:
    """Every Gather of initializer ``source`` by ``ids_input`` reads ``table`` instead."""
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    done = 0
    for node in graph.node:
        if not (
            node.op_type == "Gather" and node.input[0] == source
            and len(node.input) > 1 and node.input[1] == ids_input
            and attribute(node, "axis", 0) == 0
        ):  # fmt: skip
            new_nodes.append(node)
            continue
        nodes, consts = dequant_nodes(table, ids_input, 2, node.output[0], node.name)
        new_nodes += nodes
        graph.initializer.extend(consts)
        done += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    drop_unused_initializers(graph)
    return done


def quantize_embedding(
    model: onnx.ModelProto, ids_input: str = "input_ids", skip: str | None = None
) -> list[QuantizedTable]:
    """int8 rows + float scales per block of 32 (or per row) for Gathers of a float
    table by the ids (but of ``skip``)."""
    inits = initializers(model.graph)
    sources = {
        n.input[0] for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and len(n.input) > 1
        and n.input[1] == ids_input and n.input[0] != skip
    }  # fmt: skip
    done = []
    for source in sorted(sources):
        tensor = inits[source]
        if tensor.data_type != TensorProto.FLOAT or len(tensor.dims) != 2:
            continue
        hidden = int(tensor.dims[1])
        block = EMBEDDING_BLOCK if hidden % EMBEDDING_BLOCK == 0 else hidden
        table = QuantizedTable(f"{source}_q8", f"{source}_scale", hidden, block)
        for part, name in ((0, table.q), (1, table.scale)):
            model.graph.initializer.append(
                map_rows(tensor, name, partial(_table_part, block=block, part=part))
            )
        if _replace_gathers(model, source, ids_input, table):
            done.append(table)
    return done


def find_tied_lm_head(
    model: onnx.ModelProto, ids_input: str = "input_ids"
) -> tuple[str, str] | None:
    """(lm_head MatMul name, embedding table name) when the lm_head weight is the table^T."""
    graph = model.graph
    inits = initializers(graph)
    lm = next(
        (n for n in graph.node if n.op_type == "MatMul" and "logits" in n.output and n.input[1] in inits),
        None,
    )  # fmt: skip
    tables = [
        n.input[0] for n in graph.node
        if n.op_type == "Gather" and n.input[0] in inits and len(n.input) > 1 and n.input[1] == ids_input
    ]  # fmt: skip
    if lm is None or len(tables) != 1:
        return None
    w, table = inits[lm.input[1]], inits[tables[0]]
    if list(w.dims) != list(table.dims)[::-1]:
        return None
    if not equal_transposed(w, table):
        return None
    return lm.name, tables[0]


def embed_from_lm_head(
    model: onnx.ModelProto, source: str, ids_input: str = "input_ids"
) -> QuantizedTable | None:
    """Point the Gathers of the float table ``source`` at the 8-bit MatMulNBits that
    writes the logits (its weights must be ``source``^T quantised: the tied lm_head,
    unsmoothed). None, and nothing changed, when that lm_head is not an 8-bit
    MatMulNBits without zero points."""
    lm = next(
        (n for n in model.graph.node if "logits" in n.output or "logits_int8" in n.output), None
    )
    if (
        lm is None or lm.op_type != "MatMulNBits" or attribute(lm, "bits", 0) != 8
        or (len(lm.input) > 3 and lm.input[3])
    ):  # fmt: skip
        return None
    inits = initializers(model.graph)
    vocab, hidden = (int(d) for d in inits[source].dims)
    if attribute(lm, "N", 0) != vocab or attribute(lm, "K", 0) != hidden:
        return None
    table = QuantizedTable(
        lm.input[1], lm.input[2], hidden, attribute(lm, "block_size", 0), NBITS_ZERO
    )
    return table if _replace_gathers(model, source, ids_input, table) else None


def add_lm_head_rescoring(
    model: onnx.ModelProto, table: QuantizedTable, input_scale: np.ndarray | None, top: int
) -> None:
    """Recompute the ``top`` largest int8 logits from float activations and int8 table rows.

    The int8 lm_head quantises its input activations; near-ties between the best
    candidates then flip. The candidates' logits are recomputed as
    ``(x * input_scale) . dequant(table[v])`` (float activations, the tied int8
    embedding rows, no extra weights) and scattered back.
    """
    graph = model.graph
    lm = next(n for n in graph.node if "logits" in n.output)
    lm.output[list(lm.output).index("logits")] = "logits_int8"
    x = lm.input[0]
    nodes = []
    if input_scale is not None:  # undo the activation smoothing of the lm_head input
        graph.initializer.append(
            numpy_helper.from_array(input_scale.astype(np.float32), "lm_rescore_s")
        )
        nodes.append(
            helper.make_node("Mul", [x, "lm_rescore_s"], ["lm_rescore_x"], "lm_rescore_unsmooth")
        )
        x = "lm_rescore_x"
    const = {
        "lm_rescore_k": np.array([top], np.int64),
        "lm_rescore_axis2": np.array([2], np.int64),
        "lm_rescore_axis_last": np.array([-1], np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in const.items())
    rows, consts = dequant_nodes(table, "lm_rescore_idx", 3, "lm_rescore_w", "lm_rescore")
    graph.initializer.extend(consts)
    nodes += [
        helper.make_node("TopK", ["logits_int8", "lm_rescore_k"], ["lm_rescore_top", "lm_rescore_idx"], "lm_rescore_topk", axis=-1),
        *rows,
        helper.make_node("Unsqueeze", [x, "lm_rescore_axis2"], ["lm_rescore_xu"], "lm_rescore_unsqueeze"),
        helper.make_node("Mul", ["lm_rescore_w", "lm_rescore_xu"], ["lm_rescore_prod"], "lm_rescore_mul"),
        helper.make_node("ReduceSum", ["lm_rescore_prod", "lm_rescore_axis_last"], ["lm_rescore_exact"], "lm_rescore_sum", keepdims=0),
        helper.make_node("ScatterElements", ["logits_int8", "lm_rescore_idx", "lm_rescore_exact"], ["logits"], "lm_rescore_scatter", axis=-1),
    ]  # fmt: skip
    graph.node.extend(nodes)


def lm_head_input_chain(model: onnx.ModelProto, lm_name: str) -> list[str]:
    """The lm_head's input and the tensors it is a Reshape of (smoothing looks through
    Reshapes)."""
    producer_of = producers(model.graph)
    name = next(n.input[0] for n in model.graph.node if n.name == lm_name)
    chain = [name]
    while name in producer_of and producer_of[name].op_type == "Reshape":
        name = producer_of[name].input[0]
        chain.append(name)
    return chain
