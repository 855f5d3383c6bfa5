"""kill -9 during checkpoint writes: the previous checkpoint stays loadable, ``--resume``
continues where it stopped.

A tiny training (``python -m trainer.train``, the entry point of ``masa-rt train``) runs in
a subprocess on a tiny dataset with a checkpoint every epoch. The subprocess patches
``torch.save`` to write half of the checkpoint, fsync it, announce ``TORN`` and sleep before
writing the rest, so the test can SIGKILL it while a checkpoint is half on disk. After
every kill: ``RUN/last.pt`` is the previous complete checkpoint (or absent if none was ever
finished), never the torn one; then ``--resume`` continues from its step, and the final
log has every step exactly once.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from masa_rt.checkpoint import load_checkpoint  # noqa: E402
from masa_rt.sequence import Sequence, write_dataset_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, TRAIN_SEQS, BATCH = 8, 8, 4
STEPS_PER_EPOCH = TRAIN_SEQS // BATCH
SLOW = 1.0  # s a checkpoint write stays half done: the kill lands in that window
TINY = ["model.d_model=16", "model.n_heads=2", "model.ffn_dim=32", "model.proj_dim=16",
        "model.window=8", f"train.batch_size={BATCH}", f"train.epochs={EPOCHS}",
        "train.ckpt_every_epochs=1", "train.max_len=40"]

# The trainer, with a checkpoint write that stops half way for a while (and no plots).
CHILD = """
import io, os, sys, time
import torch
import trainer.train as tt

real_save, delay = torch.save, float(os.environ["SLOW_SAVE_S"])

def slow_save(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    print("TORN", obj["step"], flush=True)
    time.sleep(delay)
    f.write(data[len(data) // 2 :])

real_ckpt = tt.save_checkpoint

def announced(*args, **kwargs):
    out = real_ckpt(*args, **kwargs)
    print("SAVED", kwargs["step"], flush=True)
    return out

torch.save = slow_save
tt.save_checkpoint = announced
tt.plot_curves = lambda *a, **k: None
sys.exit(tt.main(sys.argv[1:]))
"""


def make_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(TRAIN_SEQS + 2):
        t = int(rng.integers(20, 30))
        phase = np.linspace(0, 2 * np.pi, t)[:, None, None]
        joints = (rng.normal(size=(1, 21, 3)) + 0.3 * np.sin(phase * (1 + i % 2))).astype(
            np.float32)
        seq = Sequence(joints, "mediapipe_hand21", 30.0, activity=f"act{i % 2}")
        items.append((f"s{i:02d}.npz", seq, "val" if i >= TRAIN_SEQS else "train"))
    write_dataset_files(root, items)
    return root


class Trainer:
    """One ``trainer.train`` subprocess and its stdout lines, read in a thread."""

    def __init__(self, data: Path, out: Path, resume: bool, slow_save_s: float) -> None:
        cmd = [sys.executable, "-c", CHILD, "--data", str(data), "--out", str(out)]
        cmd += ["--resume"] if resume else [a for kv in TINY for a in ("--set", kv)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_SAVE_S": str(slow_save_s),
               "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for(self, word: str, nth: int = 1, timeout: float = 60.0) -> int:
        """Block until the ``nth`` line starting with ``word``; return its step."""
        deadline, seen = time.monotonic() + timeout, 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and self.lines.empty():
                err = self.proc.stderr.read() if self.proc.poll() is not None else ""
                pytest.fail(f"no {word!r} #{nth} from the trainer: {err[-2000:]}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line.startswith(word):
                seen += 1
                if seen == nth:
                    return int(line.split()[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def finish(self, timeout: float = 120.0) -> None:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        assert self.proc.returncode == 0, err[-3000:]


def check_after_kill(out: Path, previous_step: int | None) -> int | None:
    """last.pt is the previous complete checkpoint (or absent); the torn write is litter."""
    last = out / "last.pt"
    torn = list(out.glob(".last.pt.*.tmp"))
    assert torn, "the kill did not land during a write"
    if previous_step is None:
        assert not last.exists(), "a partial first checkpoint became last.pt"
        return None
    ckpt = load_checkpoint(last)  # raises CheckpointError if last.pt were torn
    assert ckpt["step"] == previous_step
    assert ckpt["extra"]["position"]["step"] == previous_step
    for t in torn:  # the torn file really is unreadable: the kill cut it in half
        assert t.stat().st_size < last.stat().st_size
    return ckpt["step"]


def logged_steps(out: Path) -> list[int]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [json.loads(s)["step"] for s in lines if s.strip()]


@pytest.mark.slow
def test_kill_during_checkpoint_writes_then_resume(tmp_path):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    rng = random.Random(0)

    # 1. A fresh run killed during its very first checkpoint write: no last.pt at all,
    #    so the run is simply started again (the torn temp file is only litter).
    t = Trainer(data, out, resume=False, slow_save_s=SLOW)
    t.wait_for("TORN")
    t.kill()
    check_after_kill(out, None)

    # 2. Killed during its second write: last.pt is the first checkpoint (epoch 1).
    t = Trainer(data, out, resume=False, slow_save_s=SLOW)
    first = t.wait_for("SAVED")
    assert first == STEPS_PER_EPOCH
    t.wait_for("TORN")
    t.kill()
    step = check_after_kill(out, first)

    # 3. Resumed, then killed during the write of a random later epoch: last.pt is the
    #    checkpoint just before it, and the step count had continued from the resume.
    t = Trainer(data, out, resume=True, slow_save_s=SLOW)
    saved = step
    for _ in range(rng.randint(0, 2)):
        saved = t.wait_for("SAVED")
    assert t.wait_for("TORN") == saved + STEPS_PER_EPOCH
    t.kill()
    step = check_after_kill(out, saved)

    # 4. Resume to the end: the step count goes on from the checkpoint, every step once.
    t = Trainer(data, out, resume=True, slow_save_s=0.0)
    assert t.wait_for("SAVED") == step + STEPS_PER_EPOCH
    t.finish()
    final = load_checkpoint(out / "last.pt")
    assert final["step"] == EPOCHS * STEPS_PER_EPOCH and final["epoch"] == EPOCHS
    assert logged_steps(out) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert json.loads((out / "summary.json").read_text())["steps"] == final["step"]
    assert not list(out.glob(".*.tmp")), "a resumed run removes the torn writes' litter"
