"""A declared layout end to end: a tiny training run, ``reference build --layout-file``,
serve's preparing child, and a real server session whose hello declares the layout.

Each test declares its own layout name (the example file under another name), so that
what it shows cannot come from a declaration another test left in this process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml

from masa_rt import cli
from masa_rt.layout_file import declaration_of, declare

ROOT = Path(__file__).resolve().parents[1]
SPORTS23 = ROOT / "examples" / "layouts" / "sports23.yaml"
pytestmark = pytest.mark.slow

# A model small enough that a run takes seconds on one core (as tests/test_trainer.py).
TINY = ["model.d_model=16", "model.n_heads=2", "model.ffn_dim=32", "model.proj_dim=16",
        "model.window=8", "train.batch_size=4", "train.epochs=2"]


@pytest.fixture(autouse=True, scope="module")
def _forget_declarations(forget_layout_declarations):
    """The layouts this module declares are forgotten at its end (conftest.py)."""


def layout_file(tmp_path: Path, name: str) -> Path:
    """The shipped example declared as ``name``, in a file of its own."""
    d = yaml.safe_load(SPORTS23.read_text())
    d["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def body_motion(frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, 23, 2) sports23 joints in pixels, arms raised then lowered, and two phases."""
    rng = np.random.default_rng(seed)
    names = yaml.safe_load(SPORTS23.read_text())["joints"]
    base = rng.normal(0, 40, (23, 2)) + 200
    lift = np.sin(np.linspace(0, np.pi, frames))[:, None]
    joints = np.repeat(base[None], frames, axis=0)
    arms = [names.index(j) for j in ("l_elbow", "l_wrist", "l_hand", "r_elbow", "r_wrist",
                                     "r_hand")]
    joints[:, arms, 1] -= 80 * lift
    joints += rng.normal(0, 1, joints.shape)
    phases = (np.arange(frames) >= frames // 2).astype(np.int32)
    return joints.astype(np.float32), phases


def write_foreign(path: Path, layout: str, frames: int = 60, seed: int = 0) -> None:
    """A recording written by another tool: a valid sequence file that does not carry its
    layout's declaration, so reading it needs ``--layout-file``."""
    joints, phases = body_motion(frames, seed)
    np.savez(path, format_version=np.array(1), joints=joints, layout=np.array(layout),
             fps=np.array(30.0), phases=phases, phase_names=np.array(["raise", "lower"]),
             activity=np.array("raise_arms"))


def write_dataset(root: Path, layout: str, n: int = 8) -> None:
    root.mkdir()
    for i in range(n):
        write_foreign(root / f"s{i}.npz", layout, frames=30 + i, seed=i)
    manifest = {"format_version": 1, "layout": layout, "fps": 30.0,
                "activities": ["raise_arms"],
                "files": [{"file": f"s{i}.npz", "activity": "raise_arms",
                           "split": "val" if i >= n - 2 else "train"} for i in range(n)]}
    (root / "manifest.json").write_text(json.dumps(manifest))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """``masa-rt ...`` in a fresh process: it knows only what the command line declares."""
    return subprocess.run([sys.executable, "-m", "masa_rt.cli", *argv], capture_output=True,
                          text=True, timeout=300)


# --------------------------------------------------------------------------- training

def test_a_model_trained_on_a_declared_layout_carries_it_to_checkpoint_and_onnx(tmp_path):
    pytest.importorskip("torch")
    from engine.export import _metadata
    from engine.reference import build_reference
    from masa_rt.checkpoint import load_checkpoint, load_model

    data = tmp_path / "data"
    write_dataset(data, "train23")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"),
            "--layout-file", str(layout_file(tmp_path, "train23"))]
    for kv in TINY:
        args += ["--set", kv]
    assert declaration_of("train23") is None  # only the command line declares it
    with mock.patch("trainer.train.plot_curves"):  # the slowest part of a tiny run
        assert cli.main(args) == 0
    ckpt = tmp_path / "run" / "last.pt"
    declared = declaration_of("train23")
    assert load_checkpoint(ckpt)["input_spec"]["layout_declaration"] == declared
    model, cfg, spec, _ = load_model(ckpt)
    assert (cfg.num_joints, cfg.joint_dims, spec.layout) == (23, 2, "train23")
    # ONNX metadata: the same input spec, declaration included (serving needs no file)
    meta = _metadata(model, spec, "f" * 16, 18)
    assert json.loads(meta["input_spec"])["layout_declaration"] == declared
    # a fresh process rebuilds the model from the checkpoint alone
    code = ("import sys; from masa_rt.checkpoint import load_model; "
            "m, c, s, _ = load_model(sys.argv[1]); print(s.layout, s.input_dim)")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "train23 46"
    # and builds a reference with it; the reference records the declaration too
    write_foreign(tmp_path / "demo.npz", "train23")
    ref = build_reference([tmp_path / "demo.npz"], ckpt, tmp_path / "ref.npz")
    assert ref.meta["input_spec"]["layout_declaration"] == declared


# --------------------------------------------------------------------------- reference build

