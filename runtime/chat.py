"""A conversation on one model, in its chat template, reusing the KV cache across turns.

The session remembers which token ids sit in the cache. Every turn renders the whole
conversation to ids, keeps the longest common prefix with the cache and feeds only
the rest, so a new turn prefills just its new tokens, and regenerate/edit rewind the
cache rather than recompute it. Assistant replies are rendered from the ids that were
generated (not re-tokenized text), so the cache stays a prefix of the next prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from moechat.runtime.errors import MoechatError
from moechat.runtime.events import DoneEvent, GenerationEvent
from moechat.runtime.generator import generate
from moechat.runtime.model import LoadedModel
from moechat.runtime.sampling import SamplingParams


def _never() -> bool:
    return False


class ChatSession:
    def __init__(self, model: LoadedModel, system_prompt: str | None = None) -> None:
        self.model = model
        self._system_prompt = system_prompt
        self.messages: list[dict] = []
        self._reply_ids: dict[int, list[int]] = {}  # message index -> generated ids
        self._cache_ids: list[int] = []
        self._stale: int | None = None  # tokens of an edited conversation not yet in the cache
        # replies carry each token's routing (DoneEvent.routing) while this is on
        self.trace_routing = False
        self.reset()

    # -- facts the UI shows -------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def max_context(self) -> int:
        return self.model.max_context

    @property
    def context_used(self) -> int:
        """Tokens the conversation takes: the cache after a reply or :meth:`prefill`; after
        a reset or an edit, the conversation as it will be fed (the cache lags behind)."""
        if self._stale is None:
            return self.model.decoder.length
        if self._stale < 0:
            self._stale = len(self._history_ids())
        return self._stale

    @property
    def defaults(self) -> SamplingParams:
        return self.model.defaults

    @property
    def routing_layers(self) -> list[int]:
        """The MoE layers whose routing a reply can show (none: no routing outputs)."""
        return list(self.model.routing.layers) if self.model.routing is not None else []

    @property
    def routing_experts(self) -> int:
        return self.model.routing.spec.num_experts if self.model.routing is not None else 0

    @property
    def system_prompt(self) -> str | None:
        return self._system_prompt

    @system_prompt.setter
    def system_prompt(self, value: str | None) -> None:
        self._system_prompt = value or None
        self.messages = [m for m in self.messages if m["role"] != "system"]
        self._reply_ids = {}
        self._stale = -1
        if self._system_prompt:
            self.messages.insert(0, {"role": "system", "content": self._system_prompt})

    # -- conversation edits ---------------------------------------------------
    def reset(self, messages: list[dict] | None = None) -> None:
        """Start over, or load a stored conversation (its system message, if any, wins)."""
        self.messages = [dict(role=m["role"], content=m["content"]) for m in (messages or [])]
        self._reply_ids = {}
        self._stale = -1
        if self.messages and self.messages[0]["role"] == "system":
            self._system_prompt = self.messages[0]["content"]
        elif self._system_prompt:
            self.messages.insert(0, {"role": "system", "content": self._system_prompt})

    def pop_last_exchange(self) -> str:
        """Remove the last user message (and the reply after it); return its text."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "user":
                text = self.messages[i]["content"]
                del self.messages[i:]
                self._reply_ids = {k: v for k, v in self._reply_ids.items() if k < i}
                self._stale = -1
                return text
        raise MoechatError("there is no user message to edit")

    # -- generation -------------------------------------------------------------
    def _conversation(self, dropped: int = 0) -> tuple[list[dict], dict[int, list[int]]]:
        """The messages less the ``dropped`` oldest after the system prompt, and the
        generated ids of their replies (by index in that list)."""
        start = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        keep = [*range(start), *range(start + dropped, len(self.messages))]
        replies = {j: self._reply_ids[i] for j, i in enumerate(keep) if i in self._reply_ids}
        return [self.messages[i] for i in keep], replies

    def _history_ids(self) -> list[int]:
        """The conversation as the next prompt starts (no generation prompt, nothing dropped)."""
        msgs, replies = self._conversation()
        try:
            return self.model.template.render_ids(msgs, False, replies)
        except MoechatError:  # e.g. a template that cannot render an empty conversation
            return []

    def prefill(self, should_stop: Callable[[], bool] = _never, chunk: int = 128) -> int:
        """Feed the conversation so far into the cache ahead of the next message.

        A reopened chat otherwise prefills all its turns when the user sends, which makes
        the first reply slow. Stops between chunks of ``chunk`` tokens when
        ``should_stop()``; a conversation that no longer fits is left to the next reply
        (it drops the oldest turns). Returns the number of tokens fed.
        """
        ids = self._history_ids()
        budget = self.max_context - max(64, self.max_context // 8)
        if len(ids) > budget:
            return 0
        decoder = self.model.decoder
        common = 0
        for a, b in zip(self._cache_ids[: decoder.length], ids, strict=False):
            if a != b:
                break
            common += 1
        decoder.truncate(common)
        self._cache_ids = self._cache_ids[:common]
        done = common
        while done < len(ids) and not should_stop():
            piece = ids[done : done + chunk]
            decoder.forward(piece)
            done += len(piece)
            self._cache_ids = ids[:done]
        if done == len(ids):
            self._stale = None
        return done - common

    def send(
        self, user_text: str, params: SamplingParams, should_stop: Callable[[], bool] = _never
    ) -> Iterator[GenerationEvent]:
        self.messages.append({"role": "user", "content": user_text})
        return self._reply(params, should_stop)

    def regenerate(
        self, params: SamplingParams, should_stop: Callable[[], bool] = _never
    ) -> Iterator[GenerationEvent]:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self._reply_ids.pop(len(self.messages) - 1, None)
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise MoechatError("there is no reply to regenerate")
        return self._reply(params, should_stop)

    def _prompt_ids(self) -> tuple[list[int], int]:
        """Ids of the conversation + generation prompt, dropping the oldest turns to fit.

        The model's template renders the whole conversation every time (a template may
        treat the first or last turn differently); replies are the ids generated for
        them where the template allows (see ``render_ids``), so the cache stays a prefix.
        """
        template = self.model.template
        start = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        budget = self.max_context - max(64, self.max_context // 8)  # room for the reply
        dropped = 0
        while True:
            msgs, replies = self._conversation(dropped)
            ids = template.render_ids(msgs, True, replies)
            last = len(self.messages) - 1  # the new message: never dropped
            if len(ids) <= budget or start + dropped >= last:
                break
            dropped += 1  # the oldest turn; never the system prompt
            # Keep user/assistant alternation: do not start on an assistant turn.
            while start + dropped < last and self.messages[start + dropped]["role"] == "assistant":
                dropped += 1
        if len(ids) >= self.max_context:
            raise MoechatError(
                f"the message is too long: {len(ids)} tokens for a context of {self.max_context}"
            )
        if dropped:
            del self.messages[start : start + dropped]
            self._reply_ids = {
                k - dropped: v for k, v in self._reply_ids.items() if k >= start + dropped
            }
        return ids, dropped

    def _reply(
        self, params: SamplingParams, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationEvent]:
        try:
            ids, dropped = self._prompt_ids()
        except MoechatError:
            self.messages.pop()  # leave the conversation as it was
            raise
        decoder = self.model.decoder
        common = 0
        for a, b in zip(self._cache_ids[: decoder.length], ids[:-1], strict=False):
            if a != b:
                break
            common += 1
        decoder.truncate(common)
        self._cache_ids = self._cache_ids[:common]
        fed = ids[common:]
        done: DoneEvent | None = None
        try:
            routing = self.model.routing if self.trace_routing else None
            for event in generate(self.model, fed, params, should_stop, routing):
                if isinstance(event, DoneEvent):
                    done = event
                    event.dropped_turns = dropped
                yield event
        finally:
            generated = done.token_ids if done else []
            self._cache_ids = (self._cache_ids + fed + generated)[: decoder.length]
            if done is None:  # the caller stopped iterating: keep what the cache holds
                generated = self._cache_ids[len(ids) :]
            text = done.text if done else self.model.tokenizer.decode(generated)
            self.messages.append({"role": "assistant", "content": text})
            self._reply_ids[len(self.messages) - 1] = list(generated)
            self._stale = None
