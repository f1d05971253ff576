"""Weights that are written, not held: recipes from checkpoint tensors to graph initializers.

A streamed export (export/streamed.py) traces the graph from a model whose weights are
fake, so every initializer that comes from the checkpoint is a :class:`Recipe`: a
checkpoint tensor, or a transpose / concatenation / expert packing of such tensors —
the only rearrangements the tracer, onnxscript's constant folding and
export/graph_rewrites.py apply to weights. Each recipe yields its float32 values in
blocks of rows (a few tens of MB), so writing a 1 GB initializer never holds it.

While the graph is built the recipes travel as:
- in onnx_ir: :class:`LazyArray`, a zero-stride numpy array of the right shape (no
  memory) carrying its recipe; :func:`lazy_folding` makes onnxscript fold a Transpose of
  one into another LazyArray instead of computing it (any other fold of a weight is an
  error, never zeros in the package);
- in a ModelProto: an external-data tensor whose location is ``LAZY_PREFIX`` + an id
  (:func:`lazy_proto`, :func:`recipe_of`); graph_rewrites.py asks :func:`transposed` and
  :func:`concatenated` for its rearrangements, which keep such tensors lazy.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

LAZY_PREFIX = "moechat-lazy:"
BLOCK_BYTES = 16 << 20  # rows per block written: about this many bytes of float32

Reader = Callable[[str, tuple], torch.Tensor]  # (name, index) -> float32 tensor[index]
FLOAT32 = np.dtype(np.float32)


class Recipe(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def rows(self, start: int, stop: int) -> np.ndarray: ...


class Recipe2D(Recipe, Protocol):
    def cols(self, start: int, stop: int) -> np.ndarray: ...


class _Float:
    dtype = FLOAT32


@dataclass(frozen=True)
class Source(_Float):
    """A checkpoint tensor (internal name), read through ``reader``."""

    name: str
    shape: tuple[int, ...]
    reader: Reader

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.reader(self.name, (slice(start, stop),)).numpy()

    def cols(self, start: int, stop: int) -> np.ndarray:
        return self.reader(self.name, (slice(None), slice(start, stop))).numpy()


@dataclass(frozen=True)
class Computed(_Float):
    """Values at hand (the RoPE tables, weights read at trace time): they are small."""

    value: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.value[start:stop]

    def cols(self, start: int, stop: int) -> np.ndarray:
        return self.value[:, start:stop]


@dataclass(frozen=True)
class Transposed(_Float):
    """A 2-D source, transposed (a Linear weight as a MatMul reads it)."""

    child: Source
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.child.cols(start, stop).T

    def cols(self, start: int, stop: int) -> np.ndarray:
        return self.child.rows(start, stop).T


@dataclass(frozen=True)
class Concatenated(_Float):
    """2-D recipes side by side along the columns (fused q/k/v, gate/up)."""

    parts: tuple[Recipe2D, ...]
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([p.rows(start, stop) for p in self.parts], axis=1)

    def cols(self, start: int, stop: int) -> np.ndarray:
        out, offset = [], 0
        for p in self.parts:
            a, b = max(start, offset), min(stop, offset + p.shape[1])
            if a < b:
                out.append(p.cols(a - offset, b - offset))
            offset += p.shape[1]
        return np.concatenate(out, axis=1)


@dataclass(frozen=True)
class PackedExperts(_Float):
    """The MoE op's expert weights [E, ...]: fc1 = gate/up rows interleaved (``up`` given),
    fc2 = down stacked (models/modeling.py, MoEFeedForward.pack_experts)."""

    gate: tuple[Source, ...]
    up: tuple[Source, ...] | None
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = []
        for e in range(start, stop):
            g = self.gate[e].rows(0, self.gate[e].shape[0])
            if self.up is not None:
                u = self.up[e].rows(0, self.up[e].shape[0])
                g = np.stack((g, u), axis=1).reshape(-1, g.shape[1])
            out.append(g)
        return np.stack(out)


@dataclass(frozen=True)
class Mapped:
    """``fn`` applied to blocks of another recipe's rows (``by`` "rows") or 2-D columns
    (``by`` "cols"; each block of output rows is ``fn`` of those columns): quantisers whose
    rows (or columns) are independent."""

    child: Recipe
    fn: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]
    dtype: np.dtype
    by: str = "rows"

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.by == "cols":
            part = cast(Recipe2D, self.child).cols(start, stop)
        else:
            part = self.child.rows(start, stop)
        return self.fn(np.ascontiguousarray(part))


def mapped(child: Recipe, fn: Callable[[np.ndarray], np.ndarray], by: str = "rows") -> Mapped:
    """``fn`` over ``child`` by rows or columns; shape and dtype from a one-row probe."""
    n = child.shape[0] if by == "rows" else child.shape[1]
    first = child.rows(0, 1) if by == "rows" else cast(Recipe2D, child).cols(0, 1)
    probe = fn(np.ascontiguousarray(first))
    return Mapped(child, fn, (n, *probe.shape[1:]), probe.dtype, by)


def row_blocks(recipe: Recipe) -> Iterator[np.ndarray]:
    """The recipe's values in C order, a block of whole rows at a time: about BLOCK_BYTES
    of float32 input per block (quantisers write fewer bytes than they read)."""
    shape = recipe.shape
    row_bytes = max(recipe.dtype.itemsize, 4) * int(np.prod(shape[1:], dtype=np.int64))
    if isinstance(recipe, Mapped):  # what a row costs is the float32 input it reads
        child = recipe.child.shape
        row_bytes = 4 * (
            int(np.prod(child[1:], dtype=np.int64)) if recipe.by == "rows" else child[0]
        )
    step = max(1, BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, shape[0] if shape else 1, step):
        block = recipe.rows(start, min(start + step, shape[0]))
        yield np.ascontiguousarray(block, dtype=recipe.dtype)


def nbytes(recipe: Recipe) -> int:
    return recipe.dtype.itemsize * int(np.prod(recipe.shape, dtype=np.int64))


# -- onnx_ir: zero-memory arrays that carry their recipe -------------------------------


class LazyArray(np.ndarray):
    recipe: Recipe | None

    def __array_finalize__(self, obj: object) -> None:
        # a same-shape view (onnxscript views arrays as their dtype) keeps the recipe
        same = isinstance(obj, np.ndarray) and obj.shape == self.shape and obj.dtype == self.dtype
        self.recipe = getattr(obj, "recipe", None) if same else None


def lazy_array(recipe: Recipe) -> LazyArray:
    array = np.broadcast_to(np.zeros((), recipe.dtype), recipe.shape).view(LazyArray)
    array.recipe = recipe
    return array


class LazyFoldError(RuntimeError):
    pass


# A fold with no lazy form (MLA's kv_b_proj reshaped and split per head) reads weights of
# up to this size and folds their values, as the whole-model path does; larger ones fail.
READ_TO_FOLD_BYTES = 256 << 20


def _values(array: np.ndarray) -> np.ndarray:
    if not isinstance(array, LazyArray) or array.recipe is None:
        return array
    recipe = array.recipe
    return np.concatenate(list(row_blocks(recipe))).reshape(recipe.shape)


@contextlib.contextmanager
def lazy_folding() -> Iterator[None]:
    """onnxscript's constant folding, with Transposes of lazy weights kept lazy and other
    folds of small weights computed from their values."""
    from onnxscript.optimizer import _constant_folding as folding

    evaluator = folding._reference_evaluator
    original = evaluator.evaluate

    def evaluate(domain: str, op: str, version: int, *args, **kwargs):
        lazy = [a for a in args if isinstance(a, LazyArray)]
        if not lazy:
            return original(domain, op, version, *args, **kwargs)
        if (
            domain == ""
            and op == "Transpose"
            and len(args) == 1
            and args[0].ndim == 2
            and list(kwargs.get("perm") or [1, 0]) == [1, 0]
            and isinstance(args[0].recipe, Source)
        ):
            child = args[0].recipe
            return lazy_array(Transposed(child, child.shape[::-1]))
        if all(a.recipe is not None and nbytes(a.recipe) <= READ_TO_FOLD_BYTES for a in lazy):
            return original(domain, op, version, *map(_values, args), **kwargs)
        raise LazyFoldError(
            f"constant folding of a {op} over checkpoint weights has no streamed form"
        )

    evaluator.evaluate = evaluate
    try:
        yield
    finally:
        evaluator.evaluate = original


# -- ModelProto: lazy tensors as external data with a reserved location --------------


_ids = itertools.count()
_recipes: dict[str, Recipe] = {}


def lazy_location(recipe: Recipe) -> str:
    key = f"{LAZY_PREFIX}{next(_ids)}"
    _recipes[key] = recipe
    return key


def _location(tensor: TensorProto) -> str | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def recipe_of(tensor: TensorProto) -> Recipe | None:
    location = _location(tensor)
    if location is None or not location.startswith(LAZY_PREFIX):
        return None
    return _recipes[location]


def lazy_proto(recipe: Recipe, name: str) -> TensorProto:
    data_type = onnx.helper.np_dtype_to_tensor_dtype(recipe.dtype)
    tensor = TensorProto(name=name, data_type=data_type, dims=recipe.shape)
    set_external(tensor, lazy_location(recipe), 0, nbytes(recipe))
    return tensor


def set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """What onnx.external_data_helper.set_external_data records (it needs raw_data)."""
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def forget() -> None:
    """Drop every recipe (they keep the checkpoint's shards open); after a write."""
    _recipes.clear()


# -- the rearrangements graph_rewrites.py applies to weights --------------------------


def transposed(tensor: TensorProto, name: str) -> TensorProto:
    """``tensor``^T (2-D) as a new initializer ``name``; lazy stays lazy."""
    recipe = recipe_of(tensor)
    if recipe is None:
        w = numpy_helper.to_array(tensor).T
        return numpy_helper.from_array(np.ascontiguousarray(w), name)
    if not isinstance(recipe, Source):
        raise LazyFoldError("only a checkpoint tensor can be transposed lazily")
    return lazy_proto(Transposed(recipe, recipe.shape[::-1]), name)


def renamed(tensor: TensorProto, name: str) -> TensorProto:
    """A copy of ``tensor`` named ``name``; lazy stays lazy."""
    recipe = recipe_of(tensor)
    if recipe is None:
        return numpy_helper.from_array(numpy_helper.to_array(tensor), name)
    return lazy_proto(recipe, name)


def concatenated(tensors: list[TensorProto], name: str) -> TensorProto:
    """2-D tensors side by side (axis 1) as a new initializer ``name``."""
    recipes = [recipe_of(t) for t in tensors]
    if all(r is None for r in recipes):
        arrays = [numpy_helper.to_array(t) for t in tensors]
        return numpy_helper.from_array(np.concatenate(arrays, axis=1), name)
    parts = tuple(
        Computed(numpy_helper.to_array(t)) if r is None else cast(Recipe2D, r)
        for t, r in zip(tensors, recipes, strict=True)
    )  # small weights were read at trace time (export/streamed.py, SMALL)
    width = sum(p.shape[1] for p in parts)
    return lazy_proto(Concatenated(parts, (parts[0].shape[0], width)), name)


def map_rows(tensor: TensorProto, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> TensorProto:
    """``fn`` of ``tensor`` (whose rows ``fn`` treats independently) as initializer ``name``;
    lazy stays lazy, computed block by block when written."""
    recipe = recipe_of(tensor)
    if recipe is None:
        return numpy_helper.from_array(fn(numpy_helper.to_array(tensor)), name)
    return lazy_proto(mapped(recipe, fn), name)


def equal_transposed(w: TensorProto, table: TensorProto) -> bool:
    """Is ``w`` the transpose of ``table``? Lazy weights: the same checkpoint tensor."""
    rw, rt = recipe_of(w), recipe_of(table)
    if rw is None and rt is None:
        return bool(np.array_equal(numpy_helper.to_array(w).T, numpy_helper.to_array(table)))
    return isinstance(rw, Transposed) and isinstance(rt, Source) and rw.child.name == rt.name
