"""Chat prompts as token ids: built-in ChatML, or the model's own Jinja template.

:func:`load_template` picks the renderer a package asks for (``chat_template.format``):
``jinja`` (runtime/jinja_template.py) for packages that carry their model's template,
``chatml`` for models without one, models whose template renders exactly as ChatML
(:func:`describe_template` checks at export) and packages written before templates were
rendered. The rest of this docstring is about the built-in ChatML renderer.

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
from .manifest import ChatTemplateSpec
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
    def _check(role: object, content: object) -> tuple[str, str]:
        """``role`` and ``content`` as given, once checked: a known role, string content."""
        if not isinstance(role, str) or role not in ROLES:
            raise MoechatError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise MoechatError(f"message content for role {role!r} must be a string")
        return role, content

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
            role, content = self._check(msg.get("role"), msg.get("content"))
            ids += self.turn_ids(role, content)
        if add_generation_prompt:
            ids += self.generation_prompt_ids()
        return ids

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The same prompt as a string (for display and debugging)."""
        parts = []
        for msg in self.with_system(messages):
            role, content = self._check(msg.get("role"), msg.get("content"))
            parts.append(f"{self.im_start}{role}\n{content}{self.im_end}\n")
        if add_generation_prompt:
            parts.append(f"{self.im_start}assistant\n")
        return "".join(parts)

    def end_of_turn(self) -> list[str]:
        """The control token that closes a reply."""
        return [self.im_end]


ChatTemplate = ChatMLTemplate | JinjaTemplate


def control_text(chat: ChatTemplateSpec) -> str:
    """Text naming a package's control tokens: the template's literals, its special
    token strings and the ChatML markers (see runtime/tokenizer.py)."""
    parts = ["<|im_start|>", "<|im_end|>"] if chat.format == "chatml" else []
    parts += [v for v in chat.special_tokens.values() if v]
    if chat.jinja:
        try:
            parts.append(literal_text(chat.jinja))
        except MoechatError:  # a ChatML package's template is not rendered: let it be
            if chat.format == "jinja":
                raise
    return "\0".join(parts)


def load_template(
    chat: ChatTemplateSpec, tokenizer_path: Path
) -> tuple[TextTokenizer, ChatTemplate]:
    """The tokenizer (with the template's control tokens) and the renderer of a package's
    ``chat_template`` section."""
    tokenizer = TextTokenizer.from_file(tokenizer_path, control_text(chat))
    if chat.format == "chatml":
        return tokenizer, ChatMLTemplate(tokenizer, default_system=chat.default_system)
    if not chat.jinja:
        raise MoechatError("moechat.json: chat_template.jinja is missing")
    specials = {k: v for k, v in chat.special_tokens.items() if k in SPECIAL_KEYS and v}
    return tokenizer, JinjaTemplate(tokenizer, chat.jinja, specials, dict(chat.kwargs))


def _family(source: str) -> str:
    """A name for the template's format, for ``moechat info`` (display only)."""
    for marker, name in (
        ("<think>", "qwen3 (ChatML with thinking)"),
        ("<|im_start|>", "chatml"),
        ("[INST]", "mistral [INST]"),
        ("<|start_of_role|>", "granite roles"),
        ("<|user|>", "tulu <|user|>/<|assistant|>"),
        ("Assistant:", "deepseek User:/Assistant:"),
    ):
        if marker in source:
            return name
    return "jinja"


_PROBES = (
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": " two\n\nlines \n"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "  b  "},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d\n"},
    ],
)


def _as_chatml(template: ChatTemplate) -> ChatMLTemplate | None:
    """The built-in ChatML renderer when it renders exactly what ``template`` does."""
    tok = template.tokenizer
    try:
        head = template.render_text([{"role": "user", "content": "hi"}], False)
        chatml = ChatMLTemplate(tok, default_system=None)
    except MoechatError:
        return None
    if head.startswith("<|im_start|>system\n") and head.endswith(
        "<|im_start|>user\nhi<|im_end|>\n"
    ):
        system = head[
            len("<|im_start|>system\n") : -len("<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
        ]
        chatml = ChatMLTemplate(tok, default_system=system)
    try:
        for probe in _PROBES:
            for gen in (True, False):
                if template.render_text(probe, gen) != chatml.render_text(probe, gen):
                    return None
    except MoechatError:
        return None
    return chatml


def describe_template(
    source: str | None, origin: str, special_tokens: Mapping[str, str], tokenizer_path: Path
) -> dict:
    """moechat.json's ``chat_template`` section for a model's template (None: ChatML).

    A template that renders exactly as ChatML (MiniMind, Qwen1.5/2) keeps the built-in
    ChatML renderer (format ``chatml``, with the template's default system prompt); any
    other is stored for the Jinja renderer (format ``jinja``). ``end_of_turn`` is the
    control token the template writes after a reply: the runtime stops on it.
    """
    specials = {k: v for k, v in special_tokens.items() if k in SPECIAL_KEYS and v}
    if not source:
        meta: dict[str, object] = {
            "format": "chatml",
            "source": "built-in",
            "default_system": DEFAULT_SYSTEM,
        }
        try:
            load_template(ChatTemplateSpec(default_system=DEFAULT_SYSTEM), tokenizer_path)
        except MoechatError as err:
            raise MoechatError(
                f"the model has no chat template and ChatML does not fit its tokenizer ({err})"
            ) from None
        return {**meta, "family": "chatml", "jinja": None, "end_of_turn": ["<|im_end|>"]}
    meta = {"format": "jinja", "jinja": source, "special_tokens": specials}
    spec = ChatTemplateSpec(format="jinja", jinja=source, special_tokens=specials)
    _, template = load_template(spec, tokenizer_path)
    user = {"role": "user", "content": "hi"}
    try:  # it renders and its tokens exist (some templates insist on a system message)
        template.render_ids([user])
    except MoechatError:
        template.render_ids([{"role": "system", "content": "s"}, user])
    end = template.end_of_turn()
    chatml = _as_chatml(template)
    if chatml is not None:
        meta = {"format": "chatml", "default_system": chatml.default_system, "jinja": source}
        meta["special_tokens"] = specials
    family = "chatml" if chatml is not None else _family(source)
    return {**meta, "source": origin, "family": family, "end_of_turn": end}


DEFAULT_SYSTEM = "You are a helpful assistant"


def template_summary(chat: ChatTemplateSpec) -> str:
    """One line for ``moechat info``: renderer, origin, format and end-of-turn token."""
    if chat.format == "jinja":
        head = f"jinja (from {chat.source or 'the model'}; {chat.family or 'own format'})"
    elif chat.jinja:
        head = f"chatml (the model's template from {chat.source or 'the model'} renders as ChatML)"
    else:
        head = "chatml (built-in)"
    end = ", ".join(chat.end_of_turn) or ("<|im_end|>" if chat.format == "chatml" else "eos")
    system = f", default system {chat.default_system!r}" if chat.default_system else ""
    return f"{head}, end of turn {end}{system}"
