"""A GGUF's tokenizer (``tokenizer.ggml.*``) as ``tokenizer.json`` for ``tokenizers``.

Two vocabulary types, as llama.cpp's converter writes them:

- ``gpt2``: byte-level BPE (tokens in GPT-2's byte alphabet, ``merges``). How text is cut
  before BPE is named by ``tokenizer.ggml.pre``; :data:`PRE_TOKENIZERS` holds, per name,
  the normalizer and pre-tokenizer of the Hugging Face ``tokenizer.json`` the converter
  hashed to that name (its regexes are the ones llama.cpp's ``llama-vocab.cpp`` runs);
- ``llama``: SentencePiece BPE (Llama, Mistral, Mixtral): tokens spelt with ``▁`` for
  spaces, a score per token and no merges, bytes ``<0x00>``..``<0xFF>`` for text the
  pieces do not cover. The merges are rebuilt from the scores: SentencePiece (and
  llama.cpp's ``llm_tokenizer_spm``) merge the adjacent pair whose joined piece scores
  highest, so the pairs ranked by that score are the BPE merges (transformers'
  ``LlamaConverter`` does the same). Normalizer and decoder are those of Mixtral's own
  ``tokenizer.json``: a ``▁`` in front and for every space, byte fallback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moechat.runtime.errors import MoechatError

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)
SPACE = "\u2581"  # SentencePiece's "▁"


def _byte_level(use_regex: bool, trim_offsets: bool = True) -> dict:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    }


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_DIGITS = {"type": "Digits", "individual_digits": True}
_NFC = {"type": "NFC"}
# Qwen2's split (Qwen1.5, Qwen2, Qwen3): llama.cpp's QWEN2 regex, written case-insensitively
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek LLM / DeepSeek-MoE: llama.cpp's DEEPSEEK_LLM regexes. Escapes keep the three
# Greek range ends (U+1F7D, U+1FD3, U+1FDB) from being NFC-folded by an editor into
# lookalikes that would turn their ranges around.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = [
    _split("[\r\n]"),
    _split(r"\s?[" + _DEEPSEEK_LETTERS + "]+"),
    _split(r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"),
    _split(r"\s+$"),
    _split("[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"),
    _DIGITS,  # the HF file splits digits one by one (llama.cpp: \p{N}+)
    _byte_level(use_regex=False),
]

# DeepSeek-V3 / R1 (and JoyAI-LLM-Flash, same regexes in llama.cpp): llama.cpp's
# DEEPSEEK3_LLM regexes, as the published tokenizer.json runs them: runs of up to three
# digits, then Han and kana runs (U+4E00-U+9FA5, hiragana, katakana), then the rest
# (one ASCII punctuation glued to a Latin word, marks kept with their letters).
_DEEPSEEK_V3 = [
    _split(r"\p{N}{1,3}"),
    _split("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
    _split(
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
    _byte_level(use_regex=False),
]

# GLM-4 / 4.5 / 4.7 (GLM-4.7-Flash is a deepseek2 file): llama.cpp's CHATGLM4 regex,
# Llama 3's split with the contractions spelt out (ASCII case only, as llama.cpp has it)
_GLM4 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Kimi-K2 / Moonlight-16B-A3B (tiktoken vocabularies in deepseek2 files): Moonshot's own
# pattern (tokenization_kimi.py's pat_str). llama.cpp runs hand-written code for it
# instead (unicode.cpp), which departs from it: words are not cut at a lower-to-upper
# case change ("getUserName") and combining marks do not stay with their letters; here,
# as for qwen2's NFC, the model's own tokenizer wins.
_KIMI_WORD = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_KIMI_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_KIMI_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_KIMI_K2 = (
    rf"[\p{{Han}}]+|[^\r\n\p{{L}}\p{{N}}]?{_KIMI_WORD}*{_KIMI_LOWER}+{_KIMI_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_KIMI_WORD}+{_KIMI_LOWER}*{_KIMI_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (normalizer, pre-tokenizer steps) of the original tokenizer.json
PRE_TOKENIZERS: dict[str, tuple[dict | None, list[dict]]] = {
    "default": (None, [_byte_level(use_regex=True)]),
    "gpt2": (None, [_byte_level(use_regex=True)]),
    "gpt-2": (None, [_byte_level(use_regex=True)]),
    # digits one by one, then GPT-2's split: SmolLM, and Refact's (StarCoder) vocabulary
    # that IBM Granite 3.x (dense and MoE) uses
    "smollm": (None, [_DIGITS, _byte_level(use_regex=True)]),
    "refact": (None, [_DIGITS, _byte_level(use_regex=True)]),
    # OLMo / OLMoE: GPT-NeoX-20B's tokenizer (GPT-2's split after NFC)
    "olmo": (_NFC, [_byte_level(use_regex=True)]),
    "qwen2": (_NFC, [_split(_QWEN2), _byte_level(use_regex=False, trim_offsets=False)]),
    "deepseek-llm": ({"type": "Sequence", "normalizers": []}, _DEEPSEEK_LLM),
    "deepseek-v3": ({"type": "Sequence", "normalizers": []}, _DEEPSEEK_V3),
    "joyai-llm": ({"type": "Sequence", "normalizers": []}, _DEEPSEEK_V3),
    "glm4": (None, [_split(_GLM4), _byte_level(use_regex=False)]),
    "chatglm-bpe": (None, [_split(_GLM4), _byte_level(use_regex=False)]),
    "kimi-k2": (None, [_split(_KIMI_K2), _byte_level(use_regex=False)]),
}
_VOCAB_TYPES = "gpt2 (byte-level BPE), llama (SentencePiece BPE)"


def field(reader, key: str, default: Any = None) -> Any:
    """A GGUF metadata value (str, int, float, list) or ``default`` when absent (the one
    metadata reader: models/gguf.py uses it too)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as err:
        raise MoechatError(f"GGUF metadata {key} is corrupt: {err}") from None


