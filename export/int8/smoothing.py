"""Activation smoothing before int8 quantisation (SmoothQuant-style, exact in fp32).

The int8 kernels quantise activations too (per block of 32 along the reduction axis
for MatMulNBits and QMoE). Trained models have a few input channels with very large
values, which spoil the precision of every other channel in their block. Smoothing
divides such a channel by ``s_j`` where the activation is produced and multiplies the
matching weight row by ``s_j``, so the fp32 function is unchanged:

- norm groups: RMSNorm's weight ``gamma`` (a Mul by a constant [H] vector, or the
  gamma input of a fused SkipSimplifiedLayerNormalization) feeds only
  matmuls with constant weights (q/k/v, gate/up, the routers, the MoE op's fc1, the
  lm_head): ``gamma /= s``, every consumer's rows ``*= s``;
- FFN down projections: ``down(silu(gate x) * (up x))``: up's output columns ``/= s``
  (the up columns of a fused gate/up weight), down's rows ``*= s``;
- attention output projections: attention is linear in V, so the v columns of a packed
  q/k/v weight (GroupQueryAttention) ``/= s`` and o_proj's rows ``*= s``, one ``s`` per
  kv-head channel (the query heads sharing a kv head share its scales).
``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)`` with per-channel maxima of the
activations measured on calibration text through the fp32 graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from moechat.export.graph_rewrites import attribute
from moechat.export.graph_rewrites import consumers as consumers_by_input

ALPHA = 0.5
_PASS_THROUGH = ("Reshape",)


@dataclass
class _Group:
    activation: str  # tensor whose channels are smoothed
    producer: tuple[str, int]  # (initializer, axis) divided by s: gamma (axis 0) or up (axis 1)
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (initializer, axis) * s
    offset: int = 0  # where the producer's channels start along its axis (fused gate/up)
    heads: tuple[int, int] | None = None  # (query, kv) heads: o_proj rows tied per kv head

    def tie(self, per_channel: np.ndarray) -> np.ndarray:
        """Consumer-channel maxima -> producer-channel maxima (max over tied heads)."""
        if self.heads is None:
            return per_channel
        q_heads, kv_heads = self.heads
        return per_channel.reshape(kv_heads, q_heads // kv_heads, -1).max(axis=1).reshape(-1)

    def untie(self, s: np.ndarray) -> np.ndarray:
        """Producer-channel scales -> consumer-channel scales."""
        if self.heads is None:
            return s
        q_heads, kv_heads = self.heads
        return np.repeat(s.reshape(kv_heads, 1, -1), q_heads // kv_heads, axis=1).reshape(-1)


def _weight_consumers(
    tensor: str, users: dict, inits: dict, graph_outputs: set[str]
) -> list[tuple[str, int]] | None:
    """(weight, channel axis) of every consumer of ``tensor``; None if one is not a matmul."""
    if tensor in graph_outputs:
        return None
    out: list[tuple[str, int]] = []
    for node in users.get(tensor, []):
        if node.op_type in _PASS_THROUGH and node.input[0] == tensor:
            more = _weight_consumers(node.output[0], users, inits, graph_outputs)
            if more is None:
                return None
            out += more
        elif (
            node.op_type == "MatMul"
            and node.input[0] == tensor
            and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2
        ):
            out.append((node.input[1], 0))  # [K, N]: rows are input channels
        elif (
            node.op_type == "MoE"
            and node.domain == "com.microsoft"
            and node.input[0] == tensor
            and node.input[2] in inits
        ):
            out.append((node.input[2], 2))  # fc1 [E, 2I, H]
        else:
            return None
    return out or None


def find_groups(model: onnx.ModelProto) -> list[_Group]:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = consumers_by_input(graph)
    outputs = {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output}
    groups = []
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            group = _attention_output_group(node, users, inits, outputs, producers)
            if group is not None:
                groups.append(group)
            continue
        if node.op_type == "SkipSimplifiedLayerNormalization":  # residual Add + RMSNorm
            gamma = node.input[2]
            consumers = _weight_consumers(node.output[0], users, inits, outputs)
            if consumers and len(users.get(gamma, [])) == 1:
                groups.append(_Group(node.output[0], (gamma, 0), consumers))
            continue
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        # RMSNorm scale: Mul(gamma [H], normalised x)
        gamma = next(
            (i for i in node.input if i in inits and len(inits[i].dims) == 1 and inits[i].dims[0] > 1),
            None,
        )  # fmt: skip
        if gamma is not None:
            if len(users.get(gamma, [])) != 1:
                continue  # shared scale vector: not safe to change
            consumers = _weight_consumers(node.output[0], users, inits, outputs)
            if consumers:
                groups.append(_Group(node.output[0], (gamma, 0), consumers))
            continue
        # SwiGLU product feeding a down projection: Mul(silu(gate), up)
        consumers = _weight_consumers(node.output[0], users, inits, outputs)
        if not consumers or len(consumers) != 1 or consumers[0][1] != 0:
            continue
        for i in node.input:
            if len(users.get(i, [])) != 1:
                continue  # up's output must be used only here
            up, offset = _projection_columns(i, producers, inits)
            if up is not None and len(users.get(up.input[1], [])) == 1:
                groups.append(_Group(node.output[0], (up.input[1], 1), consumers, offset))
                break
    return groups


def _attention_output_group(
    node: onnx.NodeProto, users: dict, inits: dict, outputs: set[str], producers: dict
) -> _Group | None:
    """v columns of a packed q/k/v weight -> o_proj rows, for a GQA fed packed q/k/v."""
    if len(node.input) < 3 or node.input[1] or node.input[2]:
        return None
    qkv = producers.get(node.input[0])
    if (
        qkv is None
        or qkv.op_type != "MatMul"
        or qkv.input[1] not in inits
        or len(users.get(qkv.output[0], [])) != 1
        or len(users.get(qkv.input[1], [])) != 1
    ):
        return None
    q_heads, kv_heads = attribute(node, "num_heads", 0), attribute(node, "kv_num_heads", 0)
    width = inits[qkv.input[1]].dims[1]
    if not q_heads or not kv_heads or q_heads % kv_heads or width % (q_heads + 2 * kv_heads):
        return None
    head_dim = width // (q_heads + 2 * kv_heads)
    consumers = _weight_consumers(node.output[0], users, inits, outputs)
    if not consumers or any(
        axis != 0 or inits[w].dims[0] != q_heads * head_dim for w, axis in consumers
    ):
        return None
    offset = (q_heads + kv_heads) * head_dim
    return _Group(node.output[0], (qkv.input[1], 1), consumers, offset, (q_heads, kv_heads))


def _projection_columns(tensor: str, producers: dict, inits: dict) -> tuple:
    """(MatMul with a constant weight, first column) that computes ``tensor``.

    Either the MatMul's own output, or one output of a Split of it (a projection
    fused with its siblings: ``graph_rewrites.fuse_shared_input_matmuls``).
    """
    node, offset = producers.get(tensor), 0
    if node is not None and node.op_type == "Split" and len(node.input) > 1:
        if node.input[1] not in inits:
            return None, 0
        widths = numpy_helper.to_array(inits[node.input[1]])
        offset = int(widths[: list(node.output).index(tensor)].sum())
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
        return None, 0
    return node, offset


def _past_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            dims = inp.type.tensor_type.shape.dim
            shapes[inp.name] = (1, dims[1].dim_value, 0, dims[3].dim_value)
    return shapes


def run_with_outputs(
    graph_path: Path, tensors: Sequence[str], token_ids: Sequence[int], window: int = 256
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, value) of each of ``tensors`` per window of ``token_ids`` run through the graph
    at ``graph_path`` (a throwaway copy beside it exposes them as outputs)."""
    from moechat.runtime.providers import create_session

    graph_path = Path(graph_path)
    probe = onnx.load(str(graph_path), load_external_data=False)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    copy = graph_path.with_name(f".calibrate-{graph_path.name}")
    onnx.save_model(probe, str(copy))
    try:
        session = create_session(copy, "CPUExecutionProvider")
    finally:
        copy.unlink(missing_ok=True)
    pasts = {k: np.zeros(s, np.float32) for k, s in _past_shapes(probe).items()}
    ids = np.asarray(token_ids, dtype=np.int64)
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        feeds = {
            "input_ids": chunk[None],
            "attention_mask": np.ones((1, len(chunk)), np.int64),
            "logits_positions": np.arange(len(chunk), dtype=np.int64),
            **pasts,
        }
        yield from zip(tensors, session.run(list(tensors), feeds), strict=True)


