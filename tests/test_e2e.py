"""End to end: a small random model exported to ONNX, a real reference, the real server.

The model is random (alignment quality is not the point here, the plumbing is): exported
once with ``engine.export.export_cached`` into pytest's cache folder, because the dynamo
export takes tens of seconds on a small CPU; later runs reuse the checked file.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from serve_process import wait_for_bind
from worker_pool import pool_at, standing_workers

from clients import PoseOutlet
from clients.replay import replay
from engine.server import Server, ServerConfig
from masa_rt.align import STATES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "demos" / "pour_milk.npz"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workers_at(tiny_model, tmp_path_factory):
    """Two ``masa-rt worker`` processes for the module, and the endpoint they connect to:
    each test's server binds it and they register with it (as remote workers would)."""
    endpoint = f"ipc://{tmp_path_factory.mktemp('engine')}/workers"
    with standing_workers(*tiny_model, endpoint, n=2):
        yield endpoint


@contextmanager
def engine(kind: str, request):
    """The server's pipeline: in its process, or two ``masa-rt worker`` processes behind a
    WorkerPool (serve --workers 2)."""
    from engine.pipeline import Pipeline

    tiny_model = request.getfixturevalue("tiny_model")
    if kind == "workers":
        with pool_at(request.getfixturevalue("workers_at"), *tiny_model, n=2) as pool:
            yield pool
    else:
        yield Pipeline.from_files(tiny_model[0], [tiny_model[1]], capacity=8)


@pytest.fixture(params=["in_process", "workers"])
def server(request, tiny_model):
    with engine(request.param, request) as pipeline, Server(
            pipeline, ServerConfig(bind="tcp://127.0.0.1:0",
                                   pub_bind="tcp://127.0.0.1:0")) as srv:
        yield srv


def demo_frames() -> np.ndarray:
    with np.load(EXAMPLE) as f:
        return f["joints"]


def test_outlet_push_and_pull_estimates(server):
    joints = demo_frames()
    with PoseOutlet(server.address, session="e2e", fps=30.0, reference="pour_milk") as out:
        assert out.welcome["references"] == ["pour_milk"]
        assert abs(out.time_correction()) < 0.01  # same machine, same clock
        got = []
        for k in range(40):
            out.push(joints[k])
            est = out.pull(timeout=2.0)
            assert est is not None, f"no estimate for frame {k}"
            got.append(est)
        assert [e.seq for e in got] == list(range(40))
        assert all(e.activity == "pour_milk" and e.state in STATES for e in got)
        assert all(0.0 <= e.progress <= 1.0 and e.latency > 0 for e in got)
        stats = out.stats(whole_server=True)
        assert stats["counters"]["frames_in"] == 40 and stats["latency"]["count"] == 40


def test_replay_three_clients(server):
    report = replay(EXAMPLE, server.address, rate_hz=90.0, clients=3, duration=1.0,
                    reference="pour_milk", session_prefix="r")
    assert report.sent >= 3 * 80 and report.unanswered == 0
    assert report.answered == report.sent and not report.rejected and not report.dropped
    # The server counts an estimate just after sending it: poll until the last one is in.
    deadline = time.monotonic() + 5.0
    while server.stats()["counters"]["estimates_out"] < report.sent:
        assert time.monotonic() < deadline, "estimates_out never reached frames sent"
        time.sleep(0.01)
    counters = server.stats()["counters"]
    assert counters["frames_in"] == counters["estimates_out"] == report.sent
    assert counters["sessions_opened"] == 3


