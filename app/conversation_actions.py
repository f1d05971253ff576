"""Conversation actions of the chat app: new, open, list, rename, delete, export.

A mixin of :class:`moechat.app.tui.ChatApp`, kept apart so that the app class holds
the generation flow and this module the conversation bookkeeping around it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from moechat.app.conversation_list import ConversationListScreen
from moechat.app.dialogs import ConfirmScreen, TextPromptScreen
from moechat.app.export_conversation import FORMATS, export_conversation
from moechat.app.messages import AssistantMessage, UserMessage, note_for
from moechat.runtime.errors import MoechatError
from moechat.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from textual.containers import VerticalScroll
    from textual.screen import Screen

    from moechat.app.engine import ChatEngine
    from moechat.app.generation import Generation
    from moechat.app.prompt_input import PromptInput
    from moechat.app.status_line import StatusLine
    from moechat.app.store import ConversationStore, StoredMessage

Severity = Literal["information", "warning", "error"]


class ConversationHost(Protocol):
    """What :class:`ConversationActions` needs from the app it is mixed into (ChatApp)."""

    conversation_id: int | None
    sub_title: str
    params: SamplingParams
    system_prompt: str | None
    engine: ChatEngine | None
    export_dir: Path
    _gen: Generation | None
    _busy: bool

    @property
    def store(self) -> ConversationStore: ...
    @property
    def chat_log(self) -> VerticalScroll: ...
    @property
    def prompt(self) -> PromptInput: ...
    @property
    def status(self) -> StatusLine: ...

    def notify(
        self, message: str, *, title: str = "", severity: Severity = "information",
        timeout: float | None = None, markup: bool = True,
    ) -> None: ...  # fmt: skip
    def push_screen(
        self, screen: Screen[Any], callback: Callable[[Any], Any] | None = None
    ) -> Any: ...
    def call_later(self, callback: Callable[..., Any], *args: Any) -> bool: ...
    def engine_quiet(self) -> AbstractContextManager[None]: ...
    def _db(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def _refuse_while_generating(self) -> bool: ...
    def _set_settings(
        self, params: SamplingParams, system_prompt: str | None, *, save: bool = True
    ) -> None: ...
    def _push_system_prompt(self) -> None: ...
    def _stored(self) -> list[StoredMessage]: ...
    def _sync_engine(self) -> None: ...
    def _save_reply(
        self, gen: Generation, text: str, *, partial: bool, reason: str | None
    ) -> object: ...
    def _log_info(self, text: str, kind: str = "info") -> Awaitable[object]: ...
    async def show_welcome(self) -> None: ...
    # this mixin's own methods, called through ``self``
    async def action_new_chat(self, keep_settings: bool = False) -> None: ...
    async def load_conversation(self, conversation_id: int) -> None: ...
    def _deleted(self, conv_id: int) -> None: ...


class ConversationActions:
    """Conversation bookkeeping; its methods need a :class:`ConversationHost` as ``self``."""

    conversation_id: int | None  # (ChatApp's; declared so the mixin's own writes type-check)

    async def action_new_chat(self: ConversationHost, keep_settings: bool = False) -> None:
        if self._refuse_while_generating():
            return
        self.conversation_id = None
        self.sub_title = ""
        await self.chat_log.remove_children()
        if keep_settings:
            params, system_prompt = self.params, self.system_prompt
        else:
            params = self.engine.defaults if self.engine else SamplingParams()
            system_prompt = None
        self._set_settings(params, system_prompt, save=False)
        if self.engine is not None:
            try:
                with self.engine_quiet():
                    self.engine.reset()
            except MoechatError as err:
                self.notify(str(err), severity="error")
            self._push_system_prompt()
            self.status.show(context_used=self.engine.context_used, state="")
        await self.show_welcome()
        self.prompt.focus()

    async def load_conversation(self: ConversationHost, conversation_id: int) -> None:
        if self._refuse_while_generating():
            return
        conv = self._db(self.store.get_conversation, conversation_id)
        if conv is None:
            self.notify(f"Conversation {conversation_id} not found.", severity="error")
            return
        self._busy = True
        try:
            self.conversation_id = conv.id
            self.sub_title = conv.title
            stored = self._stored()
            defaults = self.engine.defaults if self.engine else SamplingParams()
            params = defaults
            raw = conv.settings.get("params")
            if isinstance(raw, dict):
                try:
                    params = SamplingParams.from_dict({**defaults.to_dict(), **raw})
                except MoechatError as err:
                    self.notify(f"Stored settings ignored: {err}", severity="warning")
            system_prompt = conv.settings.get("system_prompt") or None
            self._set_settings(params, system_prompt, save=False)
            log = self.chat_log
            await log.remove_children()
            widgets: list[UserMessage | AssistantMessage] = []
            for m in stored:
                if m.role == "user":
                    widgets.append(UserMessage(m.content, seq=m.seq))
                elif m.role == "assistant":
                    note, kind = note_for(m)
                    widgets.append(
                        AssistantMessage(m.content, seq=m.seq, note=note, note_kind=kind)
                    )
            if widgets:
                await log.mount_all(widgets)
            log.anchor()
            self.prompt.set_history([m.content for m in stored if m.role == "user"])
            self.status.show(state="", tokens_per_s=None, ttft_ms=None)
            self._sync_engine()  # shows the chat's context use and starts reading it ahead
        finally:
            self._busy = False

    def action_conversations(self: ConversationHost) -> None:
        if self._refuse_while_generating():
            return

        async def chosen(choice: tuple[str, int | None] | None) -> None:
            if choice is None:
                return
            what, conv_id = choice
            if what == "open" and conv_id is not None:
                await self.load_conversation(conv_id)
            elif what == "new":
                await self.action_new_chat()

        def renamed(conv_id: int, title: str) -> None:
            if conv_id == self.conversation_id:
                self.sub_title = title

        self.push_screen(
            ConversationListScreen(self.store, self.conversation_id, self._deleted, renamed),
            chosen,
        )

    def _deleted(self: ConversationHost, conv_id: int) -> None:
        if conv_id == self.conversation_id:
            self.call_later(self.action_new_chat)

    def action_delete_conversation(self: ConversationHost) -> None:
        if self._refuse_while_generating():
            return
        conv_id = self.conversation_id
        if conv_id is None:
            self.notify("This chat is not saved yet; nothing to delete.")
            return
        conv = self._db(self.store.get_conversation, conv_id)
        title = conv.title if conv else "this conversation"

        async def done(yes: bool | None) -> None:
            if yes:
                self._db(self.store.delete_conversation, conv_id)
                self.notify(f"Deleted “{title}”.")
                await self.action_new_chat()

        self.push_screen(ConfirmScreen(f"Delete “{title}”? This cannot be undone."), done)

    def action_rename_conversation(self: ConversationHost, title: str = "") -> None:
        conv_id = self.conversation_id
        if conv_id is None:
            self.notify("Send a message first; new chats are named after it.")
            return

        def done(new_title: str | None) -> None:
            if new_title:
                self._db(self.store.rename_conversation, conv_id, new_title)
                self.sub_title = new_title.strip()

        if title.strip():
            done(title)
        else:
            conv = self._db(self.store.get_conversation, conv_id)
            self.push_screen(TextPromptScreen("New title:", conv.title if conv else ""), done)

    async def action_export(
        self: ConversationHost, fmt: str = "all", target: str = ""
    ) -> list[Path]:
        conv_id = self.conversation_id
        conv = self._db(self.store.get_conversation, conv_id) if conv_id is not None else None
        if conv is None:
            self.notify("Nothing to export yet.")
            return []
        if self._gen is not None:
            self._save_reply(self._gen, self._gen.text, partial=True, reason=None)
        formats = FORMATS if fmt in ("all", "both", "") else (fmt,)
        base = Path(target).expanduser() if target else self.export_dir
        written: list[Path] = []
        try:
            for f in formats:
                written.append(export_conversation(conv, self._stored(), f, base))
        except (MoechatError, OSError) as err:
            self.notify(f"Export failed: {err}", severity="error")
            return written
        await self._log_info("Exported to " + ", ".join(str(p) for p in written))
        self.notify("Exported " + ", ".join(p.name for p in written), timeout=4)
        return written
