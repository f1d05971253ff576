"""Fewer routed experts per token than trained (``--experts-per-token K``), without onnx.

The number of experts a token runs is baked into the graph: the ``k`` attribute of each
``com.microsoft.MoE`` / ``QMoE`` node, and the K input of the TopK that chooses experts in
standard-op routing (export/lowering.py; DeepSeek's grouped routers have both). The
runtime has only onnxruntime and numpy, so this module edits the graph file's protobuf
bytes directly (the wire format: tag, then a varint, fixed-width value or
length-prefixed payload) and hands onnxruntime the edited bytes, with the package folder
as the place of the external weights. Untouched fields are copied byte for byte.

- MoE / QMoE nodes: ``k`` is set to K.
- Expert-choosing TopK nodes (their scores come from a Softmax, Sigmoid, Add or Where,
  not from a per-group Reshape / Reduce; their K is the trained top-k): their K input is
  pointed at a new int64 initializer holding K (the old constant may be shared, e.g.
  with Slice axes that happen to equal k).
Renormalisation is then the family's own: graphs that renormalise the chosen weights
(``norm_topk_prob``) renormalise over K experts, the others keep the softmax weights of
the K best (docs/decisions/0015-runtime-top-k.md). Every MoE layer must be found, or the
package is refused with the reason.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from moechat.runtime.errors import MoechatError

ENV = "MOECHAT_EXPERTS_PER_TOKEN"
K_NAME = "moechat.experts_per_token"
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
_CHOICE_SCORES = ("Softmax", "Sigmoid", "Add", "Where")
_INT64 = 7  # TensorProto.INT64


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


@dataclass
class Field:
    number: int
    wire: int
    value: bytes | int  # payload (LEN, fixed) or the integer (VARINT)

    def encode(self) -> bytes:
        tag = _encode_varint(self.number << 3 | self.wire)
        if self.wire == _VARINT:
            assert isinstance(self.value, int)
            return tag + _encode_varint(self.value)
        assert isinstance(self.value, bytes)
        if self.wire == _LEN:
            return tag + _encode_varint(len(self.value)) + self.value
        return tag + self.value


def parse(buf: bytes) -> list[Field]:
    """One message's fields in order (payloads unparsed)."""
    fields, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value: bytes | int
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            value, pos = buf[pos : pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append(Field(number, wire, value))
    return fields


def encode(fields: list[Field]) -> bytes:
    return b"".join(f.encode() for f in fields)


def _strings(fields: list[Field], number: int) -> list[str]:
    return [f.value.decode() for f in fields if f.number == number and isinstance(f.value, bytes)]


@dataclass
class _Node:
    fields: list[Field]
    op_type: str = ""
    domain: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, payload: bytes) -> _Node:
        f = parse(payload)
        op = _strings(f, 4)
        dom = _strings(f, 7)
        return cls(f, op[0] if op else "", dom[0] if dom else "", _strings(f, 1), _strings(f, 2))


def _tensor_int(payload: bytes) -> int | None:
    """The value of a one-element int64 TensorProto (raw or int64_data), else None."""
    f = parse(payload)
    kind = [x.value for x in f if x.number == 2]
    dims = [x for x in f if x.number == 1]
    if kind != [_INT64] or len(dims) > 1:
        return None
    raw = [x.value for x in f if x.number == 9]
    if raw and isinstance(raw[0], bytes) and len(raw[0]) == 8:
        return int(struct.unpack("<q", raw[0])[0])
    data = [x for x in f if x.number == 7]
    if len(data) == 1:
        value = data[0].value
        if isinstance(value, int):
            return value
        return _varint(value, 0)[0]
    return None


