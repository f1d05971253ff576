"""Load a package into a ready-to-generate model: session, decoder, tokenizer, template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moechat.runtime import hugepages
from moechat.runtime.chat_template import ChatTemplate, load_template
from moechat.runtime.decoder import Decoder
from moechat.runtime.errors import MoechatError
from moechat.runtime.package import ModelPackage, load_package
from moechat.runtime.providers import create_session, resolve_device
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


def load_model(
    path: str | Path,
    device: str = "auto",
    max_context: int | None = None,
    threads: int | None = None,
    static_cache: bool | None = None,
) -> LoadedModel:
    """Open a package; ``max_context`` caps the KV buffers (memory) below the package's."""
    package = load_package(path)
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
    if provider == "CPUExecutionProvider":  # weights in host memory: see runtime/hugepages.py
        session, huge_page_bytes = hugepages.create_on_huge_pages(
            lambda: create_session(graph_path, provider, threads)
        )
    else:
        session, huge_page_bytes = create_session(graph_path, provider, threads), 0
    attention = (
        graph.variant_attention.get(variant, graph.attention) if variant else graph.attention
    )
    if static_cache is None:
        static_cache = attention == "gqa"
    if static_cache and attention != "gqa":
        raise MoechatError("a static KV cache needs a GroupQueryAttention graph")
    kv_dtype = np.float16 if graph.kv_dtype == "float16" else np.float32
    decoder = Decoder(
        session,
        num_layers=arch.num_hidden_layers,
        kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        max_context=context,
        static_cache=static_cache,
        kv_dtype=kv_dtype,
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
    )
