"""masa_rt.labels and ``masa-rt label``: phase boundaries in a CSV -> per-frame labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from masa_rt.cli import main
from masa_rt.labels import LabelError, label_sequence, read_boundaries
from masa_rt.sequence import Sequence, load_sequence, save_sequence

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demos" / "pour_milk.npz"


def _csv(tmp_path: Path, text: str, name: str = "phases.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _recording(n: int = 10, fps: float = 10.0, t0: float = 5000.0) -> Sequence:
    joints = np.zeros((n, 42, 3), np.float32)
    return Sequence(joints=joints, layout="h2o_hands", fps=fps,
                    timestamps=t0 + np.arange(n) / fps)


def _boundaries_of(seq: Sequence, unit: str) -> str:
    """The CSV that says where each phase of a labelled sequence starts."""
    starts = np.flatnonzero(np.diff(seq.phases, prepend=-1))
    times = seq.timestamps - seq.timestamps[0]
    rows = [f"{times[k] if unit == 'time' else k},{seq.phase_names[seq.phases[k]]}"
            for k in starts]
    return "\n".join([f"{unit},phase", *rows]) + "\n"


@pytest.mark.parametrize("unit", ["time", "frame"])
def test_the_demos_own_boundaries_give_back_its_labels(tmp_path, unit):
    demo = load_sequence(DEMO)
    b = read_boundaries(_csv(tmp_path, _boundaries_of(demo, unit)))
    got = label_sequence(_recording(demo.num_frames, demo.fps), b)
    assert np.array_equal(got.phases, demo.phases) and got.phase_names == demo.phase_names


def test_time_is_seconds_from_the_first_frame_and_a_repeat_keeps_its_id(tmp_path):
    b = read_boundaries(_csv(tmp_path, "phase,time\ngrasp,0\npour,0.3\n\ngrasp,0.65\n"))
    got = label_sequence(_recording(), b, activity="pour_milk")
    assert got.phase_names == ("grasp", "pour")
    assert got.phases.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]  # 0.65 s: frame 7 on
    assert got.activity == "pour_milk"


@pytest.mark.parametrize("text, message", [
    ("", "empty: expected a header"),
    ("start,phase\n0,a\n", "line 1: unknown column 'start'"),
    ("time,frame\n0,1\n", "expected a header 'time,phase' or 'frame,phase'"),
    ("time,phase,note\n0,a,x\n", "unknown column 'note'"),
    ("time,phase\n", "no boundaries after the header"),
    ("time,phase\n0,a,b\n", "line 2: expected 2 fields"),
    ("time,phase\nsoon,a\n", "line 2: time: expected seconds >= 0, found 'soon'"),
    ("time,phase\n0,a\nnan,b\n", "line 3: time: expected seconds >= 0"),
    ("frame,phase\n0,a\n2.5,b\n", "line 3: frame: expected a whole frame index"),
    ("time,phase\n0,\n", "line 2: empty phase name"),
    ("time,phase\n0,a\n0.5,b\n0.4,c\n", "line 4: boundaries must increase: time 0.4 after 0.5"),
    ("frame,phase\n0,a\n3,b\n3,c\n", "line 4: boundaries must increase"),
    ("time,phase\n0.2,a\n", "line 2: the first phase must start at time 0"),
])
def test_bad_csvs_are_one_line_naming_the_line(tmp_path, text, message):
    with pytest.raises(LabelError) as err:
        read_boundaries(_csv(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("time,phase\n0,a\n0.95,b\n", "line 3: time 0.95 is outside the recording (0 to 0.900 s)"),
    ("frame,phase\n0,a\n10,b\n", "line 3: frame 10 is outside the recording (frames 0 to 9)"),
    ("time,phase\n0,a\n0.41,b\n0.45,c\n", "line 3: phase 'b' covers no frame"),
])
def test_boundaries_must_fit_the_recording(tmp_path, text, message):
    with pytest.raises(LabelError) as err:
        label_sequence(_recording(), read_boundaries(_csv(tmp_path, text)))
    assert message in str(err.value)


def test_label_command_writes_beside_the_demo_and_refuses_to_replace_it(tmp_path, capsys):
    demo = tmp_path / "take.npz"
    save_sequence(demo, _recording())
    csv = _csv(tmp_path, "frame,phase\n0,reach\n4,pour\n")
    assert main(["label", str(demo), "--phases", str(csv)]) == 0
    out = load_sequence(tmp_path / "take.labelled.npz")
    assert out.phases.tolist() == [0] * 4 + [1] * 6 and out.phase_names == ("reach", "pour")
    assert "wrote" in capsys.readouterr().out
    assert main(["label", str(demo), "--phases", str(csv), "-o", str(demo)]) == 2
    assert "also an input" in capsys.readouterr().err
    assert load_sequence(demo).phases is None  # the recording is untouched
    bad = _csv(tmp_path, "time,phase\n0,a\n9,b\n", "bad.csv")
    assert main(["label", str(demo), "--phases", str(bad), "-o", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "outside the recording" in err
    assert not (tmp_path / "x.npz").exists()
