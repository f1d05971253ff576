"""The anchors, by name: one adapter per engine (see ``common.Anchor``)."""

from __future__ import annotations

from typing import cast

from moechat.export.bench_anchors import genai, llama_cpp, pytorch
from moechat.export.bench_anchors.common import Anchor

ENGINES: dict[str, Anchor] = {
    anchor.NAME: cast(Anchor, anchor)
    for anchor in (pytorch, genai, llama_cpp.LLAMA_CPP, llama_cpp.LLAMA_CPP_Q4_K_M)
}
ANCHORS = tuple(ENGINES)
