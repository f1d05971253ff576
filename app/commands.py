"""Slash commands typed into the prompt: parsing and the list shown by /help.

Only parsing lives here; :class:`moechat.app.tui.ChatApp` runs them. A prompt that starts
with ``//`` is sent as a message starting with ``/`` (the first slash is dropped).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from moechat.runtime.errors import MoechatError


@dataclass(frozen=True)
class CommandSpec:
    name: str
    usage: str
    help: str
    aliases: tuple[str, ...] = ()


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("help", "/help", "list the slash commands and key bindings", ("?",)),
    CommandSpec(
        "set",
        "/set NAME VALUE",
        "set a sampling parameter for the next replies (temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_new_tokens, seed, stop, system); /set alone shows them; "
        "/set defaults restores the model's defaults",
    ),
    CommandSpec(
        "system",
        "/system [TEXT]",
        "set the system prompt; without TEXT show it; /system clear removes it",
    ),
    CommandSpec(
        "clear",
        "/clear",
        "clear the screen and the model context (a new conversation; the old one stays listed)",
    ),
    CommandSpec("new", "/new", "start a new conversation with the default settings"),
    CommandSpec("regen", "/regen", "regenerate the last reply", ("regenerate", "retry")),
    CommandSpec("edit", "/edit", "put the last message back into the input to edit it"),
    CommandSpec("copy", "/copy", "copy the last reply to the clipboard"),
    CommandSpec(
        "export",
        "/export [md|json] [PATH]",
        "export the conversation as Markdown and/or JSON (ChatML); PATH is a folder or file",
    ),
    CommandSpec("list", "/list", "open the conversation list", ("conversations", "history")),
    CommandSpec("rename", "/rename TITLE", "rename the current conversation"),
    CommandSpec("delete", "/delete", "delete the current conversation (asks first)"),
    CommandSpec(
        "model",
        "/model [PATH]",
        "show the model, provider and context size; with PATH load another model package",
        ("info",),
    ),
    CommandSpec(
        "routing",
        "/routing [on|off|LAYER]",
        "routing view (F2): colour each reply's tokens by their top expert in a MoE layer, "
        "with a layers x experts histogram; /routing alone toggles it",
    ),
    CommandSpec("stop", "/stop", "stop the reply being generated"),
    CommandSpec("quit", "/quit", "quit moechat", ("exit", "bye", "q")),
)

_BY_NAME: dict[str, CommandSpec] = {}
for _spec in COMMANDS:
    _BY_NAME[_spec.name] = _spec
    for _alias in _spec.aliases:
        _BY_NAME[_alias] = _spec


@dataclass(frozen=True)
class SlashCommand:
    name: str  # canonical name
    arg: str  # the rest of the line, stripped


def parse(text: str) -> SlashCommand | None:
    """The command in ``text``, or None when ``text`` is a message to send.

    Raises MoechatError for an unknown command (with a suggestion when one is close).
    """
    stripped = text.strip()
    if not stripped.startswith("/") or stripped.startswith("//") or stripped == "/":
        return None
    head, _, rest = stripped[1:].partition(" ")
    if "\n" in head:
        head, _, more = head.partition("\n")
        rest = more + (" " + rest if rest else "")
    name = head.lower()
    spec = _BY_NAME.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
        hint = f" (did you mean /{close[0]}?)" if close else ""
        raise MoechatError(f"unknown command /{name}{hint}; /help lists the commands")
    return SlashCommand(spec.name, rest.strip())


def unescape(text: str) -> str:
    """A message typed as ``//text`` is sent as ``/text``."""
    stripped = text.lstrip()
    return stripped[1:] if stripped.startswith("//") else text


EXPORT_FORMATS = ("md", "json")
_FORMAT_ALIASES = {"markdown": "md", "all": "all", "both": "all"}


def parse_export(arg: str) -> tuple[str, str]:
    """``/export [md|json] [PATH]`` -> (format or "all", path or "").

    A single bare word (no ``/``, ``.`` or ``~``) is read as a format, so ``/export xml``
    is refused rather than written into a folder ``./xml/``; ``./xml`` is a folder.
    """
    first, _, rest = arg.strip().partition(" ")
    word = first.lower()
    if word in EXPORT_FORMATS or word in _FORMAT_ALIASES:
        return _FORMAT_ALIASES.get(word, word), rest.strip()
    if first and not rest.strip() and not any(c in first for c in "/\\.~"):
        raise MoechatError(
            f"unknown export format {first!r}: use /export md, /export json or /export "
            "(both); a folder or file name needs a / or an extension (./notes, chat.md)"
        )
    return "all", arg.strip()


def human_value(name: str, value: object) -> str:
    """A setting as /set shows it: ``seed = random``, ``stop = none``, not Python reprs."""
    if name == "seed" and value is None:
        return "random (no seed)"
    if name == "stop":
        strings = list(value or [])  # type: ignore[call-overload]
        return ", ".join(json.dumps(s, ensure_ascii=False) for s in strings) or "none"
    if name in ("system", "system_prompt"):
        return json.dumps(value, ensure_ascii=False) if value else "none (the model's default)"
    if name == "temperature" and value == 0:
        return "0 (greedy)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def split_set(arg: str) -> tuple[str, str]:
    """``"temperature 0.7"`` -> ``("temperature", "0.7")``; accepts ``name=value`` too."""
    arg = arg.strip()
    if "=" in arg.split(" ", 1)[0]:
        name, _, value = arg.partition("=")
    else:
        name, _, value = arg.partition(" ")
    return name.strip().lower().replace("-", "_"), value.strip()


def help_lines() -> list[tuple[str, str]]:
    """(usage, help) for every command, for the help screen."""
    return [(spec.usage, spec.help) for spec in COMMANDS]