def test_reference_build_with_layout_file_feeds_the_shipped_body_model(tmp_path):
    pytest.importorskip("torch")
    from masa_rt.align import Reference
    from masa_rt.checkpoint import model_fingerprint
    from masa_rt.shipped import shipped_model_path

    write_foreign(tmp_path / "demo.npz", "ref23")
    out = tmp_path / "ref.npz"
    without = run_cli("reference", "build", str(tmp_path / "demo.npz"), "-o", str(out))
    assert without.returncode == 2
    last = without.stderr.strip().splitlines()[-1]
    assert "field 'layout': expected a registered layout" in last and "'ref23'" in last
    done = run_cli("reference", "build", str(tmp_path / "demo.npz"), "-o", str(out),
                   "--layout-file", str(layout_file(tmp_path, "ref23")))
    assert done.returncode == 0, done.stderr
    ref = Reference.load(out)
    # no --checkpoint: the shipped model of the layout the declaration converts to
    assert ref.model_fingerprint == model_fingerprint(shipped_model_path("penn13"))
    assert ref.phase_names == ["raise", "lower"] and len(ref) > 50


def test_serves_preparing_child_knows_the_layouts_declared_in_serve(tmp_path, monkeypatch):
    """serve embeds a recording into a reference in a child process: the child is handed
    the parent's declarations (the recording here does not carry its own)."""
    pytest.importorskip("torch")
    from engine.export import _cache_key
    from engine.serve_commands import prepare
    from masa_rt.align import Reference
    from masa_rt.shipped import shipped_model_path, shipped_onnx_path

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MASA_RT_CACHE", str(cache))
    # the shipped export is that checkpoint's checked export: seed the cache with it
    # rather than spend half a minute exporting it again
    ckpt = shipped_model_path("penn13")
    shutil.copy(shipped_onnx_path("penn13"), cache / f"step-{_cache_key(ckpt, 18)}.onnx")
    declare(yaml.safe_load(layout_file(tmp_path, "child23").read_text()), "serve --layout-file")
    write_foreign(tmp_path / "demo.npz", "child23")
    onnx, refs = prepare(None, [str(tmp_path / "demo.npz")])
    assert onnx.parent == cache
    ref = Reference.load(refs[0])
    assert ref.meta["input_spec"]["layout"] == "penn13" and len(ref) > 50


# --------------------------------------------------------------------------- serving

@pytest.fixture(scope="module")
def body_server(tmp_path_factory):
    """A real server with the shipped penn13 body model and a reference of a declared
    layout's demo (converted to penn13 as it was built)."""
    pytest.importorskip("torch")
    from engine.pipeline import Pipeline
    from engine.reference import build_reference
    from engine.server import Server, ServerConfig
    from masa_rt.shipped import shipped_onnx_path

    tmp = tmp_path_factory.mktemp("served")
    declare(yaml.safe_load(layout_file(tmp, "built23").read_text()), "test")
    write_foreign(tmp / "demo.npz", "built23")
    build_reference([tmp / "demo.npz"], None, tmp / "ref.npz")
    pipeline = Pipeline.from_files(shipped_onnx_path("penn13"), [tmp / "ref.npz"], capacity=4)
    with Server(pipeline, ServerConfig(bind="tcp://127.0.0.1:0",
                                       pub_bind="tcp://127.0.0.1:0")) as srv:
        yield srv


def test_a_hello_that_declares_its_layout_is_converted_and_answered(body_server, tmp_path):
    """The server has never heard of 'hello23': the hello declares it, with a conversion
    to penn13, and every frame is answered."""
    from clients import PoseOutlet

    declaration = yaml.safe_load(layout_file(tmp_path, "hello23").read_text())
    assert declaration_of("hello23") is None
    joints, _ = body_motion(40, seed=3)
    with PoseOutlet(body_server.address, session="declared", layout="hello23", fps=30.0,
                    layout_declaration=declaration) as out:
        assert out.welcome["layout"] == "hello23"
        assert out.welcome["model_layout"] == "penn13"
        assert out.welcome["shape"] == [23, 2]
        got = []
        for k, frame in enumerate(joints):
            out.push(frame, stamp=k / 30.0)
            est = out.pull(timeout=5.0)
            assert est is not None, f"no estimate for frame {k}"
            got.append(est)
    assert [e.seq for e in got] == list(range(40))
    assert {e.activity for e in got[10:]} == {"raise_arms"}
    assert declaration_of("hello23") is None  # the server registered nothing


def test_a_hello_whose_layout_does_not_reach_the_model_is_refused(body_server, tmp_path):
    from clients import PoseOutlet
    from clients.errors import ServerError

    declaration = yaml.safe_load(layout_file(tmp_path, "lone23").read_text())
    del declaration["convert_to"]
    out = PoseOutlet(body_server.address, session="lone", layout="lone23", fps=30.0,
                     layout_declaration=declaration)
    with pytest.raises(ServerError) as e:
        out.open(timeout=5.0)
    assert e.value.reason == "wrong_layout" and "penn13" in e.value.detail
    broken = dict(declaration, dims=4)
    out = PoseOutlet(body_server.address, session="broken", layout="lone23", fps=30.0,
                     layout_declaration=broken)
    with pytest.raises(ServerError) as e:
        out.open(timeout=5.0)
    assert e.value.reason == "wrong_layout" and "dims: expected 2 or 3" in e.value.detail
