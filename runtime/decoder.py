"""Runs the exported decoder graph with a KV cache.

Two cache strategies behind one interface:
- static: one preallocated [1, kv_heads, max_context, head_dim] buffer per layer and
  per key/value, bound with IO binding as both ``past_key_values.*`` input and
  ``present.*`` output; GroupQueryAttention updates it in place, so no cache tensor
  is copied per step. Rewinding is just a shorter length.
- growing: numpy arrays fed as inputs and replaced by the outputs (graphs with
  standard-op attention, which concatenates).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from moechat.runtime.errors import MoechatError

_ORT_DEVICE = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}


class Decoder:
    def __init__(
        self,
        session: ort.InferenceSession,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        max_context: int,
        static_cache: bool,
        kv_dtype: type = np.float32,
    ) -> None:
        self.session = session
        self.num_layers = num_layers
        self.max_context = max_context
        self.static_cache = static_cache
        self.length = 0
        provider = session.get_providers()[0]
        self._device = _ORT_DEVICE.get(provider, "cpu")
        self._kv_names = [
            (f"past_key_values.{i}.{n}", f"present.{i}.{n}")
            for i in range(num_layers)
            for n in ("key", "value")
        ]
        shape = (1, kv_heads, max_context if static_cache else 0, head_dim)
        if static_cache:
            self._buffers = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, kv_dtype, self._device, 0)
                for _ in self._kv_names
            ]
            self._binding = session.io_binding()
            self._binding.bind_output("logits", "cpu")  # bound first, so it is get_outputs()[0]
            for (past, present), buf in zip(self._kv_names, self._buffers, strict=True):
                self._binding.bind_ortvalue_input(past, buf)
                self._binding.bind_ortvalue_output(present, buf)
        else:
            self._empty = np.zeros(shape, dtype=kv_dtype)
            self._arrays = [self._empty] * len(self._kv_names)

    def reset(self) -> None:
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Forget cached positions from ``length`` on (rewind for regenerate/edit)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} tokens to {length}")
        self.length = length
        if not self.static_cache:
            self._arrays = (
                [a[:, :, :length] for a in self._arrays]
                if length
                else [self._empty] * len(self._arrays)
            )

    def forward(self, token_ids, logits_for: str = "last") -> np.ndarray:
        """Append ``token_ids`` to the cache; return logits [n, vocab] for the last or all positions."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if n == 0:
            raise ValueError("forward needs at least one token")
        if self.length + n > self.max_context:
            raise MoechatError(
                f"context full: {self.length + n} tokens exceed the context of {self.max_context}"
            )
        mask = np.ones((1, self.length + n), dtype=np.int64)
        positions = (
            np.arange(n, dtype=np.int64)
            if logits_for == "all"
            else np.array([n - 1], dtype=np.int64)
        )
        if self.static_cache:
            b = self._binding
            b.bind_cpu_input("input_ids", ids)
            b.bind_cpu_input("attention_mask", mask)
            b.bind_cpu_input("logits_positions", positions)
            b.bind_output("logits", "cpu")  # rebinding keeps its slot: get_outputs()[0]
            self.session.run_with_iobinding(b)
            logits = b.get_outputs()[0].numpy()
        else:
            feeds = {"input_ids": ids, "attention_mask": mask, "logits_positions": positions}
            feeds.update(
                {past: arr for (past, _), arr in zip(self._kv_names, self._arrays, strict=True)}
            )
            outputs = self.session.run(None, feeds)
            logits = outputs[0]
            self._arrays = outputs[1:]
        self.length += n
        return logits[0].astype(np.float32, copy=False)
