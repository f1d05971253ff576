"""``moechat bench --compare``: other engines on the same weights and the same prompt ids.

Anchors, one adapter module per engine (:mod:`.pytorch`, :mod:`.genai` for
onnxruntime-genai, :mod:`.llama_cpp`), each run in its own Python worker process
(:mod:`.worker`: their imports stay out of the moechat process, a crash in a native
library cannot take ``moechat bench`` down, and each engine's peak RSS is its own).

A ``prepare`` worker converts (cached under ``--cache-dir``, keyed by the source
checksums); a ``serve`` worker per engine then loads it once, and the runs are
interleaved round by round with moechat's own (rotating the order; :mod:`.compare`), so
a shared, busy machine loads every engine alike. An anchor that is not installed or not
applicable is reported as skipped with the reason; one that fails, as failed with its
last error line.

Every engine gets the same prompt ids, ``new_tokens`` greedy tokens (end-of-text
ignored) and thread count; timings follow :mod:`moechat.runtime.bench`'s definitions
(an anchor's prefill rate is prompt tokens / time to first token).
"""