def _constants(nodes: list[_Node], graph: list[Field]) -> dict[str, int]:
    """Scalar / one-element int64 values by name: Constant nodes and initializers."""
    values: dict[str, int] = {}
    for node in nodes:
        if node.op_type == "Constant" and node.outputs:
            attrs = [a.value for a in node.fields if a.number == 5]
            for attr in (parse(a) for a in attrs if isinstance(a, bytes)):
                if _strings(attr, 1) == ["value"]:
                    for t in (a.value for a in attr if a.number == 5):
                        if isinstance(t, bytes) and (v := _tensor_int(t)) is not None:
                            values[node.outputs[0]] = v
                elif _strings(attr, 1) == ["value_ints"]:
                    ints = [a.value for a in attr if a.number == 8]
                    if len(ints) == 1:  # one varint, or one packed run of them
                        one = ints[0]
                        if isinstance(one, int):
                            values[node.outputs[0]] = one
                        elif (packed := _varint(one, 0))[1] == len(one):
                            values[node.outputs[0]] = packed[0]
    for init in (f.value for f in graph if f.number == 5):
        assert isinstance(init, bytes)
        names = _strings(parse(init), 8)
        if names and (v := _tensor_int(init)) is not None:
            values[names[0]] = v
    return values


def _set_k_attribute(node: _Node, k: int) -> None:
    for f in node.fields:
        if f.number != 5 or not isinstance(f.value, bytes):
            continue
        attr = parse(f.value)
        if _strings(attr, 1) == ["k"]:
            for a in attr:
                if a.number == 3:
                    a.value = k
            f.value = encode(attr)


def _set_input(node: _Node, index: int, name: str) -> None:
    inputs = [f for f in node.fields if f.number == 1]
    inputs[index].value = name.encode()


def _k_initializer(k: int) -> Field:
    tensor = [Field(1, _VARINT, 1), Field(2, _VARINT, _INT64), Field(8, _LEN, K_NAME.encode()),
              Field(9, _LEN, struct.pack("<q", k))]  # fmt: skip
    return Field(5, _LEN, encode(tensor))


def with_experts_per_token(graph_bytes: bytes, trained: int, moe_layers: int, k: int) -> bytes:
    """The graph with ``k`` routed experts per token instead of ``trained``."""
    if not 1 <= k <= trained:
        raise MoechatError(
            f"--experts-per-token must be between 1 and the trained {trained} (got {k})"
        )
    model = parse(graph_bytes)
    graph_fields = [f for f in model if f.number == 7]
    if len(graph_fields) != 1 or not isinstance(graph_fields[0].value, bytes):
        raise MoechatError("the graph file is not an ONNX model")
    graph = parse(graph_fields[0].value)
    node_fields = [f for f in graph if f.number == 1]
    nodes = [_Node.read(f.value) for f in node_fields if isinstance(f.value, bytes)]
    producer = {out: n for n in nodes for out in n.outputs}
    consts = _constants(nodes, graph)
    moe = [n for n in nodes if n.op_type in ("MoE", "QMoE") and n.domain == "com.microsoft"]
    choice = [
        n for n in nodes
        if n.op_type == "TopK" and len(n.inputs) > 1 and consts.get(n.inputs[1]) == trained
        and getattr(producer.get(n.inputs[0]), "op_type", "") in _CHOICE_SCORES
    ]  # fmt: skip
    if moe and len(moe) != moe_layers or not moe and len(choice) != moe_layers:
        raise MoechatError(
            f"cannot change the experts per token of this graph: it has {moe_layers} MoE "
            f"layers, but {len(moe)} MoE/QMoE nodes and {len(choice)} expert-choosing TopK "
            "nodes were found (an unknown lowering)"
        )
    for node in moe:
        _set_k_attribute(node, k)
    for node in choice:
        _set_input(node, 1, K_NAME)
    for f, node in zip(node_fields, nodes, strict=True):
        f.value = encode(node.fields)
    if choice:
        graph.append(_k_initializer(k))
    graph_fields[0].value = encode(graph)
    return encode(model)


def requested(value: int | None) -> int | None:
    """The K asked for: the argument, else ``MOECHAT_EXPERTS_PER_TOKEN``, else None."""
    if value is not None:
        return value
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise MoechatError(f"{ENV} must be a whole number, got {text!r}") from None


def graph_bytes_for(graph_path: Path, arch: dict, k: int) -> bytes:
    """The package graph at ``graph_path`` with ``k`` experts per token (checked)."""
    if not arch.get("use_moe"):
        raise MoechatError("--experts-per-token needs a MoE model; this one is dense")
    trained = int(arch["num_experts_per_tok"])
    dense = set(arch.get("dense_layers") or ())
    layers = sum(1 for i in range(int(arch["num_hidden_layers"])) if i not in dense)
    return with_experts_per_token(graph_path.read_bytes(), trained, layers, k)
