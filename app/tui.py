"""The chat app (Textual).

State has one owner each: the engine holds the model context, the store holds what the
user sees (every message is written as it completes; a streaming reply is upserted about
once a second and kept with ``partial=1`` when stopped), and this class keeps the two in
step and owns the widgets. Only the UI thread touches the store and the widgets.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Header

from moechat.app import commands, paths
from moechat.app.conversation_actions import ConversationActions, Severity
from moechat.app.engine import ChatEngine, EngineSource, short_provider
from moechat.app.generation import (
    FLUSH_INTERVAL_S,
    SAVE_INTERVAL_S,
    FrameGate,
    GenChunk,
    GenDone,
    Generation,
    GenerationKind,
    GenFailed,
    pump_events,
)
from moechat.app.help_screen import HelpScreen
from moechat.app.messages import FINISH_NOTES, AssistantMessage, InfoMessage, UserMessage, note_for
from moechat.app.prefill import PrefillDone, PrefillJob
from moechat.app.prompt_input import PromptInput
from moechat.app.routing_view import RoutingActions, RoutingView
from moechat.app.sampling_panel import SamplingPanel
from moechat.app.slash_commands import CommandActions
from moechat.app.slash_menu import SlashMenu
from moechat.app.status_line import StatusLine
from moechat.app.store import ConversationStore, StoredMessage
from moechat.app.welcome import Welcome, manifest_of, welcome_text
from moechat.runtime.errors import MoechatError
from moechat.runtime.events import DoneEvent, TokenEvent
from moechat.runtime.sampling import SamplingParams

TITLE_CHARS = 60
STATUS_INTERVAL_S = 0.25  # live tokens/s updates while streaming

# Keys handled by the prompt itself (listed on the help screen with the app bindings).
PROMPT_KEYS: list[tuple[str, str]] = [
    ("enter", "send the message (or run a /command)"),
    ("shift+enter, ctrl+j", "insert a newline"),
    ("up / down", "recall earlier prompts (on the first / last line of the prompt)"),
    ("ctrl+c", "stop the reply; else copy the selection, or clear the prompt; quit when empty"),
    ("ctrl+d", "quit (on an empty prompt)"),
    ("pageup / pagedown", "scroll the chat (scrolling up stops following the reply)"),
    ("ctrl+end", "jump to the end of the chat and follow the reply again"),
]


def _title_from(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "New chat")
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


class ChatApp(ConversationActions, CommandActions, RoutingActions, App[int]):
    """Chat with one model; conversations live in ``store``."""

    CSS_PATH = "chat.tcss"
    TITLE = "moechat"

    # Footer order: what a newcomer needs first (a 60-column footer shows about six).
    BINDINGS = [
        Binding("f1", "help", "Help", tooltip="this help screen"),
        Binding(
            "escape",
            "stop",
            "Stop",
            tooltip="stop the reply being generated (kept, marked stopped)",
        ),
        Binding("ctrl+l", "conversations", "Chats", tooltip="conversations: open, rename, delete"),
        Binding("ctrl+n", "new_chat", "New", tooltip="start a new conversation"),
        Binding("ctrl+s", "toggle_sampling", "Sampling", tooltip="show/hide the sampling panel"),
        Binding("ctrl+r", "regenerate", "Regen", tooltip="regenerate the last reply"),
        Binding("ctrl+e", "edit_last", "Edit", tooltip="put the last message back into the prompt"),
        Binding("ctrl+y", "copy_last", "Copy", tooltip="copy the last reply to the clipboard"),
        Binding(
            "f2",
            "toggle_routing",
            "Routing",
            tooltip="routing view: colour each reply's tokens by their top expert (/routing)",
        ),
        Binding(
            "ctrl+q", "quit", "Quit", tooltip="quit (a reply in progress is saved)", priority=True
        ),
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (90, "-wide")]

    def __init__(
        self,
        engine: EngineSource,
        store: ConversationStore,
        *,
        conversation_id: int | None = None,
        export_dir: Path | None = None,
        flush_interval: float = FLUSH_INTERVAL_S,
        save_interval: float = SAVE_INTERVAL_S,
        model_loader: Callable[[Path], ChatEngine] | None = None,
    ) -> None:
        super().__init__()
        self._engine_source = engine
        self.model_loader = model_loader  # for /model PATH
        self.engine: ChatEngine | None = None
        self.engine_error: str | None = None
        self.store = store
        self.export_dir = export_dir or paths.data_dir() / "exports"  # never the cwd
        self.flush_interval = flush_interval
        self.save_interval = save_interval
        self.conversation_id: int | None = None
        self._resume_id = conversation_id
        self.params = SamplingParams()
        self.system_prompt: str | None = None
        self._gen: Generation | None = None
        self._gen_counter = 0
        self._busy = False  # loading/switching conversations
        # Held by the worker that uses the engine (a reply, or reading a reopened chat);
        # the UI thread takes it (after cancelling a prefill) to change the conversation.
        self._engine_lock = threading.RLock()
        self._prefill: PrefillJob | None = None
        self._prefill_counter = 0
        self.show_routing = False  # the routing view (app/routing_view.py), off by default
        self.routing_layer: int | None = None  # the coloured MoE layer (None: the first)

    # -- layout ----------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with Horizontal(id="main"):
            yield VerticalScroll(id="chat-log")
            yield SamplingPanel(self.params, self.system_prompt, id="sampling")
        yield SlashMenu(id="slash-menu")
        yield PromptInput(
            id="prompt", placeholder="Message (Enter sends, Shift+Enter newline, /help)"
        )
        yield StatusLine(id="status")
        yield Footer()

    @property
    def chat_log(self) -> VerticalScroll:
        return self.query_one("#chat-log", VerticalScroll)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    @property
    def status(self) -> StatusLine:
        return self.query_one("#status", StatusLine)

    @property
    def panel(self) -> SamplingPanel:
        return self.query_one("#sampling", SamplingPanel)

    @property
    def generating(self) -> bool:
        return self._gen is not None

    async def on_mount(self) -> None:
        self.chat_log.anchor()
        self.prompt.focus()
        self.prompt.menu = self.query_one("#slash-menu", SlashMenu)
        self._install_signal_handlers()
        source = self._engine_source
        if callable(source) and not hasattr(source, "send"):
            self.status.show(model="loading model…", state="loading model…")
            await self.show_welcome()
            self._load_engine(source)
        else:
            await self._engine_ready(source)  # type: ignore[arg-type]

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_engine(self, factory: Callable[[], ChatEngine]) -> None:
        try:
            engine = factory()
        except MoechatError as err:
            self.call_from_thread(self._engine_failed, str(err))
        except Exception as err:  # noqa: BLE001 - shown to the user; the app keeps running
            self.call_from_thread(self._engine_failed, f"{type(err).__name__}: {err}")
        else:
            # in the form call_from_thread takes (T | Awaitable[T]): mypy cannot solve T
            # from a coroutine function's type alone
            ready: Callable[[ChatEngine], Awaitable[None] | None] = self._engine_ready
            self.call_from_thread(ready, engine)

    def _engine_failed(self, error: str) -> None:
        self._busy = False
        if self.engine is not None:  # a /model switch failed: keep the current model
            self.status.show(state="")
            self.notify(error, title="Model failed to load", severity="error", timeout=15)
            return
        self.engine_error = error
        self.status.show(model="no model", state=f"model failed to load: {error}")
        self.notify(error, title="Model failed to load", severity="error", timeout=30)
        self.call_later(self.show_welcome)

    async def _engine_ready(self, engine: ChatEngine) -> None:
        self._busy = False
        self.engine = engine
        self.engine_error = None
        self.status.show(
            model=engine.model_name,
            provider=engine.provider,
            context_used=engine.context_used,
            max_context=engine.max_context,
            state="",
        )
        if self._resume_id is not None:
            resume, self._resume_id = self._resume_id, None
            await self.load_conversation(resume)
        elif self.conversation_id is not None:
            self._sync_engine()
        else:
            self._set_settings(engine.defaults, None, save=False)
            self._sync_engine()
        if self.conversation_id is None:
            await self.show_welcome()

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGHUP (terminal closed): save the partial reply, then quit."""
        if self.is_headless:
            return
        import asyncio
        import signal

        try:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is not None:
                    loop.add_signal_handler(sig, self._terminate)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # Windows, or not the main thread

    def _terminate(self) -> None:
        import os
        import threading

        self.persist_in_progress()
        # With the terminal gone, Textual's output thread can die and block shutdown
        # forever; everything is saved by now, so make sure the process ends.
        watchdog = threading.Timer(3.0, os._exit, (0,))
        watchdog.daemon = True
        watchdog.start()
        self.exit(0)

    # -- small helpers ---------------------------------------------------------------

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: Severity = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Notifications show model/user text verbatim: markup is off unless asked for."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store call; a database error is shown and the app keeps running."""
        try:
            return fn(*args, **kwargs)
        except (MoechatError, sqlite3.Error) as err:
            self.notify(f"Could not save: {err}", title="Database error", severity="error")
            return None

    def _refuse_while_generating(self) -> bool:
        if self._gen is not None:
            self.notify("A reply is being generated; press Esc to stop it first.", timeout=3)
            return True
        if self._busy:
            self.notify("Busy loading; try again in a moment.", timeout=3)
            return True
        return False

    def _need_engine(self) -> ChatEngine | None:
        if self.engine is None:
            why = self.engine_error or "the model is still loading"
            self.notify(f"No model: {why}", severity="warning")
        return self.engine

    def _settings(self) -> dict[str, Any]:
        return {"params": self.params.to_dict(), "system_prompt": self.system_prompt}

    def _set_settings(
        self, params: SamplingParams, system_prompt: str | None, *, save: bool = True
    ) -> None:
        self.params = params
        self.system_prompt = system_prompt
        self.panel.load(params, system_prompt)
        self.status.show(temperature=params.temperature)
        if save and self.conversation_id is not None:
            self._db(self.store.update_settings, self.conversation_id, self._settings())

    def _push_system_prompt(self) -> None:
        engine = self.engine
        if engine is not None and engine.system_prompt != self.system_prompt:
            with self.engine_quiet():
                engine.system_prompt = self.system_prompt

    @contextmanager
    def engine_quiet(self) -> Iterator[None]:
        """For changes to the engine's conversation from the UI thread: cancel a
        background prefill and wait until it has let go (at most one chunk)."""
        self._cancel_prefill()
        with self._engine_lock:
            yield

    def _cancel_prefill(self) -> None:
        job, self._prefill = self._prefill, None
        if job is not None:
            job.stop.set()

    def _start_prefill(self) -> None:
        """Read the loaded conversation into the cache now, so the first reply is fast."""
        engine = self.engine
        if engine is None or not hasattr(engine, "prefill") or self._gen is not None:
            return
        self._cancel_prefill()
        self._prefill_counter += 1
        job = PrefillJob(self._prefill_counter, engine.context_used)
        self._prefill = job
        self.status.show(state=f"reading the chat ({job.tokens} tokens)…")
        self._run_prefill(engine, job)

    @work(thread=True, group="prefill", exit_on_error=False)
    def _run_prefill(self, engine: ChatEngine, job: PrefillJob) -> None:
        fed, error = 0, None
        with self._engine_lock:
            if not job.stop.is_set():
                try:
                    fed = engine.prefill(job.stop.is_set)  # type: ignore[attr-defined]
                except Exception as err:  # noqa: BLE001 - the next reply prefills instead
                    error = f"{type(err).__name__}: {err}"
        self.post_message(PrefillDone(job.id, fed, time.monotonic() - job.started_at, error))

    @on(PrefillDone)
    def _prefill_done(self, message: PrefillDone) -> None:
        job = self._prefill
        if job is None or job.id != message.job_id:
            return
        self._prefill = None
        engine = self.engine
        if engine is None:
            return
        if self._gen is not None:  # a reply waited for it; its own status takes over
            return
        if message.error:
            state = f"could not read the chat ahead: {message.error}"
        elif message.fed:
            state = f"chat read: {message.fed} tokens in {message.seconds:.1f} s"
        else:
            state = ""
        self.status.show(context_used=engine.context_used, state=state)

    def _stored(self) -> list[StoredMessage]:
        if self.conversation_id is None:
            return []
        return self._db(self.store.messages, self.conversation_id) or []

    def _sync_engine(self) -> None:
        """Load the stored conversation into the engine (after a switch or a failure)."""
        engine = self.engine
        if engine is None:
            return
        history = [m.chatml() for m in self._stored() if m.role != "system"]
        try:
            with self.engine_quiet():
                engine.reset(history or None)
                self._push_system_prompt()
        except MoechatError as err:
            self.notify(str(err), title="Model error", severity="error")
        self.status.show(context_used=engine.context_used, max_context=engine.max_context)
        if history:
            self._start_prefill()

    def _blocks(self) -> list[UserMessage | AssistantMessage]:
        return [w for w in self.chat_log.children if isinstance(w, (UserMessage, AssistantMessage))]

    def last_reply(self) -> AssistantMessage | None:
        for widget in reversed(self._blocks()):
            if isinstance(widget, AssistantMessage):
                return widget
        return None

    async def _remove_from(self, seq: int) -> None:
        for widget in self._blocks():
            if widget.seq is not None and widget.seq >= seq:
                await widget.remove()

    async def show_welcome(self) -> None:
        """The first screen, until the first message: the model, the main keys, how to
        open another model (refreshed when the model has loaded)."""
        if self._blocks():
            return
        engine = self.engine
        if engine is None:
            loading = (
                f"The model failed to load: {self.engine_error}"
                if self.engine_error
                else "Loading the model…"
            )
            text = welcome_text({}, "", loading=loading, can_switch=self.model_loader is not None)
        else:
            text = welcome_text(
                manifest_of(engine), engine.model_name, can_switch=self.model_loader is not None
            )
        self.chat_log.anchor(False)  # read from the top; the first message anchors again
        existing = self.chat_log.query(Welcome)
        if existing:
            existing.first().show(text)
        else:
            await self.chat_log.mount(Welcome(text), before=0 if self.chat_log.children else None)

    async def _hide_welcome(self) -> None:
        await self.chat_log.query(Welcome).remove()

    async def _log_info(self, text: str, kind: str = "info") -> InfoMessage:
        widget = InfoMessage(text, kind=kind)
        await self.chat_log.mount(widget)
        self.chat_log.anchor()
        return widget

    # -- sending ---------------------------------------------------------------------

    @on(PromptInput.Changed, "#prompt")
    def _prompt_changed(self, event: PromptInput.Changed) -> None:
        menu = self.prompt.menu
        if menu is not None:
            menu.update_for(self.prompt.text)

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        """The prompt already cleared itself; text that is refused goes back into it."""
        text = event.text
        if not text.strip():
            return
        try:
            command = commands.parse(text)
        except MoechatError as err:
            self.notify(str(err), severity="error")
            self.restore_prompt(text)
            return
        if command is not None:
            self.prompt.remember(text.strip())
            await self.run_command(command)
            return
        if self._refuse_while_generating() or self._need_engine() is None:
            self.restore_prompt(text)
            return
        await self.send(commands.unescape(text).strip())

    def restore_prompt(self, text: str) -> None:
        """Put refused text back into the prompt, unless the user typed something new."""
        prompt = self.prompt
        if not prompt.text.strip():
            prompt.load_text(text)
            prompt.move_cursor(prompt.document.end)

    async def send(self, text: str) -> None:
        engine = self._need_engine()
        if engine is None or self._refuse_while_generating():
            return
        if self.conversation_id is None:
            cid = self._db(
                self.store.create_conversation,
                _title_from(text),
                model=engine.model_name,
                settings=self._settings(),
            )
            if cid is None:
                self.restore_prompt(text)
                return
            self.conversation_id = cid
            self.sub_title = _title_from(text)
        user_seq = self._db(self.store.add_message, self.conversation_id, "user", text)
        if user_seq is None:
            self.restore_prompt(text)
            return
        self.prompt.remember(text)
        block = AssistantMessage(seq=user_seq + 1)
        block.set_class(True, "-pending")
        await self._hide_welcome()
        await self.chat_log.mount_all([UserMessage(text, seq=user_seq), block])
        self.chat_log.anchor()
        params = self.params
        self._start(
            "send",
            block,
            user_seq + 1,
            lambda stop: engine.send(text, params, stop),
            user_seq=user_seq,
            user_text=text,
        )

    def _start(
        self,
        kind: GenerationKind,
        block: AssistantMessage,
        seq: int,
        run: Callable[[Callable[[], bool]], Iterable[TokenEvent | DoneEvent]],
        **extra: Any,
    ) -> None:
        assert self.conversation_id is not None
        self._push_system_prompt()
        self._gen_counter += 1
        gen = Generation(
            settings=self._settings(),
            id=self._gen_counter,
            kind=kind,
            conversation_id=self.conversation_id,
            seq=seq,
            block=block,
            gate=FrameGate(self.flush_interval),
            **extra,
        )
        self._gen = gen
        block.query(RoutingView).remove()  # a regenerated reply gets its own
        self.status.show(state="generating…", tokens_per_s=None, ttft_ms=None)
        self.refresh_bindings()
        self._generate(gen, run)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(
        self, gen: Generation, run: Callable[[Callable[[], bool]], Iterable[Any]]
    ) -> None:
        def events() -> Iterator[Any]:
            yield from run(gen.should_stop)

        with self._engine_lock:  # after a background prefill: it was this reply's work
            pump_events(events(), gen.id, self.post_message, gen.gate)

    def _current(self, gen_id: int) -> Generation | None:
        gen = self._gen
        return gen if gen is not None and gen.id == gen_id else None

    @on(GenChunk)
    async def _chunk(self, message: GenChunk) -> None:
        gen = self._current(message.gen_id)
        if gen is None:
            return
        now = time.monotonic()
        if gen.first_token_at is None and message.first_token_at is not None:
            gen.first_token_at = message.first_token_at
        gen.tokens += message.tokens
        gen.text += message.text
        block: AssistantMessage = gen.block
        if block.has_class("-pending"):
            block.set_pending(False)
        await block.append(message.text)
        if gen.gate is not None:
            self.call_after_refresh(gen.gate.drawn)
        if now - gen.last_status >= STATUS_INTERVAL_S:
            gen.last_status = now
            first = gen.first_token_at or now
            rate = (gen.tokens - 1) / (now - first) if gen.tokens > 1 and now > first else None
            self.status.show(
                tokens_per_s=rate,
                ttft_ms=(first - gen.started_at) * 1000.0,
                state="stopping…"
                if gen.stop_event.is_set()
                else f"generating… {gen.tokens} tokens",
            )
        if now - gen.last_save >= self.save_interval:
            self._save_reply(gen, gen.text, partial=True, reason=None)

    def _save_reply(
        self,
        gen: Generation,
        text: str,
        *,
        partial: bool,
        reason: str | None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        gen.last_save = time.monotonic()
        gen.saved_len = len(text)
        self._db(
            self.store.upsert_message,
            gen.conversation_id,
            gen.seq,
            "assistant",
            text,
            partial=partial,
            finish_reason=reason,
            stats=stats,
            settings=gen.settings,
        )

    def persist_in_progress(self) -> None:
        """Save the streaming reply now as a stopped partial (quit, signal, crash path)."""
        self._cancel_prefill()
        gen = self._gen
        if gen is None:
            return
        gen.stop_event.set()
        self._save_reply(gen, gen.text, partial=True, reason="cancelled")

    @on(GenDone)
    async def _done(self, message: GenDone) -> None:
        gen = self._current(message.gen_id)
        if gen is None:
            return
        done = message.done
        block: AssistantMessage = gen.block
        text = done.text if (done.text or not gen.text) else gen.text
        await block.finish(text)
        await self.show_reply_routing(block, done)
        reason = done.finish_reason
        if reason == "cancelled":
            block.set_note(FINISH_NOTES["cancelled"], "stopped")
        elif reason in ("length", "context"):
            block.set_note(FINISH_NOTES[reason], "info")
        else:
            block.set_note("")
        self._save_reply(
            gen,
            text,
            partial=reason == "cancelled",
            reason=reason,
            stats=dataclasses.asdict(done.stats),
        )
        self._gen = None
        stats = done.stats
        engine = self.engine
        self.status.show(
            provider=stats.provider or (engine.provider if engine else ""),
            tokens_per_s=stats.decode_tokens_per_s,
            ttft_ms=stats.ttft_ms,
            context_used=stats.context_used or (engine.context_used if engine else 0),
            max_context=stats.max_context or (engine.max_context if engine else 0),
            state="stopped" if reason == "cancelled" else f"{stats.new_tokens} tokens",
        )
        if done.dropped_turns:
            self.notify(
                f"The {done.dropped_turns} oldest turns no longer fit the context and were "
                "left out of the prompt.",
                title="Context full",
                severity="warning",
            )
        self.refresh_bindings()

    @on(GenFailed)
    async def _failed(self, message: GenFailed) -> None:
        gen = self._current(message.gen_id)
        if gen is None:
            return
        self._gen = None
        block: AssistantMessage = gen.block
        if gen.kind == "send":
            await block.finish("")
            first = gen.user_seq if gen.user_seq is not None else gen.seq
            self._db(self.store.delete_messages_from, gen.conversation_id, first)
            await self._remove_from(first)
            self.restore_prompt(gen.user_text)
            hint = "Your message is back in the prompt."
        else:
            old_text, old_partial, old_reason = gen.previous or ("", False, None)
            await block.finish(old_text)
            note, kind = note_for(
                StoredMessage(0, 0, 0, "assistant", old_text, old_partial, old_reason)
            )
            block.set_note(note, kind)
            self._db(
                self.store.upsert_message,
                gen.conversation_id,
                gen.seq,
                "assistant",
                old_text,
                partial=old_partial,
                finish_reason=old_reason,
            )
            hint = "The previous reply was kept."
        self._sync_engine()
        await self._log_info(f"Model error: {message.error}", kind="error")
        self.notify(f"{message.error}\n{hint}", title="Model error", severity="error", timeout=10)
        self.status.show(state="error")
        self.refresh_bindings()

    # -- actions ---------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":  # hidden from the footer unless a reply is being generated
            return True if self._gen is not None else False
        if action in ("regenerate", "edit_last", "new_chat"):
            return None if self._gen is not None else True
        return True

    def action_stop(self) -> None:
        """Esc: stop the reply now; what was generated so far is kept, marked stopped."""
        gen = self._gen
        if gen is None:
            return
        gen.stop_event.set()
        self.status.show(state="stopping…")

    async def action_regenerate(self) -> None:
        if self._refuse_while_generating():
            return
        engine = self._need_engine()
        if engine is None:
            return
        stored = self._stored()
        if not stored:
            self.notify("Nothing to regenerate yet.")
            return
        last = stored[-1]
        if last.role == "user":
            # The reply never arrived (the app quit or failed): send the message again.
            try:
                with self.engine_quiet():
                    text = engine.pop_last_exchange()
            except MoechatError as err:
                self.notify(str(err), severity="error")
                return
            self._db(self.store.delete_messages_from, last.conversation_id, last.seq)
            await self._remove_from(last.seq)
            await self.send(text)
            return
        block = self.last_reply()
        if block is None or block.seq != last.seq:
            await self.load_conversation(last.conversation_id)
            block = self.last_reply()
            if block is None:
                return
        await block.finish("")
        block.set_note("")
        block.set_pending(True)
        self.chat_log.anchor()
        params = self.params
        self._start(
            "regen",
            block,
            last.seq,
            lambda stop: engine.regenerate(params, stop),
            previous=(last.content, last.partial, last.finish_reason),
        )

    async def action_edit_last(self) -> None:
        if self._refuse_while_generating():
            return
        engine = self._need_engine()
        if engine is None:
            return
        stored = self._stored()
        users = [m for m in stored if m.role == "user"]
        if not users:
            self.notify("No message to edit yet.")
            return
        try:
            with self.engine_quiet():
                text = engine.pop_last_exchange()
        except MoechatError as err:
            self.notify(str(err), severity="error")
            return
        last_user = users[-1]
        self._db(self.store.delete_messages_from, last_user.conversation_id, last_user.seq)
        await self._remove_from(last_user.seq)
        self.prompt.load_text(text or last_user.content)
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.focus()
        self.status.show(context_used=engine.context_used)

    def action_scroll_log(self, where: str) -> None:
        """PageUp/PageDown from the prompt scroll the chat; scrolling up pauses following
        the reply until the view is back at the bottom (Ctrl+End jumps there)."""
        log = self.chat_log
        if where == "up":
            log.scroll_page_up(animate=False)
        elif where == "down":
            log.scroll_page_down(animate=False)
        else:
            log.anchor()

    def action_toggle_sampling(self) -> None:
        panel = self.panel
        panel.display = not panel.display
        if panel.display:
            panel.query_one("#param-temperature").focus()
        else:
            self.prompt.focus()

    @on(SamplingPanel.Changed)
    def _panel_changed(self, message: SamplingPanel.Changed) -> None:
        self.params = message.params
        self.system_prompt = message.system_prompt
        self.status.show(temperature=message.params.temperature)
        if self.conversation_id is not None:
            self._db(self.store.update_settings, self.conversation_id, self._settings())

    def action_copy_last(self) -> None:
        block = self.last_reply()
        if block is None or not block.text:
            self.notify("No reply to copy yet.")
            return
        self.copy_to_clipboard(block.text)
        self.notify(f"Copied the last reply ({len(block.text)} characters).", timeout=2)

    def _help_keys(self) -> list[tuple[str, str]]:
        rows = list(PROMPT_KEYS)
        for binding in self.BINDINGS:
            assert isinstance(binding, Binding)
            rows.append((binding.key, binding.tooltip or binding.description))
        rows.append(("ctrl+p", "command palette (every action)"))
        rows.append(("tab / shift+tab", "move between the prompt, log and panel"))
        return rows

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
            return
        self.push_screen(HelpScreen(self._help_keys(), commands.help_lines()))

    async def action_quit(self) -> None:
        self._quit()

    def _quit(self) -> None:
        self.persist_in_progress()
        self.exit(0)

    def action_help_quit(self) -> None:
        """Ctrl+C outside the prompt (Textual only hints at Ctrl+Q): stop a reply, else quit."""
        if self._gen is not None:
            self.action_stop()
        else:
            self._quit()

    def action_model_info(self) -> None:
        engine = self.engine
        if engine is None:
            self.notify(f"No model: {self.engine_error or 'still loading'}")
            return
        switch = "/model PATH loads another package" if self.model_loader else ""
        self.call_later(
            self._log_info,
            f"Model {engine.model_name} on {short_provider(engine.provider)}; context "
            f"{engine.context_used}/{engine.max_context} tokens. {switch}".rstrip(),
        )

    def switch_model(self, path: Path) -> None:
        """Load another model package in the background; the conversation carries over."""
        loader = self.model_loader
        if loader is None:
            self.notify("Switching models is not available here; quit and run: moechat chat MODEL")
            return
        if self._refuse_while_generating():
            return
        if not path.is_dir():
            self.notify(f"Not a model package folder: {path}", severity="error")
            return
        self._busy = True
        self.status.show(state=f"loading {path.name}…")
        self._load_engine(lambda: loader(path))


def run_chat_app(*args: Any, **kwargs: Any) -> int:
    """See :func:`moechat.app.launch.run_chat_app` (re-exported for the CLI)."""
    from moechat.app.launch import run_chat_app as run

    return run(*args, **kwargs)


def selfcheck_app(*args: Any, **kwargs: Any) -> int:
    """See :func:`moechat.app.launch.selfcheck_app`."""
    from moechat.app.launch import selfcheck_app as check

    return check(*args, **kwargs)
