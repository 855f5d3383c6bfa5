"""``masa-rt train``: self-supervised MASA training (METHOD.md §5), single process or DDP.

One step: two augmented views of a batch (``trainer.data``) -> ``MasaModel.forward`` ->
``masa_loss`` (L_m Eq. 6, L_c Eq. 7, L Eq. 9) -> Adam. The learning rate is halved every
``lr_halve_every`` epochs (StepLR). Outputs in ``RUN/``:

* ``config.yaml``  the resolved config (``--config RUN/config.yaml`` reproduces the run),
* ``log.jsonl``    one line per step: step, epoch, L, L_m, L_c, lr, time, world_size,
* ``last.pt``      checkpoint (atomic) after every ``ckpt_every_epochs`` epochs and when
                   the time budget runs out: weights, configs, optimizer, scheduler,
                   position (epoch, batch, step), torch RNG, data fingerprint,
* ``curves.png``   the loss terms and lr against the step,
* ``summary.json`` final losses, throughput and collapse diagnostics of ``U`` on val.

``--resume`` continues from ``last.pt`` exactly: batch order and augmentation are derived
from (seed, epoch) and (seed, rank, step) (see ``trainer.data``), the rest is restored, so
2 epochs straight and 1 + 1 resumed give the same weights.

Scale-out: run the same entry point under torchrun
(``torchrun --standalone --nproc_per_node=2 -m trainer.train --data D --out RUN``). With
``WORLD_SIZE > 1`` each rank joins a gloo process group (nccl on CUDA), the model is wrapped
in DistributedDataParallel, each rank takes every ``world_size``-th batch, and rank 0 alone
writes outputs. BatchNorm in the projection head keeps per-rank batch statistics (DDP
broadcasts rank 0's running stats each step); SyncBatchNorm would couple ranks on every
layer for no gain at these batch sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from masa_rt.atomic import atomic_write, atomic_write_json
from masa_rt.checkpoint import load_checkpoint, non_finite_weights, save_checkpoint
from masa_rt.losses import masa_loss
from masa_rt.model import MasaModel
from masa_rt.preprocess import InputSpec
from masa_rt.sequence import Dataset
from trainer.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    check_device,
    fill_from_dataset,
    load_run_config,
    run_config_to_dict,
    save_run_config,
)
from trainer.data import SequenceSet, epoch_batches, load_sequences, make_batch
from trainer.diagnostics import collapse_stats, encode_split
from trainer.plots import plot_curves, read_log

__all__ = ["Dist", "Position", "Run", "TrainingDiverged", "build_run", "init_distributed", "main",
           "run_cli", "train", "train_step"]

CKPT_NAME, LOG_NAME, CONFIG_NAME = "last.pt", "log.jsonl", "config.yaml"
logger = logging.getLogger("trainer.train")


class TrainingDiverged(ValueError):
    """The loss (or the weights) stopped being finite: training stops, and the last
    checkpoint, written before, is kept. ``masa_rt.cli`` prints such errors as one line."""

    user_facing = True


@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Position:
    """How far a run got; ``epoch`` counts completed epochs, ``batch`` batches of the next."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    sequences: int = 0  # sequences seen by this rank (throughput)
    elapsed_s: float = 0.0


@dataclass
class Run:
    """Objects one training run works with (built once, shared by the helpers below)."""

    rc: RunConfig
    spec: InputSpec
    data: SequenceSet
    fingerprint: str
    model: MasaModel
    net: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    out: Path
    dist: Dist
    device: torch.device


# ---------------------------------------------------------------------------- distributed

