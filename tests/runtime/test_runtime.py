"""The torch-free runtime: generation, stop conditions, chat cache reuse, rewind, overflow."""

import json
import subprocess
import sys

import numpy as np
import pytest

from moechat.runtime.chat import ChatSession
from moechat.runtime.events import DoneEvent
from moechat.runtime.generator import generate
from moechat.runtime.model import load_model
from moechat.runtime.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def test_runtime_and_app_never_import_torch(tiny_package):
    code = (
        "import sys, moechat.runtime.chat, moechat.runtime.model, moechat.app.cli;"
        "from moechat.runtime.model import load_model; from moechat.runtime.generator import generate;"
        "from moechat.runtime.sampling import SamplingParams;"
        f"m = load_model({str(tiny_package)!r});"
        "list(generate(m, [5, 6, 7], SamplingParams(max_new_tokens=3)));"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'onnx', 'onnxscript')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _done(events):
    events = list(events)
    assert isinstance(events[-1], DoneEvent)
    return events[-1]


def test_max_tokens_and_stream_text(tiny_package):
    model = load_model(tiny_package)
    events = list(generate(model, [5, 6, 7], SamplingParams(max_new_tokens=7, seed=1)))
    done = events[-1]
    assert done.finish_reason == "length" and len(done.token_ids) == 7
    assert "".join(e.text for e in events[:-1]) == done.text
    assert done.text == model.tokenizer.decode(done.token_ids)
    assert done.stats.prompt_tokens == 3 and done.stats.ttft_ms > 0


def test_same_seed_same_text(tiny_package):
    model = load_model(tiny_package)
    params = SamplingParams(temperature=1.5, top_p=0.95, max_new_tokens=16, seed=42)
    runs = []
    for _ in range(2):
        model.decoder.reset()
        runs.append(_done(generate(model, [5, 6, 7], params)).token_ids)
    assert runs[0] == runs[1]


def test_stop_string_and_eos(tiny_package):
    model = load_model(tiny_package)
    full = _done(generate(model, [5, 6, 7], GREEDY.replace(max_new_tokens=20)))
    assert len(full.text) > 4
    stop = full.text[2:4]
    model.decoder.reset()
    cut = _done(generate(model, [5, 6, 7], GREEDY.replace(max_new_tokens=20, stop=[stop])))
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    # eos: make the first greedy token an eos token.
    model.decoder.reset()
    model.eos_token_ids = frozenset({full.token_ids[0]})
    eos = _done(generate(model, [5, 6, 7], GREEDY))
    assert eos.finish_reason == "eos" and eos.token_ids == []


def test_cancel(tiny_package):
    model = load_model(tiny_package)
    calls = iter(range(100))
    done = _done(
        generate(model, [5, 6], GREEDY.replace(max_new_tokens=50), lambda: next(calls) >= 3)
    )
    assert done.finish_reason == "cancelled" and len(done.token_ids) == 3


def test_chat_reuses_cache_across_turns(tiny_package):
    chat = ChatSession(load_model(tiny_package), system_prompt="be brief")
    first = _done(chat.send("hello there", GREEDY))
    used = chat.context_used
    second = _done(chat.send("and again", GREEDY))
    t = chat.model.template
    new = t.turn_end_ids() + t.turn_ids("user", "and again") + t.generation_prompt_ids()
    # Only the last reply token (never fed), the reply's closing, the new turn and the
    # generation prompt were prefilled.
    assert second.stats.prompt_tokens == 1 + len(new)
    assert chat.context_used > used
    assert [m["role"] for m in chat.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    # Same result as a fresh session fed the whole conversation at once.
    fresh = load_model(tiny_package)
    ids = chat._prompt_ids()[0]
    logits_cached = chat.model.decoder.forward(ids[chat.context_used :])
    np.testing.assert_allclose(logits_cached[-1], fresh.decoder.forward(ids)[-1], atol=1e-3)
    assert first.text == chat.messages[2]["content"]


def test_regenerate_and_edit_rewind_the_cache(tiny_package):
    chat = ChatSession(load_model(tiny_package))
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    _done(chat.send("tell me a story", params))
    before = chat.context_used
    regen = _done(chat.regenerate(params))
    assert regen.stats.prompt_tokens == 1  # only the token after the common prefix
    assert chat.context_used == before
    text = chat.pop_last_exchange()
    assert text == "tell me a story" and [m["role"] for m in chat.messages] == []
    edited = _done(chat.send("tell me a poem", params))
    assert edited.stats.prompt_tokens < 12  # the system turn stayed cached


def test_context_overflow_drops_oldest_turns(tiny_package):
    model = load_model(tiny_package, max_context=160)
    chat = ChatSession(model, system_prompt="sys")
    dropped = 0
    for i in range(12):
        done = _done(chat.send(f"message number {i} with some words", GREEDY))
        dropped += done.dropped_turns
    assert dropped > 0
    assert chat.messages[0] == {"role": "system", "content": "sys"}
    assert chat.messages[1]["role"] == "user"
    assert chat.messages[-2]["content"] == "message number 11 with some words"


def test_message_longer_than_context_is_refused(tiny_package):
    from moechat.runtime.errors import MoechatError

    chat = ChatSession(load_model(tiny_package, max_context=64))
    with pytest.raises(MoechatError, match="too long"):
        list(chat.send("word " * 200, GREEDY))
    assert chat.messages == []


def test_context_cap_errors(tiny_package):
    from moechat.runtime.errors import MoechatError

    limit = json.loads((tiny_package / "moechat.json").read_text())["max_context"]
    with pytest.raises(MoechatError, match="exceeds the model's maximum context"):
        load_model(tiny_package, max_context=limit + 1)
    with pytest.raises(MoechatError, match="unknown device"):
        load_model(tiny_package, device="tpu")
