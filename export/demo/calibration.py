"""Offline English text for fitting the demo's routers and measuring its perplexity.

The text is the documentation that ships inside every CPython: the language and
library reference topics behind ``help("if")`` (``pydoc_data.topics``), with the
docstrings of a fixed list of stdlib modules as a fallback where a distribution
strips ``pydoc_data``. Nothing is downloaded.

Each document goes to the held-out split (one in four, by a hash of its text) or is
cut into paragraphs for calibration; a calibration paragraph that also occurs in a
held-out document is dropped (the ``compound`` topic repeats the ``if``/``for``/
``while`` topics word for word), so the two splits never share a paragraph.
"""

from __future__ import annotations

import hashlib
import importlib
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HELD_OUT_EVERY = 4  # one document in four (by hash) is held out for perplexity

_FALLBACK_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "fractions", "functools", "heapq", "inspect", "json", "logging",
    "pathlib", "pickle", "random", "re", "shutil", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)  # fmt: skip


@dataclass
class CalibrationText:
    calibration: list[str]  # paragraphs, in source order
    held_out: list[str]
    source: str  # where the text came from (recorded in the manifest)


def _documentation() -> tuple[list[str], str]:
    try:
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
        source = "pydoc_data.topics (CPython documentation topics)"
    except ImportError:
        docs = []
        for name in _FALLBACK_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            docs.append(module.__doc__ or "")
            for attr in sorted(vars(module)):
                doc = getattr(getattr(module, attr), "__doc__", None)
                if isinstance(doc, str) and not attr.startswith("_"):
                    docs.append(doc)
        source = "docstrings of CPython standard library modules"
    return docs, f"{source}, Python {platform.python_version()}"


def paragraphs(text: str, min_chars: int = 40) -> list[str]:
    """Blank-line separated paragraphs; heading underlines and tiny fragments dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip("\n")
        if len(block.strip()) < min_chars or re.fullmatch(r"[*=\-~^\s]+", block):
            continue
        out.append(block)
    return out


def _held_out(doc: str) -> bool:
    digest = hashlib.sha256(doc.strip().encode("utf-8")).digest()
    return digest[0] % HELD_OUT_EVERY == 0


def load_text() -> CalibrationText:
    """Whole documents for the held-out split; paragraphs of the others, minus any that
    also occur in a held-out document, for calibration."""
    docs, source = _documentation()
    held_out = [d.strip() for d in docs if d.strip() and _held_out(d)]
    seen = {p.strip() for d in held_out for p in paragraphs(d)}
    calibration = []
    for doc in docs:
        if _held_out(doc):
            continue
        for p in paragraphs(doc):
            if p.strip() not in seen:
                seen.add(p.strip())
                calibration.append(p)
    return CalibrationText(calibration, held_out, source)


def token_sequences(
    encode: Callable[[str], list[int]],
    texts: Sequence[str],
    seq_len: int,
    max_tokens: int,
    separator: str = "\n\n",
) -> list[list[int]]:
    """Sequences of ``seq_len`` tokens, at most ``max_tokens`` in all, from paragraphs
    spread evenly over ``texts`` (every k-th paragraph, in order, joined by ``separator``)."""
    encoded = [encode(t + separator) for t in texts]
    total = sum(len(e) for e in encoded)
    stride = max(1, -(-total // max(max_tokens, 1)))
    ids: list[int] = []
    for e in encoded[::stride]:
        ids += e
    n = min(len(ids), max_tokens) // seq_len
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
