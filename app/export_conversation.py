"""Export a stored conversation as Markdown or as JSON (the ChatML message list)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from moechat.app.store import Conversation, StoredMessage
from moechat.runtime.errors import MoechatError

FORMATS = ("md", "json")


def chatml_messages(
    messages: list[StoredMessage], system_prompt: str | None = None
) -> list[dict[str, str]]:
    """The ChatML list ``[{"role", "content"}]``, the system prompt first when set."""
    out: list[dict[str, str]] = []
    if system_prompt:
        out.append({"role": "system", "content": system_prompt})
    out.extend(m.chatml() for m in messages if not (system_prompt and m.role == "system"))
    return out


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _shown(params: Any) -> str:
    if not isinstance(params, dict):
        return "?"
    return ", ".join(f"{k}={v}" for k, v in params.items() if v not in (None, [], ""))


def sampling_lines(conversation: Conversation, messages: list[StoredMessage]) -> list[str]:
    """The sampling settings each reply was made with (one line when they all agree).

    Replies saved before moechat recorded them (schema v2) fall back to the
    conversation's current settings, and say so.
    """
    current = (conversation.settings or {}).get("params")
    replies = [m for m in messages if m.role == "assistant"]
    if not replies:
        return [f"- Sampling: {_shown(current)}"] if current else []
    recorded = [(n, m.settings.get("params")) for n, m in enumerate(replies, 1) if m.settings]
    distinct = {json.dumps(p, sort_keys=True) for _, p in recorded}
    if len(recorded) == len(replies) and len(distinct) == 1:
        label = "the reply" if len(replies) == 1 else f"all {len(replies)} replies"
        return [f"- Sampling ({label}): {_shown(recorded[0][1])}"]
    lines = [f"- Sampling, reply {n}: {_shown(p)}" for n, p in recorded]
    missing = len(replies) - len(recorded)
    if missing:
        lines.append(
            f"- Sampling of {missing} earlier repl{'y' if missing == 1 else 'ies'} not recorded; "
            f"the chat's settings now: {_shown(current)}"
        )
    return lines


def to_markdown(conversation: Conversation, messages: list[StoredMessage]) -> str:
    settings = conversation.settings or {}
    created = datetime.fromtimestamp(conversation.created_at).strftime("%Y-%m-%d %H:%M")
    lines = [f"# {conversation.title}", ""]
    meta = [f"- Created: {created}"]
    if conversation.model:
        meta.append(f"- Model: {conversation.model}")
    meta += sampling_lines(conversation, messages)
    lines += meta + [""]
    system_prompt = settings.get("system_prompt")
    if system_prompt:
        fence = _fence(system_prompt)
        lines += ["## System", "", f"{fence}text", system_prompt, fence, ""]
    for message in messages:
        heading = {"user": "User", "assistant": "Assistant", "system": "System"}[message.role]
        note = ""
        if message.partial:
            note = " (stopped)" if message.finish_reason == "cancelled" else " (partial)"
        lines += [f"## {heading}{note}", "", message.content.rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def to_json(conversation: Conversation, messages: list[StoredMessage]) -> str:
    """A JSON document whose ``messages`` is the ChatML list (loadable by other tools)."""
    settings = conversation.settings or {}
    doc: dict[str, Any] = {
        "title": conversation.title,
        "model": conversation.model,
        "created_at": datetime.fromtimestamp(conversation.created_at).isoformat(),
        "settings": settings,
        "messages": chatml_messages(messages, settings.get("system_prompt")),
        # per assistant message, in order: the settings it was generated with (or null)
        "reply_settings": [m.settings for m in messages if m.role == "assistant"],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def slug(title: str) -> str:
    text = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()
    return text[:40].rstrip("-") or "conversation"


def export_conversation(
    conversation: Conversation,
    messages: list[StoredMessage],
    fmt: str,
    target: Path,
) -> Path:
    """Write the conversation in ``fmt`` ("md" or "json").

    ``target`` is a folder (the file is named after the conversation) or a file path.
    """
    if fmt not in FORMATS:
        raise MoechatError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    if target.is_dir() or not target.suffix:
        target = target / f"{slug(conversation.title)}-{conversation.id}.{fmt}"
    text = to_markdown(conversation, messages) if fmt == "md" else to_json(conversation, messages)
    write_atomic(target, text)
    return target