def activation_maxima(
    graph_path: Path, tensors: Sequence[str], token_ids: Sequence[int], window: int = 256
) -> dict[str, np.ndarray]:
    """Per-channel max |x| of ``tensors`` over ``token_ids`` run through the fp32 graph."""
    maxima: dict[str, np.ndarray] = {}
    for name, value in run_with_outputs(graph_path, tensors, token_ids, window):
        m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
        maxima[name] = np.maximum(maxima[name], m) if name in maxima else m
    return maxima


def smooth(
    model: onnx.ModelProto,
    graph_path: Path,
    token_ids: Sequence[int],
    alpha: float = ALPHA,
    keep: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Smooth every group found in ``model`` (calibrated on ``graph_path``) but those
    feeding a weight in ``keep``.

    Returns ``{activation: s}``: the smoothed tensor now holds ``x / s``.

    ``graph_path`` is the fp32 graph file ``model`` was loaded from: activation names
    are unchanged by the Gemm->MatMul rewrite, so the file serves for calibration.
    """
    groups = [g for g in find_groups(model) if not any(w in keep for w, _ in g.consumers)]
    if not groups or len(token_ids) == 0:
        return {}
    maxima = activation_maxima(graph_path, [g.activation for g in groups], token_ids)
    inits = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}
    applied: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float32)
        return arrays[name]

    for g in groups:
        w_max = np.zeros_like(maxima[g.activation])
        for name, axis in g.consumers:
            w = np.abs(get(name))
            other = tuple(a for a in range(w.ndim) if a != axis)
            w_max = np.maximum(w_max, w.max(axis=other))
        x_max, w_max = g.tie(maxima[g.activation]), g.tie(w_max)
        s = np.power(np.maximum(x_max, 1e-8), alpha) / np.power(np.maximum(w_max, 1e-8), 1 - alpha)
        s = np.where((x_max > 0) & (w_max > 0), s, 1.0)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        applied[g.activation] = g.untie(s)
        name, axis = g.producer
        divisor = np.ones(get(name).shape[axis], np.float32)
        divisor[g.offset : g.offset + len(s)] = s
        shape = [1] * get(name).ndim
        shape[axis] = -1
        arrays[name] = get(name) / divisor.reshape(shape)
        for name, axis in g.consumers:
            shape = [1] * get(name).ndim
            shape[axis] = -1
            arrays[name] = get(name) * applied[g.activation].reshape(shape)
    for name, value in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return applied
