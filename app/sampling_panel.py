"""The sampling panel: every sampling parameter and the system prompt, checked as you type.

A value is applied (``Changed`` is posted) only when it is valid; an invalid one is refused
with its error shown under the field and the last valid value stays in force.
"""

from __future__ import annotations

import json

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, Static, TextArea

from moechat.runtime.errors import MoechatError
from moechat.runtime.sampling import SamplingParams

FIELDS: tuple[tuple[str, str], ...] = (
    ("temperature", "Temperature (0 = greedy)"),
    ("top_p", "Top-p"),
    ("top_k", "Top-k (0 = off)"),
    ("min_p", "Min-p (0 = off)"),
    ("repetition_penalty", "Repetition penalty (1 = off)"),
    ("max_new_tokens", "Max new tokens"),
    ("seed", "Seed (empty = random)"),
    ("stop", "Stop strings (\\n escapes, or a JSON list)"),
)


_INTEGER_FIELDS = ("top_k", "max_new_tokens", "seed")


def _bound(value: float, integer: bool) -> str:
    return f"{int(value):,}".replace(",", "_") if integer else f"{value:g}"


def allowed(name: str) -> str:
    """The allowed range as shown under a field, e.g. ``number in (0, 1]``."""
    if name == "stop":
        return f"up to {SamplingParams.MAX_STOP} strings; empty = none"
    rng = SamplingParams.RANGES.get(name)
    if rng is None:
        return ""
    integer = name in _INTEGER_FIELDS
    if name == "seed":
        return f"integer ≥ {_bound(rng.lo, True)}; empty = random"
    lo = "(" if rng.lo_open else "["
    hi = ")" if rng.hi_open else "]"
    kind = "integer" if integer else "number"
    return f"{kind} in {lo}{_bound(rng.lo, integer)}, {_bound(rng.hi, integer)}{hi}"


def display_value(params: SamplingParams, name: str) -> str:
    value = getattr(params, name)
    if name == "seed":
        return "" if value is None else str(value)
    if name == "stop":
        if not value:
            return ""
        if len(value) == 1 and "\\" not in value[0] and not value[0].startswith("["):
            return value[0].replace("\n", "\\n").replace("\t", "\\t")
        return json.dumps(value, ensure_ascii=False)
    return f"{value:g}" if isinstance(value, float) else str(value)


class SamplingPanel(VerticalScroll):
    """Docked panel; the app shows/hides it with Ctrl+S."""

    class Changed(Message):
        """Valid new settings from the panel."""

        def __init__(self, params: SamplingParams, system_prompt: str | None) -> None:
            super().__init__()
            self.params = params
            self.system_prompt = system_prompt

    def __init__(
        self, params: SamplingParams, system_prompt: str | None = None, *, id: str | None = None
    ) -> None:
        super().__init__(id=id)
        self.params = params
        self.system_prompt = system_prompt

    def compose(self) -> ComposeResult:
        yield Label("Sampling  (Ctrl+S hides)", classes="panel-title")
        for name, title in FIELDS:
            yield Label(title, classes="field-title")
            yield Input(display_value(self.params, name), id=f"param-{name}", compact=True)
            yield Static(Text(allowed(name)), id=f"range-{name}", classes="range", markup=False)
        yield Label("System prompt", classes="field-title")
        yield TextArea(
            self.system_prompt or "",
            id="param-system",
            soft_wrap=True,
            compact=True,
            highlight_cursor_line=False,
        )
        yield Static(
            Text("applies to the next reply; saved with the conversation"),
            classes="range",
            markup=False,
        )

    def load(self, params: SamplingParams, system_prompt: str | None) -> None:
        """Show ``params`` (after /set, a conversation switch or a reset)."""
        self.params = params
        self.system_prompt = system_prompt
        if not self.is_mounted:
            return
        for name, _ in FIELDS:
            widget = self.query_one(f"#param-{name}", Input)
            if widget.value != display_value(params, name):
                widget.value = display_value(params, name)
            self._set_error(name, None)
        area = self.query_one("#param-system", TextArea)
        if area.text != (system_prompt or ""):
            area.load_text(system_prompt or "")

    def _set_error(self, name: str, error: str | None) -> None:
        widget = self.query_one(f"#param-{name}", Input)
        note = self.query_one(f"#range-{name}", Static)
        widget.set_class(error is not None, "-refused")
        note.set_class(error is not None, "-error")
        note.update(Text(error if error else allowed(name)))

    def errors(self) -> dict[str, str]:
        """Fields whose current text is refused, with the message shown."""
        out = {}
        for name, _ in FIELDS:
            if self.query_one(f"#param-{name}", Input).has_class("-refused"):
                out[name] = str(self.query_one(f"#range-{name}", Static).content)
        return out

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if not event.input.id or not event.input.id.startswith("param-"):
            return
        name = event.input.id.removeprefix("param-")
        try:
            new = self.params.set_from_text(name, event.value)
        except MoechatError as err:
            self._set_error(name, f"✖ {err}")
            return
        self._set_error(name, None)
        if new != self.params:
            self.params = new
            self.post_message(self.Changed(new, self.system_prompt))

    @on(Input.Submitted)
    def _input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        errors = self.errors()
        if errors:
            self.app.notify(next(iter(errors.values())), severity="error", title="Refused")

    @on(TextArea.Changed, "#param-system")
    def _system_changed(self, event: TextArea.Changed) -> None:
        event.stop()
        text = event.text_area.text
        new = text if text.strip() else None
        if new != self.system_prompt:
            self.system_prompt = new
            self.post_message(self.Changed(self.params, new))
