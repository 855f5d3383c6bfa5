"""Shared fixtures: the two tiny random models the engine and serving tests run.

The dynamo ONNX export is the slow part of those tests (20-30 s a model here), so each model
is built once per session and its export is kept in pytest's cache across runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demos" / "pour_milk.npz"
ENGINE_WINDOW = 8  # window of the engine test model: streams in the tests run ~3.5 windows
ENGINE_FPS = 30.0


def _cache(request, name: str, fallback: Path) -> Path:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    return Path(cache.mkdir(name)) if cache else fallback


@pytest.fixture(scope="session")
def engine_model(request, tmp_path_factory):
    """(model, spec, onnx path, checkpoint) of a small random causal one-hand model."""
    torch = pytest.importorskip("torch")
    from engine.export import export_cached
    from masa_rt.checkpoint import load_model, save_checkpoint
    from masa_rt.model import MasaConfig, MasaModel
    from masa_rt.preprocess import InputSpec

    base = tmp_path_factory.getbasetemp()
    ckpt = base / "engine_tiny.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        cfg = MasaConfig(num_joints=21, joint_dims=3, d_model=32, n_heads=4, ffn_dim=64,
                         n_layers=4, window=ENGINE_WINDOW, proj_dim=32, proj_layers=2)
        save_checkpoint(ckpt, MasaModel(cfg).eval(), cfg,
                        InputSpec(layout="mediapipe_hand21", fps=ENGINE_FPS))
    onnx_path = export_cached(ckpt, _cache(request, "masa-rt-onnx", base))
    model, _cfg, spec, _meta = load_model(ckpt)
    return model, spec, onnx_path, ckpt


@pytest.fixture(scope="session")
def tiny_model(request, tmp_path_factory) -> tuple[Path, Path]:
    """(onnx, pour_milk reference) of a tiny random two-hand model, for serving tests."""
    torch = pytest.importorskip("torch")
    from engine.export import export_cached
    from engine.reference import build_reference
    from masa_rt.checkpoint import save_checkpoint
    from masa_rt.model import MasaConfig, MasaModel
    from masa_rt.preprocess import InputSpec

    cache = _cache(request, "masa-rt-e2e", tmp_path_factory.getbasetemp())
    ckpt, ref = cache / "tiny.pt", cache / "pour_milk_ref.npz"
    if not ckpt.is_file():
        torch.manual_seed(0)
        cfg = MasaConfig(d_model=32, n_heads=2, ffn_dim=64, window=8)
        save_checkpoint(ckpt, MasaModel(cfg).eval(), cfg, InputSpec("h2o_hands", 30.0))
    onnx = export_cached(ckpt, cache)
    if not ref.is_file():
        build_reference([DEMO], ckpt, ref, decoder={"steps": 5})  # serving runs the decoder too
    return onnx, ref


@pytest.fixture(scope="module")
def forget_layout_declarations():
    """Declared layouts are process-wide: a module that declares some forgets them at its
    end, so later test modules see the built-in table they expect."""
    from masa_rt import layout_file, skeleton

    saved = (dict(skeleton.LAYOUTS), dict(skeleton._DIRECT), dict(layout_file._DECLARED))
    yield
    for live, old in zip((skeleton.LAYOUTS, skeleton._DIRECT, layout_file._DECLARED), saved,
                         strict=True):
        live.clear()
        live.update(old)
