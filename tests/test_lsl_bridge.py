"""masa-rt lsl: a real LSL pose outlet -> the bridge -> a real ``masa-rt serve`` -> LSL inlets.

The test publishes the shipped demo recording as an LSL stream (channels labelled and
shuffled, as a mocap tool might send them), the bridge forwards it to the server, and real
LSL inlets read the estimate stream and the marker stream back, all on loopback.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from serve_process import serving

from clients.clock import local_clock
from clients.lsl_bridge import ESTIMATE_CHANNELS, LslUnavailable, load_pylsl
from clients.lsl_channels import ChannelMapError
from masa_rt.sequence import load_sequence
from masa_rt.skeleton import get_layout

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demos" / "pour_milk.npz"
SHIPPED_REFERENCE = ROOT / "examples" / "pour_milk.npz"
RATE_HZ = 60.0
DEADLINE = 10.0

try:
    lsl = load_pylsl()
except LslUnavailable as exc:  # pylsl's wheels bundle liblsl; a source install may lack it
    pytest.skip(f"LSL unavailable: {exc}", allow_module_level=True)


def _pose_outlet(name: str, labels: list[str], rate: float = RATE_HZ):
    info = lsl.StreamInfo(name, "Mocap", len(labels), rate, lsl.cf_float32, f"{name}-src")
    channels = info.desc().append_child("channels")
    for label in labels:
        channels.append_child("channel").append_child_value("label", label)
    return lsl.StreamOutlet(info)


def _inlet(name: str):
    (info,) = lsl.resolve_byprop("name", name, timeout=DEADLINE)
    inlet = lsl.StreamInlet(info)
    inlet.open_stream(timeout=DEADLINE)
    return inlet


def test_bridge_forwards_an_lsl_pose_stream_and_publishes_estimates(tmp_path):
    from clients.lsl_bridge import LslBridge

    demo = load_sequence(DEMO)
    lay = get_layout(demo.layout)
    labels = [f"{j}_{a}" for j in lay.joint_names for a in "xyz"]
    order = np.random.default_rng(1).permutation(len(labels))  # channel k: coordinate order[k]
    name = f"poses-{uuid.uuid4().hex[:8]}"
    poses = _pose_outlet(name, [labels[i] for i in order])
    with serving("--reference", str(SHIPPED_REFERENCE)) as address:
        bridge = LslBridge("name", name, address, reference="pour_milk").open()
        estimates, markers = _inlet(f"{name}-masa"), _inlet(f"{name}-masa-markers")
        assert estimates.info(timeout=DEADLINE).channel_count() == len(ESTIMATE_CHANNELS)
        stop = threading.Event()
        worker = threading.Thread(target=bridge.run, kwargs={"stop": stop}, daemon=True)
        worker.start()
        try:
            stamps = _publish(poses, demo.joints.reshape(len(demo.joints), -1)[:, order])
            got, got_stamps = _pull(estimates, len(stamps))
            marks, _ = _pull(markers, 2, quiet_s=0.5)
        finally:
            stop.set()
            worker.join(DEADLINE)
            bridge.close()
    report = bridge.report
    assert report.samples_in == report.frames_sent == len(stamps) == demo.num_frames
    assert report.estimates_out == len(got) == demo.num_frames and not report.skipped
    # Each estimate carries the capture stamp of the sample it answers (one machine: the
    # clock correction is ~0), so LSL recorders line estimates up with the poses.
    assert np.allclose(got_stamps, stamps, atol=1e-3)
    phase_id = np.array([row[0] for row in got]).astype(int)
    assert np.mean(phase_id == demo.phases) > 0.8  # the shipped reference's own demo
    said = [json.loads(row[0]) for row in marks]
    assert {m["activity"] for m in said} == {"pour_milk"}
    assert {m["phase"] for m in said} - {None} <= set(demo.phase_names)


def _publish(outlet, samples: np.ndarray) -> list[float]:
    """Push samples on an absolute schedule at RATE_HZ; return their stamps."""
    t0, stamps = local_clock(), []
    for k, sample in enumerate(samples):
        while local_clock() < t0 + k / RATE_HZ:
            time.sleep(0.001)
        stamps.append(local_clock())
        outlet.push_sample(sample.tolist(), stamps[-1])
    return stamps


def _pull(inlet, count: int, quiet_s: float = 3.0) -> tuple[list, list[float]]:
    """Up to ``count`` samples, or what came before ``quiet_s`` s passed without one."""
    rows, stamps = [], []
    while len(rows) < count:
        row, stamp = inlet.pull_sample(timeout=quiet_s)
        if row is None:
            break
        rows.append(row)
        stamps.append(stamp)
    return rows, stamps


def test_a_stream_whose_channels_fit_no_layout_is_one_line():
    from clients.lsl_bridge import LslBridge

    name = f"eeg-{uuid.uuid4().hex[:8]}"
    _outlet = _pose_outlet(name, ["Fp1", "Fp2", "Cz"])  # held open while the bridge looks
    with pytest.raises(ChannelMapError) as err:
        LslBridge("name", name, "tcp://127.0.0.1:1", resolve_timeout=DEADLINE)
    assert str(err.value).startswith(f"LSL stream {name!r}: channel 0 label 'Fp1' is not")
    assert "\n" not in str(err.value)
    del _outlet


def test_lsl_command_against_a_secure_server(tmp_path, capsys):
    """``masa-rt lsl --secure KEYDIR``: the bridge's own client key on a CURVE server."""
    import ast
    import re

    from engine.security import create_keypair
    from masa_rt.cli import main

    keydir = tmp_path / "keys"
    create_keypair(keydir, "server", server=True)
    create_keypair(keydir, "lsl")
    demo = load_sequence(DEMO)
    lay = get_layout(demo.layout)
    name = f"secure-poses-{uuid.uuid4().hex[:8]}"
    poses = _pose_outlet(name, [f"{j}_{a}" for j in lay.joint_names for a in "xyz"])
    frames = demo.joints.reshape(len(demo.joints), -1)[:90]

    def publish_once_the_bridge_listens() -> None:
        if poses.wait_for_consumers(DEADLINE):
            _publish(poses, frames)

    with serving("--reference", str(SHIPPED_REFERENCE), "--secure", str(keydir)) as address:
        publisher = threading.Thread(target=publish_once_the_bridge_listens, daemon=True)
        publisher.start()
        code = main(["lsl", "--name", name, "--address", address, "--secure", str(keydir),
                     "--reference", "pour_milk", "--duration", "4"])
        publisher.join(DEADLINE)
    out = capsys.readouterr().out
    assert code == 0, out
    counts = re.search(r"sent (\d+),.*rejected (\{[^}]*\}|0), estimates out (\d+)", out)
    assert counts, out
    sent, answered = int(counts.group(1)), int(counts.group(3))
    refused = counts.group(2)
    rejected = 0 if refused == "0" else sum(ast.literal_eval(refused).values())
    # Every frame is answered or refused. A few may be refused 'overloaded': samples that
    # queued in the inlet while the bridge was still opening arrive at the server at once.
    assert sent == len(frames) == answered + rejected and answered >= 0.8 * sent, out
