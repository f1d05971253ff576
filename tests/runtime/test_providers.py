"""Execution-provider choice and the loud failure on onnxruntime's silent CPU fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from moechat.runtime import providers
from moechat.runtime.errors import MoechatError
from moechat.runtime.providers import create_session, resolve_device, session_options

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DML = "DmlExecutionProvider"


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
def test_auto_prefers_cuda_when_present(monkeypatch, platform):
    monkeypatch.setattr("sys.platform", platform)
    assert resolve_device("auto", [CUDA, DML, CPU]) == CUDA
    assert resolve_device("auto", [CUDA, CPU]) == CUDA


def test_auto_uses_directml_only_on_windows(monkeypatch):
    monkeypatch.setattr("sys.platform", "win32")
    assert resolve_device("auto", [DML, CPU]) == DML
    for platform in ("linux", "darwin"):
        monkeypatch.setattr("sys.platform", platform)
        assert resolve_device("auto", [DML, CPU]) == CPU


@pytest.mark.parametrize("platform", ["linux", "win32"])
def test_auto_falls_back_to_cpu(monkeypatch, platform):
    monkeypatch.setattr("sys.platform", platform)
    assert resolve_device("auto", [CPU]) == CPU


def test_explicit_devices_map_to_providers():
    available = [CUDA, DML, CPU]
    assert resolve_device("cpu", available) == CPU
    assert resolve_device("cuda", available) == CUDA
    assert resolve_device("dml", available) == DML


def test_requested_cuda_absent_is_a_clear_error():
    with pytest.raises(MoechatError) as err:
        resolve_device("cuda", [CPU])
    message = str(err.value)
    assert "'cuda' is not available" in message
    assert "onnxruntime-gpu" in message and "moechat[cuda]" in message


def test_requested_dml_absent_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("sys.platform", "win32")
    with pytest.raises(MoechatError) as err:
        resolve_device("dml", [CPU, CUDA])
    message = str(err.value)
    assert "'dml' is not available" in message
    assert "onnxruntime-directml" in message and "moechat[directml]" in message


def test_unknown_device_is_rejected():
    with pytest.raises(MoechatError, match="unknown device 'tpu'"):
        resolve_device("tpu", [CPU])


def test_available_list_defaults_to_onnxruntime(monkeypatch):
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CUDA, CPU])
    assert resolve_device("auto") == CUDA
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(MoechatError):
        resolve_device("cuda")


class _FakeSession:
    """An InferenceSession stand-in that reports the providers it 'started'."""

    started: list[str] = [CPU]
    calls: list[dict] = []

    def __init__(self, path, sess_options=None, providers=None):
        type(self).calls.append({"path": path, "providers": providers, "options": sess_options})
        self._providers = list(type(self).started)

    def get_providers(self):
        return self._providers


@pytest.fixture
def fake_session(monkeypatch):
    _FakeSession.calls = []
    _FakeSession.started = [CPU]
    monkeypatch.setattr(providers.ort, "InferenceSession", _FakeSession)
    return _FakeSession


def test_fallback_after_session_creation_is_an_error(fake_session, tmp_path):
    fake_session.started = [CPU]  # asked for CUDA, onnxruntime quietly gave CPU
    with pytest.raises(MoechatError) as err:
        create_session(tmp_path / "model.onnx", CUDA)
    message = str(err.value)
    assert "CUDAExecutionProvider could not start" in message
    assert "fell back to CPUExecutionProvider" in message
    assert fake_session.calls[0]["providers"] == [CUDA, CPU]


def test_directml_fallback_is_an_error(fake_session, tmp_path):
    fake_session.started = [CPU]
    with pytest.raises(MoechatError, match="DmlExecutionProvider could not start"):
        create_session(tmp_path / "model.onnx", DML)


def test_session_on_the_requested_provider_is_returned(fake_session, tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)  # threads are bounded by the cores
    fake_session.started = [CUDA, CPU]
    session = create_session(tmp_path / "model.onnx", CUDA, threads=3)
    assert session.get_providers()[0] == CUDA
    assert fake_session.calls[0]["options"].intra_op_num_threads == 3


def test_cpu_session_asks_for_cpu_only(fake_session, tmp_path):
    create_session(tmp_path / "model.onnx", CPU)
    assert fake_session.calls[0]["providers"] == [CPU]


def test_session_creation_error_is_one_line(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bad graph\nsecond line\nthird")

    monkeypatch.setattr(providers.ort, "InferenceSession", boom)
    with pytest.raises(MoechatError) as err:
        create_session(Path(tmp_path / "model.onnx"), CPU)
    message = str(err.value)
    assert "cannot load model.onnx with CPUExecutionProvider" in message
    assert "bad graph" in message and "\n" not in message


def test_directml_session_options():
    opts = session_options(DML, threads=2)
    assert opts.enable_mem_pattern is False
    assert opts.intra_op_num_threads == 2
    assert opts.inter_op_num_threads == 1


def test_threads_from_environment(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)  # threads are bounded by the cores
    monkeypatch.setenv("MOECHAT_THREADS", "5")
    assert session_options(CPU).intra_op_num_threads == 5


def test_spinning_can_be_turned_off(monkeypatch):
    key = "session.intra_op.allow_spinning"
    monkeypatch.delenv("MOECHAT_SPIN", raising=False)
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default (spinning)
        session_options(CPU).get_session_config_entry(key)
    monkeypatch.setenv("MOECHAT_SPIN", "0")
    assert session_options(CPU).get_session_config_entry(key) == "0"
