"""Checkpoints: the weights plus everything needed to use them, in one file.

A checkpoint carries the model's :class:`~masa_rt.model.MasaConfig` and the
:class:`~masa_rt.preprocess.InputSpec` beside the state dict (nanoGPT's habit), so
:func:`load_model` rebuilds a working model from the file alone: no YAML, no dataset, no
command line to remember. Training state (optimizer, scheduler, epoch, step, RNG states,
data fingerprint) rides along so a run can resume exactly.

Files are written atomically (:func:`masa_rt.atomic.atomic_write`): a crash or a full disk
during a save leaves the previous checkpoint intact, which is what ``--resume`` and a
hot-reloading engine both rely on. Loading uses ``torch.load(weights_only=True)``: a
checkpoint is data, never code, even when it comes from somewhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from masa_rt.atomic import atomic_write
from masa_rt.layout_file import conversion_targets
from masa_rt.model import MasaConfig, MasaModel
from masa_rt.preprocess import InputSpec
from masa_rt.shipped import SHIPPED_MODELS, NoShippedModelError, shipped_model_path

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "default_model_path",
    "load_checkpoint",
    "load_model",
    "model_fingerprint",
    "save_checkpoint",
    "strip_checkpoint",
]

CHECKPOINT_FORMAT = "masa-rt-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED = ("model_state", "model_config", "input_spec")


class CheckpointError(ValueError):
    """A checkpoint file that exists but cannot be used (corrupt, truncated, wrong kind)."""


def default_model_path(layout: str | None = None) -> Path:
    """The model shipped inside the package for ``layout`` (None: the default hand
    model), used when no ``--model`` is given (``masa_rt.shipped``). A declared layout
    (``masa_rt.layout_file``) with no model of its own gets the shipped model of a layout
    its ``convert_to`` names (its demos and streams are converted to it)."""
    try:
        return shipped_model_path(layout)
    except NoShippedModelError:
        for target in conversion_targets(layout):
            if target in SHIPPED_MODELS:
                return shipped_model_path(target)
        raise


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel (or DataParallel) wrapper."""
    return getattr(model, "module", model)


def _state_fingerprint(state: dict[str, torch.Tensor], model_config: dict[str, Any],
                       input_spec: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({"model": model_config, "input": input_spec}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def model_fingerprint(checkpoint: dict[str, Any] | str | os.PathLike[str]) -> str:
    """First 16 hex digits of sha256(state dict tensors, model config, input spec).

    Names a model by content, not by file name: references and ONNX exports store it, so
    the engine can refuse a reference built with different weights.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    return _state_fingerprint(checkpoint["model_state"], checkpoint["model_config"],
                              checkpoint["input_spec"])


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    model_config: MasaConfig,
    input_spec: InputSpec,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    step: int = 0,
    data_fingerprint: str = "",
    train_config: dict[str, Any] | None = None,
    rng_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically; returns its model fingerprint.

    ``epoch`` is the number of *completed* epochs (resume starts at that epoch), ``step``
    the number of completed optimizer steps.
    """
    state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
    cfg, spec = model_config.to_dict(), input_spec.to_dict()
    fingerprint = _state_fingerprint(state, cfg, spec)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_state": state,
        "model_config": cfg,
        "input_spec": spec,
        "model_fingerprint": fingerprint,
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "data_fingerprint": data_fingerprint,
        "train_config": train_config or {},
        "rng_state": rng_state or {},
        "extra": extra or {},
        "torch_version": str(torch.__version__),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)
    return fingerprint


def _load_failure(exc: BaseException) -> str:
    """The useful line of a torch.load failure (weights_only errors bury it in advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = lines[0] if lines else ""
    for i, line in enumerate(lines):
        _, sep, tail = line.partition("Unpickler error:")
        if sep:
            reason = tail.strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            break
    reason = reason.split(" Please use ")[0]  # "Unsupported global: ... by default."
    return f"{type(exc).__name__}: {reason}"[:200] if reason else type(exc).__name__


def non_finite_weights(model: torch.nn.Module) -> str:
    """Names of the model's tensors holding NaN/inf ('' when all are finite), shortened
    for a message: a diverged run must not be saved or exported."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    return ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (one-line errors otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {p}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler trips on
        # Besides RuntimeError / UnpicklingError / BadZipFile for damaged files, a text or
        # other non-checkpoint file makes torch's legacy unpickler fail with KeyError: 105,
        # UnicodeDecodeError, ...: all are one line naming the file, never a traceback.
        raise CheckpointError(f"checkpoint {p}: unreadable: not a masa-rt checkpoint, or a "
                              f"corrupt or truncated one ({_load_failure(exc)}); give a .pt "
                              "written by masa-rt train, or a run folder") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {p}: not a masa-rt checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {p}: version {ckpt['version']} is newer than "
                              f"this masa-rt reads ({CHECKPOINT_VERSION})")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {p}: missing fields {missing}")
    return ckpt


def load_model(path: str | os.PathLike[str] | None = None,
               map_location: str | torch.device = "cpu",
               ) -> tuple[MasaModel, MasaConfig, InputSpec, dict[str, Any]]:
    """Rebuild the model from the file alone: ``(model in eval mode, config, spec, meta)``.

    ``path=None`` loads :func:`default_model_path`. ``meta`` holds the remaining fields
    (epoch, step, fingerprints, train config), without the optimizer state.
    """
    p = Path(path) if path is not None else default_model_path()
    ckpt = load_checkpoint(p, map_location=map_location)
    try:
        cfg = MasaConfig.from_dict(ckpt["model_config"])
        spec = InputSpec.from_dict(ckpt["input_spec"])
        model = MasaModel(cfg)
        model.load_state_dict(ckpt["model_state"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {p}: does not match this masa-rt's model: "
                              f"{reason}") from None
    model.to(map_location).eval()
    skip = {"model_state", "optimizer_state", "scheduler_state", "rng_state"}
    meta = {k: v for k, v in ckpt.items() if k not in skip}
    meta["path"] = str(p)
    return model, cfg, spec, meta


def strip_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a training checkpoint without optimizer, scheduler and RNG state (atomic).

    What ships (``default_model_path``) needs only weights and configs: this cuts the file
    to about a third and keeps the model fingerprint, the epoch/step and the train config.
    """
    ckpt = load_checkpoint(src)
    ckpt.update(optimizer_state=None, scheduler_state=None, rng_state={})
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst, "wb") as f:
        torch.save(ckpt, f)
    return Path(dst)
