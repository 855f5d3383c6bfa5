"""masa_rt.checkpoint: self-contained, atomic checkpoints."""

import os

import pytest
import torch

from masa_rt import checkpoint as ck
from masa_rt.model import MasaConfig, MasaModel
from masa_rt.preprocess import InputSpec

torch.set_num_threads(1)

CFG = MasaConfig(num_joints=21, joint_dims=3, d_model=16, n_heads=2, ffn_dim=32, proj_dim=16,
                 window=8)
SPEC = InputSpec("mediapipe_hand21", fps=30.0)


def _model(seed=0):
    torch.manual_seed(seed)
    return MasaModel(CFG)


def _save(path, model, **kw):
    return ck.save_checkpoint(path, model, CFG, SPEC, epoch=3, step=42,
                              data_fingerprint="abcd", train_config={"lr": 1e-3}, **kw)


def test_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    fp = _save(tmp_path / "m.pt", model, optimizer=opt)
    loaded, cfg, spec, meta = ck.load_model(tmp_path / "m.pt")
    assert cfg == CFG and spec == SPEC and not loaded.training
    assert meta["epoch"] == 3 and meta["step"] == 42 and meta["data_fingerprint"] == "abcd"
    assert meta["model_fingerprint"] == fp == ck.model_fingerprint(tmp_path / "m.pt")
    assert "optimizer_state" not in meta
    x = torch.randn(2, 10, CFG.input_dim)
    model.eval()
    torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)
    assert ck.load_checkpoint(tmp_path / "m.pt")["optimizer_state"] is not None


def test_fingerprint_tracks_weights_and_config(tmp_path):
    fp0 = _save(tmp_path / "a.pt", _model(0))
    assert _save(tmp_path / "b.pt", _model(0)) == fp0  # same content -> same name
    assert _save(tmp_path / "c.pt", _model(1)) != fp0
    assert len(fp0) == 16 and int(fp0, 16) >= 0
    ckpt = ck.load_checkpoint(tmp_path / "a.pt")
    ckpt["model_config"] = {**ckpt["model_config"], "tau": 1.0}
    assert ck.model_fingerprint(ckpt) != fp0


def test_failed_save_leaves_old_file_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    fp = _save(path, _model(0))

    def broken_save(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, _model(1))
    monkeypatch.undo()
    assert ck.model_fingerprint(path) == fp
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp litter


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, None])
def test_corrupt_file_gives_one_line_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut in half
        _save(path, _model())
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_model(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "unreadable" in msg


@pytest.mark.parametrize("content", [b"hello world, some notes\n", "caf\u00e9 \u2603\n".encode()])
def test_a_text_file_is_not_a_checkpoint(tmp_path, content):
    """torch's unpickler fails on text with whatever it trips on (KeyError: 105, ...)."""
    path = tmp_path / "afile.txt"
    path.write_bytes(content)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_model(path)
    msg = str(info.value)
    assert f"checkpoint {path}: unreadable: not a masa-rt checkpoint" in msg
    assert "\n" not in msg and "Error: " in msg  # the unpickler's own reason, one line


def test_not_a_checkpoint_and_missing_file(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ck.CheckpointError, match="not a masa-rt checkpoint"):
        ck.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        ck.load_model(tmp_path / "absent.pt")


def test_mismatched_state_is_a_checkpoint_error(tmp_path):
    _save(tmp_path / "m.pt", _model())
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["model_config"]["d_model"] = 32
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(ck.CheckpointError, match="does not match"):
        ck.load_model(tmp_path / "m.pt")


def test_default_model_path_is_inside_the_package():
    p = ck.default_model_path()
    assert p.name == "masa_hands_causal.pt" and p.parent.name == "assets"
    assert p.parent.parent.name == "masa_rt"


def test_strip_keeps_model_drops_training_state(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 6, CFG.input_dim), None, torch.randn(1, 5, CFG.input_dim), None)[
        "Z1"].sum().backward()
    opt.step()  # Adam now holds two moments per weight
    fp = _save(tmp_path / "full.pt", model, optimizer=opt)
    ck.strip_checkpoint(tmp_path / "full.pt", tmp_path / "ship" / "m.pt")
    stripped = ck.load_checkpoint(tmp_path / "ship" / "m.pt")
    assert stripped["optimizer_state"] is None and stripped["step"] == 42
    assert ck.model_fingerprint(stripped) == fp
    assert (tmp_path / "ship" / "m.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size / 2
