"""The chat's routing view: a reply's tokens coloured by their top expert in one layer,
and a layers x experts histogram of the reply (F2 or /routing; off by default).

Each generated token carries the routing of the decode step that produced it (the
position before it: runtime/events.py ``TokenRouting``); nothing is fetched from the
graph while the view is off (runtime/generator.py).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from rich.text import Text
from textual.widgets import Static

from moechat.app.experts_stats import SHADES, shade
from moechat.runtime.events import DoneEvent, TokenRouting

if TYPE_CHECKING:
    from moechat.app.conversation_actions import Severity
    from moechat.app.engine import ChatEngine

_GOLDEN = 0.6180339887498949


def expert_colour(expert: int) -> str:
    """A distinct, readable colour per expert (hues spread by the golden ratio)."""
    r, g, b = colorsys.hls_to_rgb((expert * _GOLDEN) % 1.0, 0.62, 0.75)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


@dataclass(frozen=True)
class ReplyRouting:
    """One reply's routing: ``layers`` (MoE layer indices) and one entry per token."""

    layers: list[int]
    tokens: list[TokenRouting]
    num_experts: int

    def top_experts(self, layer_index: int) -> list[int]:
        """Each token's top expert in ``layers[layer_index]``."""
        return [int(t.experts[layer_index, 0]) for t in self.tokens]

    def histogram(self) -> np.ndarray:
        """[layers, experts]: how often each expert was chosen (any rank) in this reply."""
        counts = np.zeros((len(self.layers), self.num_experts), np.int64)
        for t in self.tokens:
            for i in range(len(self.layers)):
                np.add.at(counts[i], t.experts[i], 1)
        return counts


def render(routing: ReplyRouting, layer_index: int) -> Text:
    """The coloured reply, a legend of the experts it used and the histogram."""
    layer = routing.layers[layer_index]
    out = Text()
    out.append(f"routing · top expert per token in layer {layer}\n", style="bold")
    tops = routing.top_experts(layer_index)
    for token, expert in zip(routing.tokens, tops, strict=True):
        out.append(token.text, style=expert_colour(expert))
    out.append("\n")
    for expert in sorted(set(tops)):
        out.append("■", style=expert_colour(expert))
        out.append(f" {expert} ({tops.count(expert)})  ")
    out.append(f"\nexperts chosen in this reply ({SHADES[1:]} against an even share)\n")
    even = 1.0 / routing.num_experts
    for layer, row in zip(routing.layers, routing.histogram(), strict=True):
        line = "".join(shade(c / max(row.sum(), 1), even) for c in row)
        out.append(f"{layer:>3} {line}\n")
    return out


class RoutingView(Static):
    """The routing panel under a reply."""

    def __init__(self, routing: ReplyRouting, layer_index: int) -> None:
        super().__init__(render(routing, layer_index), classes="routing", markup=False)
        self.routing = routing
        self.layer_index = layer_index


@runtime_checkable
class RoutingEngine(Protocol):
    """An engine that can return its replies' routing (runtime/chat.py ChatSession)."""

    trace_routing: bool

    @property
    def routing_layers(self) -> list[int]: ...
    @property
    def routing_experts(self) -> int: ...


class RoutingHost(Protocol):
    engine: ChatEngine | None
    show_routing: bool
    routing_layer: int | None

    def notify(
        self, message: str, *, title: str = "", severity: Severity = "information",
        timeout: float | None = None, markup: bool = True,
    ) -> None: ...  # fmt: skip


def _routing_engine(host: RoutingHost) -> RoutingEngine | None:
    """The engine if it exposes routing, else None after telling the user why not."""
    engine = host.engine
    if engine is None:
        host.notify("No model loaded yet.", severity="warning")
        return None
    if not isinstance(engine, RoutingEngine) or not engine.routing_layers:
        host.notify(
            "This model does not expose its routing: a dense model, or a package exported "
            "before routing left the graph (re-export it with `moechat export`; the demo: "
            "`moechat demo build --force`).",
            severity="warning",
        )
        return None
    return engine


class RoutingActions:
    """The toggle and the panel under each reply; mixed into ChatApp."""

    def action_toggle_routing(self: RoutingHost) -> None:
        set_routing(self, not self.show_routing)

    def command_routing(self: RoutingHost, arg: str) -> None:
        """``/routing`` toggles; ``on`` / ``off``; a layer number (or ``layer N``) colours
        that layer and turns the view on."""
        word = arg.lower().removeprefix("layer").strip()
        if not word:
            set_routing(self, not self.show_routing)
        elif word in ("on", "off"):
            set_routing(self, word == "on")
        elif word.isdigit():
            set_routing(self, True, int(word))
        else:
            self.notify(f"/routing takes on, off or a layer number, not {arg!r}", severity="error")

    async def show_reply_routing(self: RoutingHost, block, done: DoneEvent) -> None:
        """Mount the routing panel under ``block`` for a finished reply (when on)."""
        engine = self.engine
        if not self.show_routing or not done.routing or not isinstance(engine, RoutingEngine):
            return
        layers = engine.routing_layers
        layer = self.routing_layer if self.routing_layer in layers else layers[0]
        reply = ReplyRouting(layers, done.routing, engine.routing_experts)
        await block.mount(RoutingView(reply, layers.index(layer)))


def set_routing(host: RoutingHost, on: bool, layer: int | None = None) -> None:
    """Turn the routing view on (optionally colouring ``layer``) or off."""
    if not on:
        host.show_routing = False
        if isinstance(host.engine, RoutingEngine):
            host.engine.trace_routing = False
        host.notify("Routing view off.", timeout=2)
        return
    engine = _routing_engine(host)
    if engine is None:
        return
    layers = engine.routing_layers
    if layer is not None:
        if layer not in layers:
            moe = ", ".join(map(str, layers))
            host.notify(f"Layer {layer} has no router (MoE layers: {moe}).", severity="error")
            return
        host.routing_layer = layer
    host.show_routing = engine.trace_routing = True
    shown = host.routing_layer if host.routing_layer in layers else layers[0]
    host.notify(
        f"Routing view on: each reply's tokens are coloured by their top expert in layer "
        f"{shown} (/routing LAYER picks another).",
        timeout=4,
    )