def _vocabulary(reader) -> tuple[list[str], list[int]]:
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise MoechatError("the GGUF has no tokenizer (tokenizer.ggml.tokens)")
    types = field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens) or len(set(tokens)) != len(tokens):
        raise MoechatError("the GGUF tokenizer is corrupt (token list and types disagree)")
    return tokens, [int(t) for t in types]


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    """Control and unknown tokens are special; USER_DEFINED ones are matched whole too."""
    return [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind != TOKEN_USER_DEFINED,
        }
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
    ]


def _bos_template(reader, tokens: list[str], default: bool) -> dict | None:
    """A post-processor adding BOS (and EOS) where the file asks for them."""
    bos, eos = "bos_token_id", "eos_token_id"
    ids = {k: field(reader, f"tokenizer.ggml.{k}") for k in (bos, eos)}
    add = {
        bos: bool(field(reader, "tokenizer.ggml.add_bos_token", default)),
        eos: bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
    }
    used = {k: int(v) for k, v in ids.items() if add[k] and v is not None and 0 <= v < len(tokens)}
    if not used:
        return None

    def part(type_id: int) -> list[dict]:
        def special(key: str) -> list[dict]:
            return (
                [{"SpecialToken": {"id": tokens[used[key]], "type_id": type_id}}]
                if key in used
                else []
            )

        seq = {"Sequence": {"id": "AB"[type_id], "type_id": type_id}}
        return [*special(bos), seq, *special(eos)]

    return {
        "type": "TemplateProcessing",
        "single": part(0),
        "pair": part(0) + part(1),
        "special_tokens": {
            tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in used.values()
        },
    }


def _bpe(tokens: list[str], merges: list, **options: Any) -> dict:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": {tok: i for i, tok in enumerate(tokens)},
        "merges": merges,
        **options,
    }


def _document(added: list[dict], model: dict, **parts: Any) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        **parts,
        "model": model,
    }


def byte_level_json(reader, tokens: list[str], types: list[int]) -> dict:
    """``tokenizer.ggml.model == "gpt2"``: byte-level BPE after the named pre-tokenizer."""
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise MoechatError(
            f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})"
        )
    merges = field(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise MoechatError("the GGUF byte-level tokenizer has no tokenizer.ggml.merges")
    normalizer, steps = PRE_TOKENIZERS[pre]
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": False,
        "use_regex": True,
    }
    bos = _bos_template(reader, tokens, default=False)
    return _document(
        _added_tokens(tokens, types),
        _bpe(tokens, [m.split(" ", 1) for m in merges]),
        normalizer=normalizer,
        pre_tokenizer=steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps},
        post_processor=byte_level
        if bos is None
        else {"type": "Sequence", "processors": [byte_level, bos]},
        decoder={**byte_level, "trim_offsets": True},
    )


def sentencepiece_merges(
    tokens: list[str], types: list[int], scores: list[float]
) -> list[list[str]]:
    """BPE merges of a SentencePiece vocabulary: every split of a normal piece into two
    normal pieces, best-scoring joined piece first. Ties go to the joined piece listed
    first: llama.cpp's converter gives every token -1000 when it builds the vocabulary
    from a tokenizer.json (no tokenizer.model), whose ids follow its merges."""
    normal = {
        tok: i
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
        if kind == TOKEN_NORMAL
    }
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], normal[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def sentencepiece_json(reader, tokens: list[str], types: list[int]) -> dict:
    """``tokenizer.ggml.model == "llama"``: SentencePiece BPE with byte fallback."""
    scores = field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise MoechatError("the GGUF SentencePiece tokenizer has no scores for its tokens")
    merges = field(reader, "tokenizer.ggml.merges")  # rarely there; used as given if so
    unknown = field(reader, "tokenizer.ggml.unknown_token_id")
    if unknown is None:
        unknown = next((i for i, kind in enumerate(types) if kind == TOKEN_UNKNOWN), None)
    unk = tokens[int(unknown)] if unknown is not None and 0 <= int(unknown) < len(tokens) else None
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    normalizer = (
        {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, spaces]}
        if prefix
        else spaces
    )
    decoders = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return _document(
        _added_tokens(tokens, types),
        _bpe(
            tokens,
            [m.split(" ", 1) for m in merges]
            if merges
            else sentencepiece_merges(tokens, types, [float(s) for s in scores]),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        ),
        normalizer=normalizer,
        pre_tokenizer=None,
        post_processor=_bos_template(reader, tokens, default=True),
        decoder={"type": "Sequence", "decoders": decoders},
    )


def tokenizer_json(reader) -> dict:
    """The ``tokenizer.json`` document (as a dict) of the GGUF's vocabulary."""
    model = field(reader, "tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise MoechatError(
            f"unsupported GGUF tokenizer model {model!r} (supported: {_VOCAB_TYPES})"
        )
    tokens, types = _vocabulary(reader)
    if model == "gpt2":
        return byte_level_json(reader, tokens, types)
    return sentencepiece_json(reader, tokens, types)


def write_tokenizer_files(reader, folder: Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = tokenizer_json(reader)
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    tokens = field(reader, "tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        idx = field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    arch = field(reader, "general.architecture", "llama")
    sentencepiece = field(reader, "tokenizer.ggml.model") == "llama"
    config = {
        # the tokenizer.json as written: a model-specific class could rebuild its own
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", sentencepiece)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "model_max_length": int(field(reader, f"{arch}.context_length", 2048)),
        "chat_template": field(reader, "tokenizer.chat_template"),
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return folder
