"""The first screen: what the model is, the main keys, how to open another model.

Shown in the chat log until the first message of a conversation. Facts come from the
package's moechat.json (the demo records its source model and how it was converted),
so the text is about the model actually loaded.
"""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text
from textual.widgets import Static

MAIN_KEYS = (
    ("Enter", "send"),
    ("Shift+Enter", "newline"),
    ("Esc/Ctrl+C", "stop"),
    ("Ctrl+R", "regenerate"),
    ("Ctrl+E", "edit"),
    ("Ctrl+S", "sampling"),
    ("Ctrl+L", "chats"),
    ("Ctrl+N", "new"),
    ("F1", "all keys"),
    ("Ctrl+D", "quit"),
)


def manifest_of(engine: Any) -> dict[str, Any]:
    """The loaded package's moechat.json (``engine.manifest`` or ``engine.model.package``)."""
    manifest = getattr(engine, "manifest", None)
    if manifest is None:
        package = getattr(getattr(engine, "model", None), "package", None)
        manifest = getattr(package, "manifest", None)
    return manifest if isinstance(manifest, dict) else {}


def _params(source_model: str) -> str:
    """``"HuggingFaceTB/SmolLM2-135M-Instruct"`` -> ``"135M"`` (empty when not named)."""
    match = re.search(r"(\d+(?:\.\d+)?[MB])\b", source_model)
    return match.group(1) if match else ""


def describe_model(manifest: dict[str, Any], fallback_name: str = "") -> list[str]:
    """One to three lines about the model, for people rather than for debugging."""
    name = manifest.get("name") or fallback_name or "the model"
    a = manifest.get("architecture") or {}
    shape = ""
    if a:
        ffn = (
            f"{a.get('n_routed_experts')} routed experts top-{a.get('num_experts_per_tok')}"
            f" + {a.get('n_shared_experts')} shared"
            if a.get("use_moe")
            else "dense"
        )
        shape = (
            f"{a.get('num_hidden_layers')} layers, hidden {a.get('hidden_size')}, {ffn}, "
            f"context {manifest.get('max_context', '?')}"
        )
    demo = manifest.get("demo")
    if isinstance(demo, dict):
        source = (demo.get("source") or {}).get("model", "SmolLM2-135M-Instruct")
        size = _params(source)
        base = source.split(" (")[0].split("/")[-1]
        lines = [
            f"{name}: the demo model",
            f"{base} ({size + ', ' if size else ''}English only) with its feed-forward layers "
            "turned into a mixture of experts, without training: a toy for trying the app. "
            "Expect short, often wrong answers.",
        ]
        ppl = demo.get("perplexity") or {}
        if "moe" in ppl and "dense" in ppl:
            shape += f"; perplexity {ppl['moe']:.1f} vs {ppl['dense']:.1f} before conversion"
    else:
        lines = [f"{name}"]
    if shape:
        lines.append(shape)
    return lines


def welcome_text(
    manifest: dict[str, Any], name: str, *, loading: str = "", can_switch: bool = True
) -> Text:
    text = Text()
    if loading:
        text.append(loading + "\n", style="bold")
    else:
        first, *rest = describe_model(manifest, name)
        text.append(first + "\n", style="bold")
        for line in rest:
            text.append(line + "\n")
    text.append("\n")
    for i, (key, what) in enumerate(MAIN_KEYS):
        text.append(key, style="bold")
        text.append(f" {what}" + (" · " if i < len(MAIN_KEYS) - 1 else "\n"))
    text.append("Type / for the commands.\n")
    if can_switch:
        text.append("Another model: /model PATH (a package folder), or `moechat chat PATH`.\n")
    else:
        text.append("Another model: quit, then `moechat chat PATH`.\n")
    text.append("`moechat export` makes packages from checkpoints (see the README).")
    return text


class Welcome(Static):
    """The welcome view in the chat log (removed when the first message is sent)."""

    def __init__(self, text: Text) -> None:
        super().__init__(text, markup=False, classes="welcome")

    def show(self, text: Text) -> None:
        self.update(text)
