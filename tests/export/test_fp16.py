"""float16 packages (``moechat export --fp16``, meant for CUDA): built and checked on CPU.

The CUDA tests run only where onnxruntime-gpu finds a working GPU (never in CI).
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moechat.app.cli import main
from moechat.runtime.model import load_model

from model_factory import export_tiny_package


@pytest.fixture(scope="module")
def fp16_package(tmp_path_factory, tiny_checkpoint):
    return export_tiny_package(tiny_checkpoint, tmp_path_factory.mktemp("fp16") / "pkg", "--fp16")


def _logits(package, device="cpu", static_cache=None):
    model = load_model(package, device=device, static_cache=static_cache)
    ids = list(range(3, 40))
    return np.concatenate([model.decoder.forward(ids, "all"), model.decoder.forward([5])])


def test_fp16_package_is_float16_and_close_to_fp32(fp16_package, tiny_package):
    manifest = json.loads((fp16_package / "moechat.json").read_text())
    assert manifest["graph"]["dtype"] == manifest["graph"]["kv_dtype"] == "float16"
    assert manifest["parity"]["graph"].startswith("float16")
    assert manifest["parity"]["relative"] < 5e-3
    assert manifest["parity_fp32"]["relative"] < 1e-4  # the fp32 graph was checked first

    graph = onnx.load(fp16_package / "model.onnx", load_external_data=False).graph
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    weights = [t for t in graph.initializer if t.data_type in float_types and len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    kv = [i for i in graph.input if i.name.startswith("past_key_values.")]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in kv)

    for static in (True, False):  # IO-bound float16 cache buffers, and the growing cache
        half, full = _logits(fp16_package, static_cache=static), _logits(tiny_package)
        assert half.dtype == np.float32
        assert np.abs(half - full).max() < 5e-3 * np.abs(full).max()
        assert (half.argmax(-1) == full.argmax(-1)).mean() > 0.9


def test_fp16_does_not_combine_with_int8_or_variants(tiny_checkpoint, tmp_path, capsys):
    for extra in (["--int8"], ["--variant", "dml"]):
        rc = main(["export", str(tiny_checkpoint), str(tmp_path / "x"), "--fp16", *extra])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and "--fp16" in err and "Traceback" not in err
        assert len(err.splitlines()) == 1
        assert not (tmp_path / "x").exists()


def _cuda_works() -> bool:
    """onnxruntime-gpu installed *and* a session really starts on the GPU."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), providers=["CUDAExecutionProvider"]
        )
    except Exception:
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


cuda = pytest.mark.skipif(not _cuda_works(), reason="no CUDA GPU for onnxruntime here")


@cuda
def test_cuda_fp32_package_matches_cpu(tiny_package):
    gpu, cpu = _logits(tiny_package, "cuda"), _logits(tiny_package, "cpu")
    assert np.abs(gpu - cpu).max() < 1e-3 * np.abs(cpu).max()


@cuda
def test_cuda_fp16_package_matches_cpu_fp32(fp16_package, tiny_package):
    gpu, cpu = _logits(fp16_package, "cuda"), _logits(tiny_package, "cpu")
    assert np.abs(gpu - cpu).max() < 5e-3 * np.abs(cpu).max()
