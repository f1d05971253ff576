"""Entry points the CLI calls: run the chat app on a model package, or self-check the UI.

Nothing heavy is imported at module level: the runtime (onnxruntime) is loaded inside
:func:`run_chat_app`, in the app's loader thread, so the window opens at once.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from moechat.app.engine import ChatEngine, EngineSource
from moechat.runtime.errors import MoechatError
from moechat.runtime.events import DoneEvent, FinishReason, GenerationStats, TokenEvent
from moechat.runtime.sampling import SamplingParams


def open_store(data_dir: Path | None = None, ask: Callable[[str], bool] | None = None):
    """The conversations database in ``data_dir`` (default: the user data dir). When it
    is damaged, ``ask`` (a yes/no question to the user) may have it moved aside: renamed,
    never deleted, and a new one started; otherwise the one-line error stands."""
    from moechat.app.paths import database_path
    from moechat.app.store import ConversationStore, DatabaseDamaged, move_aside

    path = database_path(data_dir)
    try:
        return ConversationStore(path)
    except DatabaseDamaged as err:
        if ask is None or not ask(f"moechat: {err}.\nMove it aside and start a new one? [y/N] "):
            raise
        aside = move_aside(path)
        print(f"moechat: the damaged database is kept as {aside}", file=sys.stderr)
        return ConversationStore(path)


def ask_on_terminal(question: str) -> bool:
    """A yes/no question on the terminal; no terminal (a pipe, a service) means no."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    print(question, end="", file=sys.stderr, flush=True)
    try:
        return input().strip().lower() in ("y", "yes")
    except EOFError:
        return False


def run_chat_app(
    model_dir: Path,
    device: str = "auto",
    data_dir: Path | None = None,
    *,
    conversation_id: int | None = None,
    resume: bool = False,
    export_dir: Path | None = None,
    threads: int | None = None,
    max_context: int | None = None,
) -> int:
    """Open the chat app on the model package in ``model_dir``; returns the exit code.

    The model loads in a worker thread while the window is already up (load errors are
    shown in the app). ``resume`` reopens the most recent conversation;
    ``conversation_id`` a given one. Raises MoechatError before the app starts when the
    package folder is missing or the conversations database cannot be opened.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MoechatError(f"model package not found: {model_dir}")
    from moechat.app.tui import ChatApp

    def load_package(path: Path) -> ChatEngine:
        from moechat.runtime.chat import ChatSession
        from moechat.runtime.model import load_model

        model = load_model(path, device=device, max_context=max_context, threads=threads)
        return ChatSession(model, system_prompt=None)

    def load() -> ChatEngine:
        return load_package(model_dir)

    store = open_store(data_dir, ask=ask_on_terminal)
    try:
        if resume and conversation_id is None:
            recent = store.list_conversations()
            conversation_id = recent[0].id if recent else None
        app = ChatApp(
            load,
            store,
            conversation_id=conversation_id,
            export_dir=export_dir or Path(store.path).parent / "exports",
            model_loader=load_package,
        )
        # The generation thread needs the GIL between tokens; a short switch interval lets
        # it take the GIL back quickly while the UI thread renders (default: 5 ms).
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, 0.001))
        try:
            app.run()
        finally:
            sys.setswitchinterval(switch_interval)
            app.persist_in_progress()  # KeyboardInterrupt or a crash: keep the partial reply
        return app.return_code or 0
    finally:
        store.close()


class EchoEngine:
    """A model-free engine for :func:`selfcheck_app`: streams the user text back."""

    model_name = "selfcheck-echo"
    provider = "CPUExecutionProvider"
    max_context = 4096

    def __init__(self) -> None:
        self.defaults = SamplingParams(temperature=0.0)
        self.system_prompt: str | None = None
        self.messages: list[dict] = []

    @property
    def context_used(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    def _reply(self, text: str, should_stop: Callable[[], bool]) -> Iterator:
        reply = f"echo: {text}"
        out = []
        start = time.perf_counter()
        reason: FinishReason = "eos"
        for i, piece in enumerate(re.findall(r"\S+\s*|\s+", reply)):
            if should_stop():
                reason = "cancelled"
                break
            out.append(piece)
            yield TokenEvent(piece, i)
        final = "".join(out)
        self.messages.append({"role": "assistant", "content": final})
        elapsed = max(time.perf_counter() - start, 1e-6)
        yield DoneEvent(
            final,
            list(range(len(out))),
            reason,
            GenerationStats(
                new_tokens=len(out),
                decode_tokens_per_s=len(out) / elapsed,
                context_used=self.context_used,
                max_context=self.max_context,
            ),
        )

    def send(self, user_text: str, params: SamplingParams, should_stop: Callable[[], bool]):
        self.messages.append({"role": "user", "content": user_text})
        return self._reply(user_text, should_stop)

    def regenerate(self, params: SamplingParams, should_stop: Callable[[], bool]):
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        return self._reply(self.messages[-1]["content"], should_stop)

    def pop_last_exchange(self) -> str:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        return self.messages.pop()["content"] if self.messages else ""

    def reset(self, messages: list[dict] | None = None) -> None:
        self.messages = [dict(m) for m in messages or []]


def selfcheck_app(
    engine: EngineSource | None = None,
    data_dir: Path | None = None,
    prompt: str = "hello from the selfcheck",
    timeout_s: float = 60.0,
) -> int:
    """Mount the app headless, send ``prompt``, wait for the reply, exit; 0 when it worked.

    Without ``engine`` a built-in echo engine is used (checks Textual, the stylesheet and
    SQLite are packaged); with a real engine it checks a whole turn. Without ``data_dir``
    a temporary folder is used, so the user's conversations are untouched.
    """
    import asyncio

    from moechat.app.store import ConversationStore
    from moechat.app.tui import ChatApp

    engine = engine if engine is not None else EchoEngine()
    with tempfile.TemporaryDirectory(prefix="moechat-selfcheck-") as tmp:
        folder = Path(data_dir) if data_dir is not None else Path(tmp)
        from moechat.app.paths import database_path

        store = ConversationStore(database_path(folder))
        app = ChatApp(engine, store, export_dir=folder)
        outcome: dict[str, object] = {"ok": False, "error": None}

        async def drive() -> None:
            async with app.run_test(headless=True, size=(100, 30)) as pilot:
                deadline = time.monotonic() + timeout_s
                while app.engine is None and app.engine_error is None:
                    if time.monotonic() > deadline:
                        raise MoechatError("selfcheck: the model did not load in time")
                    await pilot.pause(0.05)
                if app.engine is None:
                    raise MoechatError(f"selfcheck: model failed to load: {app.engine_error}")
                await app.send(prompt)
                while app.generating:
                    if time.monotonic() > deadline:
                        raise MoechatError("selfcheck: no reply in time")
                    await pilot.pause(0.05)
                reply = app.last_reply()
                stored = store.messages(app.conversation_id) if app.conversation_id else []
                outcome["ok"] = (
                    reply is not None
                    and len(stored) == 2
                    and stored[1].role == "assistant"
                    and "tok/s" in app.status.text
                )
                if not outcome["ok"]:
                    outcome["error"] = f"selfcheck: unexpected state, stored={stored!r}"

        try:
            asyncio.run(drive())
        except MoechatError as err:
            outcome["error"] = str(err)
        finally:
            store.close()
    if outcome["error"]:
        print(outcome["error"])
    return 0 if outcome["ok"] else 1
