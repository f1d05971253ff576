"""Runs the exported decoder graph with a KV cache.

Two cache strategies behind one interface:
- static: one preallocated buffer per layer and per key/value, room for max_context
  positions, bound with IO binding as both ``past_key_values.*`` input and
  ``present.*`` output; GroupQueryAttention updates it in place, so no cache tensor
  is copied per step. Rewinding is just a shorter length. On the CPU the graph sees
  the buffer as [1, kv_heads, capacity, head_dim] with a capacity that starts at
  256 and doubles up to max_context when the cache outgrows it: onnxruntime's CPU
  GroupQueryAttention costs more per step with a larger buffer dimension (7% at
  4096 against 384 on SmolLM2). Growing re-lays the cached positions out in place
  inside the same allocation, so memory is reserved once and never copied
  elsewhere (docs/architecture.md).
- growing: numpy arrays fed as inputs and replaced by the outputs (graphs with
  standard-op attention, which concatenates).

Keys and values may differ in width (``value_head_dim``): a multi-head latent attention
graph (DeepSeek-V2/V3, models/mla.py) caches the latent as its "key" and the shared
rotary key as its "value", one KV head each. Its graphs output only the new positions
as present (``present_new_only``, moechat.json ``kv_present: new``): the static cache
then binds, per step, the cached positions of each buffer as the past input and the
next free positions of the same buffer as the present output, so onnxruntime writes the
new entries in place and nothing cached is copied (CPU, one KV head); the growing cache
appends them to its arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from moechat.runtime.errors import MoechatError

_ORT_DEVICE = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}
INITIAL_CAPACITY = 256  # CPU static cache: positions the graph sees before the first growth


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
        initial_capacity: int = INITIAL_CAPACITY,
        value_head_dim: int | None = None,
        present_new_only: bool = False,
        routing_outputs: Sequence[str] = (),
    ) -> None:
        self.session = session
        # router logits outputs (runtime/routing.py): fetched only by forward_routed
        self.routing_outputs = list(routing_outputs)
        self._new_only = present_new_only
        provider = session.get_providers()[0]
        if present_new_only and (_ORT_DEVICE.get(provider, "cpu") != "cpu" or kv_heads != 1):
            static_cache = False  # in-place appends: CPU buffers of one KV head only
        self.num_layers = num_layers
        self.max_context = max_context
        self.static_cache = static_cache
        self.length = 0
        self._device = _ORT_DEVICE.get(provider, "cpu")
        self._kv_names = [
            (f"past_key_values.{i}.{n}", f"present.{i}.{n}")
            for i in range(num_layers)
            for n in ("key", "value")
        ]
        self._kv_heads, self._head_dim = kv_heads, head_dim
        value_dim = value_head_dim or head_dim
        # the width of each cache tensor, in the order of _kv_names (key, value per layer)
        self._widths = [head_dim, value_dim] * num_layers
        self._last_logits: tuple[np.ndarray, ort.OrtValue] | None = None
        if static_cache:
            self._binding = session.io_binding()
            self._binding.bind_output("logits", "cpu")  # bound first, so it is get_outputs()[0]
            if self._device == "cpu":
                # numpy owns the memory (pages are committed as they are first written);
                # onnxruntime gets [1, H, capacity, D] views of its first elements.
                self._storage: list[np.ndarray] = [
                    np.empty(kv_heads * max_context * d, dtype=kv_dtype) for d in self._widths
                ]
                if present_new_only:  # bound per step (_bind_appends)
                    self.capacity = max_context
                else:
                    self.capacity = min(max_context, max(1, initial_capacity))
                    self._bind_views()
                self._last_logits = self._logits_buffer(session)
            else:
                self.capacity = max_context
                buffers = [
                    ort.OrtValue.ortvalue_from_shape_and_type(
                        (1, kv_heads, max_context, d), kv_dtype, self._device, 0
                    )
                    for d in self._widths
                ]
                self._bind(buffers)
        else:
            self.capacity = max_context
            self._empty: list[np.ndarray] = [
                np.zeros((1, kv_heads, 0, d), dtype=kv_dtype) for d in self._widths
            ]
            self._arrays = list(self._empty)

    @staticmethod
    def _logits_buffer(session: ort.InferenceSession) -> tuple[np.ndarray, ort.OrtValue] | None:
        """A reusable [1, 1, vocab] logits output for single-position steps (decode), so a
        step does not allocate and wrap a new output tensor."""
        out = session.get_outputs()[0]
        vocab = out.shape[-1]
        if not isinstance(vocab, int):
            return None
        array = np.empty((1, 1, vocab), np.float16 if out.type == "tensor(float16)" else np.float32)
        return array, ort.OrtValue.ortvalue_from_numpy(array)

    def _bind(self, buffers: list[ort.OrtValue]) -> None:
        self._buffers = buffers  # keeps the OrtValues alive while bound
        for (past, present), buf in zip(self._kv_names, buffers, strict=True):
            self._binding.bind_ortvalue_input(past, buf)
            self._binding.bind_ortvalue_output(present, buf)

    def _view(self, storage: np.ndarray, capacity: int, width: int) -> np.ndarray:
        return storage[: self._kv_heads * capacity * width].reshape(
            1, self._kv_heads, capacity, width
        )

    def _bind_views(self) -> None:
        self._bind(
            [
                ort.OrtValue.ortvalue_from_numpy(self._view(s, self.capacity, d))
                for s, d in zip(self._storage, self._widths, strict=True)
            ]
        )

    def _bind_appends(self, n: int) -> None:
        """Past = the cached positions of each buffer, present = its next ``n`` positions."""
        values = []
        for (past, present), storage, d in zip(
            self._kv_names, self._storage, self._widths, strict=True
        ):
            start = self.length * d
            cached = storage[:start].reshape(1, 1, self.length, d)
            fresh = storage[start : start + n * d].reshape(1, 1, n, d)
            values += [
                ort.OrtValue.ortvalue_from_numpy(cached),
                ort.OrtValue.ortvalue_from_numpy(fresh),
            ]
            self._binding.bind_ortvalue_input(past, values[-2])
            self._binding.bind_ortvalue_output(present, values[-1])
        self._buffers = values  # keeps the OrtValues alive while bound

    def _grow(self, needed: int) -> None:
        """Widen the CPU buffers' capacity to hold ``needed`` positions (doubling)."""
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, self.max_context)
        for storage, step in zip(self._storage, self._widths, strict=True):
            # Head h moves from h*old to h*new positions; the last head first, so no
            # head overwrites one that has not moved yet.
            for h in range(self._kv_heads - 1, 0, -1):
                src = storage[h * self.capacity * step : (h * self.capacity + self.length) * step]
                storage[h * capacity * step : (h * capacity + self.length) * step] = src
        self.capacity = capacity
        self._bind_views()

    def reset(self) -> None:
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Forget cached positions from ``length`` on (rewind for regenerate/edit)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} tokens to {length}")
        self.length = length
        if not self.static_cache:
            self._arrays = [a[:, :, :length] for a in self._arrays] if length else list(self._empty)

    def forward(
        self, token_ids: Sequence[int] | np.ndarray, logits_for: str = "last"
    ) -> np.ndarray:
        """Append ``token_ids`` to the cache; return logits [n, vocab] for the last or all positions."""
        return self._run(token_ids, logits_for, routing=False)[0]

    def forward_routed(
        self, token_ids: Sequence[int] | np.ndarray, logits_for: str = "last"
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """:meth:`forward`, also fetching each MoE layer's router logits [n, experts] (in
        the order of ``routing_outputs``)."""
        if not self.routing_outputs:
            raise MoechatError("this graph has no routing outputs")
        return self._run(token_ids, logits_for, routing=True)

    def _restore_outputs(self) -> None:
        """Unbind the routing outputs after a routed step: logits first, then the cache."""
        b = self._binding
        b.clear_binding_outputs()
        b.bind_output("logits", "cpu")
        if self._device != "cpu":
            self._bind(self._buffers)
        elif not self._new_only:  # new-only graphs bind the cache per step
            self._bind_views()

    def _run(
        self, token_ids: Sequence[int] | np.ndarray, logits_for: str, routing: bool
    ) -> tuple[np.ndarray, list[np.ndarray]]:
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
            if self._new_only:
                self._bind_appends(n)
            elif self.length + n > self.capacity:
                self._grow(self.length + n)
            b = self._binding
            b.bind_cpu_input("input_ids", ids)
            b.bind_cpu_input("attention_mask", mask)
            b.bind_cpu_input("logits_positions", positions)
            for name in self.routing_outputs if routing else ():
                b.bind_output(name, "cpu")  # after logits and the cache: the last outputs
            if len(positions) == 1 and self._last_logits is not None:
                array, value = self._last_logits
                b.bind_ortvalue_output("logits", value)
                self.session.run_with_iobinding(b)
                logits = array.copy()  # the buffer is rewritten by the next step
            else:
                b.bind_output("logits", "cpu")  # rebinding keeps its slot: get_outputs()[0]
                self.session.run_with_iobinding(b)
                logits = b.get_outputs()[0].numpy()
            routers: list[np.ndarray] = []
            if routing:
                fetched = b.get_outputs()[-len(self.routing_outputs) :]
                routers = [v.numpy() for v in fetched]
                self._restore_outputs()
        else:
            feeds = {"input_ids": ids, "attention_mask": mask, "logits_positions": positions}
            feeds.update(
                {past: arr for (past, _), arr in zip(self._kv_names, self._arrays, strict=True)}
            )
            names = ["logits"] + [present for _, present in self._kv_names]
            outputs = self.session.run(names + (self.routing_outputs if routing else []), feeds)
            logits = outputs[0]
            presents, routers = outputs[1 : len(names)], outputs[len(names) :]
            if self._new_only:
                self._arrays = [
                    np.concatenate((a, o), axis=2)
                    for a, o in zip(self._arrays, presents, strict=True)
                ]
            else:
                self._arrays = presents
        self.length += n
        routers = [r.reshape(n, -1).astype(np.float32, copy=False) for r in routers]
        return logits[0].astype(np.float32, copy=False), routers
