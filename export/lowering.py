"""ONNX translations of moechat's custom torch ops (see ``moechat.models.ops``).

Two lowerings of the routing op, chosen by ``--moe-impl``:
- ``contrib``: one ``com.microsoft.MoE`` node (onnxruntime CPU and CUDA kernels);
- ``ops``: standard ONNX ops (Softmax, TopK, NonZero, Gather, MatMul, ScatterND),
  for providers without the contrib kernel (DirectML). Only routed tokens reach an
  expert, as in the eager implementation.
Attention lowers to ``com.microsoft.GroupQueryAttention`` when the model uses the
contrib attention op; otherwise the exporter traces plain torch attention.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Opset

from moechat.models import mla as _mla  # noqa: F401  (registers moechat::moe_grouped)
from moechat.models import ops as _ops  # noqa: F401  (registers torch.ops.moechat)

MSFT = Opset("com.microsoft", 1)
ONNX_FLOAT = onnx.TensorProto.FLOAT


def _register_contrib_schemas() -> None:
    """onnxscript needs schemas to know how many outputs a contrib node has."""

    def schema(name, inputs, outputs, attrs):
        return onnx.defs.OpSchema(
            name, "com.microsoft", 1,
            inputs=[onnx.defs.OpSchema.FormalParameter(n, "T", param_option=o) for n, o in inputs],
            outputs=[onnx.defs.OpSchema.FormalParameter(n, "T") for n in outputs],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(int32)", "tensor(int64)", "tensor(uint8)"], "")],
            attributes=[onnx.defs.OpSchema.Attribute(a, t, "") for a, t in attrs],
        )  # fmt: skip

    single = onnx.defs.OpSchema.FormalParameterOption.Single
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    if not onnx.defs.has("MoE", "com.microsoft"):
        onnx.defs.register_schema(
            schema(
                "MoE",
                [("input", single), ("router_probs", single), ("fc1_experts_weights", single),
                 ("fc1_experts_bias", optional), ("fc2_experts_weights", single),
                 ("fc2_experts_bias", optional)],
                ["output"],
                [("activation_type", onnx.defs.OpSchema.AttrType.STRING),
                 ("k", onnx.defs.OpSchema.AttrType.INT),
                 ("normalize_routing_weights", onnx.defs.OpSchema.AttrType.INT),
                 ("swiglu_fusion", onnx.defs.OpSchema.AttrType.INT)],
            )
        )  # fmt: skip
    if not onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        onnx.defs.register_schema(
            schema(
                "GroupQueryAttention",
                [("query", single), ("key", single), ("value", single), ("past_key", single),
                 ("past_value", single), ("seqlens_k", single), ("total_sequence_length", single),
                 ("cos_cache", single), ("sin_cache", single)],
                ["output", "present_key", "present_value"],
                [("num_heads", onnx.defs.OpSchema.AttrType.INT),
                 ("kv_num_heads", onnx.defs.OpSchema.AttrType.INT),
                 ("do_rotary", onnx.defs.OpSchema.AttrType.INT),
                 ("rotary_interleaved", onnx.defs.OpSchema.AttrType.INT),
                 ("scale", onnx.defs.OpSchema.AttrType.FLOAT)],
            )
        )  # fmt: skip


def moe_contrib(x, router_logits, fc1, fc2, top_k: int, normalize: bool):
    # com.microsoft.MoE applies the softmax itself: it takes raw router logits.
    return MSFT.MoE(
        x, router_logits, fc1, None, fc2, None,
        activation_type="swiglu", k=top_k, normalize_routing_weights=int(normalize), swiglu_fusion=1,
    )  # fmt: skip


def moe_standard_ops(x, router_logits, fc1, fc2, top_k: int, normalize: bool):
    probs = op.Softmax(router_logits, axis=-1)
    weights, experts = op.TopK(probs, op.Constant(value_ints=[top_k]), axis=-1)
    if normalize:
        weights = op.Div(weights, op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1))
    # A [T, E] matrix holding each token's weight for each expert (0 where not routed).
    dense = op.ScatterElements(
        op.Mul(probs, op.Constant(value_float=0.0)), experts, weights, axis=1
    )
    return _experts_standard_ops(x, dense, fc1, fc2)


def _experts_standard_ops(x, dense, fc1, fc2):
    """Routed SwiGLU experts from ``dense`` [T, E] (each token's weight per expert)."""
    num_experts = fc1.shape[0]
    out = op.Mul(x, op.Constant(value_float=0.0))
    for e in range(num_experts):
        w_e = op.Gather(dense, op.Constant(value_int=e), axis=1)  # [T]
        token = op.Reshape(op.NonZero(w_e), op.Constant(value_ints=[-1, 1]))  # [n, 1]
        x_e = op.GatherND(x, token)  # [n, H]
        w1 = op.Transpose(op.Gather(fc1, op.Constant(value_int=e), axis=0), perm=[1, 0])
        w2 = op.Transpose(op.Gather(fc2, op.Constant(value_int=e), axis=0), perm=[1, 0])
        h = op.MatMul(x_e, w1)  # [n, 2I] interleaved gate/up
        two_i = op.Shape(h, start=1)
        h = op.Reshape(
            h,
            op.Concat(
                op.Constant(value_ints=[-1]),
                op.Div(two_i, op.Constant(value_ints=[2])),
                op.Constant(value_ints=[2]),
                axis=0,
            ),
        )
        gate = op.Squeeze(
            op.Slice(
                h,
                op.Constant(value_ints=[0]),
                op.Constant(value_ints=[1]),
                op.Constant(value_ints=[2]),
            ),
            op.Constant(value_ints=[2]),
        )
        up = op.Squeeze(
            op.Slice(
                h,
                op.Constant(value_ints=[1]),
                op.Constant(value_ints=[2]),
                op.Constant(value_ints=[2]),
            ),
            op.Constant(value_ints=[2]),
        )
        act = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
        y = op.Mul(
            op.MatMul(act, w2), op.Unsqueeze(op.GatherND(w_e, token), op.Constant(value_ints=[1]))
        )
        # Plain ScatterND onto zeros, then Add (each token appears once per expert):
        # DirectML implements ScatterND but not its reduction attribute.
        out = op.Add(out, op.ScatterND(op.Mul(x, op.Constant(value_float=0.0)), token, y))
    return out  # fmt: skip


def _route_grouped(
    router_logits,
    bias,
    top_k: int,
    scoring: str,
    topk_method: str,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scale: float,
):
    """DeepSeek-V2/V3 routing in standard ops (models/mla.py route_grouped): the [T, E]
    matrix of each token's weight per expert (0 where not routed)."""
    num_experts = router_logits.shape[-1]
    if scoring == "softmax":
        scores = op.Softmax(router_logits, axis=-1)
    else:
        scores = op.Sigmoid(router_logits)
    choice = op.Add(scores, bias) if topk_method == "noaux_tc" else scores
    zeros = op.Mul(scores, op.Constant(value_float=0.0))
    if topk_method != "greedy":
        per_group = num_experts // n_group
        grouped = op.Reshape(choice, op.Constant(value_ints=[-1, n_group, per_group]))
        if topk_method == "noaux_tc":
            best2, _ = op.TopK(grouped, op.Constant(value_ints=[2]), axis=-1)
            group_scores = op.ReduceSum(best2, op.Constant(value_ints=[-1]), keepdims=0)
        else:
            group_scores = op.ReduceMax(grouped, op.Constant(value_ints=[-1]), keepdims=0)
        _, keep = op.TopK(group_scores, op.Constant(value_ints=[topk_group]), axis=-1)
        group_zeros = op.Mul(group_scores, op.Constant(value_float=0.0))
        group_mask = op.ScatterElements(
            group_zeros, keep, op.Add(op.GatherElements(group_zeros, keep, axis=1),
                                      op.Constant(value_float=1.0)), axis=1,
        )  # fmt: skip
        expert_mask = op.Reshape(
            op.Expand(op.Unsqueeze(group_mask, op.Constant(value_ints=[-1])),
                      op.Constant(value_ints=[1, 1, per_group])),
            op.Constant(value_ints=[-1, num_experts]),
        )  # fmt: skip
        fill = float("-inf") if topk_method == "noaux_tc" else 0.0
        choice = op.Where(
            op.Greater(expert_mask, op.Constant(value_float=0.5)),
            choice,
            op.Add(zeros, op.Constant(value_float=fill)),
        )
    _, experts = op.TopK(choice, op.Constant(value_ints=[top_k]), axis=-1)
    weights = op.GatherElements(scores, experts, axis=1)
    if normalize:
        total = op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1)
        weights = op.Div(weights, op.Add(total, op.Constant(value_float=1e-20)))
    if scale != 1.0:
        weights = op.Mul(weights, op.Constant(value_float=scale))
    return op.ScatterElements(zeros, experts, weights, axis=1)


