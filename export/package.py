"""Write a self-contained model package: graph, tokenizer and moechat.json.

The package is assembled in a temporary folder beside OUTDIR and renamed into place
only after parity passed, so a failed export never leaves a half-written package.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime
import torch

if TYPE_CHECKING:
    from moechat.export.int8.quantize import QuantizeOptions

import moechat
from moechat.export.onnx_graph import export_decoder
from moechat.export.options import ExportOptions
from moechat.export.parity import DECODE_STEPS, cpu_decoder, measure_parity, parity_prompts
from moechat.export.routing_outputs import routing_section
from moechat.models.loading import LoadedCheckpoint
from moechat.models.modeling import parameter_counts
from moechat.models.streaming import StreamedCheckpoint
from moechat.runtime.chat_template import describe_template
from moechat.runtime.errors import MoechatError
from moechat.runtime.jinja_template import SPECIAL_KEYS
from moechat.runtime.package import FORMAT_VERSION, MANIFEST, sha256_file
from moechat.runtime.tokenizer import TextTokenizer

PARITY_TOLERANCE = 1e-4  # max |Δlogit| relative to the logit scale, fp32
QUICK_DECODE_STEPS = 8
DEFAULT_SYSTEM = "You are a helpful assistant"


def _tokenizer_config(tokenizer_dir: Path | None) -> dict:
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer_config.json").is_file():
        return {}
    try:
        cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoechatError(f"tokenizer_config.json is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise MoechatError("tokenizer_config.json is not a JSON object")
    return cfg


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_source(tokenizer_dir: Path | None) -> tuple[str | None, str]:
    """(Jinja text or None, where it came from): chat_template.jinja (what transformers
    writes now) or tokenizer_config.json's ``chat_template`` (a string, or named templates:
    the one named "default")."""
    if tokenizer_dir is not None and (tokenizer_dir / "chat_template.jinja").is_file():
        try:
            return (tokenizer_dir / "chat_template.jinja").read_text(
                encoding="utf-8"
            ), "chat_template.jinja"
        except UnicodeDecodeError:
            raise MoechatError("chat_template.jinja is not UTF-8 text") from None
    template = _tokenizer_config(tokenizer_dir).get("chat_template")
    if isinstance(template, list):  # several named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise MoechatError(
                "tokenizer_config.json has named chat templates but none named 'default' "
                f"(found: {', '.join(map(str, named))})"
            )
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise MoechatError("tokenizer_config.json: chat_template must be a string")
    return template or None, "tokenizer_config.json"


def chat_template_meta(tokenizer_dir: Path | None) -> dict:
    """moechat.json's ``chat_template``: the model's own template (rendered in a sandbox
    at run time, never executed here), or built-in ChatML when the model has none."""
    source, origin = _template_source(tokenizer_dir)
    cfg = _tokenizer_config(tokenizer_dir)
    specials = {k: t for k in SPECIAL_KEYS if (t := _token_text(cfg.get(k)))}
    if tokenizer_dir is None:
        raise MoechatError("no tokenizer folder")
    return describe_template(source, origin, specials, tokenizer_dir / "tokenizer.json")


def _chat_template(tokenizer_dir: Path | None) -> tuple[str | None, str]:
    """(Jinja text or None, ChatML default system prompt): for the demo build's chats."""
    source, _ = _template_source(tokenizer_dir)
    system = DEFAULT_SYSTEM
    if source:  # after "system": an escaped newline in a jinja string, or a real one (GGUF)
        found = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}+\\\n]+)<\|im_end\|>", source)
        if found:
            system = found.group(1)
    return source, system


def _eos_ids(folders: list[Path]) -> list[int]:
    """eos_token_id (an int or a list) of generation_config.json, then config.json."""
    ids: list[int] = []
    for folder in folders:
        for name in ("generation_config.json", "config.json"):
            try:
                doc = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            value = doc.get("eos_token_id") if isinstance(doc, dict) else None
            values = value if isinstance(value, list) else [value]
            ids += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return ids


