"""Reading a reopened conversation into the model's cache in the background.

Without it, the first reply in a reopened chat prefills every earlier turn before its
first token (seconds for a long chat on a CPU). The app starts a job as soon as a
conversation is loaded into the engine; a reply that is sent meanwhile waits for it
(the work is the reply's own prefill), and every other change to the engine's
conversation cancels it first (it stops between chunks).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class PrefillJob:
    id: int
    tokens: int  # the conversation's length, for the status line
    stop: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.monotonic)


class PrefillDone(Message):
    def __init__(self, job_id: int, fed: int, seconds: float, error: str | None) -> None:
        super().__init__()
        self.job_id = job_id
        self.fed = fed
        self.seconds = seconds
        self.error = error
