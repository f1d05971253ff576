"""Request bodies of the OpenAI-compatible API, checked and turned into dataclasses.

Unknown fields are ignored (clients send many: ``user``, ``logit_bias``, ...); a known
field of the wrong type or out of range is a 400 :class:`ApiError` naming it. Sampling
fields keep moechat's ranges (runtime/sampling.py), under the API's names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from moechat.runtime.sampling import SamplingParams

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "not_found_error",
    "rate_limit_exceeded",
    "service_unavailable",
    "server_error",
]
Role = Literal["system", "user", "assistant"]


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type: ErrorType = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass
class Message:
    role: Role
    content: str


@dataclass
class Sampling:
    """What a request asks of the sampler: moechat field name -> value, and the limit."""

    changes: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None  # None: until the end of the reply or of the context

    def params(self, defaults: SamplingParams, max_tokens: int) -> SamplingParams:
        return defaults.replace(**self.changes, max_new_tokens=max_tokens)


@dataclass
class ChatRequest:
    messages: list[Message]
    sampling: Sampling
    model: str | None = None
    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest:
    prompt: str
    sampling: Sampling
    model: str | None = None
    stream: bool = False
    include_usage: bool = False


# -- field checks ---------------------------------------------------------------------
def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a string, got {_kind(value)}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} is not valid UTF-8 text (a lone surrogate)", param) from None
    return value


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "an array", dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, got {_kind(value)}", name)
    return value


def _number(body: dict[str, Any], api: str, ours: str) -> float | None:
    value = body.get(api)
    if value is None:
        return None
    rng = SamplingParams.RANGES[ours]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{api} must be a number, got {_kind(value)}", api)
    if not rng.contains(value):
        raise bad_request(f"{api} must be in {rng.describe()}, got {value!r}", api)
    return float(value)


def _integer(body: dict[str, Any], api: str, ours: str) -> int | None:
    value = body.get(api)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 256.0 from a client that sends every number as a float
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{api} must be an integer, got {_kind(value)}", api)
    rng = SamplingParams.RANGES[ours]
    if not rng.contains(value):
        raise bad_request(f"{api} must be in {rng.describe()}, got {value}", api)
    return value


def _stop(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad_request(
            f"stop must be a string or an array of strings, got {_kind(value)}", "stop"
        )
    stops = [_text(s, "stop") for s in items]
    if len(stops) > SamplingParams.MAX_STOP:
        raise bad_request(f"stop allows at most {SamplingParams.MAX_STOP} strings", "stop")
    return [s for s in stops if s]


def _sampling(body: dict[str, Any]) -> Sampling:
    changes: dict[str, Any] = {}
    for api, ours in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("min_p", "min_p"),
        ("repetition_penalty", "repetition_penalty"),
    ):
        if api == "top_p" and type(body.get(api)) in (int, float) and body[api] == 0:
            changes["temperature"] = 0.0  # top_p 0 keeps only the most likely token: greedy
            continue
        value = _number(body, api, ours)
        if value is not None:
            changes[ours] = value
    for api, ours in (("top_k", "top_k"), ("seed", "seed")):
        integer = _integer(body, api, ours)
        if integer is not None:
            changes[ours] = integer
    if "stop" in body:
        changes["stop"] = _stop(body["stop"])
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad_request("only n=1 is supported (one choice per request)", "n")
    limit = None
    for api in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        value = _integer(body, api, "max_new_tokens")
        limit = value if value is not None else limit
    return Sampling(changes, limit)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad_request(
            f"stream_options must be an object, got {_kind(options)}", "stream_options"
        )
    return stream, _bool(options, "include_usage") if stream else False


def _model(body: dict[str, Any]) -> str | None:
    value = body.get("model")
    return None if value is None else _text(value, "model")


def _content(value: Any, param: str, role: str) -> str:
    if value is None and role == "assistant":
        return ""
    if isinstance(value, str):
        return _text(value, param)
    if not isinstance(value, list):
        raise bad_request(
            f"{param} must be a string or an array of text parts, got {_kind(value)}", param
        )
    texts = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else _kind(part)
            raise bad_request(f"{where}: only text parts are supported (got {kind!r})", where)
        texts.append(_text(part.get("text"), f"{where}.text"))
    return "".join(texts)


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object, got {_kind(m)}", where)
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(
                f"{where}.role must be system, user or assistant, got {role!r} "
                "(tools are not supported)",
                f"{where}.role",
            )
        out.append(Message(role, _content(m.get("content"), f"{where}.content", role)))
    return out


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def parse_chat(body: Any) -> ChatRequest:
    """A ``/v1/chat/completions`` body."""
    body = _object(body)
    if "messages" not in body:
        raise bad_request("messages is required", "messages")
    stream, usage = _stream(body)
    return ChatRequest(_messages(body["messages"]), _sampling(body), _model(body), stream, usage)


def parse_completion(body: Any) -> CompletionRequest:
    """A ``/v1/completions`` body: ``prompt`` is a string (or an array of one string)."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    if not isinstance(prompt, str):
        raise bad_request(
            f"prompt must be a string (or an array of one string), got {_kind(prompt)}", "prompt"
        )
    if _bool(body, "echo"):
        raise bad_request("echo is not supported", "echo")
    stream, usage = _stream(body)
    return CompletionRequest(_text(prompt, "prompt"), _sampling(body), _model(body), stream, usage)
