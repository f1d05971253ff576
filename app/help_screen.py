"""F1: every key binding and slash command."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "app.pop_screen", "Close")]

    def __init__(self, keys: list[tuple[str, str]], commands: list[tuple[str, str]]) -> None:
        super().__init__(classes="dialog-screen")
        self.keys = keys
        self.commands = commands

    def compose(self) -> ComposeResult:
        keys = Table(title="Keys", show_header=False, box=None, expand=True, padding=(0, 1))
        keys.add_column(style="bold", no_wrap=True)
        keys.add_column()
        for key, what in self.keys:
            keys.add_row(key, what)
        commands = Table(
            title="Slash commands", show_header=False, box=None, expand=True, padding=(0, 1)
        )
        commands.add_column(style="bold", no_wrap=True)
        commands.add_column()
        for usage, what in self.commands:
            commands.add_row(usage, what)
        with VerticalScroll(classes="dialog help"):
            yield Static(keys)
            yield Static(commands)
            yield Static(
                Text("Start a message with // to send a line that begins with /.  Esc closes."),
                markup=False,
            )
