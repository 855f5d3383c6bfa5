"""Reference building: the stored embeddings are what the engine computes live."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.reference import ReferenceBuildError, build_reference  # noqa: E402
from masa_rt.align import Reference  # noqa: E402
from masa_rt.checkpoint import load_model, save_checkpoint  # noqa: E402
from masa_rt.cli import main  # noqa: E402
from masa_rt.model import MasaConfig, MasaModel  # noqa: E402
from masa_rt.preprocess import InputSpec, frame_features  # noqa: E402
from masa_rt.sequence import Sequence, save_sequence  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = MasaConfig(num_joints=21, joint_dims=3, d_model=32, n_heads=4, ffn_dim=64,
                     n_layers=2, window=8, proj_dim=32, proj_layers=2)
    path = tmp_path_factory.mktemp("ref") / "m.pt"
    save_checkpoint(path, MasaModel(cfg).eval(), cfg,
                    InputSpec(layout="mediapipe_hand21", fps=30.0))
    return path


def _demo(path, n: int, fps: float, seed: int, phases: bool = True):
    rng = np.random.default_rng(seed)
    joints = np.cumsum(rng.normal(0, 0.05, (n, 21, 3)), axis=0).astype(np.float32)
    extra = dict(phases=(np.arange(n) * 3 // n).astype(np.int32),
                 phase_names=("reach", "pour", "place")) if phases else {}
    save_sequence(path, Sequence(joints=joints, layout="mediapipe_hand21", fps=fps,
                                 activity="pour_milk", **extra))
    return joints


def test_reference_holds_the_offline_causal_embeddings(ckpt, tmp_path):
    joints = _demo(tmp_path / "d1.npz", 45, 30.0, 1)
    _demo(tmp_path / "d2.npz", 100, 60.0, 2)  # another rate: resampled to the model's 30 Hz
    ref = build_reference([tmp_path / "d1.npz", tmp_path / "d2.npz"], ckpt,
                          tmp_path / "pour.npz")
    loaded = Reference.load(tmp_path / "pour.npz")
    model, _cfg, spec, meta = load_model(ckpt)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(frame_features(joints, spec))[None])[0].numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.embeddings, want, atol=1e-5)
    assert loaded.model_fingerprint == meta["model_fingerprint"] == ref.model_fingerprint
    assert (loaded.activity, loaded.phase_names, loaded.fps) == (
        "pour_milk", ["reach", "pour", "place"], 30.0)
    np.testing.assert_array_equal(loaded.phases, np.arange(45) * 3 // 45)
    np.testing.assert_allclose(loaded.times, np.arange(45) / 30.0)
    (other,) = loaded.meta["other_demos"]
    assert other["frames"] == 50 and other["dtw_cost_to_first"] >= 0.0


def test_demo_without_phases_is_refused(ckpt, tmp_path):
    _demo(tmp_path / "d.npz", 20, 30.0, 3, phases=False)
    with pytest.raises(ReferenceBuildError, match="no phase labels"):
        build_reference([tmp_path / "d.npz"], ckpt, tmp_path / "r.npz")
    assert not (tmp_path / "r.npz").exists()


def test_cli_reference_build(ckpt, tmp_path, capsys):
    _demo(tmp_path / "d.npz", 20, 30.0, 4)
    assert main(["reference", "build", str(tmp_path / "d.npz"), "--checkpoint", str(ckpt),
                 "-o", str(tmp_path / "r.npz")]) == 0
    assert "pour_milk, 20 frames, 3 phases" in capsys.readouterr().out
    assert len(Reference.load(tmp_path / "r.npz")) == 20
