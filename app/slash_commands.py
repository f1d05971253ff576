"""Slash commands and command-palette entries of the chat app.

A mixin of :class:`moechat.app.tui.ChatApp`: every keyboard action reachable by
typing (``/set temperature 0.7``) or from the palette (Ctrl+P).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from textual.app import SystemCommand
from textual.screen import Screen

from moechat.app import commands
from moechat.runtime.errors import MoechatError
from moechat.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from moechat.app.conversation_actions import Severity
    from moechat.app.engine import ChatEngine


class CommandHost(Protocol):
    """What :class:`CommandActions` needs from the app it is mixed into (ChatApp): the
    actions it dispatches to and the settings it reads."""

    params: SamplingParams
    system_prompt: str | None
    engine: ChatEngine | None

    def notify(
        self, message: str, *, title: str = "", severity: Severity = "information",
        timeout: float | None = None, markup: bool = True,
    ) -> None: ...  # fmt: skip
    def _log_info(self, text: str, kind: str = "info") -> Awaitable[object]: ...
    def _set_settings(
        self, params: SamplingParams, system_prompt: str | None, *, save: bool = True
    ) -> None: ...
    def switch_model(self, path: Path) -> None: ...
    def action_help(self) -> None: ...
    def action_stop(self) -> None: ...
    def action_copy_last(self) -> None: ...
    def action_toggle_sampling(self) -> None: ...
    def action_model_info(self) -> None: ...
    def action_toggle_routing(self) -> None: ...
    def command_routing(self, arg: str) -> None: ...
    def action_conversations(self) -> None: ...
    def action_rename_conversation(self, title: str = "") -> None: ...
    def action_delete_conversation(self) -> None: ...
    async def action_new_chat(self, keep_settings: bool = False) -> None: ...
    async def action_regenerate(self) -> None: ...
    async def action_edit_last(self) -> None: ...
    async def action_export(self, fmt: str = "all", target: str = "") -> Any: ...
    async def action_quit(self) -> None: ...
    # this mixin's own methods, called through ``self``
    async def _command_set(self, arg: str) -> None: ...
    async def _command_system(self, arg: str) -> None: ...
    async def _palette_clear(self) -> None: ...
    async def _palette_export_md(self) -> None: ...
    async def _palette_export_json(self) -> None: ...


class CommandActions:
    """Dispatches slash commands and palette entries; its methods need a
    :class:`CommandHost` as ``self``."""

    # -- slash commands ----------------------------------------------------------------

    async def run_command(self: CommandHost, command: commands.SlashCommand) -> None:
        name, arg = command.name, command.arg
        if name == "help":
            self.action_help()
        elif name == "set":
            await self._command_set(arg)
        elif name == "system":
            await self._command_system(arg)
        elif name == "clear":
            await self.action_new_chat(keep_settings=True)
        elif name == "new":
            await self.action_new_chat()
        elif name == "regen":
            await self.action_regenerate()
        elif name == "edit":
            await self.action_edit_last()
        elif name == "copy":
            self.action_copy_last()
        elif name == "export":
            try:
                fmt, target = commands.parse_export(arg)
            except MoechatError as err:
                self.notify(str(err), title="Export", severity="error")
                return
            await self.action_export(fmt, target)
        elif name == "list":
            self.action_conversations()
        elif name == "rename":
            self.action_rename_conversation(arg)
        elif name == "delete":
            self.action_delete_conversation()
        elif name == "model":
            if arg:
                self.switch_model(Path(arg).expanduser())
            else:
                self.action_model_info()
        elif name == "routing":
            self.command_routing(arg)
        elif name == "stop":
            self.action_stop()
        elif name == "quit":
            await self.action_quit()

    async def _command_set(self: CommandHost, arg: str) -> None:
        if not arg:
            settings = {**self.params.to_dict(), "system": self.system_prompt}
            lines = [f"{k} = {commands.human_value(k, v)}" for k, v in settings.items()]
            await self._log_info("Sampling settings:\n" + "\n".join(lines))
            return
        key, value = commands.split_set(arg)
        if key in ("defaults", "default", "reset"):
            defaults = self.engine.defaults if self.engine else SamplingParams()
            self._set_settings(defaults, self.system_prompt)
            self.notify("Sampling settings reset to the model's defaults.")
            return
        if key in ("system", "system_prompt"):
            await self._command_system(value)
            return
        if not value:
            self.notify(f"Usage: /set {key} VALUE", severity="warning")
            return
        try:
            params = self.params.set_from_text(key, value)
        except MoechatError as err:
            self.notify(str(err), title="Refused", severity="error")
            return
        before = self.params.to_dict()
        self._set_settings(params, self.system_prompt)
        shown = ", ".join(
            f"{k} = {commands.human_value(k, v)}"
            for k, v in params.to_dict().items()
            if before[k] != v
        )
        self.notify(f"{shown or 'unchanged'} (applies to the next reply)", timeout=3)

    async def _command_system(self: CommandHost, arg: str) -> None:
        if not arg:
            current = self.system_prompt or "(none: the model's default)"
            await self._log_info(
                f"System prompt: {current}\nSet it with /system TEXT; /system clear."
            )
            return
        new = None if arg.strip().lower() in ("clear", "none", "off", "default") else arg
        self._set_settings(self.params, new)
        self.notify("System prompt " + ("cleared." if new is None else "set for the next reply."))

    # -- command palette -------------------------------------------------------------

    def get_system_commands(self: CommandHost, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)  # type: ignore[misc]  # textual's App
        palette: list[tuple[str, str, Callable[[], object]]] = [
            ("Stop generating", "Stop the reply (Esc)", self.action_stop),
            ("Regenerate reply", "Re-roll the last reply (Ctrl+R)", self.action_regenerate),
            ("Edit last message", "Put it back into the prompt (Ctrl+E)", self.action_edit_last),
            ("Sampling panel", "Show or hide the settings (Ctrl+S)", self.action_toggle_sampling),
            ("Conversations", "Open, rename, delete chats (Ctrl+L)", self.action_conversations),
            ("New chat", "Start a new conversation (Ctrl+N)", self.action_new_chat),
            ("Clear chat", "New conversation, same settings (/clear)", self._palette_clear),
            ("Copy last reply", "Copy it to the clipboard (Ctrl+Y)", self.action_copy_last),
            ("Export as Markdown", "Write a .md file (/export md)", self._palette_export_md),
            ("Export as JSON", "Write the ChatML list (/export json)", self._palette_export_json),
            ("Rename conversation", "Give this chat a title", self.action_rename_conversation),
            (
                "Delete conversation",
                "Delete this chat (asks first)",
                self.action_delete_conversation,
            ),
            ("Routing view", "Colour replies by their experts (F2)", self.action_toggle_routing),
            ("Model info", "Model, provider, context", self.action_model_info),
            ("Keys and commands", "The help screen (F1)", self.action_help),
        ]
        for title, help_text, action in palette:
            yield SystemCommand(title, help_text, action)

    async def _palette_clear(self: CommandHost) -> None:
        await self.action_new_chat(keep_settings=True)

    async def _palette_export_md(self: CommandHost) -> None:
        await self.action_export("md")

    async def _palette_export_json(self: CommandHost) -> None:
        await self.action_export("json")
