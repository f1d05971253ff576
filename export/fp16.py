"""The float16 step of ``moechat export --fp16`` (packages for CUDA GPUs).

The fp32 graph, already checked against PyTorch, is converted to float16 weights,
activations and KV cache (onnxruntime's own converter, shipped in its wheel), then
checked against PyTorch again with a float16 tolerance. Logits come out in float16;
the runtime upcasts them. onnxruntime's CPU provider runs the graph too (slowly), so
the check needs no GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from moechat.export.onnx_graph import save_model
from moechat.export.parity import ParityReport, cpu_decoder, measure_parity
from moechat.models.modeling import CausalLM

# Max |Δlogit| relative to the logit scale: float16 keeps ~3 decimal digits, and
# rounding adds up over the layers (measured: 4.3e-4 on the tiny MoE).
FP16_TOLERANCE = 5e-3


def convert_graph_to_fp16(graph: Path) -> None:
    """Rewrite ``graph`` (+ its external data) in place as a float16 graph."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(graph), load_external_data=True)
    # keep_io_types=False: the KV cache inputs/outputs become float16 too, so the
    # runtime's static cache buffers are float16 and nothing is cast per step.
    model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    save_model(model, graph)


def check_fp16_graph(
    model: CausalLM, graph: Path, prompts: list[list[int]], max_context: int
) -> ParityReport:
    """Parity of the float16 graph against the fp32 PyTorch model (CPU provider)."""
    decoder = cpu_decoder(graph, model.config, max_context, kv_dtype=np.float16)
    return measure_parity(model, decoder, prompts)
