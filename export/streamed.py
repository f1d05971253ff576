"""The streamed export: trace with fake weights, write each weight from the checkpoint.

Peak memory is a few blocks of rows, not the model: the graph is traced from a
:class:`CausalLM` on the meta device (shapes, no storage), through the
same torch.onnx export, constant folding and rewrites as export/onnx_graph.py, with
every weight a lazy recipe (export/lazy_weights.py). :func:`write_streamed` then writes
model.onnx.data exactly as ``onnx.save_model`` lays it out (initializers in graph order,
those of 1024 bytes and more external, no gaps), reading each weight from the
memory-mapped shards as it goes: the same bytes as the whole-model path
(tests/export/test_streamed_export.py).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript.optimizer
import torch

from moechat.export.lazy_weights import (
    Computed,
    LazyArray,
    PackedExperts,
    Recipe,
    Source,
    forget,
    lazy_array,
    lazy_folding,
    lazy_location,
    nbytes,
    recipe_of,
    row_blocks,
    set_external,
)
from moechat.export.onnx_graph import rewrite_graph, trace_program
from moechat.models.modeling import model_rope_caches
from moechat.models.streaming import StreamedCheckpoint

SIZE_THRESHOLD = 1024  # onnx.save_model's size_threshold in export/onnx_graph.py
# Weights of at most this many values are read at trace time: torch.onnx's optimizer
# merges equal initializers up to this size (onnx_ir DeduplicateInitializersPass), and
# merging depends on the values.
SMALL = 1024
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def packed_experts(ckpt: StreamedCheckpoint, layer: int, fc: str) -> PackedExperts:
    """Layer ``layer``'s MoE op weight ``fc`` ("fc1": gate/up interleaved, "fc2": down)."""
    cfg = ckpt.config
    prefix = f"model.layers.{layer}.mlp.experts"

    def sources(part: str) -> tuple[Source, ...]:
        names = [f"{prefix}.{e}.{part}_proj.weight" for e in range(cfg.n_routed_experts)]
        return tuple(Source(n, ckpt.shapes[n], ckpt.read) for n in names)

    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.n_routed_experts
    if fc == "fc1":
        return PackedExperts(sources("gate"), sources("up"), (e, 2 * i, h))
    return PackedExperts(sources("down"), None, (e, h, i))


def _recipes(
    ckpt: StreamedCheckpoint, max_positions: int
) -> Callable[[str, tuple[int, ...]], Recipe]:
    """The recipe of each traced initializer name: a parameter, or a layer's packed experts."""

    def recipe(name: str, shape: tuple[int, ...]) -> Recipe:
        cfg = ckpt.config
        if name in ckpt.shapes:
            return Source(name, ckpt.shapes[name], ckpt.read)
        if name in ("cos_cache", "sin_cache"):  # computed, not read: real values
            tables = model_rope_caches(cfg, max_positions)
            return Computed(tables[name == "sin_cache"].numpy())
        found = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.lifted_tensor_\d+", name)
        if found and len(shape) == 3 and shape[0] == cfg.n_routed_experts:
            for fc in ("fc1", "fc2"):  # the MoE op's two weights differ in shape
                packed = packed_experts(ckpt, int(found[1]), fc)
                if packed.shape == shape:
                    return packed
        raise ValueError(f"the traced graph has a weight the checkpoint cannot give: {name}")

    return recipe


def _swap_in_recipes(ckpt: StreamedCheckpoint, max_positions: int) -> Callable[[Any], None]:
    import onnx_ir as ir

    recipe = _recipes(ckpt, max_positions)

    def swap(model: ir.Model) -> None:
        for name, value in model.graph.initializers.items():
            raw = getattr(value.const_value, "raw", None)
            if not (isinstance(raw, torch.Tensor) and raw.device.type == "meta"):
                continue
            made = recipe(name, tuple(int(d) for d in raw.shape))
            if int(np.prod(made.shape)) <= SMALL:  # real values: onnx_ir deduplicates these
                array = np.concatenate(list(row_blocks(made))).reshape(made.shape)
                value.const_value = ir.Tensor(array, name=name)
            else:
                value.const_value = ir.Tensor(lazy_array(made), name=name)

    return swap


