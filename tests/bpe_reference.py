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
        self.pattern = _re.compile(_gpt2_pattern())
        self.digits = pre == "smollm"
        self.byte_map = bytes_to_unicode()

    def pieces(self, text: str) -> list[str]:
        chunks = [text]
        if self.digits:  # llama.cpp's "\p{N}" first: every digit is its own piece
            chunks = [c for c in _re.split(rf"({_N})", text) if c]
        out = []
        for chunk in chunks:
            out += self.pattern.findall(chunk)
        return out

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
