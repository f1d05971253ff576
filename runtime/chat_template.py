"""Chat prompts as token ids: built-in ChatML, or the model's own Jinja template.

:func:`load_template` picks the renderer a package asks for (``chat_template.format``):
``jinja`` (runtime/jinja_template.py) for packages that carry their model's template,
``chatml`` for packages without one (and packages written before templates were
rendered). The rest of this docstring is about the built-in ChatML renderer.


Layout::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n

Control tokens are emitted as ids; everything between them (``"{role}\\n{content}"`` and
the ``"\\n"`` after ``<|im_end|>``) is encoded with ``encode_text`` (data), so message text
can never inject control tokens. ``"{role}\\n{content}"`` is encoded as one piece rather
than role and content separately: BPE pre-tokenisation would otherwise split a leading
whitespace run of the content (e.g. ``"\\n\\n\\nx"``) differently from the whole string.
With one piece per segment between control tokens the ids equal those of encoding
:meth:`ChatMLTemplate.render_text` with special tokens recognised, for any content free
of control-token strings.

A reply generated after :meth:`ChatMLTemplate.generation_prompt_ids` is best kept as
``generation_prompt_ids() + generated + turn_end_ids()`` (the ids the model actually saw);
``turn_ids("assistant", text)`` re-encodes ``"assistant\n" + text`` as one piece and may
tokenize differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import MoechatError
from .jinja_template import SPECIAL_KEYS, JinjaTemplate, literal_text
from .tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant")


class ChatMLTemplate:
    """Render ``[{"role": ..., "content": ...}]`` conversations in ChatML."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        default_system: str | None = "You are a helpful assistant",
        im_start: str = "<|im_start|>",
        im_end: str = "<|im_end|>",
    ) -> None:
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.im_start = im_start
        self.im_end = im_end
        self.im_start_id = tokenizer.token_id(im_start)
        self.im_end_id = tokenizer.token_id(im_end)
        self._newline_ids = tokenizer.encode_text("\n")

    def with_system(self, messages: Sequence[dict]) -> list[dict]:
        """The messages with the default system message prepended when one is needed."""
        msgs = list(messages)
        if self.default_system is not None and (not msgs or msgs[0].get("role") != "system"):
            msgs.insert(0, {"role": "system", "content": self.default_system})
        return msgs

    @staticmethod
    def _check(role: str, content: str) -> None:
        if role not in ROLES:
            raise MoechatError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise MoechatError(f"message content for role {role!r} must be a string")

    def turn_ids(self, role: str, content: str) -> list[int]:
        """Ids of one complete turn: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""
        self._check(role, content)
        body = self.tokenizer.encode_text(f"{role}\n{content}")
        return [self.im_start_id, *body, *self.turn_end_ids()]

    def turn_end_ids(self) -> list[int]:
        """Ids of ``<|im_end|>\n``, closing a reply generated after the generation prompt."""
        return [self.im_end_id, *self._newline_ids]

    def generation_prompt_ids(self) -> list[int]:
        """Ids of ``<|im_start|>assistant\\n`` (the model continues after it)."""
        return [self.im_start_id, *self.tokenizer.encode_text("assistant\n")]

    def render_ids(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        reply_ids: Mapping[int, Sequence[int]] | None = None,
    ) -> list[int]:
        """Token ids of the whole conversation (plus the generation prompt); ``reply_ids``
        (message index -> generated ids) stand in for assistant replies."""
        ids: list[int] = []
        shift = len(self.with_system(messages)) - len(messages)
        replies = {k + shift: v for k, v in (reply_ids or {}).items()}
        for i, msg in enumerate(self.with_system(messages)):
            if i in replies and msg.get("role") == "assistant":
                ids += self.generation_prompt_ids() + [int(t) for t in replies[i]]
                ids += self.turn_end_ids()
                continue
            ids += self.turn_ids(msg.get("role"), msg.get("content"))
        if add_generation_prompt:
            ids += self.generation_prompt_ids()
        return ids

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The same prompt as a string (for display and debugging)."""
        parts = []
        for msg in self.with_system(messages):
            role, content = msg.get("role"), msg.get("content")
            self._check(role, content)
            parts.append(f"{self.im_start}{role}\n{content}{self.im_end}\n")
        if add_generation_prompt:
            parts.append(f"{self.im_start}assistant\n")
        return "".join(parts)

    def end_of_turn(self) -> list[str]:
        """The control token that closes a reply."""
        return [self.im_end]


ChatTemplate = ChatMLTemplate | JinjaTemplate


def control_text(chat: Mapping) -> str:
    """Text naming a package's control tokens: the template's literals, its special
    token strings and the ChatML markers (see runtime/tokenizer.py)."""
    parts = ["<|im_start|>", "<|im_end|>"] if chat.get("format", "chatml") == "chatml" else []
    parts += [str(v) for v in (chat.get("special_tokens") or {}).values() if v]
    if chat.get("format") == "jinja" and isinstance(chat.get("jinja"), str):
        parts.append(literal_text(chat["jinja"]))
    return "\0".join(parts)


def load_template(chat: Mapping, tokenizer_path: Path) -> tuple[TextTokenizer, ChatTemplate]:
    """The tokenizer (with the template's control tokens) and the renderer of a package's
    ``chat_template`` section."""
    if not isinstance(chat, Mapping):
        raise MoechatError("moechat.json: chat_template must be an object")
    fmt = chat.get("format", "chatml")
    if fmt not in ("chatml", "jinja"):
        raise MoechatError(f"moechat.json: unknown chat template format {fmt!r}")
    tokenizer = TextTokenizer.from_file(tokenizer_path, control_text(chat))
    if fmt == "chatml":
        return tokenizer, ChatMLTemplate(tokenizer, default_system=chat.get("default_system"))
    source = chat.get("jinja")
    if not isinstance(source, str) or not source:
        raise MoechatError("moechat.json: chat_template.jinja is missing")
    specials = chat.get("special_tokens") or {}
    if not isinstance(specials, Mapping):
        raise MoechatError("moechat.json: chat_template.special_tokens must be an object")
    specials = {k: str(v) for k, v in specials.items() if k in SPECIAL_KEYS and v}
    kwargs = chat.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise MoechatError("moechat.json: chat_template.kwargs must be an object")
    return tokenizer, JinjaTemplate(tokenizer, source, specials, dict(kwargs))
