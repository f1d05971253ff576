"""Text <-> token ids, with user text always encoded as data.

Special tokens typed by a user (e.g. ``<|im_start|>``) must never become control-token
ids. The ``tokenizers`` library supports this directly: with
``Tokenizer.encode_special_tokens = True`` special added tokens are not matched in the input
and are encoded like ordinary text. The flag is set once when the tokenizer is wrapped, so
every encode through :class:`TextTokenizer` is text-as-data; special ids are only ever
produced explicitly via :meth:`TextTokenizer.token_id`. Added tokens that are *not* marked
special (``special: false``) are ordinary vocabulary and are still matched.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import MoechatError


class TextTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that encodes text as data."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        tokenizer.encode_special_tokens = True  # mutates the given object on purpose
        self._tok = tokenizer
        self._special: dict[str, int] = {
            t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        self._check_data_encoding()

    @classmethod
    def from_file(cls, path: Path) -> TextTokenizer:
        """Load ``tokenizer.json`` (or a directory containing it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise MoechatError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MoechatError(f"cannot load tokenizer {path}: {first}") from err
        return cls(tok)

    def _check_data_encoding(self) -> None:
        for content, tid in self._special.items():
            if tid in self._tok.encode(content, add_special_tokens=False).ids:
                raise MoechatError(
                    "this tokenizers version cannot encode special tokens as text; "
                    "upgrade tokenizers"
                )

    def encode_text(self, text: str) -> list[int]:
        """Encode user/content text as data: typed special tokens stay plain text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_raw(self, text: str) -> list[int]:
        """Encode a ``--raw`` prompt: no BOS/post-processor tokens, still text-as-data."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        """The id of one vocabulary token (e.g. ``"<|im_end|>"``)."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise MoechatError(f"token {token!r} is not in the tokenizer vocabulary")
        return tid

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id, or None when out of range."""
        return self._tok.id_to_token(token_id)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text; ids outside the vocabulary are ignored."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special (control) tokens: content -> id."""
        return dict(self._special)

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (``encode_special_tokens`` is True)."""
        return self._tok
