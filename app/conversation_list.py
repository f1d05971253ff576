"""Ctrl+L: the stored conversations, to open, rename, delete (after a confirmation) or start."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from moechat.app.dialogs import ConfirmScreen, TextPromptScreen
from moechat.app.store import Conversation, ConversationStore
from moechat.runtime.errors import MoechatError

Choice = tuple[str, int | None]  # ("open", id) or ("new", None)


def _when(ts: float) -> str:
    moment = datetime.fromtimestamp(ts)
    if moment.date() == datetime.now().date():
        return moment.strftime("%H:%M")
    return moment.strftime("%Y-%m-%d")


class ConversationListScreen(ModalScreen[Choice | None]):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("n", "new", "New"),
        Binding("r", "rename", "Rename"),
        Binding("d,delete", "delete", "Delete"),
    ]

    def __init__(
        self,
        store: ConversationStore,
        current_id: int | None,
        on_deleted: Callable[[int], None] | None = None,
        on_renamed: Callable[[int, str], None] | None = None,
    ) -> None:
        super().__init__(classes="dialog-screen")
        self.store = store
        self.current_id = current_id
        self.on_deleted = on_deleted
        self.on_renamed = on_renamed
        self.conversations: list[Conversation] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog conversations"):
            yield Static("Conversations", classes="dialog-title")
            yield OptionList(id="conversation-options")
            yield Static(
                Text("Enter open · n new · r rename · d delete · Esc close"),
                markup=False,
                classes="hint",
            )

    def on_mount(self) -> None:
        self.refresh_list()
        self.query_one(OptionList).focus()

    def refresh_list(self, highlight_id: int | None = None) -> None:
        options = self.query_one(OptionList)
        keep = highlight_id
        if keep is None and options.highlighted is not None and self.conversations:
            keep = self.conversations[min(options.highlighted, len(self.conversations) - 1)].id
        try:
            self.conversations = self.store.list_conversations()
        except MoechatError as err:  # a damaged or busy database: say so, keep running
            self.notify(str(err), title="Database error", severity="error", timeout=15)
            self.conversations = []
        options.clear_options()
        for conv in self.conversations:
            label = Text()
            label.append("● " if conv.id == self.current_id else "  ", style="bold")
            label.append(conv.title, style="bold" if conv.id == self.current_id else "")
            label.append(f"   {conv.message_count} msgs · {_when(conv.updated_at)}", style="dim")
            options.add_option(Option(label, id=str(conv.id)))
        if not self.conversations:
            options.add_option(Option(Text("No conversations yet (n starts one)"), disabled=True))
            return
        index = 0
        for i, conv in enumerate(self.conversations):
            if conv.id == (keep if keep is not None else self.current_id):
                index = i
        options.highlighted = index

    def selected(self) -> Conversation | None:
        index = self.query_one(OptionList).highlighted
        if index is None or not self.conversations or index >= len(self.conversations):
            return None
        return self.conversations[index]

    @on(OptionList.OptionSelected)
    def _open(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self.dismiss(("open", int(event.option.id)))

    def action_close(self) -> None:
        self.dismiss(None)

    def action_new(self) -> None:
        self.dismiss(("new", None))

    def action_rename(self) -> None:
        conv = self.selected()
        if conv is None:
            return

        def done(title: str | None) -> None:
            if not title:
                return
            try:
                self.store.rename_conversation(conv.id, title)
            except MoechatError as err:
                self.notify(str(err), severity="error")
                return
            if self.on_renamed:
                self.on_renamed(conv.id, title)
            self.refresh_list(conv.id)

        self.app.push_screen(TextPromptScreen("New title:", conv.title), done)

    def action_delete(self) -> None:
        conv = self.selected()
        if conv is None:
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.store.delete_conversation(conv.id)
            except MoechatError as err:
                self.notify(str(err), title="Database error", severity="error", timeout=15)
                return
            if self.on_deleted:
                self.on_deleted(conv.id)
            self.notify(f"Deleted “{conv.title}”")
            self.refresh_list()

        self.app.push_screen(
            ConfirmScreen(
                f"Delete “{conv.title}” ({conv.message_count} messages)? This cannot be undone."
            ),
            done,
        )
