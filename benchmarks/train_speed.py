"""Training speed: sequences per second and seconds per epoch, on this machine.

    python benchmarks/train_speed.py                               # synthetic hands
    python benchmarks/train_speed.py --data data/penn --config configs/penn.yaml
    python benchmarks/train_speed.py --steps 10 --set train.batch_size=32 --json out.json

Times whole optimizer steps of the real trainer (``trainer.train.train_step``: two augmented
views, forward, Eq. 9 loss, backward, Adam) after a warm-up, and reports the median, so one
slow step (another process, a page fault) does not move the number. Data preparation
(augmentation + ``frame_features``) is timed separately because it is numpy on the main
thread. Seconds per epoch = steps per epoch x median step time. Nothing is asserted: the
numbers describe a machine, and the machine is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from masa_rt.synth import write_dataset
from trainer.config import load_run_config
from trainer.data import epoch_batches, make_batch
from trainer.train import Dist, build_run, train_step


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def synthetic_hands(folder: Path, per_activity: int) -> Path:
    """The default benchmark data: all synthetic two-hand activities."""
    write_dataset(folder, seed=0, activities=["hands"], per_activity=per_activity)
    return folder


def measure(data: Path, config: str | None, overrides: list[str], steps: int,
            warmup: int) -> dict:
    rc = load_run_config(config, overrides)
    with tempfile.TemporaryDirectory() as out:
        run = build_run(rc, data, Path(out), Dist())
    batches = epoch_batches(len(run.data), rc.train.batch_size, 0, rc.train.seed)
    step_s, data_s = [], []
    for i in range(warmup + steps):
        idx = batches[i % len(batches)]
        t0 = time.perf_counter()
        make_batch(run.data, idx, run.spec, rc.augment, np.random.default_rng(i))
        t1 = time.perf_counter()
        train_step(run, idx, i)
        t2 = time.perf_counter()
        if i >= warmup:
            data_s.append(t1 - t0)
            step_s.append(t2 - t1)  # includes its own make_batch, as in training
    median = statistics.median(step_s)
    frames = [len(j) for j in run.data.joints]
    return {
        "data": str(data),
        "train_sequences": len(run.data),
        "frames_per_sequence": {"mean": float(np.mean(frames)), "max": int(max(frames))},
        "batch_size": rc.train.batch_size,
        "model": {k: getattr(rc.model, k) for k in ("d_model", "attention", "window",
                                                    "positions", "input_kind")},
        "params": sum(p.numel() for p in run.model.parameters()),
        "timed_steps": steps,
        "median_step_s": round(median, 4),
        "median_data_s": round(statistics.median(data_s), 4),
        "sequences_per_s": round(rc.train.batch_size / median, 2),
        "seconds_per_epoch": round(len(batches) * median, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="dataset folder (default: synthetic hands)")
    p.add_argument("--config", default=None, help="YAML run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--per-activity", type=int, default=8, help="synthetic data size")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else synthetic_hands(Path(tmp) / "hands",
                                                                 args.per_activity)
        result = {"machine": machine(),
                  **measure(data, args.config, args.set, args.steps, args.warmup)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
