"""Message blocks in the chat log."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from moechat.app.store import StoredMessage

FINISH_NOTES = {
    "cancelled": "■ stopped",
    "length": "… max new tokens reached (/set max_new_tokens N for longer replies)",
    "context": "… context window full",
    "interrupted": "■ partial (the app quit before the reply finished)",
    "error": "✖ failed",
}


def note_for(message: StoredMessage) -> tuple[str, str | None]:
    """(note under a stored reply, its style) from how the reply ended."""
    reason = message.finish_reason
    if reason == "cancelled":
        return FINISH_NOTES["cancelled"], "stopped"
    if message.partial:
        return FINISH_NOTES["interrupted"], "stopped"
    if reason in ("length", "context"):
        return FINISH_NOTES[reason], "info"
    return "", None


class UserMessage(Static):
    """The user's text, shown verbatim (no markup or Markdown is interpreted)."""

    def __init__(self, text: str, *, seq: int | None = None) -> None:
        super().__init__(Text(text), markup=False, classes="message user")
        self.seq = seq
        self.text = text
        self.border_title = "You"


class AssistantMessage(Vertical):
    """A reply: Markdown that streams in, then is re-rendered once from the final text."""

    def __init__(
        self,
        text: str = "",
        *,
        seq: int | None = None,
        title: str = "Assistant",
        note: str = "",
        note_kind: str | None = None,
    ) -> None:
        super().__init__(classes="message assistant")
        self.seq = seq
        self.text = text
        self.border_title = title
        self._stream: MarkdownStream | None = None
        self._note = note
        self._note_kind = note_kind

    def compose(self) -> ComposeResult:
        yield Markdown(self.text, classes="reply")
        yield Static(Text(self._note), classes="note", markup=False)

    def on_mount(self) -> None:
        self.set_note(self._note, self._note_kind)

    @property
    def markdown(self) -> Markdown:
        return self.query_one(".reply", Markdown)

    @property
    def note(self) -> str:
        return self._note

    def set_note(self, note: str, kind: str | None = None) -> None:
        self._note, self._note_kind = note, kind
        widget = self.query_one(".note", Static)
        widget.update(Text(note))
        widget.set_class(bool(note), "-visible")
        for k in ("stopped", "error", "info"):
            self.set_class(kind == k, f"-{k}")

    def set_pending(self, pending: bool) -> None:
        self.set_class(pending, "-pending")

    async def append(self, fragment: str) -> None:
        if not fragment:
            return
        self.text += fragment
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
        await self._stream.write(fragment)

    async def finish(self, text: str) -> None:
        """Stop streaming and render ``text`` once (fixes blocks cut mid-stream)."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.text = text
        self.set_pending(False)
        await self.markdown.update(text)


class InfoMessage(Static):
    """A note from the app in the log (help output, command results, errors)."""

    def __init__(self, text: str, *, kind: str = "info") -> None:
        super().__init__(Text(text), markup=False, classes=f"message info -{kind}")