def test_serve_command_runs_and_stops_on_sigterm(tiny_model):
    """`masa-rt serve` in its own process: binds, answers, prints counters on SIGTERM.
    ``--workers 1``: the engine in the serve process, whatever the machine's core count
    (``--workers 2``: tests/test_workers.py)."""
    onnx, ref = tiny_model
    cmd = [sys.executable, "-m", "masa_rt.cli", "serve", "--model", str(onnx),
           "--reference", str(ref), "--bind", "tcp://127.0.0.1:0", "--pub", "tcp://127.0.0.1:0",
           "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        address = wait_for_bind(proc)
        with PoseOutlet(address, session="cli", fps=30.0) as out:
            out.push(demo_frames()[0])
            assert out.pull(timeout=5.0).seq == 0
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert re.search(r"frames_in\s+1\b", stdout) and "latency.p99_us" in stdout
    assert "event=signal signal=SIGTERM" in stderr


def test_serving_modules_do_not_import_torch():
    code = ("import sys, engine.server, engine.pipeline, engine.watch, engine.serve_commands, "
            "engine.workers, engine.worker, engine.worker_commands, "
            "clients.replay; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_demo_scores_a_held_out_pour(tiny_model, capsys):
    from engine.demo import DemoConfig, run_demo
    from engine.pipeline import Pipeline

    pipeline = Pipeline.from_files(tiny_model[0], [tiny_model[1]], capacity=4)
    assert run_demo(DemoConfig(duration=1.5, watch=True), pipeline=pipeline) == 0
    out = capsys.readouterr().out
    assert "pour_milk" in out and "phase accuracy" in out and "progress MAE" in out
    answered = re.search(r"frames answered\s+(\d+)/(\d+)", out)
    assert answered and answered.group(1) == answered.group(2) and int(answered.group(1)) >= 40


@pytest.mark.parametrize("activity", ["stir_cup", "squat"])
def test_demo_performs_the_references_activity(activity):
    """Any synthetic activity, its pause and repeat moved inside its own phases."""
    from engine.demo import DemoConfig, held_out_performance

    seq = held_out_performance(DemoConfig(activity=activity, pause_phase=9, repeat_phase=9))
    assert seq.activity == activity and len(set(seq.phases.tolist())) == len(seq.phase_names)


def test_demo_of_an_activity_it_cannot_perform_is_one_line(tmp_path, capsys):
    from masa_rt.cli import main

    ref = tmp_path / "my_assembly.npz"
    np.savez(ref, activity=np.array("my_assembly"), embeddings=np.zeros((3, 2)))
    assert main(["demo", "--reference", str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'my_assembly'" in err and "masa-rt score" in err and len(err.splitlines()) == 1


def test_demo_scores_lookahead_answers_against_the_frame_they_describe():
    """With lookahead L, the answer to frame s is where the user was at frame s - L."""
    from clients.replay import ReplayReport
    from engine.demo import score
    from masa_rt.align import Estimate
    from masa_rt.synth.generate import generate

    truth = generate("pour_milk", np.random.default_rng(0), clean=True)
    names = list(truth.phase_names)

    def said(frame: int) -> Estimate:
        p = int(truth.phases[frame])
        return Estimate(p, names[p], 0.5, float(truth.canonical_time[frame]), 0.0, 1.0,
                        "tracking", "pour_milk", frame / truth.fps)

    lagged = {s: said(s - 3) for s in range(3, truth.num_frames)}
    report = ReplayReport(clients=1, rate_hz=truth.fps, duration_s=1.0, sent=truth.num_frames)
    right = score(truth, lagged, report, lag=3)
    assert right.answered == truth.num_frames - 3 == right.scored  # seq 0..2 never answered
    assert right.lag == 3 and any("lookahead" in line for line in right.lines())
    assert right.phase_accuracy == 1.0 and right.progress_mae == 0.0
    assert score(truth, lagged, report).phase_accuracy < 1.0  # scored as if current: wrong


def test_lookahead_reference_served_end_to_end(tiny_model, tmp_path):
    """A reference whose decoder has lookahead 2: the welcome tells the client the lag,
    the first two answers are 'waiting' (they describe no frame yet), the rest track."""
    from dataclasses import replace

    from engine.pipeline import Pipeline
    from masa_rt.align import Reference
    from masa_rt.phase_decoder import PhaseDecoder

    ref = Reference.load(tiny_model[1])
    late = replace(ref, decoder=PhaseDecoder(ref.decoder.members[0].arrays(), lookahead=2))
    late.save(tmp_path / "late.npz")
    pipeline = Pipeline.from_files(tiny_model[0], [tmp_path / "late.npz"], capacity=4)
    joints = demo_frames()
    with Server(pipeline, ServerConfig(bind="tcp://127.0.0.1:0",
                                       pub_bind="tcp://127.0.0.1:0")) as srv, \
            PoseOutlet(srv.address, session="late", fps=30.0) as out:
        assert out.welcome["lookahead_s"] == pytest.approx(2 / 30.0)
        got = []
        t0 = time.monotonic()
        for k in range(12):
            out.push(joints[k], stamp=t0 + k / 30.0)  # on the model's grid: one frame each
            est = out.pull(timeout=2.0)
            assert est is not None, f"no estimate for frame {k}"
            got.append(est)
    assert [e.seq for e in got] == list(range(12))
    assert [e.state for e in got[:2]] == ["waiting", "waiting"]
    assert all(e.state != "waiting" for e in got[2:])


def test_a_headset_sending_openxr_hands_is_converted_to_the_models_layout(server):
    """A client streaming OpenXR hand joints (XR_EXT_hand_tracking, 2 x 26) to the two-hand
    model is welcomed with the layout its frames are converted to, and answered exactly as
    a client sending the same poses in the model's own layout."""
    from masa_rt.skeleton import convert

    joints = demo_frames()[:30]
    openxr = convert(joints, "h2o_hands", "openxr_hands26")  # palm, metacarpals: NaN
    got = {}
    for layout, frames in (("h2o_hands", joints), ("openxr_hands26", openxr)):
        with PoseOutlet(server.address, session=f"x-{layout}", layout=layout,
                        reference="pour_milk") as out:
            assert out.welcome["layout"] == layout
            assert out.welcome["model_layout"] == (None if layout == "h2o_hands"
                                                   else "h2o_hands")
            assert out.welcome["shape"] == list(frames.shape[1:])
            got[layout] = []
            for k, frame in enumerate(frames):
                out.push(frame, stamp=k / 30.0)  # the same clock for both: same resampling
                est = out.pull(timeout=2.0)
                assert est is not None
                got[layout].append((est.phase_id, round(est.progress, 6)))
    assert got["openxr_hands26"] == got["h2o_hands"]
