"""First-reply TTFT after reopening a ~850-token chat: without and with ChatSession.prefill
(issue 24; docs/benchmarks.md, "Reopening a chat"). Not a test.

    python benchmarks/reopen_ttft.py PACKAGE     # from the repository root
"""

import sys
import time
from pathlib import Path

from moechat.runtime.chat import ChatSession
from moechat.runtime.events import TokenEvent
from moechat.runtime.model import load_model
from moechat.runtime.sampling import SamplingParams

model = load_model(sys.argv[1])
paras = [
    p
    for p in Path("export/data/heldout.txt").read_text().split("\n\n")
    if p.isascii() and len(p) > 200
]
history, session = [], ChatSession(model)
while True:  # alternate user/assistant turns of held-out English until ~850 tokens
    role = "user" if len(history) % 2 == 0 else "assistant"
    session.reset(history + [{"role": role, "content": paras[len(history) % len(paras)]}])
    if session.context_used > 850:
        break
    history.append({"role": role, "content": paras[len(history) % len(paras)]})
session.reset(history)
print(f"chat: {len(history)} messages, {session.context_used} tokens")
params = SamplingParams(temperature=0.0, max_new_tokens=1)
for mode in ("before", "after") * 6:
    model.decoder.reset()
    s = ChatSession(model)
    s.reset(history)
    t0 = time.perf_counter()
    fed = s.prefill() if mode == "after" else 0
    ahead = time.perf_counter() - t0
    t1 = time.perf_counter()
    first = next(
        e for e in s.send("Summarise that in one line.", params) if isinstance(e, TokenEvent)
    )
    ttft = (time.perf_counter() - t1) * 1000
    print(
        f"{mode:6} read ahead {fed:4d} tokens in {ahead * 1000:6.0f} ms; first-reply TTFT {ttft:6.0f} ms"
    )
