"""Load a package into a ready-to-generate model: session, decoder, tokenizer, template."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moechat.runtime import hugepages, topk
from moechat.runtime.chat_template import ChatTemplate, load_template
from moechat.runtime.decoder import Decoder
from moechat.runtime.errors import MoechatError
from moechat.runtime.package import ModelPackage, load_package
from moechat.runtime.providers import create_session, resolve_device
from moechat.runtime.routing import PackageRouting, RoutedGraph, package_routing
from moechat.runtime.sampling import SamplingParams
from moechat.runtime.tokenizer import TextTokenizer


@dataclass
class LoadedModel:
    package: ModelPackage
    provider: str
    decoder: Decoder
    tokenizer: TextTokenizer
    template: ChatTemplate
    defaults: SamplingParams
    eos_token_ids: frozenset[int]
    huge_page_bytes: int = 0  # weights moved onto transparent huge pages (runtime/hugepages.py)
    experts_per_token: int | None = None  # routed experts per token, when lowered (topk.py)
    routing: PackageRouting | None = None  # the graph's router outputs (runtime/routing.py)

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def max_context(self) -> int:
        return self.decoder.max_context


def _graph_variant(package: ModelPackage, provider: str) -> str | None:
    variants = package.spec.graph.variants
    key = {"DmlExecutionProvider": "dml", "CUDAExecutionProvider": "cuda"}.get(provider)
    return key if key in variants else None


def check_graph_interface(session: Any, package: ModelPackage, graph_file: str) -> None:
    """The graph's inputs and outputs must be the ones moechat.json describes (layers,
    KV heads, head size, vocabulary, cache dtype): a mismatch is a damaged package, and
    onnxruntime would fail mid-generation with an error about binding names or shapes."""
    arch, graph = package.spec.architecture, package.spec.graph
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    problem = None
    kv = sorted(n for n in inputs if n.startswith("past_key_values."))
    expected = sorted(
        f"past_key_values.{i}.{n}" for i in range(arch.num_hidden_layers) for n in ("key", "value")
    )
    kv_type = "tensor(float16)" if graph.kv_dtype == "float16" else "tensor(float)"
    if missing := {"input_ids", "attention_mask", "logits_positions"} - set(inputs):
        problem = f"it has no input {sorted(missing)[0]!r}"
    elif "logits" not in outputs:
        problem = "it has no output 'logits'"
    elif kv != expected:
        problem = (
            f"it has a KV cache for {len(kv) // 2} layers, moechat.json says "
            f"{arch.num_hidden_layers}"
        )
    else:
        for name in kv:
            shape, kind = inputs[name].shape, inputs[name].type
            width = arch.value_dim if name.endswith(".value") else arch.head_dim
            want = {1: arch.num_key_value_heads, 3: width}
            for axis, size in want.items():
                if len(shape) != 4 or (isinstance(shape[axis], int) and shape[axis] != size):
                    what = "KV heads" if axis == 1 else "head size"
                    problem = f"{name} has shape {shape}, moechat.json says {what} {size}"
                    break
            if problem is None and kind != kv_type:
                problem = f"{name} is {kind}, moechat.json says a {graph.kv_dtype} KV cache"
            if problem:
                break
        vocab = outputs["logits"].shape[-1] if outputs["logits"].shape else None
        if problem is None and isinstance(vocab, int) and vocab != arch.vocab_size:
            problem = (
                f"its logits have {vocab} entries, moechat.json says vocabulary {arch.vocab_size}"
            )
    if problem:
        raise MoechatError(
            f"package {package.path} is damaged: the graph {graph_file} does not match "
            f"moechat.json: {problem}"
        )


def load_model(
    path: str | Path,
    device: str = "auto",
    max_context: int | None = None,
    threads: int | None = None,
    static_cache: bool | None = None,
    experts_per_token: int | None = None,
    routed_graph: RoutedGraph | None = None,
) -> LoadedModel:
    """Open a package; ``max_context`` caps the KV buffers (memory) below the package's;
    ``experts_per_token`` (default: ``MOECHAT_EXPERTS_PER_TOKEN``) lowers the routed experts
    each token runs (runtime/topk.py); ``routed_graph``: the package's graph with router
    outputs added by the caller (a package exported before routing left the graph)."""
    package = load_package(path)
    top_k = topk.requested(experts_per_token)
    provider = resolve_device(device)
    if max_context is not None:
        if max_context < 16:
            raise MoechatError(f"context cap {max_context} is too small (at least 16 tokens)")
        if max_context > package.max_context:
            raise MoechatError(
                f"context cap {max_context} exceeds the model's maximum context of {package.max_context}"
            )
    context = max_context or package.max_context
    graph, arch = package.spec.graph, package.spec.architecture
    variant = _graph_variant(package, provider)
    graph_path = package.graph_path(variant)
    edited = (
        None if top_k is None else topk.graph_bytes_for(graph_path, package.architecture, top_k)
    )
    if routed_graph is not None:
        if edited is not None:
            raise MoechatError(
                "--experts-per-token needs a package with routing outputs here: re-export it"
            )
        edited = routed_graph.graph
    if provider == "CPUExecutionProvider":  # weights in host memory: see runtime/hugepages.py
        session, huge_page_bytes = hugepages.create_on_huge_pages(
            lambda: create_session(graph_path, provider, threads, edited)
        )
    else:
        session, huge_page_bytes = create_session(graph_path, provider, threads, edited), 0
    check_graph_interface(session, package, graph_path.name)
    attention = (
        graph.variant_attention.get(variant, graph.attention) if variant else graph.attention
    )
    new_only = graph.kv_present == "new"  # MLA: the runtime appends to its buffers
    if static_cache is None:
        static_cache = attention == "gqa" or new_only
    if static_cache and attention != "gqa" and not new_only:
        raise MoechatError("a static KV cache needs a GroupQueryAttention graph")
    kv_dtype = np.float16 if graph.kv_dtype == "float16" else np.float32
    section = routed_graph.section if routed_graph else package.spec.raw.get("routing")
    routing = package_routing(arch.fields, section, str(package.path))
    if routing is not None and top_k is not None:  # the graph now chooses top_k experts
        routing = dataclasses.replace(routing, spec=routing.spec.with_top_k(top_k))
    if routing is not None:
        names = {o.name for o in session.get_outputs()}
        if missing := [o for o in routing.outputs if o not in names]:
            raise MoechatError(
                f"package {package.path} is damaged: the graph {graph_path.name} has no "
                f"routing output {missing[0]!r}, which moechat.json names"
            )
    decoder = Decoder(
        session,
        num_layers=arch.num_hidden_layers,
        kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        max_context=context,
        static_cache=static_cache,
        kv_dtype=kv_dtype,
        value_head_dim=arch.value_dim,
        present_new_only=new_only,
        routing_outputs=routing.outputs if routing is not None else (),
    )
    tokenizer, template = load_template(package.spec.chat_template, package.tokenizer_path)
    if tokenizer.vocab_size > arch.vocab_size:
        raise MoechatError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {arch.vocab_size}: "
            "the tokenizer does not fit this model"
        )
    defaults = SamplingParams.from_dict(package.spec.defaults)
    return LoadedModel(
        package=package,
        provider=provider,
        decoder=decoder,
        tokenizer=tokenizer,
        template=template,
        defaults=defaults,
        eos_token_ids=frozenset(package.spec.tokenizer.eos_token_ids),
        huge_page_bytes=huge_page_bytes,
        routing=routing,
    )
