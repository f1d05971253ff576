"""F1: every key binding and slash command, and what differs for ollama/oterm users."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

# People coming from `ollama run` or oterm try their habits first: what works, what differs.
OLLAMA_DIFFERENCES: tuple[tuple[str, str], ...] = (
    ("ctrl+c / ctrl+d", "as in ollama: Ctrl+C stops a reply (Esc too); on an empty prompt "
     "Ctrl+C or Ctrl+D quits; /bye works"),
    ('"""', 'no triple quotes for several lines: Shift+Enter or Ctrl+J inserts a newline'),
    ("/set parameter", "/set NAME VALUE (e.g. /set temperature 0.7); the values stay with the chat"),
    ("ollama pull / run", "no model hub: packages come from `moechat export`; /model PATH "
     "opens another one, `moechat chat PATH` starts with it"),
    ("ctrl+l", "lists the saved chats (in ollama it clears the screen: here /clear)"),
    ("/save, /load", "every chat is saved as you go (like oterm): Ctrl+L reopens one; "
     "/export writes Markdown or JSON"),
    ("/show info", "/model (or the status line) shows the model, provider and context use"),
)  # fmt: skip


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
            keys.add_row(Text(key), Text(what))  # as written: "[md|json]" is not markup
        commands = Table(
            title="Slash commands", show_header=False, box=None, expand=True, padding=(0, 1)
        )
        commands.add_column(style="bold", no_wrap=True)
        commands.add_column()
        for usage, what in self.commands:
            commands.add_row(Text(usage), Text(what))
        habits = Table(
            title="Coming from ollama or oterm", show_header=False, box=None, expand=True,
            padding=(0, 1),
        )  # fmt: skip
        habits.add_column(style="bold", no_wrap=True)
        habits.add_column()
        for theirs, ours in OLLAMA_DIFFERENCES:
            habits.add_row(Text(theirs), Text(ours))
        with VerticalScroll(classes="dialog help"):
            yield Static(keys)
            yield Static(commands)
            yield Static(habits)
            yield Static(
                Text("Start a message with // to send a line that begins with /.  Esc closes."),
                markup=False,
            )
