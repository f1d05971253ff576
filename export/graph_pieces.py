"""The written graph run one layer at a time: pieces of model.onnx that share its data.

An onnxruntime session over a whole package holds every layer's weights (about the
package's size, more than a streamed export may use at scale: issue 17). The streamed
export's checks cut model.onnx where each layer begins (the first node that reads
``model.layers.{i}.input_layernorm.weight``) and where the logits begin (the first node
that reads ``logits_positions``): the embedding, each layer, then the positions'
selection, the final norm and lm_head. Each piece is a model of those nodes (in graph
order, so the cuts cannot reorder anything) whose initializers point into the same
model.onnx.data, run in its own session, one session at a time; what crosses a cut (the
residual stream, the mask's lengths, shapes) is kept per prompt between pieces. The
last piece is run on demand for a few positions at a time: a vocabulary of logits per
position (151,936 floats at Qwen's size) is more than the rest of a prompt's outputs.
The nodes, weights and kernels are the package's; only fusions onnxruntime might make
across a cut are not made. A graph without these names (norm weights merged as equal
constants) runs whole, as before.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from moechat.runtime.providers import create_session

CPU = "CPUExecutionProvider"


@dataclass
class Piece:
    nodes: list[onnx.NodeProto]
    inputs: list[str]  # graph inputs and tensors of earlier pieces
    outputs: list[str]  # graph outputs and tensors later pieces read


@dataclass
class PromptOutputs:
    """One prompt's outputs: those asked for, and its logits at the positions given (the
    last piece run again; call it before moving to the next prompt)."""

    values: dict[str, np.ndarray]
    logits: Callable[[np.ndarray], np.ndarray]  # positions -> [len(positions), vocab]


def cut_points(graph: onnx.GraphProto, layers: int) -> list[int] | None:
    """Index of the node where each layer begins, then where the logits begin (None: not
    found)."""
    first: dict[str, int] = {}
    for n, node in enumerate(graph.node):
        for name in node.input:
            first.setdefault(name, n)
    names = [f"model.layers.{i}.input_layernorm.weight" for i in range(layers)]
    points = [first.get(name) for name in [*names, "logits_positions"]]
    if any(p is None for p in points):
        return None
    found = [int(p) for p in points if p is not None]
    if found != sorted(set(found)) or found[0] == 0:
        return None
    return found


def pieces(graph: onnx.GraphProto, layers: int) -> list[Piece] | None:
    points = cut_points(graph, layers)
    if points is None:
        return None
    bounds = [0, *points, len(graph.node)]
    ranges = [graph.node[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    constants = {t.name for t in graph.initializer} | {""}
    wanted_later: set[str] = {o.name for o in graph.output}
    out: list[Piece] = []
    for nodes in reversed(ranges):  # the last piece first: what later pieces read is known
        made = {name for node in nodes for name in node.output}
        read = [x for node in nodes for x in node.input if x not in constants and x not in made]
        outputs = [
            x for x in dict.fromkeys(o for node in nodes for o in node.output) if x in wanted_later
        ]
        out.append(Piece(list(nodes), list(dict.fromkeys(read)), outputs))
        wanted_later |= set(read)
    return out[::-1]


def _piece_model(model: onnx.ModelProto, piece: Piece, dtypes: dict[str, np.dtype]) -> bytes:
    graph = model.graph
    declared = {v.name: v for v in graph.input}
    used = {x for node in piece.nodes for x in node.input}
    inputs = [
        declared[x]
        if x in declared
        else onnx.helper.make_tensor_value_info(
            x, onnx.helper.np_dtype_to_tensor_dtype(dtypes[x]), None
        )
        for x in piece.inputs
    ]
    outputs = [onnx.ValueInfoProto(name=x) for x in piece.outputs]  # typed by onnxruntime
    initializers = [t for t in graph.initializer if t.name in used]
    part = onnx.helper.make_graph(piece.nodes, graph.name, inputs, outputs, initializers)
    built = onnx.helper.make_model(
        part, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    built.functions.extend(model.functions)
    return built.SerializeToString()


def return_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim; elsewhere nothing).
    glibc keeps what Python, PyTorch and the last session freed for its own reuse, while
    the next session's weights come from new allocations: without this the two add up
    at the checks' peak (0.25 GiB at DeepSeek-V2-Lite's layer shape)."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


def run_by_layer(
    graph: Path, layers: int, feeds: list[dict[str, np.ndarray]], names: list[str]
) -> Iterator[PromptOutputs]:
    """Per feed (one prompt each), ``names`` of the graph's outputs other than the logits,
    and the logits on demand; the graph run piece by piece."""
    names = [x for x in names if x != "logits"]
    model = onnx.load(str(graph), load_external_data=False)
    parts = pieces(model.graph, layers)
    if parts is None:  # one session over the whole graph
        session = create_session(graph, CPU)
        for feed in feeds:
            values = dict(zip(names, session.run(names, feed), strict=True))
            yield PromptOutputs(values, _logits(session, feed))
        return
    kept: list[dict[str, np.ndarray]] = [dict(f) for f in feeds]
    found: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    for k, piece in enumerate(parts[:-1]):
        dtypes = {x: kept[0][x].dtype for x in piece.inputs}
        return_freed_memory()
        session = create_session(graph, CPU, model_bytes=_piece_model(model, piece, dtypes))
        later = {x for p in parts[k + 1 :] for x in p.inputs}
        for values, probes in zip(kept, found, strict=True):
            results = session.run(piece.outputs, {x: values[x] for x in piece.inputs})
            for x, value in zip(piece.outputs, results, strict=True):
                if x in names:
                    probes[x] = value
                if x in later:
                    values[x] = value
            for x in [x for x in values if x not in later]:
                del values[x]
        del session
    last = parts[-1]
    dtypes = {x: kept[0][x].dtype for x in last.inputs}
    return_freed_memory()
    session = create_session(graph, CPU, model_bytes=_piece_model(model, last, dtypes))
    for values, probes in zip(kept, found, strict=True):
        yield PromptOutputs(dict(probes), _logits(session, dict(values)))
        values.clear()
        probes.clear()


def _logits(session, feed: dict[str, np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def at(positions: np.ndarray) -> np.ndarray:
        (logits,) = session.run(["logits"], {**feed, "logits_positions": positions})
        return logits[0]

    return at
