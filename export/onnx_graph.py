"""Trace a :class:`CausalLM` to an ONNX decoder with the KV cache as inputs/outputs.

Graph interface (documented in docs/architecture.md):
  inputs   input_ids int64 [batch, sequence]
           attention_mask int64 [batch, total_sequence]   (ones; total = past + sequence)
           logits_positions int64 [num_logits]           (positions of ``sequence`` to score)
           past_key_values.{i}.key / .value  float [batch, kv_heads, past_sequence, head_dim]
  outputs  logits float [batch, num_logits, vocab]
           present.{i}.key / .value  float [batch, kv_heads, total_sequence, head_dim]
With GroupQueryAttention the runtime may bind one max-length buffer as both past and
present (onnxruntime then updates it in place). Multi-head latent attention graphs
(DeepSeek-V2/V3) output only the new positions as present (moechat.json: graph
``kv_present`` "new"); the runtime appends them to its own buffers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxscript.optimizer
import torch

from moechat.export.graph_rewrites import (
    find_routers,
    fuse_residual_norms,
    fuse_shared_input_matmuls,
    gemm_to_matmul,
    pack_attention_inputs,
)
from moechat.export.lowering import translation_table
from moechat.export.routing_outputs import expose_router_logits
from moechat.models.config import ModelConfig
from moechat.models.mla import MLAttention
from moechat.models.modeling import CausalLM, MoEFeedForward
from moechat.runtime.routing import moe_layers

MOE_IMPLS = ("contrib", "ops")
ATTENTION_IMPLS = ("gqa", "ops")


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [(i, n) for i in range(num_layers) for n in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "logits_positions"]
    inputs += [f"past_key_values.{i}.{n}" for i, n in kv]
    outputs = ["logits"] + [f"present.{i}.{n}" for i, n in kv]
    return inputs, outputs


def _example_inputs(model: CausalLM) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    seq, past = 3, 5  # distinct sizes > 1 so torch.export keeps them symbolic
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    mask = torch.ones(1, past + seq, dtype=torch.long)
    widths = (cfg.head_dim, cfg.value_head_dim) * cfg.num_hidden_layers  # MLA: they differ
    kv = [torch.zeros(1, cfg.num_key_value_heads, past, d) for d in widths]
    return (ids, mask, torch.arange(seq), *kv)


def _dynamic_shapes(num_layers: int) -> dict:
    dim = torch.export.Dim
    batch, seq = dim("batch", max=256), dim("sequence", max=1 << 17)
    total, past = dim("total_sequence", max=1 << 17), dim("past_sequence", max=1 << 17)
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "logits_positions": {0: dim("num_logits", max=1 << 17)},
        "past": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
    }


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings meant for its developers; keep ours clean."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # onnxscript's optimizer logs every skipped fold at INFO once torch.onnx has given
    # it a handler (the demo build's second export printed 220 such lines)
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_decoder(
    model: CausalLM,
    path: Path,
    moe_impl: str = "contrib",
    attention: str = "gqa",
    residual_norms: bool = True,
) -> None:
    """Write ``path`` (+ ``path.data`` external weights) for ``model``.

    ``residual_norms``: fuse residual Add + RMSNorm into SkipSimplifiedLayerNormalization
    (contrib-op graphs only). Off for float16 graphs: onnxruntime's float16 kernel of
    that op measured 30x further from PyTorch than the unfused ops (1.4e-2 vs 4.3e-4
    of the logit scale on the tiny MoE, CPU provider).
    """
    cfg = model.config
    program = trace_program(model, moe_impl, attention)
    proto = program.model_proto
    # Fold per-expert weight slices/transposes of the standard-op lowering into plain
    # initializers, so MatMuls read constant weights (and the int8 quantizer finds them).
    with _quiet():
        onnxscript.optimizer.fold_constants(
            proto, input_size_limit=1 << 30, output_size_limit=1 << 30
        )
    rewrite_graph(proto, cfg, attention, residual_norms)
    save_model(proto, path)


def trace_program(
    model: CausalLM,
    moe_impl: str,
    attention: str,
    before_optimize: Callable[[Any], None] | None = None,
) -> torch.onnx.ONNXProgram:
    """torch.onnx's program for ``model``; ``before_optimize`` gets its onnx_ir model
    before torch.onnx's optimizer runs (the streamed export swaps in lazy weights)."""
    if moe_impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}")
    from torch.onnx._internal.exporter._onnx_program import ONNXProgram

    optimize = ONNXProgram.optimize

    def swap_then_optimize(program: ONNXProgram) -> None:
        if before_optimize is not None:
            before_optimize(program.model)
        optimize(program)

    model.eval()
    model.set_attention_variant(attention == "gqa")
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.freeze_packed()
        if isinstance(module, MLAttention):  # present = the new positions (models/mla.py)
            module.new_only = True
    inputs, outputs = io_names(model.config.num_hidden_layers)
    try:
        ONNXProgram.optimize = swap_then_optimize
        with _quiet(), torch.no_grad():
            return torch.onnx.export(
                model,
                # on the model's device: the meta device for the streamed export's tracing
                tuple(t.to(model.cos_cache.device) for t in _example_inputs(model)),
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=_dynamic_shapes(model.config.num_hidden_layers),
                custom_translation_table=translation_table(moe_impl),
                optimize=True,
            )
    finally:
        ONNXProgram.optimize = optimize
        for module in model.modules():
            if isinstance(module, MoEFeedForward):
                module.packed = None
            if isinstance(module, MLAttention):
                module.new_only = False


def rewrite_graph(
    proto: onnx.ModelProto, cfg: ModelConfig, attention: str, residual_norms: bool
) -> None:
    """The exact rewrites every traced graph gets (after constant folding)."""
    routers = {node.name for node in find_routers(proto)}
    gemm_to_matmul(proto, keep=routers)
    fuse_shared_input_matmuls(proto, skip=routers)
    pack_attention_inputs(proto)
    if residual_norms and attention == "gqa":  # not in standard-op graphs (DirectML)
        fuse_residual_norms(proto)
    # last: the rewrites above find routers by structure, not by name
    expose_router_logits(proto, moe_layers(cfg.to_dict()))
    drop_trace_metadata(proto)


def drop_trace_metadata(proto: onnx.ModelProto) -> None:
    """torch.onnx's per-node notes (stack traces with the exporting machine's paths, FX
    node text naming the device it traced on): nothing reads them, and a package should
    not depend on where or how it was traced (the streamed export traces on meta)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]


def save_model(proto: onnx.ModelProto, path: Path) -> None:
    """Save with weights in ``<name>.data`` beside the graph."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        p.unlink(missing_ok=True)
    onnx.save_model(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data.name, size_threshold=1024,
    )  # fmt: skip
