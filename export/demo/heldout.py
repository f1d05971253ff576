"""Held-out text of four kinds for the demo's perplexity checks.

``export/data/heldout/`` holds prose, dialogue, instructions and code comments written
for moechat, independently of every calibration source (Python's documentation,
``calibration.txt``, the dense model's own chats) and of ``heldout.txt``. The demo build
scores the dense model and its MoE on each kind separately: a conversion that only
keeps the kind of text it was calibrated on shows up here.
"""

from __future__ import annotations

from importlib import resources

KINDS = ("prose", "dialogue", "instructions", "code_comments")


def heldout_kinds() -> dict[str, str]:
    """Kind -> text, from the package data."""
    folder = resources.files("moechat.export") / "data" / "heldout"
    return {kind: (folder / f"{kind}.txt").read_text("utf-8") for kind in KINDS}