def init_distributed(device: str = "cpu") -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend)
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _all_mean(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Mean over ranks (for logging; gradients are averaged by DDP itself)."""
    if dist.world_size > 1:
        values = values.clone()
        tdist.all_reduce(values)
        values /= dist.world_size
    return values


def _any_rank(flag: bool, dist: Dist) -> bool:
    """True if any rank says so: ranks must agree on stopping or the collectives hang."""
    if dist.world_size == 1:
        return flag
    t = torch.tensor([float(flag)])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def _barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        tdist.barrier()


# ---------------------------------------------------------------------------- setup

def _device(rc: RunConfig, dist: Dist) -> torch.device:
    name = rc.train.device
    if name.startswith("cuda") and dist.world_size > 1:
        name = f"cuda:{dist.local_rank}"
    return torch.device(name)


def _warn_subsampled(data: SequenceSet, rc: RunConfig) -> None:
    """A subsampled clip runs at fps / stride; a causal model is served at the full fps."""
    n = sum(s > 1 for s in data.strides)
    if n and rc.model.attention == "causal":
        logger.warning("%d of %d train clips are longer than train.max_len=%d and subsampled "
                    "(stride up to %d): the causal model sees them below the %g fps it is "
                    "served at; raise train.max_len to keep every frame", n, len(data),
                    rc.train.max_len, max(data.strides), data.fps)


def schedule_for_steps(cfg: TrainConfig, n: int, world_size: int = 1) -> TrainConfig:
    """With ``steps`` set: the epochs those steps need on ``n`` clips, and the lr halved
    at the same fractions of the run as ``lr_halve_every / epochs`` (at least one epoch
    apart). Deterministic in the data size, so a resumed run derives the same."""
    if cfg.steps is None:
        return cfg
    per_epoch = len(epoch_batches(n, cfg.batch_size, 0, cfg.seed, 0, world_size))
    epochs = math.ceil(cfg.steps / per_epoch)
    fraction = cfg.lr_halve_every / max(cfg.epochs, 1)
    return replace(cfg, epochs=epochs, lr_halve_every=max(1, round(fraction * epochs)))


def build_run(rc: RunConfig, data_dir: Path, out: Path, dist: Dist) -> Run:
    """Load data, fill the model dims from it, build model, optimizer and scheduler."""
    ds = Dataset(data_dir)
    layout, fps = ds.manifest.layout, ds.manifest.fps
    first = next(ds.sequences("train"), None)
    if first is None:
        raise ConfigError(f"{data_dir}: the train split is empty")
    feature_dim = 0 if first.features is None else int(first.features.shape[-1])
    spec = fill_from_dataset(rc, layout, fps, feature_dim)
    data = load_sequences(data_dir, "train", spec, rc.train.max_len)
    _warn_subsampled(data, rc)
    rc.train = schedule_for_steps(rc.train, len(data), dist.world_size)
    device = _device(rc, dist)
    torch.manual_seed(rc.train.seed)  # the same initial weights on every rank
    model = MasaModel(rc.model).to(device)
    net: torch.nn.Module = model
    if dist.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=rc.train.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=rc.train.lr_halve_every,
                                                gamma=0.5)
    return Run(rc, spec, data, ds.fingerprint(), model, net, optimizer, scheduler, out, dist,
                device)


# ---------------------------------------------------------------------------- checkpoints

def _rng_state(device: torch.device) -> dict:
    """Torch RNG (dropout); numpy randomness needs no state, it is derived per step."""
    state = {"torch": torch.get_rng_state(),
             "numpy": "derived from (seed, epoch) and (seed, rank, step)"}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _check_finite_weights(run: Run, pos: Position) -> None:
    """Refuse to checkpoint NaN/inf weights (a finite loss with an infinite gradient can
    still make them): the previous ``last.pt`` is worth more. Same answer on every rank."""
    if bad := non_finite_weights(run.model):
        raise TrainingDiverged(f"step {pos.step}: weights are not finite ({bad}); not writing "
                               "a checkpoint. Lower train.lr")


def _save(run: Run, pos: Position) -> None:
    """Rank 0 writes ``RUN/last.pt`` (atomically); every rank waits for it."""
    _check_finite_weights(run, pos)
    if run.dist.is_main:
        save_checkpoint(
            run.out / CKPT_NAME, run.model, run.rc.model, run.spec,
            optimizer=run.optimizer, scheduler=run.scheduler, epoch=pos.epoch, step=pos.step,
            data_fingerprint=run.fingerprint, train_config=run_config_to_dict(run.rc),
            rng_state=_rng_state(run.device),
            extra={"position": asdict(pos), "world_size": run.dist.world_size},
        )
    _barrier(run.dist)


def _restore(run: Run) -> Position:
    """Load ``RUN/last.pt`` into the run; refuse a different model or different data."""
    path = run.out / CKPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path)
    if ckpt["model_config"] != run.rc.model.to_dict():
        diff = sorted(k for k, v in run.rc.model.to_dict().items()
                      if ckpt["model_config"].get(k) != v)
        raise ConfigError(f"resume: model config differs from {path} in {diff}")
    if ckpt["data_fingerprint"] != run.fingerprint:
        raise ConfigError(f"resume: the dataset changed since {path} was written "
                          f"(fingerprint {ckpt['data_fingerprint']} -> {run.fingerprint})")
    run.model.load_state_dict(ckpt["model_state"])
    run.optimizer.load_state_dict(ckpt["optimizer_state"])
    run.scheduler.load_state_dict(ckpt["scheduler_state"])
    torch.set_rng_state(ckpt["rng_state"]["torch"])
    if "cuda" in ckpt["rng_state"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng_state"]["cuda"], run.device)
    return Position(**ckpt["extra"]["position"])


def _init_weights(run: Run, path: Path) -> None:
    """Load a checkpoint's weights into a fresh run (TrainConfig.init_from)."""
    if path.is_dir():
        path = path / CKPT_NAME
    ckpt = load_checkpoint(path)
    mine = run.rc.model.to_dict()
    diff = sorted(k for k, v in mine.items() if k != "window" and ckpt["model_config"].get(k) != v)
    if diff:
        raise ConfigError(f"init_from: model config differs from {path} in {diff} (only "
                          "model.window may change when fine-tuning)")
    if ckpt["input_spec"] != run.spec.to_dict():
        raise ConfigError(f"init_from: input spec differs from {path}: "
                          f"{ckpt['input_spec']} vs {run.spec.to_dict()}")
    state = dict(ckpt["model_state"])
    if ckpt["model_config"]["window"] != run.rc.model.window:
        for name, table in state.items():
            if name.endswith("attn.rel_bias"):
                state[name] = _fit_window(table, run.rc.model.window, mine["attention"])
    run.model.load_state_dict(state)
    logger.info("init_from: weights of %s (window %d -> %d)", path,
                ckpt["model_config"]["window"], run.rc.model.window)


def _fit_window(table: torch.Tensor, window: int, attention: str) -> torch.Tensor:
    """A causal relative-bias table (H, W_old) -> (H, window): offsets 0..window-1 keep
    their learned bias; offsets the old table lacked take its last (farthest) entry."""
    if attention != "causal":
        raise ConfigError("init_from: model.window can change only for a causal model "
                          "(a full model's table is centred on offset 0)")
    if table.shape[1] >= window:
        return table[:, :window].clone()
    pad = table[:, -1:].expand(-1, window - table.shape[1])
    return torch.cat([table, pad], dim=1)


# ---------------------------------------------------------------------------- logging

class _Log:
    """``RUN/log.jsonl`` on rank 0: one JSON object per step, flushed as written."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        self.file = None
        if not enabled:
            return
        if keep_until_step is not None and path.exists():
            self._truncate(path, keep_until_step)
        self.file = open(path, "a" if keep_until_step is not None else "w", encoding="utf-8")

    @staticmethod
    def _truncate(path: Path, step: int) -> None:
        """Drop lines past the checkpoint: those steps are about to run again."""
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from a crash
        with atomic_write(path, "w") as f:
            f.write("".join(f"{line}\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------- the loop

def train_step(run: Run, idx: np.ndarray, step: int) -> torch.Tensor:
    """One optimizer step; returns (L, L_m, L_c) averaged over ranks, detached."""
    rng = np.random.default_rng([run.rc.train.seed, run.dist.rank, step])
    batch = make_batch(run.data, idx, run.spec, run.rc.augment, rng,
                       run.rc.train.clip_len).to(run.device)
    # "view" positions: None = each view's own frame counter (TrainConfig.positions).
    source = run.rc.train.positions == "source"
    out = run.net(batch.x1, batch.m1, batch.x2, batch.m2, pos1=batch.g1 if source else None,
                  pos2=batch.g2 if source else None)
    losses = masa_loss(out, batch.loss_inputs(), run.rc.loss)
    # Averaged before the update, so every rank sees the same values and a NaN on any rank
    # stops them all before it reaches the weights.
    terms = _all_mean(torch.stack([losses[k].detach() for k in ("L", "L_m", "L_c")]).cpu(),
                      run.dist)
    if not torch.isfinite(terms).all():
        L, L_m, L_c = terms.tolist()
        raise TrainingDiverged(
            f"step {step + 1}: the loss is not finite (L={L:.4g}, L_m={L_m:.4g}, L_c={L_c:.4g}); "
            "training stopped before this step's update. Lower train.lr, check model.tau "
            "and the data (NaN/inf in joints or features)")
    run.optimizer.zero_grad(set_to_none=True)
    losses["L"].backward()
    run.optimizer.step()
    return terms


@contextmanager
def _progress(run: Run, epoch: int, total: int, done: int) -> Iterator[tqdm]:
    quiet = not run.dist.is_main or not sys.stderr.isatty()
    bar = tqdm(total=total, initial=done, disable=quiet, leave=False,
               desc=f"epoch {epoch + 1}/{run.rc.train.epochs}")
    try:
        yield bar
    finally:
        bar.close()


def _run_epoch(run: Run, pos: Position, log: _Log, deadline: float | None,
               clock: Callable[[], float]) -> bool:
    """Train the rest of epoch ``pos.epoch``; False if the time budget stopped it."""
    cfg = run.rc.train
    batches = epoch_batches(len(run.data), cfg.batch_size, pos.epoch, cfg.seed,
                            run.dist.rank, run.dist.world_size)
    with _progress(run, pos.epoch, len(batches), pos.batch) as bar:
        for i in range(pos.batch, len(batches)):
            if cfg.steps is not None and pos.step >= cfg.steps:
                break  # the step budget ends inside this (last) epoch
            L, L_m, L_c = train_step(run, batches[i], pos.step).tolist()
            pos.step, pos.batch = pos.step + 1, i + 1
            pos.sequences += len(batches[i])
            if pos.step % cfg.log_every == 0:
                log.write({"step": pos.step, "epoch": pos.epoch, "L": L, "L_m": L_m, "L_c": L_c,
                           "lr": run.optimizer.param_groups[0]["lr"],
                           "time": round(clock(), 3),
                           "world_size": run.dist.world_size})
            bar.set_postfix(L=f"{L:.4f}", L_m=f"{L_m:.4f}", L_c=f"{L_c:.3f}")
            bar.update()
            if _any_rank(deadline is not None and time.monotonic() > deadline, run.dist):
                return False
    run.scheduler.step()
    pos.epoch, pos.batch = pos.epoch + 1, 0
    return True


def _loop(run: Run, pos: Position, log: _Log) -> str:
    """All remaining epochs; returns "done" or "time" (budget ran out, checkpointed)."""
    cfg = run.rc.train
    started, base = time.monotonic(), pos.elapsed_s
    deadline = started + 60 * cfg.max_minutes if cfg.max_minutes is not None else None

    def clock() -> float:  # training seconds, including those before a resume
        return base + time.monotonic() - started

    while pos.epoch < cfg.epochs:
        finished = _run_epoch(run, pos, log, deadline, clock)
        pos.elapsed_s = clock()
        last = pos.epoch == cfg.epochs
        if not finished or last or pos.epoch % cfg.ckpt_every_epochs == 0:
            _save(run, pos)
        if not finished:
            return "time"
    return "done"


# ---------------------------------------------------------------------------- the run

def _summary(run: Run, pos: Position, status: str, data_dir: Path) -> dict:
    """Final numbers for RUN/summary.json (rank 0)."""
    records = read_log(run.out / LOG_NAME)
    last_epoch = [r for r in records if r["epoch"] == records[-1]["epoch"]] if records else []
    split = "val" if Dataset(data_dir).entries("val") else "train"
    embeddings = encode_split(run.model, data_dir, split, run.spec, run.rc.train.max_len)
    seen = pos.sequences * run.dist.world_size
    return {
        "status": status,
        "epochs_completed": pos.epoch,
        "steps": pos.step,
        "world_size": run.dist.world_size,
        "wall_s": round(pos.elapsed_s, 2),
        "train_sequences": len(run.data),
        "subsampled_clips": sum(s > 1 for s in run.data.strides),
        "sequences_per_s": round(seen / pos.elapsed_s, 2) if pos.elapsed_s > 0 else None,
        "last_epoch_mean": {k: float(np.mean([r[k] for r in last_epoch]))
                            for k in ("L", "L_m", "L_c")} if last_epoch else {},
        "data_fingerprint": run.fingerprint,
        "model_fingerprint": load_checkpoint(run.out / CKPT_NAME)["model_fingerprint"],
        "collapse": {"split": split, **collapse_stats(embeddings, seed=run.rc.train.seed)},
    }


def train(rc: RunConfig, data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          resume: bool = False) -> Path:
    """Train (or resume) a run in ``out_dir``; returns the path of ``RUN/last.pt``."""
    check_device(rc.train.device)
    dist = init_distributed(rc.train.device)
    try:
        return _train(rc, Path(data_dir), Path(out_dir), resume, dist)
    finally:
        if dist.world_size > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


def _remove_torn_writes(out: Path) -> None:
    """Delete temporary files of writes killed mid-way (masa_rt.atomic names them
    ``.<target>.<random>.tmp``); the targets themselves are always whole."""
    for tmp in out.glob(".*.tmp"):
        logger.warning("removing %s, left by a write that was killed", tmp.name)
        tmp.unlink(missing_ok=True)


def _train(rc: RunConfig, data_dir: Path, out: Path, resume: bool, dist: Dist) -> Path:
    if not resume and (out / CKPT_NAME).exists():
        raise ConfigError(f"{out} already holds a run ({CKPT_NAME}); pass --resume to continue "
                          "it or choose another --out")
    run = build_run(rc, data_dir, out, dist)
    if not resume and rc.train.init_from:
        _init_weights(run, Path(rc.train.init_from))
    pos = _restore(run) if resume else Position()
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_torn_writes(out)
        save_run_config(run.rc, out / CONFIG_NAME)
    _barrier(dist)
    log = _Log(out / LOG_NAME, dist.is_main, pos.step if resume else None)
    try:
        status = _loop(run, pos, log)
    except TrainingDiverged as exc:
        ckpt = out / CKPT_NAME
        kept = (f"{ckpt} keeps the last good weights" if ckpt.exists()
                else f"no checkpoint was written to {ckpt}")
        raise TrainingDiverged(f"{exc}; {kept}") from None
    finally:
        log.close()
    if not (out / CKPT_NAME).exists():  # zero epochs asked for: still leave a checkpoint
        _save(run, pos)
    if dist.is_main:
        if (out / LOG_NAME).stat().st_size:
            plot_curves(out / LOG_NAME, out / "curves.png", title=str(out.name))
        atomic_write_json(out / "summary.json", _summary(run, pos, status, data_dir))
    _barrier(dist)
    return out / CKPT_NAME


# ---------------------------------------------------------------------------- command line

def run_cli(args: argparse.Namespace) -> int:
    """``masa-rt train`` / ``python -m trainer.train`` with parsed arguments."""
    out = Path(args.out)
    config = args.config
    if config is None and args.resume and (out / CONFIG_NAME).is_file():
        config = out / CONFIG_NAME  # resume with the run's own config unless told otherwise
    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.max_minutes is not None:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    rc = load_run_config(config, overrides)
    ckpt = train(rc, args.data, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"masa-rt train: checkpoint {ckpt}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m trainer.train`` (what torchrun launches)."""
    from trainer.commands import add_train_arguments

    parser = argparse.ArgumentParser(prog="python -m trainer.train")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"trainer.train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
