"""Incremental, UTF-8 safe detokenisation for streaming output.

Byte-level BPE (and byte-fallback) tokens can end in the middle of a multi-byte character;
decoding such a prefix yields a trailing U+FFFD. :class:`StreamDecoder` uses the
prefix/read-offset scheme of text-generation-inference: each step decodes only a short
window ``ids[prefix:]`` and emits the text beyond ``decode(ids[prefix:read])``. The tokens in
``ids[prefix:read]`` give the decoder context (e.g. so a leading-space strip applies to them,
not to new text). Trailing U+FFFD characters are held back until a later token completes
them (or :meth:`StreamDecoder.flush` releases them), so a genuinely invalid byte still
appears in the output exactly where ``decode(all_ids)`` has it.

Caveat: a ``ByteFallback`` decoder turns a whole run of ``<0xNN>`` tokens into one U+FFFD
per token once the run is invalid UTF-8, retroactively. Valid leading bytes of such a run
may already have been streamed; for valid UTF-8 output the stream always equals
``decode(all_ids)``.
"""

from __future__ import annotations

from .tokenizer import TextTokenizer

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Turn a stream of token ids into a stream of complete text chunks."""

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all pushed tokens."""
        self._ids: list[int] = []  # window: ids[0:read] is context, ids[read:] is new
        self._read = 0
        self._prefix_len = 0  # len(decode(ids[0:read]))
        self._emitted = 0  # chars emitted beyond the prefix text in this window

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completed (possibly ``""``)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        stable = text.rstrip(_REPLACEMENT)
        start = self._prefix_len + self._emitted
        out = stable[start:] if len(stable) > start else ""
        if len(stable) == len(text) and len(text) > self._prefix_len:
            # Text ends on a character boundary: the new tokens become the next context.
            self._ids = self._ids[self._read :]
            self._read = len(self._ids)
            self._prefix_len = len(self._decode(self._ids))
            self._emitted = 0
        else:
            self._emitted += len(out)
        return out

    def flush(self) -> str:
        """Return whatever is still held back (U+FFFD for incomplete bytes) and reset."""
        out = self._decode(self._ids)[self._prefix_len + self._emitted :]
        self.reset()
        return out
