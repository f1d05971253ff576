"""One line under the prompt: model, provider, speed, time to first token, context use."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

from moechat.app.engine import short_provider


@dataclass
class StatusInfo:
    model: str = "no model"
    provider: str = ""
    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    context_used: int = 0
    max_context: int = 0
    new_tokens: int | None = None
    state: str = ""  # "loading…", "generating", "stopped", an error, ...
    temperature: float | None = None


def _parts(info: StatusInfo) -> dict[str, str]:
    parts = {"model": info.model}
    if info.provider:
        parts["provider"] = short_provider(info.provider)
    speed = "–" if info.tokens_per_s is None else f"{info.tokens_per_s:.1f}"
    parts["speed"] = f"{speed} tok/s"
    ttft = "–" if info.ttft_ms is None else f"{info.ttft_ms:.0f} ms"
    parts["ttft"] = f"TTFT {ttft}"
    if info.max_context:
        pct = 100.0 * info.context_used / info.max_context
        parts["ctx"] = f"ctx {info.context_used}/{info.max_context} ({pct:.0f}%)"
    else:
        parts["ctx"] = f"ctx {info.context_used}/–"
    if info.temperature is not None:
        parts["temperature"] = "greedy" if info.temperature == 0 else f"T {info.temperature:g}"
    if info.state:
        parts["state"] = info.state
    return parts


# What goes first when the line is too narrow (the context meter and the state stay).
_DROP_ORDER = ("provider", "temperature", "ttft", "speed")


def format_status(info: StatusInfo, width: int | None = None) -> str:
    """The status line; with ``width``, the least useful parts go until it fits."""
    parts = _parts(info)
    text = "  │  ".join(parts.values())
    if width is None or len(text) <= width:
        return text
    for key in ("", *_DROP_ORDER):  # "": first only the narrower separator
        parts.pop(key, None)
        text = " │ ".join(parts.values())
        if len(text) <= width:
            return text
    if len(parts["model"]) > 12:
        parts["model"] = parts["model"][:11] + "…"
    if "ctx" in parts and info.max_context:
        parts["ctx"] = f"ctx {info.context_used}/{info.max_context}"
    return " │ ".join(parts.values())


class StatusLine(Static):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id, markup=False)
        self.info = StatusInfo()

    def show(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.info, key, value)
        self.refresh()

    def render(self) -> Text:
        width = self.content_size.width or None
        return Text(format_status(self.info, width), no_wrap=True, overflow="ellipsis")

    @property
    def text(self) -> str:
        return format_status(self.info)

    @property
    def shown(self) -> str:
        """The line as drawn at the widget's width."""
        return format_status(self.info, self.content_size.width or None)
