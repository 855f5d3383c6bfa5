"""TensorRT backend against ONNX Runtime, within FP16 tolerance. Runs only where TensorRT,
cuda-python and an NVIDIA GPU are present; skipped with the reason elsewhere (CI)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends import BackendUnavailable, get_backend

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    try:
        from engine.backends.tensorrt_backend import _import_gpu

        _import_gpu()
    except BackendUnavailable as exc:
        pytest.skip(f"TensorRT backend unavailable: {exc}")
    torch = pytest.importorskip("torch")
    from engine.export import export_onnx
    from masa_rt.checkpoint import save_checkpoint
    from masa_rt.model import MasaConfig, MasaModel
    from masa_rt.preprocess import InputSpec

    torch.manual_seed(0)
    cfg = MasaConfig(num_joints=21, joint_dims=3, d_model=32, n_heads=4, ffn_dim=64,
                     n_layers=4, window=8, proj_dim=32, proj_layers=2)
    base = tmp_path_factory.mktemp("trt")
    save_checkpoint(base / "m.pt", MasaModel(cfg).eval(), cfg,
                    InputSpec(layout="mediapipe_hand21", fps=30.0))
    return export_onnx(base / "m.pt", base / "m.onnx"), base


@pytest.mark.parametrize("graphs", [True, False])
def test_tensorrt_matches_onnxruntime(onnx_path, graphs):
    path, base = onnx_path
    trt = get_backend("tensorrt", path, capacity=8, cache_dir=base / "engines",
                      cuda_graphs=graphs)
    ort = get_backend("onnxruntime", path, capacity=8)
    for b in (trt, ort):
        for _ in range(6):
            b.allocate()
    rng = np.random.default_rng(0)
    worst = 0.0
    for r in range(30):  # dense rounds (graph path) and sparse ones (span path), a reset
        slots = np.arange(6) if r % 2 == 0 else np.sort(rng.choice(6, 3, replace=False))
        if r == 15:
            trt.reset(np.array([2]))
            ort.reset(np.array([2]))
        frames = rng.standard_normal((len(slots), ort.input_dim)).astype(np.float32)
        worst = max(worst, float(np.abs(trt.step(slots, frames) - ort.step(slots, frames)).max()))
    assert worst < 1e-2
