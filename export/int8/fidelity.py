"""int8 vs fp32 fidelity on held-out text, measured by ``moechat export --int8``.

Both graphs run the same held-out tokens teacher-forced through their KV caches
(chunks, windows as in ``moechat eval``). Reported:
  top1_agreement     share of positions where both graphs predict the same next token
  mean_kl            mean KL(p_fp32 || p_int8) over positions, in nats
  perplexity_ratio   perplexity(int8) / perplexity(fp32) on the held-out text
  routing_agreement  share of (token, MoE layer) pairs whose top-k expert set is the
                     same in both graphs (MoE models only)
Router logits are read from throwaway copies of both graphs that expose the router
MatMul outputs as extra graph outputs (the copies share the original weight files).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from moechat.export.int8.quantize import find_routers
from moechat.runtime.errors import MoechatError
from moechat.runtime.evaluate import log_softmax, teacher_forced_chunks, windows
from moechat.runtime.providers import create_session

THRESHOLDS = {"perplexity_ratio_max": 1.02, "top1_agreement_min": 0.97}
HELDOUT_MAX_TOKENS = 4096
WINDOW = 512
CHUNK = 128


@dataclass
class FidelityReport:
    text: str
    tokens: int
    top1_agreement: float
    mean_kl: float
    perplexity_fp32: float
    perplexity_int8: float
    perplexity_ratio: float
    routing_agreement: float | None
    routing_agreement_per_layer: list[float] = field(default_factory=list)
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLDS))

    @property
    def misses(self) -> list[str]:
        return threshold_misses(self.to_dict())

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("top1_agreement", "routing_agreement"):
            if d[k] is not None:
                d[k] = round(d[k], 5)
        d["mean_kl"] = float(f"{self.mean_kl:.4g}")
        for k in ("perplexity_fp32", "perplexity_int8", "perplexity_ratio"):
            d[k] = round(d[k], 5)
        d["routing_agreement_per_layer"] = [round(x, 5) for x in self.routing_agreement_per_layer]
        d["passed"] = not threshold_misses(d)
        return d

    def summary(self) -> str:
        routing = (
            f", expert-routing agreement {self.routing_agreement:.2%}"
            if self.routing_agreement is not None
            else ""
        )
        return (
            f"top-1 agreement {self.top1_agreement:.2%}, mean KL {self.mean_kl:.3g} nats, "
            f"perplexity ratio {self.perplexity_ratio:.4f} "
            f"({self.perplexity_int8:.3f} / {self.perplexity_fp32:.3f}){routing} "
            f"on {self.tokens} held-out tokens"
        )


def threshold_misses(report: dict) -> list[str]:
    """The thresholds a fidelity report (``FidelityReport.to_dict()``, as in moechat.json)
    misses, one phrase each."""
    t, out = report["thresholds"], []
    if report["perplexity_ratio"] > t["perplexity_ratio_max"]:
        out.append(
            f"perplexity ratio {report['perplexity_ratio']:.4f} exceeds {t['perplexity_ratio_max']}"
        )
    if report["top1_agreement"] < t["top1_agreement_min"]:
        out.append(
            f"top-1 agreement {report['top1_agreement']:.2%} is below {t['top1_agreement_min']:.0%}"
        )
    return out


def heldout_text() -> str:
    """The project's own held-out text (English and Chinese), shipped as package data."""
    return (resources.files("moechat.export") / "data" / "heldout.txt").read_text("utf-8")


def _with_router_outputs(graph: Path, dest: Path) -> list[str]:
    """Copy ``graph`` (not its weights) to ``dest`` in the same folder, routers as outputs."""
    model = onnx.load(str(graph), load_external_data=False)
    routers = [n.output[0] for n in find_routers(model)]
    present = {o.name for o in model.graph.output}
    for name in routers:
        if name not in present:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    onnx.save_model(model, str(dest))
    return routers


