"""onnxruntime's MatMulNBits quantiser over lazy weights (the streamed export).

``MatMulNBitsQuantizer`` reads each MatMul weight whole, quantises it with a C++ kernel
and stores the result. Over a streamed export's lazy weights (export/lazy_weights.py)
:func:`lazy_nbits` lets it build the same nodes and initializers while the data stays a
recipe: the kernel's output for a block of weight columns (output channels, each
quantised on its own along K) is that block's rows of the packed weight and scales, so
they are computed when written. Anything else of the quantiser is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import matmul_nbits_quantizer as nbits

from moechat.export.lazy_weights import LazyArray, lazy_array, lazy_proto, mapped, recipe_of


class _LazyTensor:
    def __init__(self, array: LazyArray) -> None:
        self.array = array

    def numpy(self) -> LazyArray:
        return self.array


@contextlib.contextmanager
def lazy_nbits() -> Iterator[None]:
    quantizer = nbits.DefaultWeightOnlyQuantizer
    block_quant = quantizer.qbits_block_quant
    from_proto, serialize_tensor = ir.from_proto, ir.serde.serialize_tensor

    def read(proto: Any) -> Any:  # the weight the quantiser reads
        recipe = recipe_of(proto) if hasattr(proto, "external_data") else None
        return from_proto(proto) if recipe is None else _LazyTensor(lazy_array(recipe))

    def quantize(self: Any, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not isinstance(weight, LazyArray) or weight.recipe is None:
            return block_quant(self, weight)
        child = weight.recipe

        def part(index: int) -> Callable[[np.ndarray], np.ndarray]:
            return lambda columns: block_quant(self, columns)[index]

        zero_point = block_quant(self, np.zeros((weight.shape[0], 1), weight.dtype))[2]
        packed, scales = (lazy_array(mapped(child, part(i), by="cols")) for i in (0, 1))
        return packed, scales, np.zeros((weight.shape[1], zero_point.shape[1]), np.uint8)

    def serialize(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        raw = getattr(tensor, "raw", None)
        if isinstance(raw, LazyArray) and raw.recipe is not None:
            return lazy_proto(raw.recipe, tensor.name)
        return serialize_tensor(tensor, *args, **kwargs)

    quantizer.qbits_block_quant = quantize
    ir.from_proto, ir.serde.serialize_tensor = read, serialize
    try:
        yield
    finally:
        quantizer.qbits_block_quant = block_quant
        ir.from_proto, ir.serde.serialize_tensor = from_proto, serialize_tensor
