"""The prompt: a multi-line TextArea where Enter sends and Up recalls earlier prompts."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from moechat.app.slash_menu import SlashMenu, takes_argument


class PromptInput(TextArea):
    """Enter sends; Shift+Enter or Ctrl+J inserts a newline.

    Up on the first line recalls the previous prompt, Down on the last line the next one.
    Keys that TextArea binds but the app uses (Ctrl+E, Ctrl+Y, Ctrl+C, Ctrl+D) are routed
    to app actions here so they work while the prompt has focus.
    """

    BINDINGS = [
        Binding("ctrl+e", "app.edit_last", "Edit", show=False),  # the footer has the app's
        Binding("ctrl+y", "app.copy_last", "Copy", show=False),
        Binding("ctrl+c", "interrupt", "Stop / copy / quit", show=False),
        Binding("ctrl+d", "delete_or_quit", "Delete right / quit", show=False),
        Binding("pageup", "app.scroll_log('up')", "Scroll up", show=False),
        Binding("pagedown", "app.scroll_log('down')", "Scroll down", show=False),
        Binding("ctrl+end", "app.scroll_log('end')", "Scroll to the end", show=False),
    ]

    class Submitted(Message):
        def __init__(self, prompt: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

    def __init__(self, *, id: str | None = None, placeholder: str = "") -> None:
        super().__init__(
            id=id,
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            compact=True,
            placeholder=placeholder,
            highlight_cursor_line=False,
        )
        self.prompts: list[str] = []
        self.menu: SlashMenu | None = None  # slash-command completion (set by the app)
        self._history_index: int | None = None
        self._draft = ""

    # -- sending and newlines --------------------------------------------------------

    async def _on_key(self, event: events.Key) -> None:
        if self.read_only:
            return
        if self._menu_key(event.key):
            event.stop()
            event.prevent_default()
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.submit()
            return
        if event.key in ("shift+enter", "ctrl+j", "alt+enter"):
            event.stop()
            event.prevent_default()
            start, end = self.selection
            self._replace_via_keyboard("\n", start, end)
            return
        await super()._on_key(event)

    def _menu_key(self, key: str) -> bool:
        """Keys for the slash-command list while it is open; True when one was used."""
        menu = self.menu
        if menu is None or not menu.display:
            return False
        # The list follows the text through Changed messages, which the app handles
        # after keys already queued (fast typing, tmux, a paste): bring it up to date, or
        # Enter would complete a prefix typed earlier and drop what followed.
        menu.update_for(self.text)
        if not menu.display:
            return False
        if key in ("up", "down"):
            menu.move(-1 if key == "up" else 1)
            return True
        if key == "escape":
            menu.hide()
            return True
        spec = menu.chosen
        if spec is None or key not in ("tab", "enter"):
            return False
        completed = f"/{spec.name}"
        typed = self.text[1:].lower()
        if key == "enter" and typed in (spec.name, *spec.aliases):
            menu.hide()  # a whole command name: Enter runs what was typed (/set alone too)
            return False
        needs_argument = takes_argument(spec)
        if key == "enter" and not needs_argument:
            menu.hide()
            self.load_text(completed)
            self.submit()
            return True
        self.load_text(completed + (" " if needs_argument or key == "tab" else ""))
        self.move_cursor(self.document.end)
        menu.hide()
        return True

    def submit(self) -> None:
        """Post the text and clear the prompt at once, so keys typed right after Enter
        (fast typing, pasted lines) start the next prompt instead of joining this one."""
        text = self.text
        if not text.strip():
            return
        self.load_text("")
        self._history_index = None
        self.post_message(self.Submitted(self, text))

    # -- history ---------------------------------------------------------------------

    def remember(self, text: str) -> None:
        """Add a sent prompt to the history (consecutive duplicates collapse)."""
        if text.strip() and (not self.prompts or self.prompts[-1] != text):
            self.prompts.append(text)
        self._history_index = None
        self._draft = ""

    def set_history(self, prompts: list[str]) -> None:
        self.prompts = [p for p in prompts if p.strip()]
        self._history_index = None

    def _show(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        if select or self.cursor_location[0] > 0 or not self.prompts:
            super().action_cursor_up(select)
            return
        if self._history_index is None:
            self._draft = self.text
            self._history_index = len(self.prompts) - 1
        elif self._history_index > 0:
            self._history_index -= 1
        else:
            return
        self._show(self.prompts[self._history_index])

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.document.line_count - 1
        if select or self._history_index is None or self.cursor_location[0] < last_row:
            super().action_cursor_down(select)
            return
        if self._history_index < len(self.prompts) - 1:
            self._history_index += 1
            self._show(self.prompts[self._history_index])
        else:
            self._history_index = None
            self._show(self._draft)

    # -- keys shared with the app ----------------------------------------------------

    async def action_interrupt(self) -> None:
        """Ctrl+C: stop a reply; else copy a selection; else clear the prompt; on an
        empty prompt quit (as in a shell, and as oterm and ollama users expect)."""
        if getattr(self.app, "generating", False):
            await self.app.run_action("stop")
        elif self.selected_text:
            self.action_copy()
        elif self.text:
            self.load_text("")
            self._history_index = None
        else:
            await self.app.run_action("quit")

    async def action_delete_or_quit(self) -> None:
        """Ctrl+D deletes right of the cursor; on an empty prompt it quits (like a shell)."""
        if self.text:
            self.action_delete_right()
        elif not getattr(self.app, "generating", False):
            await self.app.run_action("quit")
