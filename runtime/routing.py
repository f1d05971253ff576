"""Which experts each token chose, from the router logits a package exposes (numpy only).

Exported graphs declare every MoE layer's router logits as an extra output,
``router_logits.{layer}`` [tokens, experts] (export/routing_outputs.py): the router
MatMul runs anyway, and an output nobody fetches costs nothing (docs/benchmarks.md).
moechat.json's ``routing`` section names them and, for DeepSeek-V3's ``noaux_tc``
router, records each layer's score correction bias (a constant inside the graph the
runtime cannot read without onnx). :func:`route` then chooses the experts and their
weights exactly as the family does (models/ops.py ``route``, models/mla.py
``route_grouped``): softmax top-k with or without renormalisation; DeepSeek-V2
``greedy`` / ``group_limited_greedy``; V3 ``noaux_tc`` (sigmoid scores, the bias for
the choice only, groups scored by their best two); times ``routed_scaling_factor``.

Experts come best first (rank 0 = the top expert), as ``torch.topk`` orders them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from moechat.runtime.errors import MoechatError
from moechat.runtime.evaluate import DEFAULT_CHUNK, teacher_forced_chunks

if TYPE_CHECKING:
    from moechat.runtime.decoder import Decoder
    from moechat.runtime.model import LoadedModel

Scoring = Literal["softmax", "sigmoid"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
OUTPUT_PREFIX = "router_logits."


def output_name(layer: int) -> str:
    """The graph output holding layer ``layer``'s router logits."""
    return f"{OUTPUT_PREFIX}{layer}"


def moe_layers(arch: dict[str, Any]) -> list[int]:
    """Indices of the layers with routed experts (a ModelConfig / moechat.json dict)."""
    if not arch.get("use_moe"):
        return []
    dense = set(arch.get("dense_layers") or ())
    return [i for i in range(int(arch["num_hidden_layers"])) if i not in dense]


