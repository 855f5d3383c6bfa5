"""ONNX export: metadata, the ORT-vs-torch check, refusals, atomic writes, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import engine.export as export  # noqa: E402
from engine.backends import read_model_info  # noqa: E402
from masa_rt.checkpoint import load_model, save_checkpoint  # noqa: E402
from masa_rt.cli import main  # noqa: E402
from masa_rt.model import MasaConfig, MasaModel  # noqa: E402
from masa_rt.preprocess import InputSpec  # noqa: E402

W = 8


def _ckpt(path, **overrides):
    torch.manual_seed(0)
    cfg = MasaConfig(**{**dict(num_joints=21, joint_dims=3, d_model=32, n_heads=4, ffn_dim=64,
                               n_layers=4, window=W, proj_dim=32, proj_layers=2), **overrides})
    save_checkpoint(path, MasaModel(cfg).eval(), cfg,
                    InputSpec(layout="mediapipe_hand21", fps=30.0))
    return path


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """Same model and cache as the other engine tests (one slow export per session)."""
    ckpt = tmp_path_factory.getbasetemp() / "engine_tiny.pt"
    if not ckpt.exists():
        _ckpt(ckpt)
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = cache.mkdir("masa-rt-onnx") if cache else ckpt.parent
    return ckpt, export.export_cached(ckpt, cache)


def test_metadata_and_dynamic_batch(exported):
    ckpt, path = exported
    model, cfg, spec, meta = load_model(ckpt)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["masa_config"]) == cfg.to_dict()
    assert json.loads(props["input_spec"]) == spec.to_dict()
    assert props["window"] == str(W) and props["opset"] == "18"
    assert props["model_fingerprint"] == meta["model_fingerprint"]
    assert props["cache_layout"] == "ring_per_layer" and props["masa_rt_version"]
    assert props["step_abi"] == str(export.STEP_ABI) == "2"
    info = read_model_info(path)
    assert info.cache_shape == (4, 4, W - 1, 8) and (info.input_dim, info.embed_dim) == (63, 32)
    proto = onnx.load(str(path))
    names = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    assert names == (list(export.INPUT_NAMES), list(export.OUTPUT_NAMES))
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input)
    # the check itself, at batch sizes the export never saw
    assert export.check_against_torch(model, path.read_bytes(), batches=(3, 7), steps=4) < 1e-4


def test_refuses_a_graph_that_differs_and_leaves_no_file(exported, tmp_path, monkeypatch):
    ckpt, path = exported
    monkeypatch.setattr(export, "onnx_bytes", lambda *a, **k: path.read_bytes())
    monkeypatch.setattr(export, "check_against_torch", lambda *a, **k: 0.5)
    out = tmp_path / "m.onnx"
    out.write_bytes(path.read_bytes())  # a previous export (a non-ONNX file is refused)
    with pytest.raises(export.ExportError, match="differs from torch by 0.5"):
        export.export_onnx(ckpt, out)
    assert out.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp litter


@pytest.mark.parametrize("overrides, match", [
    (dict(attention="full"), "causal"),
    (dict(positions="absolute_sine"), "relative"),
])
def test_refuses_models_that_cannot_stream(tmp_path, overrides, match):
    with pytest.raises(export.ExportError, match=match):
        export.export_onnx(_ckpt(tmp_path / "m.pt", **overrides), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export(exported, tmp_path, monkeypatch, capsys):
    ckpt, path = exported
    seen = {}

    def fake(checkpoint, out, *, opset, atol):
        seen.update(checkpoint=checkpoint, out=out, opset=opset, atol=atol)
        return out

    monkeypatch.setattr(export, "export_onnx", fake)
    assert main(["export", "--checkpoint", str(ckpt), "--out", "x.onnx"]) == 0
    assert seen == dict(checkpoint=str(ckpt), out="x.onnx", opset=18, atol=1e-4)
    assert export.resolve_checkpoint(tmp_path) == tmp_path / "last.pt"  # a run folder


def test_ring_step_equals_streaming_encoder(exported):
    model = load_model(exported[0])[0]
    step = export.RingStep(model).eval()
    state = step.initial_state(3)
    frame = torch.randn(3, 63)
    with torch.no_grad():
        u, k_new, v_new = step(*step.inputs(frame, state))
        u_ref, (k, v, ptr, ok) = step.encoder.step(frame, state)
    np.testing.assert_array_equal(u.numpy(), u_ref.numpy())
    np.testing.assert_array_equal(k_new.numpy(), k[:, :, :, 0].transpose(0, 1).numpy())
    assert k_new.shape == v_new.shape == (3, 4, 4, 8) and ok[:, 0].all() and (ptr == 1).all()


def test_graph_only_reads_the_caches(exported, tmp_path):
    """After ONNX Runtime's optimisations every cache input feeds one matmul and nothing
    else: no Split/Concat/Slice copies of the cache (what step ABI 1 spent its time on)."""
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(exported[1]), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "opt.onnx")).graph
    for name in export.input_names(4)[1:9]:
        users = [n.op_type for n in graph.node if name in n.input]
        assert users in (["MatMul"], ["FusedMatMul"]), (name, users)


def test_export_error_is_user_facing():
    assert export.ExportError.user_facing is True


def test_a_nan_output_fails_the_check():
    """max(worst, nan) is worst: a NaN difference must not pass as 0."""
    cfg = MasaConfig(num_joints=21, joint_dims=3, d_model=16, n_heads=2, ffn_dim=32,
                     n_layers=2, window=4, proj_dim=16, proj_layers=1)
    step = export.RingStep(MasaModel(cfg).eval()).eval()

    class NanSession:
        def run(self, names, feed):
            b = feed["frame"].shape[0]
            return [np.full((b, 16), np.nan, np.float32), np.zeros((b, 2, 2, 8), np.float32),
                    np.zeros((b, 2, 2, 8), np.float32)]

    with pytest.raises(export.ExportError, match="ONNX Runtime gives non-finite values"):
        export._run_both(step, NanSession(), 2, 2, np.random.default_rng(0))


def test_refuses_a_checkpoint_with_nan_weights(tmp_path, capsys):
    ckpt = _ckpt(tmp_path / "m.pt")
    c = torch.load(ckpt, weights_only=True)
    for t in c["model_state"].values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    torch.save(c, ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "weights are not finite" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_only_opset_18(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--out", str(tmp_path / "m.onnx"), "--opset", "5"])
    assert "--opset: invalid choice: 5" in capsys.readouterr().err
    with pytest.raises(ValueError, match="opset: expected one of 18"):
        export.export_onnx(None, tmp_path / "m.onnx", opset=5)


def test_metadata_opset_is_the_graphs(exported):
    proto = onnx.load(str(exported[1]))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["opset"] == str(export._written_opset(proto)) == "18"


def test_refuses_outputs_that_would_destroy_something(tmp_path, capsys):
    ckpt = _ckpt(tmp_path / "m.pt")
    text = tmp_path / "afile.txt"
    text.write_text("notes")
    (tmp_path / "adir").mkdir()
    for out, said in [(text, "exists and is not an ONNX model; refusing to replace it"),
                      (tmp_path / "adir", "is a directory"),
                      (ckpt, "is also an input")]:
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
        assert said in capsys.readouterr().err
    assert text.read_text() == "notes" and (tmp_path / "m.pt").stat().st_size > 1000
