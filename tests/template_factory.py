"""Tokenizer folders for the real chat templates in tests/chat_templates/*.json.

Each fixture holds a model family's template text (with its origin), its bos/eos/pad
strings and its control tokens; :func:`make_folder` adds them to the tiny tokenizer of
tokenizer_factory.py and writes the folder as transformers saves one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken

from moechat.runtime.manifest import ChatTemplateSpec

from tokenizer_factory import build_tiny_tokenizer

FIXTURES = Path(__file__).parent / "chat_templates"
FAMILIES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def fixture(family: str) -> dict:
    return json.loads((FIXTURES / f"{family}.json").read_text(encoding="utf-8"))


def make_folder(folder: Path, family: str, special_flag: bool = True) -> Path:
    """tokenizer.json + tokenizer_config.json for ``family`` (transformers' layout)."""
    fx = fixture(family)
    tok = build_tiny_tokenizer()
    tok.add_tokens([AddedToken(t, special=special_flag, normalized=False) for t in fx["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fx["added"]])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": fx["chat_template"]}
    for key in ("bos_token", "eos_token", "pad_token"):
        if fx.get(key):
            config[key] = fx[key]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return folder


def chat_meta(family: str, **kwargs) -> ChatTemplateSpec:
    fx = fixture(family)
    specials = {k: fx[k] for k in ("bos_token", "eos_token", "pad_token") if fx.get(k)}
    return ChatTemplateSpec(
        format="jinja", jinja=fx["chat_template"], special_tokens=specials, kwargs=kwargs
    )
