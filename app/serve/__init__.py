"""``moechat serve``: an OpenAI-compatible HTTP server for one model package.

- schema.py: request bodies parsed into dataclasses; :class:`ApiError` (OpenAI-style errors)
- worker.py: the model, loaded in the background; one generation at a time from a bounded
  queue, with one KV cache reused across requests that share a prefix
- routes.py: the Starlette app (/v1/chat/completions, /v1/completions, /v1/models, /health)
- server.py: uvicorn, signals and the command's options

docs/decisions/0013-serve-stack.md says why Starlette + uvicorn.
"""
