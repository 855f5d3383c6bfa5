"""benchmarks/error_anatomy.py sorts wrong frames by where they sit; check its buckets on
hand-made streams whose errors are known."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")  # the script imports the harness and the model loader

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "error_anatomy.py"
_spec = importlib.util.spec_from_file_location("error_anatomy", _path)
anat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(anat)


def test_boundary_buckets_count_from_each_change():
    phases = np.array([0] * 10 + [1] * 3 + [2] * 10)
    got = anat.boundary_bucket(phases)
    assert got[9] == "until_1" and got[8] == "until_2" and got[3] == "mid"
    assert got[10] == "since_0" and got[11] == "since_1"
    assert got[12] == "until_1"  # a phase's last frame, however short the phase
    assert got[13] == "since_0" and got[18] == "since_5" and got[19] == "mid"  # 6 a side
    assert got[:3] == ["mid"] * 3


def test_motion_tells_pauses_and_speeds_from_the_frame_times():
    ref_frames = 11  # one reference frame = 0.1 of progress
    progress = np.array([0.0, 0.1, 0.2, 0.2, 0.2, 0.25, 0.45, 0.65])
    times = np.array([0, 1, 2, 3, 4, 5, 6, 8]) / 30  # the last frame after a dropped one
    assert anat.motion(progress, times, ref_frames, 30.0) == [
        "normal", "normal", "normal", "pause", "pause", "slow", "fast", "normal"]


def _stream(phases, progress, activity="a"):
    progress = np.asarray(progress, dtype=np.float64)
    return SimpleNamespace(activity=activity, phases=np.asarray(phases), progress=progress,
                           times=np.arange(len(progress)) / 30.0)


def test_an_engine_one_frame_late_errs_only_on_each_first_frame():
    phases = np.array([0] * 12 + [1] * 12 + [2] * 12)
    progress = np.arange(36) / 35
    late = np.concatenate([[0], phases[:-1]])
    refs = {"a": SimpleNamespace(phases=phases, fps=30.0)}
    r = anat.anatomy([_stream(phases, progress)], [late], refs)
    assert r["wrong"] == 2 and r["frames"] == 36
    assert r["by_boundary"]["since_0"] == {"frames": 2, "wrong_pct": 100.0,
                                           "share_of_wrong_pct": 100.0}
    assert r["by_boundary"]["until_1"]["wrong_pct"] == 0.0


def test_a_pause_near_the_end_read_as_the_next_phase_is_counted_by_position():
    # Reference: phase 0 on frames 0..9, phase 1 on 10..19. The stream slows to frame 8.5
    # (u = 0.85 of phase 0), holds there for 6 more frames, and the engine says phase 1
    # meanwhile.
    ref_phases = np.array([0] * 10 + [1] * 10)
    f = np.concatenate([np.arange(9), [8.5] * 7, np.arange(9, 20)])
    progress = f / 19
    phases = ref_phases[np.floor(f).astype(int)]
    said = phases.copy()
    said[10:16] = 1
    refs = {"a": SimpleNamespace(phases=ref_phases, fps=30.0)}
    r = anat.anatomy([_stream(phases, progress)], [said], refs)
    assert r["wrong"] == 6
    assert r["pauses"]["by_position"]["0.8"] == {"frames": 6, "wrong_pct": 100.0}
    assert r["pauses"]["by_frames_paused"]["00+"]["frames"] == 4  # paused 1..4 frames
    assert r["mid_phase"]["pause"]["next"] == sum(
        b == "mid" for b in anat.boundary_bucket(phases)[10:16]) == 1


class _StillStream:
    """20 frames: moving 0..5, still 6..15 (canonical time held), moving 16..19."""

    progress = np.concatenate([np.arange(6), [5.0] * 10, np.arange(6, 10)]) / 19


def test_pause_state_scores_each_frame_against_the_users_pause():
    # The aligner called frames 9..15 paused (and frame 2, moving).
    said = np.zeros(20, dtype=np.int64)
    said[[2, *range(9, 16)]] = anat.STATES.index("paused")
    r = anat.pause_state([_StillStream()], [said], need=4)
    # Still frames 6..15: 6, 7, 8 begin the pause (run 1..3) and count as neither.
    assert r["paused_frames"] == 7 and r["moving_frames"] == 10
    assert r["recall_pct"] == 100.0 and r["false_flag_pct"] == 10.0


def test_pause_state_counts_every_frame_of_a_real_stream():
    from engine.export import resolve_checkpoint
    from engine.harness import (
        SCENARIOS,
        embed_learned,
        load_references,
        make_references,
        make_streams,
        run_per_activity,
    )
    from masa_rt.checkpoint import load_model

    model, _cfg, spec, _meta = load_model(resolve_checkpoint(None))
    emb = {"learned": embed_learned(model)}
    _built, canon = make_references(["stir_cup"], spec, emb)
    streams = make_streams(["stir_cup"], [SCENARIOS["pause"]], 1, 0, spec, canon, emb)
    refs = load_references(Path(__file__).resolve().parents[1] / "examples", ["stir_cup"])
    preds = run_per_activity(refs, streams, "learned")
    r = anat.pause_state(streams, [p.state for p in preds], need=4)
    held = anat.still(streams[0].progress)
    pauses = int(np.sum(held[1:] & ~held[:-1]) + held[0])
    # Every frame is counted but the first 3 of each pause (its start, neither state).
    total = r["paused_frames"] + r["moving_frames"]
    assert len(streams[0]) - 3 * pauses <= total < len(streams[0])
    assert r["paused_frames"] >= 50  # the scenario's 2 s pause, at 30 fps
