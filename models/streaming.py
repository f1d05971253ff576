"""A checkpoint read tensor by tensor: safetensors shards memory-mapped, never loaded whole.

``moechat export`` of a large model never builds the model in float32: the graph is
traced from a model whose weights are fake (export/streamed.py) and each weight is read
from its shard when it is written (bf16/fp16 -> float32, one tensor or row block at a
time). Names are the checkpoint's keys mapped to :class:`CausalLM`'s exactly as
:func:`moechat.models.loading.build_model` maps them, and checked the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moechat.models.config import ModelConfig
from moechat.models.families import ExpertView, is_stacked, stacked_views, to_internal_keys
from moechat.models.gguf_streaming import GGUFPart, gguf_not_streamable, index_gguf
from moechat.models.loading import check_names_and_shapes, check_sizes, clean_key, weight_files
from moechat.models.mla import beyond_last_layer, rope_row_order
from moechat.models.modeling import CausalLM
from moechat.runtime.errors import MoechatError

# Rows read at once when comparing or converting a large tensor: ~64 MB of float32.
_BLOCK_BYTES = 64 << 20


def not_streamable(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` (or GGUF file) cannot be exported streamed (None:
    it can)."""
    if folder.suffix == ".gguf" and folder.is_file():
        return gguf_not_streamable(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return (
            "it is neither a Hugging Face folder (config.json + safetensors shards) nor a GGUF file"
        )
    files = weight_files(folder)
    if any(f.suffix != ".safetensors" for f in files):
        return "its weights are not safetensors"
    return None


@dataclass
class StreamedCheckpoint:
    """What :class:`moechat.models.loading.LoadedCheckpoint` holds, minus the model."""

    config: ModelConfig
    source: Path
    weight_files: list[Path]
    tokenizer_dir: Path | None
    # internal name -> (index in weight_files, key), or its place in a GGUF file
    keys: dict[str, tuple[int, str] | GGUFPart]
    shapes: dict[str, tuple[int, ...]]
    model: CausalLM  # on the meta device: the structure to trace, no weights
    views: dict[str, ExpertView] = field(default_factory=dict)  # experts in stacked tensors
    # MLA's interleaved rope rows: the stored rows that make each row (rotate-half layout)
    row_orders: dict[str, torch.Tensor] = field(default_factory=dict)
    release_mapped: Callable[[], None] | None = None  # a GGUF file's pages
    _files: ExitStack = field(default_factory=ExitStack, repr=False)
    _handles: list = field(default_factory=list, repr=False)

    def _handle(self, index: int):
        from safetensors import safe_open

        while len(self._handles) < len(self.weight_files):
            f = self.weight_files[len(self._handles)]
            self._handles.append(self._files.enter_context(safe_open(str(f), "pt")))
        return self._handles[index]

    def read(self, name: str, index: tuple | slice = slice(None)) -> torch.Tensor:
        """``tensor[name][index]`` as float32 (a copy), read from the memory-mapped shard."""
        where = self.keys[name]
        if isinstance(where, GGUFPart):
            return where.read(index)
        shard, key = where
        stored = self._handle(shard).get_slice(key)
        view, order = self.views.get(name), self.row_orders.get(name)
        if order is not None:  # rows permuted within a head: read the span they come from
            parts = index if isinstance(index, tuple) else (index,)
            rows = order[parts[0] if parts else slice(None)]
            low = int(rows.min()) if len(rows) else 0
            span = stored[(slice(low, int(rows.max()) + 1 if len(rows) else 0), *parts[1:])]
            return span[rows - low].to(torch.float32, copy=True)
        if view is None:
            return stored[index].to(torch.float32, copy=True)
        part = stored[view.stored_index(index)][0]
        return (part.T if view.transposed else part).to(torch.float32, copy=True).contiguous()

    def release(self) -> None:
        """Unmap the shards: the pages read so far leave this process's resident set
        (they are the page cache's to keep); the next read maps them again."""
        self._files.close()
        self._handles.clear()
        if self.release_mapped is not None:
            self.release_mapped()

    def tensor(self, name: str) -> torch.Tensor:
        return self.read(name)

    def row_blocks(self, name: str) -> Iterator[torch.Tensor]:
        """``tensor[name]`` in blocks of whole rows (first axis), float32."""
        shape = self.shapes[name]
        row = max(1, int(torch.tensor(shape[1:]).prod()) * 4) if len(shape) > 1 else 4
        step = max(1, _BLOCK_BYTES // row)
        for start in range(0, shape[0], step):
            yield self.read(name, slice(start, min(start + step, shape[0])))

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        """Layer ``index``'s weights (float32), names relative to the layer."""
        prefix = f"model.layers.{index}."
        return {k[len(prefix) :]: self.tensor(k) for k in self.keys if k.startswith(prefix)}


def _same_tensor(ckpt: StreamedCheckpoint, a: str, b: str) -> bool:
    if ckpt.shapes[a] != ckpt.shapes[b]:
        return False
    blocks = zip(ckpt.row_blocks(a), ckpt.row_blocks(b), strict=True)
    return all(torch.equal(x, y) for x, y in blocks)


def open_streamed(source: Path, max_positions: int = 4096) -> StreamedCheckpoint:
    """Index ``source``'s tensors (safetensors shards or a GGUF file); check names and
    shapes as a load would."""
    if source.suffix == ".gguf" and source.is_file():
        index = index_gguf(source)  # its own one-line error for what cannot stream
        cfg = index.config
        keys: dict[str, tuple[int, str] | GGUFPart] = dict(index.parts)
        ckpt = StreamedCheckpoint(
            cfg, source, [source], index.tokenizer_dir, keys, dict(index.shapes),
            meta_model(cfg), release_mapped=index.release,
        )  # fmt: skip
        return _checked(ckpt, max_positions)
    reason = not_streamable(source)
    if reason is not None:
        raise MoechatError(f"{source} cannot be exported streamed: {reason}")
    return _checked(_index_safetensors(source), max_positions)


def _index_safetensors(folder: Path) -> StreamedCheckpoint:
    from safetensors import safe_open

    cfg = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text("utf-8")))
    files = weight_files(folder)
    # meta tensors stand in for the weights: renames keep the object, so each internal
    # name leads back to its shard and key
    origin: dict[int, tuple[int, str]] = {}
    state: dict[str, torch.Tensor] = {}
    stacked: dict[str, torch.Tensor] = {}  # internal name -> meta tensor of one expert
    views: dict[str, ExpertView] = {}
    for shard, path in enumerate(files):
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    name = clean_key(key)
                    if name is None or (cfg.is_mla and beyond_last_layer(name, cfg)):
                        continue
                    shape = tuple(f.get_slice(key).get_shape())
                    if is_stacked(name):  # each expert read from its place in the stack
                        for internal, view in stacked_views(name, shape, cfg).items():
                            meta = torch.empty(view.rows, view.cols, device="meta")
                            origin[id(meta)], views[internal] = (shard, key), view
                            stacked[internal] = meta
                        continue
                    meta = torch.empty(shape, device="meta")
                    origin[id(meta)] = (shard, key)
                    state[name] = meta
        except MoechatError:
            raise
        except Exception as err:
            raise MoechatError(f"cannot read {path}: {err}") from None
    state = {**to_internal_keys(state, cfg, rearrange=False), **stacked}
    keys = {name: origin[id(t)] for name, t in state.items()}
    orders = {}
    if cfg.is_mla and cfg.rope_interleave:
        orders = {k: o for k in keys if (o := rope_row_order(k, cfg)) is not None}
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    return StreamedCheckpoint(
        cfg, folder, files, folder, dict(keys), shapes, meta_model(cfg), views, orders
    )


