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


def format_status(info: StatusInfo) -> str:
    parts = [info.model]
    if info.provider:
        parts.append(short_provider(info.provider))
    speed = "–" if info.tokens_per_s is None else f"{info.tokens_per_s:.1f}"
    parts.append(f"{speed} tok/s")
    ttft = "–" if info.ttft_ms is None else f"{info.ttft_ms:.0f} ms"
    parts.append(f"TTFT {ttft}")
    if info.max_context:
        pct = 100.0 * info.context_used / info.max_context
        parts.append(f"ctx {info.context_used}/{info.max_context} ({pct:.0f}%)")
    else:
        parts.append(f"ctx {info.context_used}/–")
    if info.temperature is not None:
        parts.append("greedy" if info.temperature == 0 else f"T {info.temperature:g}")
    if info.state:
        parts.append(info.state)
    return "  │  ".join(parts)


class StatusLine(Static):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id, markup=False)
        self.info = StatusInfo()

    def show(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.info, key, value)
        self.update(Text(format_status(self.info), no_wrap=True, overflow="ellipsis"))

    @property
    def text(self) -> str:
        return format_status(self.info)
