"""moechat.json, typed: one validated tree read by :func:`load_manifest`.

The file format is unchanged (``export/package.py`` writes it; docs/architecture.md,
"moechat.json", lists its sections). Reading checks the types of the fields the runtime
uses and raises one-line :class:`MoechatError`\\s naming the field; fields it does not
know are tolerated (newer exports may add some) and stay readable in
:attr:`Manifest.raw`. Records that only people read (provenance, parity, fidelity,
demo) are kept as plain dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from moechat.runtime.errors import MoechatError

FORMAT_VERSION = 1
# A package's context: the runtime refuses a cap below MIN_CONTEXT; above MAX_CONTEXT
# the RoPE tables and KV buffers would not fit any machine moechat runs on.
MIN_CONTEXT = 16
MAX_CONTEXT = 1 << 20
# Every family's graph has the same interface (docs/architecture.md); models/config.py's
# Family type lists the same names.
SUPPORTED_ARCHITECTURES = (
    "minimind",
    "llama",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "granitemoe",
    "deepseek",
    "deepseek_v2",
    "deepseek_v3",
)

T = TypeVar("T")
_MISSING: Any = object()
_TYPE_NAMES: dict[type, str] = {
    int: "an integer", float: "a number", str: "a string", bool: "true or false",
    dict: "an object", list: "a list",
}  # fmt: skip


class _Section:
    """Typed reads from one JSON object of the manifest, with one-line errors."""

    def __init__(self, data: Any, where: str, file: Path) -> None:
        self.where, self.file = where, file
        if not isinstance(data, dict):
            self.fail(f"{where} must be an object")
        self.data: dict[str, Any] = data

    def fail(self, message: str) -> None:
        raise MoechatError(f"{self.file} is corrupt: {message}")

    def get(self, key: str, kind: type[T], default: Any = _MISSING) -> T:
        name = f"{self.where}.{key}" if self.where else key
        if key not in self.data or (self.data[key] is None and default is not _MISSING):
            if default is _MISSING:
                self.fail(f"no {name!r}")
            return cast(T, default)
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            self.fail(f"{name!r} must be {_TYPE_NAMES.get(kind, kind.__name__)}")
        return cast(T, value)

    def section(self, key: str, required: bool = True) -> _Section:
        where = f"{self.where}.{key}" if self.where else key
        if key not in self.data and not required:
            return _Section({}, where, self.file)
        if key not in self.data:
            self.fail(f"no {where!r}")
        return _Section(self.data[key], where, self.file)

    def count(self, key: str, lo: int = 1, hi: int | None = None) -> int:
        """An integer in [lo, hi] (a size, a count)."""
        value = self.get(key, int)
        if value < lo or (hi is not None and value > hi):
            name = f"{self.where}.{key}" if self.where else key
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            self.fail(f"{name!r} must be {bound} (got {value})")
        return value

    def file_name(self, key: str) -> str:
        """A file of the package: a plain name inside its folder (no path, no ``..``)."""
        return plain_name(self.get(key, str), f"{self.where}.{key}" if self.where else key, self)

    def int_list(self, key: str) -> list[int]:
        values = self.get(key, list, [])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            self.fail(f"{self.where}.{key!r} must be a list of integers")
        return values

    def str_map(self, key: str) -> dict[str, str]:
        values = self.get(key, dict, {})
        if not all(isinstance(v, str) for v in values.values()):
            self.fail(f"{self.where + '.' if self.where else ''}{key!r} must map names to strings")
        return values


def plain_name(name: str, where: str, section: _Section) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or ":" in name:
        section.fail(f"{where!r} must be a file name inside the package, not {name!r}")
    return name


@dataclass(frozen=True)
class Architecture:
    """The model's shape (a ModelConfig as a dict: ``fields`` holds all of it)."""

    model_type: str
    vocab_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    use_moe: bool
    fields: dict[str, Any] = field(repr=False)
    value_head_dim: int = 0  # width of the cached values (MLA: the rope key); 0: head_dim

    @property
    def value_dim(self) -> int:
        return self.value_head_dim or self.head_dim


