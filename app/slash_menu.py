"""Slash-command completion where you type: a list above the prompt while a command
name is being typed (``/`` shows them all), each with a one-line description.

Up/Down pick, Tab completes, Enter completes and runs a command that takes no
argument (``/he`` Enter runs ``/help``; a whole name runs as typed), Esc closes the list.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from moechat.app.commands import COMMANDS, CommandSpec


def matches(text: str) -> list[CommandSpec]:
    """Commands whose name (or an alias) starts with what is typed after ``/``.

    Empty once the name is complete and followed by a space, for a message (``//``), or
    for more than one line.
    """
    if not text.startswith("/") or text.startswith("//") or "\n" in text or " " in text:
        return []
    typed = text[1:].lower()
    return [
        spec
        for spec in COMMANDS
        if spec.name.startswith(typed) or any(a.startswith(typed) for a in spec.aliases)
    ]


def short_help(spec: CommandSpec) -> str:
    return spec.help.split(";")[0].split(" (")[0]


def takes_argument(spec: CommandSpec) -> bool:
    """Whether the usage has an argument that is required (``/rename TITLE``)."""
    words = spec.usage.split()[1:]
    return any(not w.startswith("[") for w in words)


class SlashMenu(OptionList):
    """Never focused: the prompt keeps the keyboard and drives the list."""

    can_focus = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False, compact=True)
        self.specs: list[CommandSpec] = []
        self.display = False

    def update_for(self, text: str) -> None:
        specs = matches(text)
        if [s.name for s in specs] == [s.name for s in self.specs] and self.display == bool(specs):
            return
        self.specs = specs
        self.clear_options()
        for spec in specs:
            label = Text(no_wrap=True, overflow="ellipsis")
            label.append(f"{spec.usage:<26}", style="bold")
            label.append(" " + short_help(spec))
            self.add_option(Option(label, id=spec.name))
        self.display = bool(specs)
        if specs:
            self.highlighted = 0

    def hide(self) -> None:
        self.specs = []
        self.clear_options()
        self.display = False

    def move(self, step: int) -> None:
        if self.specs:
            current = self.highlighted or 0
            self.highlighted = (current + step) % len(self.specs)

    @property
    def chosen(self) -> CommandSpec | None:
        if not self.specs or self.highlighted is None:
            return None
        return self.specs[self.highlighted]
