"""Record -> label -> reference build -> serve, end to end with the shipped model.

A headset (replay of the shipped demo recording) streams to a real ``masa-rt serve
--record``; the recorded take is labelled from a CSV of phase starts (``masa-rt label``),
built into a reference (``masa-rt reference build``, torch, the shipped model), served by
a second ``masa-rt serve``, and a replay of the same performance gets its phases back.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from serve_process import ENV, serving

from clients.replay import replay
from masa_rt.cli import main
from masa_rt.sequence import load_sequence

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demos" / "pour_milk.npz"
SHIPPED_REFERENCE = ROOT / "examples" / "pour_milk.npz"
RATE_HZ = 60.0  # twice the demo's 30 fps: the test takes half the time, recording and all
pytestmark = pytest.mark.slow


def _wait_for_file(folder: Path, timeout: float = 20.0) -> Path:
    deadline = time.monotonic() + timeout
    while not (found := sorted(folder.glob("*.npz"))):
        assert time.monotonic() < deadline, f"nothing recorded in {folder}"
        time.sleep(0.05)
    return found[0]


def _phase_csv(path: Path, phases: np.ndarray, names: tuple[str, ...]) -> Path:
    """A person's CSV of where each phase starts (frame indices of the take)."""
    starts = np.flatnonzero(np.diff(phases, prepend=-1))
    path.write_text("frame,phase\n" + "".join(f"{k},{names[phases[k]]}\n" for k in starts))
    return path


def test_record_label_build_serve(tmp_path):
    demo = load_sequence(DEMO)
    record_dir = tmp_path / "recordings"
    record_dir.mkdir()

    # 1. Record: a headset performs the pour against the shipped reference.
    with serving("--reference", str(SHIPPED_REFERENCE), "--record", str(record_dir)) as address:
        report = replay(DEMO, address, rate_hz=RATE_HZ, session_prefix="take")
        assert report.sent == demo.num_frames and report.unanswered == 0
        take = _wait_for_file(record_dir)  # written on the replay's bye
    recorded = load_sequence(take)
    assert take.name.endswith("_take-0.npz") and recorded.num_frames == demo.num_frames
    assert np.array_equal(recorded.joints, demo.joints, equal_nan=True)
    assert recorded.fps == RATE_HZ and "closed=bye" in recorded.source

    # 2. Label it from a CSV of phase starts.
    csv = _phase_csv(tmp_path / "phases.csv", demo.phases, demo.phase_names)
    labelled = tmp_path / "take.labelled.npz"
    assert main(["label", str(take), "--phases", str(csv), "-o", str(labelled),
                 "--activity", "pour_milk"]) == 0
    assert np.array_equal(load_sequence(labelled).phases, demo.phases)

    # 3. Build a reference from it (torch, the shipped model: a few seconds).
    reference = tmp_path / "my_pour.npz"
    built = subprocess.run([sys.executable, "-m", "masa_rt.cli", "reference", "build",
                            str(labelled), "-o", str(reference)], capture_output=True,
                           text=True, env=ENV, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]

    # 4. Serve it; the same performance gets its phases back.
    said: dict[int, str | None] = {}
    with serving("--reference", str(reference)) as address:
        report = replay(DEMO, address, rate_hz=RATE_HZ, session_prefix="check",
                        on_estimate=lambda _i, est: said.__setitem__(est.seq, est.phase_name))
    assert report.unanswered == 0 and len(said) == demo.num_frames
    truth = {k: demo.phase_names[p] for k, p in enumerate(demo.phases)}
    right = sum(said[k] == truth[k] for k in said)
    assert set(said.values()) - {None} <= set(demo.phase_names)
    assert right / len(said) > 0.8, f"{right}/{len(said)} frames in the labelled phase"
