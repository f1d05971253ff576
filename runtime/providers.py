"""Execution-provider choice and onnxruntime session creation.

onnxruntime silently falls back to CPU when a requested provider cannot start; we
check the providers actually in use and fail loudly instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnxruntime as ort

from moechat.runtime.errors import MoechatError

DEVICES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_device(device: str, available: list[str] | None = None) -> str:
    """Map ``auto|cpu|cuda|dml`` to a provider name, checking it is installed."""
    available = available_providers() if available is None else available
    if device == "auto":
        if "CUDAExecutionProvider" in available:
            return "CUDAExecutionProvider"
        if sys.platform == "win32" and "DmlExecutionProvider" in available:
            return "DmlExecutionProvider"
        return "CPUExecutionProvider"
    if device not in DEVICES:
        raise MoechatError(f"unknown device {device!r} (choose auto, cpu, cuda or dml)")
    provider = DEVICES[device]
    if provider not in available:
        package = {"cuda": "onnxruntime-gpu", "dml": "onnxruntime-directml"}.get(device)
        hint = (
            f": install {package} (pip install 'moechat[{'directml' if device == 'dml' else device}]')"
            if package
            else ""
        )
        raise MoechatError(f"device {device!r} is not available in this onnxruntime build{hint}")
    return provider


def resolve_threads(threads: int | None) -> int | None:
    """``--threads`` (or ``MOECHAT_THREADS`` when it is not given): 1 to the machine's
    core count; None (or MOECHAT_THREADS empty or 0) leaves the choice to onnxruntime.
    More threads than cores only make them wait on each other (100000 ran a 2-core
    machine at a load of 600)."""
    source = "--threads"
    if threads is None:
        text = os.environ.get("MOECHAT_THREADS", "").strip()
        if text in ("", "0"):
            return None
        source = "MOECHAT_THREADS"
        try:
            threads = int(text)
        except ValueError:
            raise MoechatError(f"MOECHAT_THREADS must be a whole number, got {text!r}") from None
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise MoechatError(
            f"{source} must be between 1 and {cores} (this machine's CPU cores), got {threads}"
        )
    return threads


def session_options(provider: str, threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if provider == "DmlExecutionProvider":
        # DirectML requires these (onnxruntime docs).
        opts.enable_mem_pattern = False
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    threads = resolve_threads(threads)
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if os.environ.get("MOECHAT_SPIN") == "0":
        # Idle worker threads block instead of spinning: much faster on a CPU shared
        # with other busy processes (docs/decisions/0009-spinning-threads.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in session_config_entries(os.environ.get("MOECHAT_SESSION_CONFIG", "")):
        opts.add_session_config_entry(key, value)
    return opts


def session_config_entries(text: str) -> list[tuple[str, str]]:
    """``MOECHAT_SESSION_CONFIG``: extra onnxruntime session config entries,
    ``key=value[;key=value...]`` (for ``moechat bench --ab``)."""
    entries = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoechatError(f"MOECHAT_SESSION_CONFIG wants key=value[;key=value], got {item!r}")
        entries.append((key.strip(), value.strip()))
    return entries


def create_session(
    model_path: Path, provider: str, threads: int | None = None, model_bytes: bytes | None = None
) -> ort.InferenceSession:
    """``model_bytes``: an edited copy of the graph at ``model_path`` (runtime/topk.py); its
    external weights are read from beside ``model_path``."""
    providers = (
        [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    )
    options = session_options(provider, threads)  # its own errors are not onnxruntime's
    source: str | bytes = str(model_path)
    if model_bytes is not None:
        source = model_bytes
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(Path(model_path).parent)
        )
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises several unrelated exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoechatError(f"cannot load {model_path.name} with {provider}: {first}") from None
    if session.get_providers()[0] != provider:
        raise MoechatError(
            f"{provider} could not start (onnxruntime fell back to {session.get_providers()[0]})"
        )
    return session
