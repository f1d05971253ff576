"""``moechat export`` of a checkpoint too large to hold: the package's graph, streamed.

Called by export/package.py for a :class:`StreamedCheckpoint` in place of tracing,
the whole-model parity check and the int8 step. What differs from the whole-model path:
- the graph is traced on the meta device and each weight is written from the shards
  (export/streamed.py); with ``--int8`` it is quantised as it is written: no fp32 graph
  exists at any point;
- parity is checked layer by layer (export/layer_parity.py): fp32 packages to the same
  1e-4 of each probe's scale; int8 packages only against a loose bound that catches a
  broken layer (their distance to fp32 is what the fidelity report measures);
- fidelity compares the int8 graph with PyTorch fp32 computed layer by layer, each
  held-out window one prefill;
- activation smoothing is skipped: its calibration runs the fp32 graph, which a
  streamed export never has (recorded in moechat.json's quantization.smoothing_note).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moechat.export.options import ExportOptions
from moechat.models.streaming import StreamedCheckpoint
from moechat.runtime.errors import MoechatError
from moechat.runtime.tokenizer import TextTokenizer

# A quantised graph's layer probes differ from fp32 by a few % of their scale; a layer
# whose weights are wrong differs by about its whole scale.
INT8_LAYER_TOLERANCE = 0.25


def check_streamed_options(options: ExportOptions) -> None:
    """The export options a streamed export supports (one-line error otherwise)."""
    unsupported = (
        ("--fp16", options.fp16),
        ("--variant", bool(options.variants)),
        ("--int8-residual-pass", options.int8_residual_pass),
        ("--int8-matmuls dynamic", options.int8_matmuls == "dynamic"),
        ("--moe-impl ops", options.moe_impl == "ops"),
    )
    for flag, used in unsupported:
        if used:
            raise MoechatError(
                f"{flag} is not available when the checkpoint is exported streamed "
                "(tensor by tensor); pass --no-stream to load the whole model instead"
            )


def export_streamed(
    ckpt: StreamedCheckpoint,
    work: Path,
    manifest: dict,
    options: ExportOptions,
    tokenizer: TextTokenizer,
    prompts: list[list[int]],
    max_context: int,
    progress: Callable[[str], None],
) -> None:
    """Write ``work/model.onnx`` (+ data) and record parity (and quantization, fidelity)."""
    from moechat.export.layer_parity import check_layers, measure_fidelity_layerwise
    from moechat.export.package import PARITY_TOLERANCE, quantize_options
    from moechat.export.streamed import trace_streamed, write_streamed

    check_streamed_options(options)
    cfg = ckpt.config
    progress("tracing the model to ONNX on the meta device (weights stay in the checkpoint)")
    proto = trace_streamed(ckpt, options.fp32_moe_impl, options.attention)
    if options.int8:
        from moechat.export.int8.lazy_nbits import lazy_nbits
        from moechat.export.int8.quantize import quantize_model

        quantize = quantize_options(options, manifest["architecture"], smooth=False)
        with lazy_nbits():  # no calibration: 4-bit matmuls by round to nearest, not GPTQ
            proto, info = quantize_model(proto, quantize)
        level = "int8" if info.get("weights") == "int8" else "int4"
        info = {"method": level, **info}
        info["smoothing_note"] = "skipped: a streamed export has no fp32 graph to calibrate on"
        if quantize.dense_bits == 4:
            info["matmuls"] += "; round to nearest (GPTQ needs the fp32 graph)"
        manifest["graph"]["quantization"] = info
    progress(f"writing the graph, {cfg.num_hidden_layers} layers, weights read from the shards")
    write_streamed(proto, work / "model.onnx", cfg.num_hidden_layers, progress, ckpt.release)
    del proto
    tolerance = INT8_LAYER_TOLERANCE if options.int8 else PARITY_TOLERANCE
    progress("checking parity layer by layer: PyTorch (one layer in memory) vs onnxruntime")
    parity = check_layers(ckpt, work / "model.onnx", prompts, tolerance, progress)
    manifest["parity"] = {"reference": "pytorch-fp32", **parity.to_dict(), "tolerance": tolerance}
    if not options.int8:
        return
    from moechat.export.int8.fidelity import HELDOUT_MAX_TOKENS, WINDOW, heldout_text
    from moechat.runtime.evaluate import read_text_file

    manifest["parity"]["graph"] = (
        f"{manifest['graph']['quantization']['method']} (streamed export: no fp32 graph is written)"
    )
    if options.heldout is not None:
        text, name = read_text_file(options.heldout), Path(options.heldout).name
    else:
        text, name = heldout_text(), "moechat heldout.txt"
    ids = tokenizer.encode_text(text)[:HELDOUT_MAX_TOKENS]
    level = manifest["graph"]["quantization"]["method"]
    progress(
        f"measuring {level} fidelity against PyTorch fp32, layer by layer, on {len(ids)} tokens"
    )
    report = measure_fidelity_layerwise(
        ckpt, work / "model.onnx", ids, name, min(WINDOW, max_context), progress
    )
    manifest["fidelity"] = {"reference": "pytorch-fp32, layer by layer", **report.to_dict()}
    size = sum(f.stat().st_size for f in (work / "model.onnx", work / "model.onnx.data"))
    fp32 = 4 * sum(int(p.numel()) for p in ckpt.model.parameters())
    info.update(
        fp32_package_bytes=fp32,  # what the fp32 weights would take (never written)
        int8_package_bytes=size,
        size_ratio=round(size / max(fp32, 1), 4),
    )