class _Runner:
    """Growing-cache runner that also fetches the router logits."""

    def __init__(self, graph: Path, work: Path, tag: str, arch: dict) -> None:
        copy = work / f".fidelity-{tag}.onnx"
        self.routers = _with_router_outputs(graph, copy)
        try:
            self.session = create_session(copy, "CPUExecutionProvider")
        finally:
            copy.unlink(missing_ok=True)
        layers = arch["num_hidden_layers"]
        self.kv = [(f"past_key_values.{i}.{n}", f"present.{i}.{n}") for i in range(layers) for n in ("key", "value")]  # fmt: skip
        heads, key_dim = arch["num_key_value_heads"], arch["head_dim"]
        value_dim = arch.get("value_head_dim") or key_dim  # MLA: the rope key's width
        self.empty = [np.zeros((1, heads, 0, d), np.float32) for d in (key_dim, value_dim) * layers]
        self.outputs = ["logits"] + [p for _, p in self.kv] + self.routers
        self.new_only = bool(arch.get("kv_lora_rank"))
        self.reset()

    def reset(self) -> None:
        self.past = list(self.empty)
        self.length = 0

    def forward(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        n = len(ids)
        feeds = {
            "input_ids": ids.reshape(1, -1),
            "attention_mask": np.ones((1, self.length + n), np.int64),
            "logits_positions": np.arange(n, dtype=np.int64),
        }
        feeds.update({name: arr for (name, _), arr in zip(self.kv, self.past, strict=True)})
        out = self.session.run(self.outputs, feeds)
        present = out[1 : 1 + len(self.kv)]
        if self.new_only:  # MLA graphs: present holds the new positions
            present = [
                np.concatenate((p, n), axis=2) for p, n in zip(self.past, present, strict=True)
            ]
        self.past = present
        self.length += n
        return out[0][0], [r.reshape(n, -1) for r in out[1 + len(self.kv) :]]


def measure_fidelity(
    fp32_graph: Path,
    int8_graph: Path,
    arch: dict,
    token_ids: Sequence[int],
    text_name: str = "heldout.txt",
    window: int = WINDOW,
    chunk: int = CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> FidelityReport:
    """Compare the two graphs on ``token_ids`` (teacher forcing, chunked, windowed)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if len(ids) < 2:
        raise ValueError("fidelity needs at least 2 held-out tokens")
    work = Path(int8_graph).parent
    ref = _Runner(Path(fp32_graph), Path(fp32_graph).parent, "fp32", arch)
    q = _Runner(Path(int8_graph), work, "int8", arch)
    if len(ref.routers) != len(q.routers):
        raise ValueError(
            f"the int8 graph has {len(q.routers)} routers, the fp32 graph {len(ref.routers)}"
        )
    top_k = int(arch.get("num_experts_per_tok", 1))
    total = sum(e - s for s, e in windows(len(ids), window))
    agree = scored = 0
    kl = nll_ref = nll_q = 0.0
    route_same = np.zeros(len(ref.routers))
    route_tokens = 0
    fed = 0
    for new_window, a, b, n in teacher_forced_chunks(len(ids), window, chunk):
        if new_window:
            ref.reset()
            q.reset()
        lr, rr = ref.forward(ids[a:b])
        lq, rq = q.forward(ids[a:b])
        for name, logits in (("fp32", lr), ("int8", lq)):
            if not np.isfinite(logits).all():  # max(nan, 0.0) would hide it in the report
                raise MoechatError(f"the {name} graph computed non-finite logits (NaN or infinity)")
        for i, (x, y) in enumerate(zip(rr, rq, strict=True)):
            route_same[i] += same_topk(x, y, top_k).sum()
        route_tokens += b - a
        fed += b - a
        if n:
            pr, pq = log_softmax(lr[:n]), log_softmax(lq[:n])
            target = ids[a + 1 : a + 1 + n]
            rows = np.arange(n)
            nll_ref -= float(pr[rows, target].sum())
            nll_q -= float(pq[rows, target].sum())
            kl += float((np.exp(pr) * (pr - pq)).sum())
            agree += int((pr.argmax(-1) == pq.argmax(-1)).sum())
            scored += n
        if progress is not None:
            progress(fed, total)
    per_layer = (route_same / max(route_tokens, 1)).tolist()
    ppl_ref, ppl_q = math.exp(nll_ref / scored), math.exp(nll_q / scored)
    return FidelityReport(
        text=text_name,
        tokens=scored,
        top1_agreement=agree / scored,
        mean_kl=max(kl / scored, 0.0),  # >= 0 in exact arithmetic; rounding gave -9e-170
        perplexity_fp32=ppl_ref,
        perplexity_int8=ppl_q,
        perplexity_ratio=ppl_q / ppl_ref,
        routing_agreement=float(np.mean(per_layer)) if per_layer else None,
        routing_agreement_per_layer=per_layer,
    )


def same_topk(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row: is the set of the k largest entries the same in a and b?"""
    ta = np.sort(np.argpartition(-a, k - 1, axis=-1)[:, :k], axis=-1)
    tb = np.sort(np.argpartition(-b, k - 1, axis=-1)[:, :k], axis=-1)
    return (ta == tb).all(axis=-1)