@dataclass(frozen=True)
class GraphSpec:
    file: str
    attention: str  # "gqa" (GroupQueryAttention) or "ops"
    dtype: str = "float32"
    moe_impl: str | None = None
    kv_dtype: Literal["float32", "float16"] = "float32"
    variants: dict[str, str] = field(default_factory=dict)  # provider key -> graph file
    variant_attention: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    kv_present: Literal["total", "new"] = "total"  # "new": present holds the new positions


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None


@dataclass(frozen=True)
class ChatTemplateSpec:
    """How prompts are rendered: built-in ChatML, or the model's Jinja template (rendered
    in a sandbox, runtime/jinja_template.py). ``jinja`` is only rendered for ``jinja``."""

    format: Literal["chatml", "jinja"] = "chatml"
    default_system: str | None = None
    jinja: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>" ...
    kwargs: dict[str, Any] = field(default_factory=dict)  # template variables
    end_of_turn: list[str] = field(default_factory=list)  # the control token after a reply
    source: str | None = None  # tokenizer_config.json, chat_template.jinja, built-in
    family: str | None = None  # the format's name, for moechat info


@dataclass(frozen=True)
class Manifest:
    format_version: int
    name: str | None
    architecture: Architecture
    graph: GraphSpec
    tokenizer: TokenizerSpec
    chat_template: ChatTemplateSpec
    defaults: dict[str, Any]  # sampling defaults (SamplingParams.from_dict checks them)
    max_context: int
    files: dict[str, str]  # file name -> sha256
    raw: dict[str, Any] = field(repr=False)  # the whole file, unknown fields included


def _chat_template(chat: _Section) -> ChatTemplateSpec:
    fmt = chat.get("format", str, "chatml")
    if fmt not in ("chatml", "jinja"):
        chat.fail(f"'chat_template.format' must be chatml or jinja, not {fmt!r}")
    jinja = chat.get("jinja", str, None)
    if fmt == "jinja" and not jinja:
        chat.fail("'chat_template.jinja' is missing")
    end = chat.get("end_of_turn", list, [])
    if not all(isinstance(t, str) for t in end):
        chat.fail("'chat_template.end_of_turn' must be a list of strings")
    return ChatTemplateSpec(
        format=cast(Literal["chatml", "jinja"], fmt),
        default_system=chat.get("default_system", str, None),
        jinja=jinja,
        special_tokens=chat.str_map("special_tokens"),
        kwargs=chat.get("kwargs", dict, {}),
        end_of_turn=end,
        source=chat.get("source", str, None),
        family=chat.get("family", str, None),
    )


def _file_map(section: _Section, key: str) -> dict[str, str]:
    names = section.str_map(key)
    for name in names.values():
        plain_name(name, f"{section.where}.{key}", section)
    return names


def _files(top: _Section) -> dict[str, str]:
    """``files``: package file name -> sha256 (64 hex digits)."""
    files = top.str_map("files")
    for name, digest in files.items():
        plain_name(name, "files", top)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            top.fail(f"'files.{name}' must be a sha256 (64 hex digits)")
    return files


def _tokenizer(tok: _Section, vocab_size: int) -> TokenizerSpec:
    """Token ids must exist in the model's vocabulary (a string or an id out of range
    would never match, and the reply would run to max_new_tokens)."""
    spec = TokenizerSpec(
        file=tok.file_name("file"),
        bos_token_id=tok.get("bos_token_id", int, None),
        eos_token_ids=tok.int_list("eos_token_ids"),
        pad_token_id=tok.get("pad_token_id", int, None),
    )
    for name, ids in (
        ("bos_token_id", [spec.bos_token_id]),
        ("eos_token_ids", spec.eos_token_ids),
        ("pad_token_id", [spec.pad_token_id]),
    ):
        if any(i is not None and not 0 <= i < vocab_size for i in ids):
            tok.fail(f"'tokenizer.{name}' must be token ids below the vocabulary size {vocab_size}")
    return spec


