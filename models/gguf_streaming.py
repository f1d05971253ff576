"""A GGUF file read tensor by tensor for the streamed export (models/streaming.py).

gguf's reader memory-maps the file: each tensor's ``data`` is a view of its blocks
(quantised types: one row of blocks per row of the matrix), so a block of rows is
dequantised on its own. Each :class:`CausalLM` weight is a :class:`GGUFPart`: its place
in a stored tensor (an expert of a stacked ``ffn_*_exps``, rows of a fused ``attn_qkv``;
models/gguf.py's :func:`~moechat.models.gguf.tensor_places`, the whole-model load's own
layout) and, where llama.cpp's converter permuted q/k rows, the stored row of each row.
"""

from __future__ import annotations

import atexit
import mmap
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moechat.models.config import ModelConfig
from moechat.models.gguf import (
    Place,
    architecture,
    gguf_config,
    open_gguf,
    rope_row_order,
    tensor_places,
    write_tokenizer_files,
)
from moechat.runtime.errors import MoechatError


@dataclass(frozen=True)
class GGUFPart:
    tensor: Any  # gguf.ReaderTensor: ``data`` memory-mapped from the file
    place: Place
    order: np.ndarray | None  # the stored row of each row (llama.cpp's q/k permutation)

    def read(self, index: tuple | slice) -> torch.Tensor:
        """``weight[index]`` (a slice of rows, then of columns) as float32: only the rows
        it needs are dequantised."""
        from gguf.quants import dequantize

        parts = index if isinstance(index, tuple) else (index,)
        wanted = np.arange(self.place.rows)[parts[0] if parts else slice(None)]
        if self.order is not None:
            wanted = self.order[wanted]
        stored = self.place.offset + wanted
        low, high = (int(stored.min()), int(stored.max()) + 1) if len(stored) else (0, 0)
        data = (
            self.tensor.data if self.place.expert is None else self.tensor.data[self.place.expert]
        )
        try:
            block = dequantize(data[low:high], self.tensor.tensor_type)
        except Exception as err:
            raise MoechatError(
                f"cannot dequantise {self.tensor.name} ({self.tensor.tensor_type.name}): {err}"
            ) from None
        rows = np.asarray(block, dtype=np.float32)[stored - low]  # a copy, never the file
        return torch.from_numpy(np.ascontiguousarray(rows[(slice(None), *parts[1:])]))


def gguf_not_streamable(path: Path) -> str | None:
    reader = open_gguf(path)
    if gguf_config(reader).is_mla:
        return "DeepSeek-V2/V3 GGUF files store kv_b_proj split in two (joined at load)"
    return None


@dataclass
class GGUFIndex:
    """What :func:`moechat.models.streaming.open_streamed` needs of a GGUF file."""

    config: ModelConfig
    parts: dict[str, GGUFPart]  # internal name -> where its values are
    shapes: dict[str, tuple[int, ...]]
    tokenizer_dir: Path
    release: Callable[[], None]  # the file's pages leave the resident set


def gguf_parts(
    reader: Any, cfg: ModelConfig
) -> tuple[dict[str, GGUFPart], dict[str, tuple[int, ...]]]:
    """Each :class:`CausalLM` weight's part of the file, and its shape."""
    _, arch = architecture(reader)
    parts: dict[str, GGUFPart] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        for key, place in tensor_places(tensor.name, shape, cfg).items():
            order = rope_row_order(key, place.rows, cfg) if arch.permuted_qk else None
            parts[key] = GGUFPart(tensor, place, order)
            shapes[key] = (place.rows, *shape[2 if place.expert is not None else 1 :])
    return parts, shapes


def index_gguf(path: Path) -> GGUFIndex:
    reader = open_gguf(path)
    cfg = gguf_config(reader)
    if cfg.is_mla:
        raise MoechatError(f"{path} cannot be exported streamed: {gguf_not_streamable(path)}")
    parts, shapes = gguf_parts(reader, cfg)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="moechat-gguf-tokenizer-"))
    atexit.register(shutil.rmtree, tokenizer_dir, ignore_errors=True)
    try:
        write_tokenizer_files(reader, tokenizer_dir)
    except BaseException:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
        raise
    mapped = getattr(reader.data, "_mmap", None)

    def release() -> None:
        if mapped is not None and hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_DONTNEED)  # file-backed: the page cache keeps them

    return GGUFIndex(cfg, parts, shapes, tokenizer_dir, release)