def _checked(ckpt: StreamedCheckpoint, max_positions: int) -> StreamedCheckpoint:
    """Sizes, names and tied embeddings decided as build_model decides them."""
    cfg, keys, shapes = ckpt.config, ckpt.keys, ckpt.shapes
    check_sizes(cfg, {k: torch.empty(s, device="meta") for k, s in shapes.items()})
    # tied embeddings as build_model decides them: one table, or an lm_head of its own
    if cfg.tie_word_embeddings or "lm_head.weight" not in keys:
        if "lm_head.weight" in keys and "model.embed_tokens.weight" not in keys:
            keys["model.embed_tokens.weight"] = keys["lm_head.weight"]
            shapes["model.embed_tokens.weight"] = shapes["lm_head.weight"]
        if "lm_head.weight" in keys and not _same_tensor(
            ckpt, "lm_head.weight", "model.embed_tokens.weight"
        ):
            ckpt.config = cfg = cfg.with_changes(tie_word_embeddings=False)
        else:
            ckpt.config = cfg = cfg.with_changes(tie_word_embeddings=True)
            keys.pop("lm_head.weight", None)
            shapes.pop("lm_head.weight", None)
    check_names_and_shapes(cfg, {k: torch.empty(s, device="meta") for k, s in shapes.items()})
    ckpt.model = meta_model(cfg, max_positions)
    if cfg.tie_word_embeddings:  # the traced graph names the shared table lm_head.weight
        keys["lm_head.weight"] = keys["model.embed_tokens.weight"]
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return ckpt


def meta_model(cfg: ModelConfig, max_positions: int = 4096) -> CausalLM:
    """``cfg``'s model on the meta device: shapes, no storage."""
    with torch.device("meta"):
        return CausalLM(cfg, max_positions=max_positions).eval()


def float32_bytes(folder: Path) -> int:
    """What ``folder``'s weights (or a GGUF file's) take as float32 (read from the shards'
    headers)."""
    from safetensors import safe_open

    if folder.suffix == ".gguf" and folder.is_file():
        from moechat.models.gguf import open_gguf

        return sum(4 * int(t.n_elements) for t in open_gguf(folder).tensors)

    total = 0
    for path in weight_files(folder):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                total += 4 * int(torch.Size(f.get_slice(key).get_shape()).numel())
    return total
