"""QMoE expert weights <-> float (the layouts export/int8/quantize.py ``moe_to_qmoe`` writes).

8 bits: uint8 = q + 128; 4 bits: two values per byte, offset 8, the even index in the
low nibble (``pack_uint4``). Scales: one per ``block`` values along the last axis, or
one per row (``block`` 0).
"""

from __future__ import annotations

import numpy as np

from moechat.export.int8.quantize import pack_uint4, quantize_rows


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., K/2] -> int8 [..., K] (inverse of ``pack_uint4``)."""
    low = (packed & 0x0F).astype(np.int16) - 8
    high = (packed >> 4).astype(np.int16) - 8
    q = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int8)
    q[..., 0::2], q[..., 1::2] = low, high
    return q


def dequantize_qmoe(stored: np.ndarray, scale: np.ndarray, bits: int, block: int) -> np.ndarray:
    q = unpack_uint4(stored) if bits == 4 else stored.astype(np.int16) - 128
    w = q.astype(np.float32)
    if block:
        w = w.reshape(*w.shape[:-1], -1, block) * scale[..., None].astype(np.float32)
        return w.reshape(*w.shape[:-2], -1)
    return w * scale[..., None].astype(np.float32)


def quantize_qmoe(
    w: np.ndarray, bits: int, block: int, scale_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    q, scale = quantize_rows(w, block, bits)
    stored = (q.astype(np.int16) + 128).astype(np.uint8) if bits == 8 else pack_uint4(q)
    return stored, scale.astype(scale_dtype)