def _check_tokenizer(
    tokenizer: TextTokenizer, vocab_size: int, chat: dict, folders: list[Path]
) -> dict:
    """The tokenizer section: stop ids are the template's end-of-turn token, the eos
    token of tokenizer_config.json and the eos ids of generation_config/config.json."""
    if tokenizer.vocab_size > vocab_size:
        raise MoechatError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {vocab_size}: "
            "they do not belong together"
        )
    specials = chat.get("special_tokens") or {}
    names = list(chat["end_of_turn"])
    if chat["format"] == "chatml":
        names.append("<|endoftext|>")  # MiniMind's end of text, where the vocabulary has it
    if specials.get("eos_token"):
        names.append(specials["eos_token"])
    stops: list[int] = []
    for name in names:
        tid = tokenizer.backend.token_to_id(name)
        if tid is not None and tid not in stops:
            stops.append(tid)
    stops += [i for i in _eos_ids(folders) if 0 <= i < vocab_size and i not in stops]
    if not stops:
        raise MoechatError(
            "cannot tell where a reply ends: the chat template writes no end-of-turn token "
            "and no eos token is configured"
        )

    def token(key: str) -> int | None:
        return tokenizer.backend.token_to_id(specials[key]) if specials.get(key) else None

    bos = token("bos_token")
    if chat["format"] == "chatml" and bos is None:
        bos = tokenizer.token_id("<|im_start|>")
    pad = token("pad_token")
    if pad is None:
        pad = tokenizer.backend.token_to_id("<|endoftext|>")
    return {
        "file": "tokenizer.json",
        "bos_token_id": bos,
        "eos_token_ids": stops,
        "pad_token_id": stops[0] if pad is None else pad,
    }


def check_outdir(outdir: Path, inputs: list[Path], force: bool) -> None:
    """OUTDIR may be replaced only when it is a moechat package that holds none of the
    export's inputs: ``--force`` never deletes a checkpoint, a tokenizer or other files."""
    if outdir.exists() and not outdir.is_dir():
        raise MoechatError(f"{outdir} is a file, not a folder: choose another OUTDIR")
    if not outdir.exists() or not any(outdir.iterdir()):
        return
    if not force:
        raise MoechatError(f"{outdir} exists and is not empty (use --force to replace it)")
    target = outdir.resolve()
    for path in inputs:
        source = Path(path).resolve()
        if source == target or target in source.parents or source in target.parents:
            relation = (
                "is"
                if source == target
                else "contains"
                if target in source.parents
                else "is inside"
            )
            raise MoechatError(
                f"--force would delete the export's input: {outdir} {relation} {path}; "
                "choose another OUTDIR"
            )
    if not (outdir / MANIFEST).is_file():
        raise MoechatError(
            f"{outdir} is not a moechat package (no {MANIFEST}): --force only replaces a "
            "package; choose an empty or new OUTDIR"
        )


