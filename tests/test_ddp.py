"""Two-process DistributedDataParallel training on CPU (gloo), launched like torchrun does."""

import json
import os
import subprocess
import sys

import pytest
from test_trainer import TINY, make_dataset

from masa_rt.checkpoint import load_checkpoint


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    data = make_dataset(tmp_path / "data", n=10)
    out = tmp_path / "run"
    sets = [arg for kv in TINY + ["train.epochs=2", "train.batch_size=2"] for arg in ("--set", kv)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer.train", "--data", str(data), "--out", str(out), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # 8 train sequences / batch 2 = 4 batches per epoch, every 2nd on each rank: 2 steps
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 for r in log)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["extra"]["world_size"] == 2 and ckpt["epoch"] == 2 and ckpt["step"] == 4
    assert not any(k.startswith("module.") for k in ckpt["model_state"])  # unwrapped
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
