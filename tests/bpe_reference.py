"""A from-scratch GPT-2 byte-level BPE, for checking tokenizer.json files built from GGUF.

It knows nothing of the ``tokenizers`` library: it pre-tokenises with llama.cpp's
regexes for the GGUF's ``tokenizer.ggml.pre`` and applies ``tokenizer.ggml.merges`` by
rank to each piece, as llama.cpp's ``llm_tokenizer_bpe`` does.
"""

from __future__ import annotations

import functools

import regex as _re  # the dev extra: \p{L} / \p{N}; re's \d and \w differ on "½" and the like

_L, _N = r"\p{L}", r"\p{N}"


def _gpt2_pattern() -> str:
    other = r"[^\s\p{L}\p{N}]"
    return rf"'s|'t|'re|'ve|'m|'ll|'d| ?{_L}+| ?{_N}+| ?{other}+|\s+(?!\S)|\s+"


# the regexes per tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp), run one after the other
PATTERNS = {
    "gpt2": [_gpt2_pattern()],
    "smollm": [_N, _gpt2_pattern()],  # llama.cpp's "\p{N}" first: every digit alone
    "deepseek-v3": [
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    ],
    # Moonshot's pat_str (tokenization_kimi.py), not llama.cpp's hand-written code for it;
    # V1: "&&" is a set intersection
    "kimi-k2": [
        r"(?V1)[\p{Han}]+"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "glm4": [
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
}


def split_isolated(pieces: list[str], pattern: str) -> list[str]:
    """llama.cpp's unicode_regex_split step: every match and every gap between matches
    becomes a piece of its own."""
    compiled, out = _re.compile(pattern), []
    for piece in pieces:
        start = 0
        for m in compiled.finditer(piece):
            out += [piece[start : m.start()], m.group()]
            start = m.end()
        out.append(piece[start:])
    return [p for p in out if p]


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class ReferenceBPE:
    def __init__(self, tokens: list[str], merges: list[str], pre: str = "gpt2") -> None:
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.patterns = PATTERNS[pre]
        self.byte_map = bytes_to_unicode()

    def pieces(self, text: str) -> list[str]:
        pieces = [text]
        for pattern in self.patterns:
            pieces = split_isolated(pieces, pattern)
        return pieces

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            best = min(
                range(len(parts) - 1),
                key=lambda i: self.ranks.get((parts[i], parts[i + 1]), float("inf")),
            )
            if (parts[best], parts[best + 1]) not in self.ranks:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pieces(text):
            mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[p] for p in self.bpe(mapped)]
        return ids
