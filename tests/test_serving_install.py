"""A serving-only install: no torch. serve, replay, watch, bench and demo run on the shipped
ONNX model and references; what needs torch says so in one line. The wheel carries the
shipped examples, so demo and bench work from it as from a clone."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDING = ROOT / "examples" / "demos" / "pour_milk.npz"

# Runs masa-rt with torch unimportable, as on a machine that never installed it.
WITHOUT_TORCH = """
import sys
from importlib.abc import MetaPathFinder

class NoTorch(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
from masa_rt.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def masa_rt_without_torch(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASA_RT_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.slow
def test_demo_and_bench_run_without_torch(tmp_path):
    demo = masa_rt_without_torch(tmp_path, "demo", "--no-watch", "--duration", "2", "-q")
    assert demo.returncode == 0, demo.stderr
    assert "phase accuracy" in demo.stdout and "frames answered   60/60" in demo.stdout
    bench = masa_rt_without_torch(tmp_path, "bench", "--streams", "1", "--iters", "20",
                                  "--seconds", "0.5", "--e2e-clients", "1", "-q")
    assert bench.returncode == 0, bench.stderr
    assert "CASA-style baseline runs in torch" in bench.stdout
    assert bench.stdout.strip().splitlines()[-1].startswith("headline:")
    assert list(tmp_path.iterdir()) == [] or [p.name for p in tmp_path.iterdir()] == ["cache"]


@pytest.mark.parametrize("argv, said", [
    (["serve", "--reference", str(RECORDING)], "is a recording: embedding it into a reference "
                                               "needs torch"),
    (["reference", "build", str(RECORDING), "-o", "r.npz"], "pip install 'masa-rt[train]'"),
    (["export", "--out", "m.onnx"], "pip install 'masa-rt[train]'"),
])
def test_what_needs_torch_says_so_in_one_line(tmp_path, argv, said):
    run = masa_rt_without_torch(tmp_path, *argv)
    assert run.returncode == 2 and said in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_shipped_examples(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(ROOT), "-w", str(tmp_path)], check=True,
                   timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("masa_rt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shared = {n.split("/share/masa-rt/", 1)[1] for n in names if "/share/masa-rt/" in n}
    assert {"examples/pour_milk.npz", "examples/demos/pour_milk.npz",
            "examples/lookahead3/pour_milk.npz"} <= shared
    assert any(n.endswith("masa_rt/assets/masa_hands_causal.onnx") for n in names)