def _kv_present(graph: _Section) -> Literal["total", "new"]:
    value = graph.get("kv_present", str, "total")
    if value not in ("total", "new"):
        graph.fail(f"'graph.kv_present' must be total or new, not {value!r}")
    return cast(Literal["total", "new"], value)


def parse_manifest(data: Any, file: Path) -> Manifest:
    """Validate a decoded moechat.json (``file`` names it in errors)."""
    top = _Section(data, "", file)
    version = top.get("format_version", int)
    if version < 1:
        top.fail(f"'format_version' must be at least 1 (got {version})")
    if version > FORMAT_VERSION:
        raise MoechatError(
            f"{file.parent} was written by a newer moechat (package format {version})"
        )
    arch = top.section("architecture")
    model_type = arch.get("model_type", str, "")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise MoechatError(f"unsupported architecture {model_type or None!r} in {file.parent}")
    graph, tok, chat = (
        top.section("graph"),
        top.section("tokenizer"),
        top.section("chat_template", required=False),
    )
    vocab_size = arch.count("vocab_size")
    kv_dtype = graph.get("kv_dtype", str, "float32")
    if kv_dtype not in ("float32", "float16"):
        graph.fail(f"'graph.kv_dtype' must be float32 or float16, not {kv_dtype!r}")
    return Manifest(
        format_version=version,
        name=top.get("name", str, None),
        architecture=Architecture(
            model_type=model_type,
            vocab_size=vocab_size,
            num_hidden_layers=arch.count("num_hidden_layers"),
            num_key_value_heads=arch.count("num_key_value_heads"),
            head_dim=arch.count("head_dim"),
            use_moe=arch.get("use_moe", bool, False),
            fields=arch.data,
            value_head_dim=arch.get("value_head_dim", int, 0),
        ),
        graph=GraphSpec(
            file=graph.file_name("file"),
            attention=graph.get("attention", str),
            dtype=graph.get("dtype", str, "float32"),
            moe_impl=graph.get("moe_impl", str, None),
            kv_dtype=cast(Literal["float32", "float16"], kv_dtype),
            variants=_file_map(graph, "variants"),
            variant_attention=graph.str_map("variant_attention"),
            quantization=graph.get("quantization", dict, None),
            kv_present=_kv_present(graph),
        ),
        tokenizer=_tokenizer(tok, vocab_size),
        chat_template=_chat_template(chat),
        defaults=top.get("defaults", dict, {}),
        max_context=top.count("max_context", MIN_CONTEXT, MAX_CONTEXT),
        files=_files(top),
        raw=top.data,
    )


def kv_bytes_per_token(arch: dict[str, Any], itemsize: int = 4) -> int:
    """KV cache bytes per token, all layers: KV heads x (key + value width) per layer.
    MLA (DeepSeek-V2/V3) caches one latent and one rope key: kv_lora_rank + rope."""
    key = arch["head_dim"]
    value = arch.get("value_head_dim") or key
    return arch["num_hidden_layers"] * arch["num_key_value_heads"] * (key + value) * itemsize


def decompressed_kv_bytes_per_token(arch: dict[str, Any], itemsize: int = 4) -> int | None:
    """MLA only: what per-head keys and values would take per token (None otherwise)."""
    if not arch.get("kv_lora_rank"):
        return None
    key = arch["qk_nope_head_dim"] + arch["qk_rope_head_dim"]
    width = arch["num_attention_heads"] * (key + arch["v_head_dim"])
    return arch["num_hidden_layers"] * width * itemsize


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate ``path`` (a moechat.json); one-line MoechatError on anything wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MoechatError(f"cannot read {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoechatError(f"{path} is corrupt: {err}") from None
    if not isinstance(data, dict):
        raise MoechatError(f"{path} is corrupt: not a JSON object")
    return parse_manifest(data, path)