def moe_grouped_standard_ops(
    x, router_logits, bias, fc1, fc2, top_k: int, scoring: str, topk_method: str,
    n_group: int, topk_group: int, normalize: bool, scale: float,
):  # fmt: skip
    dense = _route_grouped(
        router_logits, bias, top_k, scoring, topk_method, n_group, topk_group, normalize, scale
    )
    return _experts_standard_ops(x, dense, fc1, fc2)


def moe_grouped_contrib(
    x, router_logits, bias, fc1, fc2, top_k: int, scoring: str, topk_method: str,
    n_group: int, topk_group: int, normalize: bool, scale: float,
):  # fmt: skip
    """com.microsoft.MoE behind a router it cannot express: the experts and weights are
    chosen with standard ops, the op gets log(weight) for the chosen experts and -1e30
    elsewhere (its softmax then gives weight / sum over the chosen), and its output,
    linear in the weights, is multiplied back by the sum per token."""
    dense = _route_grouped(
        router_logits, bias, top_k, scoring, topk_method, n_group, topk_group, normalize, scale
    )
    chosen = op.Greater(dense, op.Constant(value_float=0.0))
    tiny = op.Constant(value_float=1e-38)
    logits = op.Where(
        chosen, op.Log(op.Max(dense, tiny)), op.Add(op.Mul(dense, op.Constant(value_float=0.0)),
                                                    op.Constant(value_float=-1e30))
    )  # fmt: skip
    out = MSFT.MoE(
        x, logits, fc1, None, fc2, None,
        activation_type="swiglu", k=top_k, normalize_routing_weights=0, swiglu_fusion=1,
    )  # fmt: skip
    return op.Mul(out, op.ReduceSum(dense, op.Constant(value_ints=[-1]), keepdims=1))


def gqa_contrib(
    q, k, v, past_k, past_v, attention_mask, cos_cache, sin_cache,
    num_heads: int, kv_heads: int, scale: float,
):  # fmt: skip
    seqlens_k = op.Cast(
        op.Sub(
            op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0),
            op.Constant(value_int=1),
        ),
        to=onnx.TensorProto.INT32,
    )
    total = op.Cast(op.Shape(attention_mask, start=1, end=2), to=onnx.TensorProto.INT32)
    total = op.Squeeze(total, op.Constant(value_ints=[0]))
    return MSFT.GroupQueryAttention(
        q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
        scale=scale,
    )  # fmt: skip


def translation_table(moe_impl: str) -> dict:
    """The ``custom_translation_table`` for ``torch.onnx.export``."""
    _register_contrib_schemas()
    moe = {"contrib": moe_contrib, "ops": moe_standard_ops}[moe_impl]
    grouped = {"contrib": moe_grouped_contrib, "ops": moe_grouped_standard_ops}[moe_impl]
    return {
        torch.ops.moechat.moe_routed.default: moe,
        torch.ops.moechat.moe_grouped.default: grouped,
        torch.ops.moechat.gqa_attention.default: gqa_contrib,
    }