def _serialize(model: Any) -> onnx.ModelProto:
    """onnx_ir model -> ModelProto with lazy weights as reserved external-data tensors."""
    import onnx_ir as ir

    for name, value in model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, LazyArray):
            if raw.recipe is None:
                raise ValueError(f"{name}: a weight rearranged in a way with no streamed form")
            value.const_value = ir.ExternalTensor(
                lazy_location(raw.recipe), 0, nbytes(raw.recipe),
                ir.DataType.from_numpy(raw.recipe.dtype),
                shape=ir.Shape(raw.shape), name=name,
            )  # fmt: skip
    return ir.serde.serialize_model(model)


def trace_streamed(
    ckpt: StreamedCheckpoint,
    moe_impl: str = "contrib",
    attention: str = "gqa",
    residual_norms: bool = True,
) -> onnx.ModelProto:
    """The graph export_decoder would write for ``ckpt``, its weights lazy."""
    with lazy_folding():
        program = trace_program(
            ckpt.model, moe_impl, attention,
            before_optimize=_swap_in_recipes(ckpt, ckpt.model.cos_cache.shape[0]),
        )  # fmt: skip
        onnxscript.optimizer.fold_constants(
            program.model, input_size_limit=1 << 30, output_size_limit=1 << 30
        )
    proto = _serialize(program.model)
    rewrite_graph(proto, ckpt.config, attention, residual_norms)
    return proto


class WriteProgress:
    """Layers done / total, MB written, elapsed and ETA, at most every ``every`` seconds."""

    def __init__(
        self, total_bytes: int, layers: int, report: Callable[[str], None], every: float = 5.0
    ):
        self.total, self.layers, self.report, self.every = total_bytes, layers, report, every
        self.done = 0
        self.start = self.last = time.perf_counter()

    def advance(self, nbytes: int, layer: int | None) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed * (self.total - self.done) / max(self.done, 1)
        where = f"layer {layer + 1}/{self.layers}, " if layer is not None else ""
        self.report(
            f"writing weights: {where}{self.done / 1e6:,.0f} / {self.total / 1e6:,.0f} MB, "
            f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        )


def _layer_of(recipe: object) -> int | None:
    """The layer of the first checkpoint tensor in ``recipe`` (None: not a layer's)."""
    if isinstance(recipe, Source):
        found = _LAYER.match(recipe.name)
        return int(found[1]) if found else None
    for attr in ("child", "parts", "gate"):
        value = getattr(recipe, attr, None)
        for item in value if isinstance(value, tuple) else (value,):
            if item is not None and (layer := _layer_of(item)) is not None:
                return layer
    return None


def write_streamed(
    proto: onnx.ModelProto,
    path: Path,
    layers: int,
    progress: Callable[[str], None] = lambda msg: None,
    release: Callable[[], None] = lambda: None,
) -> None:
    """Write ``path`` + ``path.data`` as export/onnx_graph.save_model would, computing
    each lazy weight block by block from the checkpoint (``release`` after each: the
    shards' pages read for it leave the resident set)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        p.unlink(missing_ok=True)
    lazy = [(t, r) for t in proto.graph.initializer if (r := recipe_of(t)) is not None]
    total = sum(nbytes(r) for _, r in lazy)
    meter = WriteProgress(total, layers, progress)
    try:
        with open(data, "wb") as out:
            for tensor in proto.graph.initializer:
                recipe = recipe_of(tensor)
                if recipe is not None:
                    size = nbytes(recipe)
                    if sys.getsizeof(b"") + size < SIZE_THRESHOLD:  # stays in the graph
                        del tensor.external_data[:]
                        tensor.ClearField("data_location")
                        tensor.raw_data = b"".join(b.tobytes() for b in row_blocks(recipe))
                        continue
                    offset = out.tell()
                    for block in row_blocks(recipe):
                        out.write(block.tobytes())
                    set_external(tensor, data.name, offset, out.tell() - offset)
                    meter.advance(size, _layer_of(recipe))
                    release()
                elif (
                    tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= SIZE_THRESHOLD
                ):
                    offset = out.tell()
                    out.write(tensor.raw_data)
                    set_external(tensor, data.name, offset, out.tell() - offset)
                    tensor.ClearField("raw_data")
        onnx.save_model(proto, str(path))
    finally:
        forget()
