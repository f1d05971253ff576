"""Where the int8 error of a Llama-layout dense model comes from: a PyTorch fake-quant
simulation of onnxruntime's 8-bit ``MatMulNBits`` with ``accuracy_level=4`` (weights
and activations symmetric int8, one scale per block along the reduction axis), scored
like ``moechat export --int8`` scores its graph (top-1 agreement and mean KL against
fp32 on the shipped held-out text, windows of 512). Not a test.

    python benchmarks/int8_error_sim.py HF_FOLDER [--block 64]

HF_FOLDER: a Hugging Face Llama folder (config.json, model.safetensors,
tokenizer.json), e.g. the one ``moechat bench --compare`` leaves in its cache for
SmolLM2-135M-Instruct. The lm_head stays float (the exporter rescores its top logits
in float). Variants: no smoothing; SmoothQuant alpha 0.5 (what the exporter does);
int8 weights only; int8 activations only; the residual stream rotated by a random
orthogonal matrix (QuaRot-style, exact in fp32) with smoothing. Results:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "export" / "data"
WINDOW = 512


def fake_quant(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 per block of ``block`` values along the last axis, dequantised."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(x.shape)


class SimulatedLlama:
    """Full-sequence Llama forward with norm weights folded into the matmuls they feed;
    ``divisors`` hold each smoothed activation's per-channel divisor."""

    def __init__(self, folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        self.cfg = cfg
        sd = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        embed = sd["model.embed_tokens.weight"]
        lm = sd.get("lm_head.weight", embed)
        self.w = {"embed": embed.clone(), "lm": lm * sd["model.norm.weight"]}
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            qkv = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            gate_up = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            self.w[i] = {
                "qkv": qkv * sd[p + "input_layernorm.weight"],
                "o": sd[p + "self_attn.o_proj.weight"].clone(),
                "gate_up": gate_up * sd[p + "post_attention_layernorm.weight"],
                "down": sd[p + "mlp.down_proj.weight"].clone(),
                "attn_in": torch.ones(cfg["hidden_size"]),
                "mlp_in": torch.ones(cfg["hidden_size"]),
                "down_in": torch.ones(cfg["intermediate_size"]),
            }
        self.quant_weights: dict | None = None
        self.quant_acts = 0  # activation block, 0 = float

    def quantize(self, block: int, weights: bool = True, activations: bool = True) -> None:
        self.quant_acts = block if activations else 0
        self.quant_weights = None
        if weights:
            self.quant_weights = {
                (i, k): fake_quant(self.w[i][k], block)
                for i in range(self.cfg["num_hidden_layers"])
                for k in ("qkv", "o", "gate_up", "down")
            }

    def _linear(self, x: torch.Tensor, i: int, key: str) -> torch.Tensor:
        w = self.quant_weights[(i, key)] if self.quant_weights else self.w[i][key]
        return (fake_quant(x, self.quant_acts) if self.quant_acts else x) @ w.T

    @torch.no_grad()
    def forward(self, ids: list[int], maxima: dict | None = None) -> torch.Tensor:
        """Log-probabilities [T, vocab]; ``maxima`` collects per-channel |activation| maxima."""
        cfg, t = self.cfg, len(ids)
        heads, kv, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        eps = cfg["rms_norm_eps"]
        freqs = torch.outer(
            torch.arange(t).float(),
            1.0 / cfg["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim),
        )
        cos, sin = freqs.cos(), freqs.sin()

        def rope(x: torch.Tensor) -> torch.Tensor:
            a, b = x[..., : dim // 2], x[..., dim // 2 :]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

        def observe(i: int, name: str, x: torch.Tensor) -> None:
            if maxima is not None:
                old = maxima.get((i, name), torch.zeros(x.shape[-1]))
                maxima[(i, name)] = torch.maximum(old, x.abs().amax(0))

        def norm(x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

        mask = torch.full((t, t), float("-inf")).triu(1)
        h = self.w["embed"][torch.tensor(ids)]
        for i in range(cfg["num_hidden_layers"]):
            w = self.w[i]
            x = norm(h) / w["attn_in"]
            observe(i, "attn_in", x)
            qkv = self._linear(x, i, "qkv")
            q = qkv[:, : heads * dim].view(t, heads, dim).transpose(0, 1)
            k = qkv[:, heads * dim : (heads + kv) * dim].view(t, kv, dim).transpose(0, 1)
            v = qkv[:, (heads + kv) * dim :].view(t, kv, dim).transpose(0, 1)
            k = rope(k).repeat_interleave(heads // kv, 0)
            v = v.repeat_interleave(heads // kv, 0)
            scores = rope(q) @ k.transpose(1, 2) / math.sqrt(dim) + mask
            attn = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(t, heads * dim)
            h = h + self._linear(attn, i, "o")
            x = norm(h) / w["mlp_in"]
            observe(i, "mlp_in", x)
            gate, up = self._linear(x, i, "gate_up").chunk(2, -1)
            m = torch.nn.functional.silu(gate) * up / w["down_in"]
            observe(i, "down_in", m)
            h = h + self._linear(m, i, "down")
        return torch.log_softmax(norm(h) @ self.w["lm"].T, -1)

    def smooth(self, calibration: list[int], alpha: float = 0.5) -> None:
        """SmoothQuant: activation channel j divided by s_j, the weights it meets times s_j."""
        maxima: dict = {}
        self.forward(calibration, maxima)
        for i in range(self.cfg["num_hidden_layers"]):
            w = self.w[i]
            for act, weight in (("attn_in", "qkv"), ("mlp_in", "gate_up"), ("down_in", "down")):
                w_max = w[weight].abs().amax(0).clamp_min(1e-8)
                s = maxima[(i, act)].clamp_min(1e-8) ** alpha / w_max ** (1 - alpha)
                w[act] = w[act] * s
                w[weight] = w[weight] * s

    def rotate_residual(self, q: torch.Tensor) -> None:
        """h -> h q everywhere (exact in fp32: RMSNorm is rotation invariant once its
        weight is folded)."""
        self.w["embed"] = self.w["embed"] @ q
        self.w["lm"] = self.w["lm"] @ q
        for i in range(self.cfg["num_hidden_layers"]):
            w = self.w[i]
            w["qkv"], w["gate_up"] = w["qkv"] @ q, w["gate_up"] @ q
            w["o"], w["down"] = q.T @ w["o"], q.T @ w["down"]


def score(model: SimulatedLlama, windows: list[list[int]], reference: list) -> str:
    agree = kl = count = 0.0
    for ids, ref in zip(windows, reference, strict=True):
        logp = model.forward(ids)
        agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        count += len(ids)
    return f"top-1 {agree / count:.2%}  mean KL {kl / count:.5f}  ({int(count)} tokens)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_folder", type=Path)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(args.hf_folder / "tokenizer.json"))
    held = tokenizer.encode((DATA / "heldout.txt").read_text("utf-8")).ids
    calibration = tokenizer.encode((DATA / "calibration.txt").read_text("utf-8")).ids[:1024]
    windows = [held[j : j + WINDOW] for j in range(0, len(held), WINDOW)]
    windows = [w for w in windows if len(w) > 16]
    reference = [SimulatedLlama(args.hf_folder).forward(w) for w in windows]
    hidden = json.loads((args.hf_folder / "config.json").read_text())["hidden_size"]
    torch.manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(hidden, hidden))[0]

    def variant(name: str, smooth: bool, rotate: bool = False, **quant) -> None:
        model = SimulatedLlama(args.hf_folder)
        if rotate:
            model.rotate_residual(rotation)
        if smooth:
            model.smooth(calibration)
        model.quantize(args.block, **quant)
        print(f"{name:45s} {score(model, windows, reference)}", flush=True)

    variant("no smoothing", smooth=False)
    variant("smoothing alpha 0.5 (the exporter)", smooth=True)
    variant("smoothing, int8 weights only", smooth=True, activations=False)
    variant("smoothing, int8 activations only", smooth=True, weights=False)
    variant("residual stream rotated + smoothing", smooth=True, rotate=True)


if __name__ == "__main__":
    main()
