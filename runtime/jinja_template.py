"""A model's own Jinja chat template, rendered in a sandbox straight to token ids.

The template text comes from the model folder (tokenizer_config.json or a GGUF) and is
untrusted: it runs in jinja2's ``ImmutableSandboxedEnvironment`` set up as transformers
sets it up (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not HTML-escape, a ``{% generation %}`` tag
that renders its body), so it renders the same text and can run no code.

User text is data, whatever the template: the template is rendered a second time with
each message's content replaced by a unique placeholder. Control tokens are looked up
only in the template's own text between placeholders; each run of text between two
control tokens (template text and message contents joined, as the whole rendered string
has them) is encoded in one piece with :meth:`TextTokenizer.encode_text`, which never
matches a control token. For content free of control-token strings the ids equal
transformers' ``apply_chat_template(tokenize=True)``: ``tokenizers`` also splits the
text at added tokens first and encodes each run between them on its own.

Templates that rewrite content (``trim``, Qwen3's removal of earlier reasoning) are
followed: each rewritten content is located by rendering with only that message real.
Residual differences to transformers: a control token's ``lstrip``/``rstrip`` only
absorbs whitespace of the template's own text, not of an adjacent message; a token the
template builds from message text (``'<|' + role + '|>'``) stays text; a template whose
rewrites cannot be followed gets the contents verbatim.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from .errors import MoechatError
from .tokenizer import TextTokenizer

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The compiled template (MoechatError on a syntax error)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # transformers' {% generation %} marks replies
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise MoechatError(f"the chat template is not valid Jinja: {err.message}") from None


def literal_text(source: str) -> str:
    """The template's literal strings joined by NULs (where its control tokens are named)."""
    import jinja2.nodes

    template = compile_template(source)
    ast = template.environment.parse(source)
    parts = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    parts |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(parts))


