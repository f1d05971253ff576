"""The anchors, by name: one adapter module per engine (see ``common.Anchor``)."""

from __future__ import annotations

from typing import cast

from moechat.export.bench_anchors import genai, llama_cpp, pytorch
from moechat.export.bench_anchors.common import Anchor

ENGINES: dict[str, Anchor] = {
    module.NAME: cast(Anchor, module) for module in (pytorch, genai, llama_cpp)
}
ANCHORS = tuple(ENGINES)
