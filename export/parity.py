"""PyTorch vs onnxruntime parity, measured by the exporter on every package.

Each prompt runs as: prefill, 16 greedy decode steps, then a multi-token append onto
the non-empty cache. Tolerance is relative to the logit scale (max |logit|).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moechat.models.config import ModelConfig
from moechat.models.modeling import CausalLM
from moechat.runtime.decoder import Decoder
from moechat.runtime.errors import MoechatError
from moechat.runtime.providers import create_session

DECODE_STEPS = 16


def cpu_decoder(
    graph: Path, cfg: ModelConfig, max_context: int, kv_dtype: type = np.float32
) -> Decoder:
    """A growing-cache decoder on the CPU provider, for checking an exported graph."""
    session = create_session(graph, "CPUExecutionProvider")
    return Decoder(
        session, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
        max_context=max_context, static_cache=False, kv_dtype=kv_dtype,
        value_head_dim=cfg.value_head_dim, present_new_only=cfg.is_mla,
    )  # fmt: skip


@dataclass
class ParityReport:
    max_abs_diff: float
    logit_scale: float
    relative: float
    greedy_match: bool
    prompts: int
    tokens: int
    decode_steps: int = DECODE_STEPS

    def to_dict(self) -> dict:
        return asdict(self)


def parity_prompts(
    vocab_size: int, tokenizer_ids: list[list[int]] | None = None, seed: int = 0
) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab_size, size=n).tolist() for n in (1, 7, 33)]
    return prompts + [p for p in (tokenizer_ids or []) if p]


def check_finite(ref: np.ndarray, got: np.ndarray) -> None:
    """Non-finite logits fail the check: ``max(0.0, nan)`` is 0.0, so a NaN would
    otherwise read as perfect parity."""
    for name, logits in (("PyTorch", ref), ("onnxruntime", got)):
        bad = int(np.size(logits) - np.count_nonzero(np.isfinite(logits)))
        if bad:
            raise MoechatError(
                f"parity check failed: {name} computed {bad} non-finite logit(s) (NaN or "
                "infinity); the checkpoint's weights or config values are broken"
            )


def measure_parity(
    model: CausalLM,
    decoder: Decoder,
    prompts: list[list[int]],
    append: int = 5,
    decode_steps: int = DECODE_STEPS,
) -> ParityReport:
    max_diff = scale = 0.0
    greedy_match = True
    tokens = 0
    rng = np.random.default_rng(1)
    for prompt in prompts:
        decoder.reset()
        past = model.empty_cache()
        ref, past = model.step(torch.tensor([prompt]), past)
        got = decoder.forward(prompt, logits_for="all")
        steps = [(ref[0].numpy(), got)]
        token = int(ref[0, -1].argmax())
        for _ in range(decode_steps):
            ref, past = model.step(torch.tensor([[token]]), past)
            got = decoder.forward([token])
            steps.append((ref[0].numpy(), got))
            greedy_match &= int(np.argmax(got[-1])) == int(ref[0, -1].argmax())
            token = int(ref[0, -1].argmax())
        chunk = rng.integers(0, model.config.vocab_size, size=append).tolist()
        ref, past = model.step(torch.tensor([chunk]), past)
        steps.append((ref[0].numpy(), decoder.forward(chunk, logits_for="all")))
        for r, g in steps:
            check_finite(r, g)
            max_diff = max(max_diff, float(np.abs(r - g).max()))
            scale = max(scale, float(np.abs(r).max()))
            tokens += r.shape[0]
    decoder.reset()
    return ParityReport(
        max_diff, scale, max_diff / max(scale, 1e-9), greedy_match, len(prompts), tokens,
        decode_steps,
    )  # fmt: skip