@dataclass(frozen=True)
class RouterSpec:
    """How a family turns router logits into experts and weights (ModelConfig's fields)."""

    num_experts: int
    top_k: int
    normalize: bool = True
    scoring: Scoring = "softmax"
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0  # routed_scaling_factor

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> RouterSpec:
        try:
            spec = cls(
                num_experts=int(arch["n_routed_experts"]),
                top_k=int(arch["num_experts_per_tok"]),
                normalize=bool(arch.get("norm_topk_prob", True)),
                scoring=cast(Scoring, arch.get("scoring_func", "softmax")),
                topk_method=cast(TopkMethod, arch.get("topk_method", "greedy")),
                n_group=int(arch.get("n_group", 1)),
                topk_group=int(arch.get("topk_group", 1)),
                scale=float(arch.get("routed_scaling_factor", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise MoechatError(f"the architecture does not describe its router: {err}") from None
        if spec.scoring not in ("softmax", "sigmoid") or spec.topk_method not in (
            "greedy", "group_limited_greedy", "noaux_tc"
        ):  # fmt: skip
            raise MoechatError(
                f"unknown router ({spec.scoring} scores, topk_method {spec.topk_method})"
            )
        if not 1 <= spec.top_k <= spec.num_experts or spec.num_experts % spec.n_group:
            raise MoechatError(
                f"inconsistent router: top-{spec.top_k} of {spec.num_experts} experts "
                f"in {spec.n_group} groups"
            )
        return spec

    def with_top_k(self, top_k: int) -> RouterSpec:
        return RouterSpec(**{**self.__dict__, "top_k": top_k})


@dataclass(frozen=True)
class Routing:
    """One layer's choice for T tokens: ``experts`` [T, k] (best first), ``weights`` [T, k]
    (what multiplies each expert's output)."""

    experts: np.ndarray
    weights: np.ndarray


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (ties: the lower index first)."""
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]


def route(logits: np.ndarray, spec: RouterSpec, bias: np.ndarray | None = None) -> Routing:
    """The experts and weights of ``logits`` [T, E]; ``bias`` [E]: noaux_tc's correction."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1, spec.num_experts)
    if spec.scoring == "softmax":
        scores = _softmax(logits)
    else:
        scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    choice = scores
    if spec.topk_method == "noaux_tc":
        if bias is None:
            raise MoechatError("noaux_tc routing needs the score correction bias")
        choice = scores + np.asarray(bias, dtype=np.float32)
    if spec.topk_method != "greedy":
        t, e = choice.shape
        grouped = choice.reshape(t, spec.n_group, e // spec.n_group)
        if spec.topk_method == "noaux_tc":  # a group's score: the sum of its best two
            group_scores = -np.sort(-grouped, axis=-1)[:, :, :2].sum(axis=-1)
        else:
            group_scores = grouped.max(axis=-1)
        keep = _top(group_scores, spec.topk_group)
        mask = np.zeros((t, spec.n_group), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        mask = np.repeat(mask, e // spec.n_group, axis=1)
        fill = -np.inf if spec.topk_method == "noaux_tc" else 0.0
        choice = np.where(mask, choice, np.float32(fill))
    experts = _top(choice, spec.top_k)
    weights = np.take_along_axis(scores, experts, axis=1)
    if spec.normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    if spec.scale != 1.0:
        weights = weights * np.float32(spec.scale)
    return Routing(experts=experts.astype(np.int64), weights=weights.astype(np.float32))


@dataclass(frozen=True)
class PackageRouting:
    """A package's routing outputs: which graph output is which MoE layer's router, the
    rule that picks experts, and noaux_tc's correction bias per layer."""

    layers: list[int]  # MoE layer indices, in output order
    outputs: list[str]  # graph output names, one per layer
    spec: RouterSpec
    correction_bias: dict[int, np.ndarray]  # layer -> [E] (noaux_tc only)

    def route_layer(self, index: int, logits: np.ndarray) -> Routing:
        """Routing of the ``index``-th routed layer (``self.layers[index]``)."""
        return route(logits, self.spec, self.correction_bias.get(self.layers[index]))


@dataclass(frozen=True)
class RoutedGraph:
    """A package's graph with router outputs added outside the runtime (onnx, in
    export/routing_outputs.py ``routed_graph``), for packages exported before routing
    left the graph; ``section`` stands in for moechat.json's ``routing``."""

    graph: bytes
    section: dict[str, Any]


def package_routing(arch: dict[str, Any], section: Any, where: str) -> PackageRouting | None:
    """Read moechat.json's ``routing`` section (None: the package has none; ``where``
    names the package in errors)."""
    if section is None:
        return None
    bad = f"{where}: moechat.json's 'routing' section is corrupt"
    if not isinstance(section, dict):
        raise MoechatError(f"{bad}: not an object")
    layers, outputs = section.get("layers"), section.get("outputs")
    if (
        not isinstance(layers, list)
        or not isinstance(outputs, list)
        or len(layers) != len(outputs)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        or not all(isinstance(o, str) for o in outputs)
    ):
        raise MoechatError(f"{bad}: 'layers' and 'outputs' must be lists of equal length")
    spec = RouterSpec.from_arch(arch)
    biases: dict[int, np.ndarray] = {}
    raw = section.get("correction_bias") or {}
    if not isinstance(raw, dict):
        raise MoechatError(f"{bad}: 'correction_bias' must map layers to lists")
    for key, values in raw.items():
        try:
            layer, bias = int(key), np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            raise MoechatError(f"{bad}: 'correction_bias.{key}' is not a list of numbers") from None
        if bias.shape != (spec.num_experts,):
            raise MoechatError(f"{bad}: 'correction_bias.{key}' needs {spec.num_experts} values")
        biases[layer] = bias
    if spec.topk_method == "noaux_tc" and set(biases) != set(layers):
        raise MoechatError(f"{bad}: noaux_tc routing needs a correction bias for every layer")
    return PackageRouting(layers=layers, outputs=outputs, spec=spec, correction_bias=biases)


def require_routing(model: LoadedModel) -> PackageRouting:
    """The model's routing outputs, or a one-line error saying why there are none."""
    if model.routing is not None:
        return model.routing
    if not model.package.spec.architecture.use_moe:
        raise MoechatError(f"{model.name} is a dense model: it has no experts to look inside")
    raise MoechatError(
        f"{model.package.path} was exported before moechat exposed routing: re-export it "
        "with `moechat export` (the demo: `moechat demo build --force`) to look inside its "
        "experts"
    )


def collect_routing(
    decoder: Decoder,
    routing: PackageRouting,
    token_ids: Sequence[int],
    window: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> list[Routing]:
    """Teacher-force ``token_ids`` through the cache (chunks and windows as ``moechat eval``
    walks a text) and return each MoE layer's routing of every token, [T, k] per layer.

    Each token is routed once: a window's first token, already fed as the previous
    window's last, is not counted again. ``progress(tokens_done)`` after each chunk.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    window = min(window or decoder.max_context, decoder.max_context)
    parts: list[list[np.ndarray]] = [[] for _ in routing.outputs]
    first = True
    for new_window, a, b, _ in teacher_forced_chunks(len(ids), max(window, 2), chunk):
        if new_window:
            decoder.reset()
        _, logits = decoder.forward_routed(ids[a:b], logits_for="last")
        skip = 1 if new_window and not first else 0
        first = False
        for layer, x in zip(parts, logits, strict=True):
            layer.append(x[skip:])
        if progress is not None:
            progress(b)
    decoder.reset()
    return [
        routing.route_layer(i, np.concatenate(p) if p else np.zeros((0, routing.spec.num_experts)))
        for i, p in enumerate(parts)
    ]