@dataclass
class JinjaTemplate:
    """Render ``[{"role": ..., "content": ...}]`` with the model's own chat template."""

    tokenizer: TextTokenizer
    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ...
    kwargs: dict = field(default_factory=dict)  # extra template variables (enable_thinking)
    default_system: str | None = None  # the template supplies its own default

    def __post_init__(self) -> None:
        self._template = compile_template(self.source)
        controls = sorted(self.tokenizer.special_tokens, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, controls)) or "(?!)")
        self._nonce = f"{secrets.randbelow(10**8):08d}"  # digits: case filters keep them
        self._mark_re = re.compile(f"\ue000{self._nonce}(\\d+)\ue001")

    # -- text ---------------------------------------------------------------
    def render_text(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        """The prompt as the template renders it (for display, debugging and checks)."""
        return self._render(_checked(messages), add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        variables = {**self.special_tokens, **self.kwargs}
        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as err:
            raise MoechatError(f"the chat template refused the conversation: {err}") from None
        except Exception as err:  # a template bug (TypeError, IndexError ...) on this input
            raise MoechatError(
                f"the chat template failed on this conversation: {type(err).__name__}: {err}"
            ) from None

    def _mark(self, i: int) -> str:
        return f"\ue000{self._nonce}{i}\ue001"

    def _pieces(self, msgs: list[dict], add_generation_prompt: bool) -> list[str | int | tuple]:
        """The rendering as template text (str), verbatim contents (message index, int)
        and rewritten contents (``("data", text)``)."""
        marked = [{**m, "content": self._mark(i)} for i, m in enumerate(msgs)]
        split = self._mark_re.split(self._render(marked, add_generation_prompt))
        pieces: list[str | int | tuple] = [p if k % 2 == 0 else int(p) for k, p in enumerate(split)]
        real = self._render(msgs, add_generation_prompt)
        if _join(pieces, msgs) == real:
            return pieces
        # The template rewrites some contents: find each one's rendering on its own.
        counts = {i: split[1::2].count(str(i)) for i in range(len(msgs))}
        rewritten = list(pieces)
        for k, p in enumerate(pieces):
            if not isinstance(p, int) or counts[p] != 1:
                continue
            one = [m if i == p else marked[i] for i, m in enumerate(msgs)]
            text = self._render(one, add_generation_prompt)
            before = "".join(_text(q, marked) for q in pieces[:k])
            after = "".join(_text(q, marked) for q in pieces[k + 1 :])
            if (
                text.startswith(before)
                and text.endswith(after)
                and len(text) >= len(before) + len(after)
            ):
                rewritten[k] = ("data", text[len(before) : len(text) - len(after)])
        if _join(rewritten, msgs) == real:
            return rewritten
        if any("\ue000" in p or "\ue001" in p for p in pieces if isinstance(p, str)):
            raise MoechatError(
                "the chat template rewrites message text in a way moechat cannot follow"
            )
        return pieces  # not followable: contents verbatim (still data)

    # -- ids ------------------------------------------------------------------
    def render_ids(
        self,
        messages: Sequence[Mapping],
        add_generation_prompt: bool = True,
        reply_ids: Mapping[int, Sequence[int]] | None = None,
    ) -> list[int]:
        """Token ids of the conversation (plus the generation prompt).

        ``reply_ids`` maps the index of an assistant message to the ids that were
        generated for it: they are used as they are (the cache holds them) where the
        template puts the reply verbatim right after its generation prompt; elsewhere
        the reply's text is rendered like any other content.
        """
        msgs = _checked(messages)
        pieces = self._pieces(msgs, add_generation_prompt)
        reply_ids = dict(reply_ids or {})
        ids: list[int] = []
        run: list[str] = []  # text since the last control token

        def flush() -> None:
            if run:
                ids.extend(self.tokenizer.encode_text("".join(run)))
                run.clear()

        for k, p in enumerate(pieces):
            if isinstance(p, tuple):
                run.append(p[1])
            elif isinstance(p, int):
                cut = self._splice_cut(msgs, pieces, k) if p in reply_ids else None
                if cut is not None:
                    text = "".join(run)
                    run[:] = [text[: len(text) - cut]]
                    flush()
                    ids.extend(int(t) for t in reply_ids[p])
                else:
                    run.append(msgs[p]["content"])
            else:
                pos = 0
                for m in self._control_re.finditer(p):
                    head = p[pos : m.start()]
                    lstrip, rstrip = self.tokenizer.strips(m.group())
                    run.append(head.rstrip() if lstrip else head)
                    flush()
                    ids.append(self.tokenizer.token_id(m.group()))
                    pos = m.end()
                    if rstrip:
                        pos += len(p[pos:]) - len(p[pos:].lstrip())
                run.append(p[pos:])
        flush()
        return ids

    def _splice_cut(self, msgs: list[dict], pieces: list, k: int) -> int | None:
        """Whether the generated ids can stand in for the reply at piece ``k``: the text
        before it must be the generation prompt the reply was generated after, plus at
        most some whitespace that the reply itself starts with (DeepSeek's ``'Assistant:'``
        prompt and ``'Assistant: ' + reply``; the reply's first token carries the
        space). Returns how many characters of template text the ids replace, or None."""
        index = pieces[k]
        if msgs[index]["role"] != "assistant" or index == 0:
            return None
        before = "".join(_text(q, msgs) for q in pieces[:k])
        try:
            prompt = self._render(msgs[:index], True)
        except MoechatError:
            return None
        extra = before[len(prompt) :]
        if not before.startswith(prompt) or extra.strip():
            return None
        return len(extra) if msgs[index]["content"].startswith(extra) else None

    def generation_prompt_text(self, messages: Sequence[Mapping]) -> str:
        """What the template appends for the model to start a reply."""
        msgs = _checked(messages)
        full = self._render(msgs, True)
        bare = self._render(msgs, False)
        return full[len(bare) :] if full.startswith(bare) else ""

    def end_of_turn(self) -> list[str]:
        """The control token the template writes right after an assistant reply."""
        probes = (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
        )
        for probe in probes:
            try:
                pieces = self._pieces(probe, False)
            except MoechatError:
                continue
            last = len(probe) - 1
            ks = [k for k, p in enumerate(pieces) if p == last]
            if not ks:
                continue
            tail = "".join(p for p in pieces[ks[-1] + 1 :] if isinstance(p, str))
            found = self._control_re.search(tail)
            return [found.group()] if found else []
        return []


def _text(piece, msgs: list[dict]) -> str:
    if isinstance(piece, int):
        return msgs[piece]["content"]
    return piece[1] if isinstance(piece, tuple) else piece


def _join(pieces: list, msgs: list[dict]) -> str:
    return "".join(_text(p, msgs) for p in pieces)


def _checked(messages: Sequence[Mapping]) -> list[dict]:
    """Plain ``{"role", "content"}`` dicts of strings (what the template may see)."""
    out = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise MoechatError(f"a chat message needs a role, got {role!r}")
        if not isinstance(content, str):
            raise MoechatError(f"message content for role {role!r} must be a string")
        out.append({"role": str(role), "content": str(content)})
    return out
