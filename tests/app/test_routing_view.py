"""The chat app's routing view on a real package whose routers are set by hand: F2 turns it
on, /routing picks the layer, each reply token is coloured by the top expert of the step
that produced it, the histogram counts the reply's choices; off, nothing is fetched."""

from __future__ import annotations

import numpy as np
from routing_factory import RIGGED, expected_routing

from moechat.app.routing_view import RoutingView, expert_colour, render
from moechat.app.store import ConversationStore
from moechat.app.tui import ChatApp
from moechat.runtime.chat import ChatSession
from moechat.runtime.model import load_model

from fake_engine import pilot_test, wait_until


def _reply_start(cache: list[int], generated: list[int]) -> int:
    """Where the reply begins in the cache (its last token may not have been fed)."""
    for fed in (len(generated), len(generated) - 1):
        if fed and cache[-fed:] == generated[:fed]:
            return len(cache) - fed
    raise AssertionError("the reply is not at the end of the cache")


@pilot_test
async def test_routing_view_colours_tokens_by_their_experts(rigged_package, tmp_path):
    engine = ChatSession(load_model(rigged_package, max_context=256), None)
    calls = {"routed": 0}
    forward_routed = engine.model.decoder.forward_routed

    def counting(*args, **kwargs):
        calls["routed"] += 1
        return forward_routed(*args, **kwargs)

    engine.model.decoder.forward_routed = counting  # type: ignore[method-assign]
    store = ConversationStore(tmp_path / "chats.sqlite3")
    app = ChatApp(engine, store, export_dir=tmp_path)
    async with app.run_test(size=(110, 50)) as pilot:

        async def command(line: str) -> None:
            app.prompt.load_text(line)
            await pilot.press("enter")

        async def reply_to(text: str):
            before = len(app._blocks())
            await command(text)
            await wait_until(
                pilot, lambda: len(app._blocks()) == before + 2 and not app.generating, 60
            )
            return app.last_reply()

        await command("/set temperature 0")
        await command("/set max_new_tokens 10")
        # off by default: no routing fetched, no panel
        block = await reply_to("hello")
        assert calls["routed"] == 0 and not block.query(RoutingView)
        assert not app.show_routing and not engine.trace_routing

        await pilot.press("f2")  # the key binding
        assert app.show_routing and engine.trace_routing
        await command("/routing 2")  # colour the last MoE layer
        assert app.routing_layer == 2
        block = await reply_to("tell me more")
        assert calls["routed"] > 0
        view = block.query_one(RoutingView)
        routing = view.routing
        generated = engine._reply_ids[len(engine.messages) - 1]
        assert len(routing.tokens) == len(generated) >= 2
        start = _reply_start(engine._cache_ids, generated)
        producers = [engine._cache_ids[start - 1], *generated[:-1]]
        # each token's routing is its producer's: the rigged routers make it known
        for token, producer in zip(routing.tokens, producers, strict=True):
            for index, layer in enumerate(routing.layers):
                want = expected_routing(producer, layer)
                assert token.experts[index].tolist() == [e for e, _ in want]
                np.testing.assert_allclose(token.weights[index], [w for _, w in want], atol=1e-5)
        assert routing.layers == [0, 1, 2] and view.layer_index == 2
        # the colours: each token's top expert in layer 2
        text = render(routing, view.layer_index)
        spans = [(text.plain[s.start : s.end], str(s.style)) for s in text.spans]
        tops = [expected_routing(p, 2)[0][0] for p in producers]
        coloured = [(t.text, expert_colour(e)) for t, e in zip(routing.tokens, tops, strict=True)]
        shown = [c for c in coloured if c[0]]  # a piece may be empty (a partial character)
        assert len(set(tops)) > 1 and spans[1 : 1 + len(shown)] == shown
        # the histogram: every rank's expert, per layer
        want = np.zeros((3, RIGGED.n_routed_experts), np.int64)
        for producer in producers:
            for layer in range(3):
                for expert, _ in expected_routing(producer, layer):
                    want[layer, expert] += 1
        np.testing.assert_array_equal(routing.histogram(), want)
        assert "layer 2" in text.plain

        await command("/routing off")
        assert not app.show_routing and not engine.trace_routing
        fetched = calls["routed"]
        block = await reply_to("and now?")
        assert calls["routed"] == fetched and not block.query(RoutingView)


@pilot_test
async def test_routing_view_on_a_model_without_routing_says_why(tmp_path):
    from fake_engine import FakeEngine

    app = ChatApp(FakeEngine(), ConversationStore(tmp_path / "c.sqlite3"), export_dir=tmp_path)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f2")
        await wait_until(
            pilot,
            lambda: any("does not expose its routing" in n.message for n in app._notifications),
        )
        assert not app.show_routing
        app.prompt.load_text("/routing banana")
        await pilot.press("enter")
        await wait_until(
            pilot, lambda: any("takes on, off or a layer" in n.message for n in app._notifications)
        )