def export_package(
    ckpt: LoadedCheckpoint | StreamedCheckpoint,
    outdir: Path,
    options: ExportOptions,
    tokenizer_dir: Path | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Export ``ckpt`` to ``outdir``; return the manifest. Raises MoechatError on failure."""
    outdir = Path(outdir)
    tokenizer_dir = tokenizer_dir or ckpt.tokenizer_dir
    inputs = [
        Path(ckpt.source),
        *ckpt.weight_files,
        *filter(None, [tokenizer_dir, options.heldout]),
    ]
    check_outdir(outdir, inputs, options.force)
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
        raise MoechatError(
            "no tokenizer.json found: pass --tokenizer DIR (MiniMind ships one in model/)"
        )
    cfg = ckpt.config
    if cfg.is_mla and options.attention == "gqa":
        # no contrib kernel runs latent attention: standard ops (models/mla.py)
        options = copy.copy(options)
        options.attention = "ops"
    tokenizer = TextTokenizer.from_file(tokenizer_dir / "tokenizer.json")
    chat = chat_template_meta(tokenizer_dir)
    source = Path(ckpt.source)
    folders = [source] if source.is_dir() else []
    folders += [tokenizer_dir] if tokenizer_dir not in folders else []
    tokenizer_meta = _check_tokenizer(tokenizer, cfg.vocab_size, chat, folders)
    max_context = options.max_context or min(cfg.max_position_embeddings, 4096)
    if cfg.sliding_window and max_context > cfg.sliding_window:
        # Within the window full attention is the model's own attention: cap the context.
        if options.max_context:
            raise MoechatError(
                f"this model attends to a sliding window of {cfg.sliding_window} tokens: "
                f"--max-context can be at most {cfg.sliding_window}"
            )
        max_context = cfg.sliding_window
        progress(f"context capped at the model's sliding window: {max_context} tokens")
    if options.attention == "gqa" and cfg.head_dim % 16:
        raise MoechatError(
            f"onnxruntime's GroupQueryAttention needs a head size that is a multiple of 16 "
            f"(this model: {cfg.head_dim}); export with --attention ops"
        )
    if max_context > ckpt.model.cos_cache.shape[0]:
        raise MoechatError(
            f"--max-context {max_context} exceeds the RoPE table the model was built with"
        )

    try:
        outdir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    except OSError as err:
        raise MoechatError(f"cannot write {outdir}: {err.strerror or err}") from None
    texts = [
        "Hello, who are you?",
        "你好，请介绍一下你自己。",
        "def add(a, b):\n    return a + b",
    ]
    prompts = parity_prompts(cfg.vocab_size, [tokenizer.encode_text(t) for t in texts])
    try:
        shutil.copyfile(tokenizer_dir / "tokenizer.json", work / "tokenizer.json")
        if isinstance(ckpt, StreamedCheckpoint):  # weights written tensor by tensor
            from moechat.export.streamed_package import export_streamed

            manifest = build_manifest(ckpt, options, tokenizer_meta, chat, max_context)
            export_streamed(
                ckpt, work, manifest, options, tokenizer, prompts, max_context, progress
            )
            manifest.update(options.extra_manifest)
            write_manifest(work, manifest)
            _replace_dir(work, outdir)
            return manifest
        progress("tracing the model to ONNX")
        export_decoder(
            ckpt.model, work / "model.onnx", options.fp32_moe_impl, options.attention,
            residual_norms=not options.fp16,
        )  # fmt: skip

        progress("checking parity: PyTorch vs onnxruntime")
        decoder = cpu_decoder(work / "model.onnx", cfg, max_context)
        steps = DECODE_STEPS
        if options.quick_parity:  # 7 random tokens and an English prompt
            prompts, steps = [prompts[1], prompts[3]], QUICK_DECODE_STEPS
        report = measure_parity(ckpt.model, decoder, prompts, decode_steps=steps)
        del decoder  # releases the session (and its open graph files) before the rename
        if report.relative > PARITY_TOLERANCE:
            raise MoechatError(
                f"parity check failed: max |Δlogit| {report.max_abs_diff:.3g} is "
                f"{report.relative:.2g} of the logit scale {report.logit_scale:.3g} (limit {PARITY_TOLERANCE})"
            )
        manifest = build_manifest(ckpt, options, tokenizer_meta, chat, max_context)
        manifest["parity"] = {
            "reference": "pytorch-fp32",
            **report.to_dict(),
            "tolerance": PARITY_TOLERANCE,
        }
        if options.int8:
            _quantize(work, manifest, tokenizer, options, max_context, progress)
        if options.fp16:
            _to_fp16(ckpt, work, manifest, prompts, max_context, progress)
        for variant in options.variants:
            _export_variant(ckpt, work, manifest, variant, prompts, max_context, progress)
        manifest.update(options.extra_manifest)
        write_manifest(work, manifest)
        _replace_dir(work, outdir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


# Graph variants for providers that lack kernels the default graph uses. DirectML has
# no MoE/QMoE kernel and runs GroupQueryAttention in fp16 only: it gets a float32
# graph of standard ONNX ops (routing lowered to TopK/NonZero/ScatterND, plain attention).
VARIANTS = {"dml": ("ops", "ops")}


def _export_variant(ckpt, work, manifest, variant, prompts, max_context, progress) -> None:
    if variant not in VARIANTS:
        raise MoechatError(f"unknown graph variant {variant!r} (known: {', '.join(VARIANTS)})")
    moe_impl, attention = VARIANTS[variant]
    name = f"model.{variant}.onnx"
    progress(f"tracing the {variant} variant (standard ONNX ops)")
    export_decoder(ckpt.model, work / name, moe_impl, attention)
    decoder = cpu_decoder(work / name, ckpt.config, max_context)
    report = measure_parity(ckpt.model, decoder, prompts)
    if report.relative > PARITY_TOLERANCE:
        raise MoechatError(f"parity check of the {variant} variant failed: {report.relative:.2g}")
    graph = manifest["graph"]
    graph.setdefault("variants", {})[variant] = name
    graph.setdefault("variant_attention", {})[variant] = attention
    graph.setdefault("variant_parity", {})[variant] = report.to_dict()


def _to_fp16(ckpt, work, manifest, prompts, max_context, progress) -> None:
    from moechat.export.fp16 import FP16_TOLERANCE, check_fp16_graph, convert_graph_to_fp16

    progress("converting the graph to float16")
    convert_graph_to_fp16(work / "model.onnx")
    progress("checking float16 parity: PyTorch fp32 vs onnxruntime fp16 (CPU)")
    report = check_fp16_graph(ckpt.model, work / "model.onnx", prompts, max_context)
    if report.relative > FP16_TOLERANCE:
        raise MoechatError(
            f"float16 parity check failed: max |Δlogit| {report.max_abs_diff:.3g} is "
            f"{report.relative:.2g} of the logit scale (limit {FP16_TOLERANCE})"
        )
    manifest["graph"].update(dtype="float16", kv_dtype="float16")
    manifest["parity_fp32"] = manifest["parity"]
    manifest["parity"] = {
        "reference": "pytorch-fp32",
        **report.to_dict(),
        "tolerance": FP16_TOLERANCE,
        "graph": "float16 (CPU provider)",
    }


def quantize_options(options: ExportOptions, arch: dict, smooth: bool = True) -> QuantizeOptions:
    """What ``--int8`` / ``--int4`` / ``--int8-*`` ask of the quantiser."""
    from moechat.export.int8.quantize import QuantizeOptions, default_nbits_block

    dense_bits = 4 if options.int4 == "all" else 8
    return QuantizeOptions(
        moe=options.moe_impl or "qmoe",
        dense=options.int8_matmuls or "nbits",
        block=options.int8_block or default_nbits_block(arch, dense_bits),
        residual_pass=options.int8_residual_pass,
        expert_bits=4 if options.int4 else 8,
        dense_bits=dense_bits,
        smooth=smooth,
        expert_block=options.expert_block,
    )


def _quantize(work, manifest, tokenizer, options, max_context, progress) -> None:
    """Replace the fp32 graph in ``work`` by its int8 version; record how and how well."""
    from moechat.export.int8.step import quantize_package_graph

    quantize = quantize_options(options, manifest["architecture"])
    result = quantize_package_graph(
        work, manifest["architecture"], tokenizer, quantize, options.heldout, max_context, progress
    )
    manifest["graph"]["quantization"] = result.quantization
    manifest["parity"]["graph"] = "float32, before int8 quantization"
    manifest["fidelity"] = {"reference": "fp32 graph", **result.fidelity.to_dict()}


def checkpoint_weight(
    ckpt: LoadedCheckpoint | StreamedCheckpoint,
) -> Callable[[str], torch.Tensor | None]:
    """A weight by its internal name: the loaded model's, or read from the shards."""
    if isinstance(ckpt, StreamedCheckpoint):
        return lambda name: ckpt.tensor(name) if name in ckpt.keys else None
    return ckpt.model.state_dict().get


def build_manifest(
    ckpt: LoadedCheckpoint | StreamedCheckpoint, options: ExportOptions, tokenizer_meta: dict, chat: dict,
    max_context: int,
) -> dict:  # fmt: skip
    cfg = ckpt.config
    sources = [str(p) for p in ckpt.weight_files]
    total, active = parameter_counts(ckpt.model)
    return {
        "format_version": FORMAT_VERSION,
        "name": options.name or Path(ckpt.source).stem,
        "architecture": cfg.to_dict(),
        "parameters": {"total": total, "active_per_token": active},
        "graph": {
            "file": "model.onnx",
            "dtype": "float32",
            "quantization": None,
            "moe_impl": options.moe_impl,
            "attention": options.attention,
            "kv_layout": "BNSH",
            "kv_dtype": "float32",
            # MLA graphs output only the new positions as present (models/mla.py)
            "kv_present": "new" if cfg.is_mla else "total",
            "inputs": "input_ids, attention_mask, logits_positions, past_key_values.{i}.{key,value}",
            "outputs": "logits, present.{i}.{key,value}, router_logits.{moe layer}",
        },
        "routing": routing_section(cfg, checkpoint_weight(ckpt)),
        "tokenizer": tokenizer_meta,
        "chat_template": chat,
        "defaults": {
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 0,
            "min_p": 0.05,
            "repetition_penalty": 1.05,
            "max_new_tokens": 512,
            **options.defaults,
        },  # fmt: skip
        "max_context": max_context,
        "provenance": {
            "source": str(Path(ckpt.source).resolve()),
            "source_files": sources,
            "source_sha256": {Path(p).name: sha256_file(Path(p)) for p in ckpt.weight_files},
            "moechat_version": moechat.__version__,
            "torch_version": torch.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    """Record checksums of the package files, then write moechat.json atomically."""
    manifest["files"] = {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def _replace_dir(new: Path, target: Path) -> None:
    new.chmod(0o755)  # mkdtemp makes it private
    for f in new.iterdir():
        f.chmod(0o644)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
