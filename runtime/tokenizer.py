"""Text <-> token ids, with user text always encoded as data.

Control tokens typed by a user (e.g. ``<|im_start|>``) must never become control-token
ids, whatever the tokenizer file says about them. Control tokens are the added tokens
marked ``special`` plus every other added token (whitespace-only ones aside) whose text
occurs in ``control_text``: the chat template's literal text and its bos/eos strings,
the rule transformers' ``sanitize_control_tokens`` uses. GGUF files mark their chat
tokens USER_DEFINED (``special: false``) and some tokenizer.json files do too, so the
``special`` flag alone is not enough.

Data is encoded by a second ``tokenizers.Tokenizer`` built from the same file with the
control tokens marked special and ``encode_special_tokens = True``: the library then
never matches them in the input and encodes them like ordinary text. Other added tokens
(e.g. whitespace runs) stay ordinary vocabulary, as in transformers. Control ids are
only ever produced explicitly via :meth:`TextTokenizer.token_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from .errors import MoechatError


class TextTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that encodes text as data."""

    def __init__(self, tokenizer: Tokenizer, control_text: str = "") -> None:
        tokenizer.encode_special_tokens = True  # mutates the given object on purpose
        self._tok = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self._added = {t.content: t for t in added.values()}
        self._control: dict[str, int] = {
            t.content: i
            for i, t in added.items()
            if t.special or (t.content.strip() and t.content in control_text)
        }
        self._data = self._data_tokenizer(added)
        self._check_data_encoding()

    @classmethod
    def from_file(cls, path: Path, control_text: str = "") -> TextTokenizer:
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
        return cls(tok, control_text)

    def _data_tokenizer(self, added: dict) -> Tokenizer:
        """The tokenizer itself, or a copy whose non-special control tokens are special."""
        flip = {i for i, t in added.items() if not t.special and t.content in self._control}
        if not flip:
            return self._tok
        doc = json.loads(self._tok.to_str())
        for entry in doc.get("added_tokens", []):
            if entry.get("id") in flip:
                entry["special"] = True
        data = Tokenizer.from_str(json.dumps(doc))
        data.encode_special_tokens = True
        return data

    def _check_data_encoding(self) -> None:
        for content, tid in self._control.items():
            if tid in self._data.encode(content, add_special_tokens=False).ids:
                raise MoechatError(
                    "this tokenizers version cannot encode special tokens as text; "
                    "upgrade tokenizers"
                )

    def encode_text(self, text: str) -> list[int]:
        """Encode user/content text as data: typed control tokens stay plain text."""
        return self._data.encode(text, add_special_tokens=False).ids

    def encode_raw(self, text: str) -> list[int]:
        """Encode a ``--raw`` prompt: no BOS/post-processor tokens, still text-as-data."""
        return self._data.encode(text, add_special_tokens=False).ids

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
        """Control tokens (special, or named by the chat template): content -> id."""
        return dict(self._control)

    def strips(self, token: str) -> tuple[bool, bool]:
        """(lstrip, rstrip) of an added token: whitespace it absorbs on either side."""
        t = self._added.get(token)
        return (bool(t.lstrip), bool(t.rstrip)) if t is not None else (False, False)

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (``encode_special_tokens`` is True)."""
        return self._tok
