"""Run configuration: one typed dataclass per concern, the paper's values as defaults.

A run is configured in three layers (dinov2's habit), later layers winning:

1. the dataclass defaults (METHOD.md §5: Adam 3e-3 halved every 50 epochs, 150 epochs,
   batch 16, sequences subsampled to at most 150 frames),
2. a YAML file (``--config configs/hands_causal.yaml``) with the sections below,
3. ``--set section.key=value`` overrides (values parsed as YAML: ``--set model.tau=1``).

Sections: ``model`` (:class:`~masa_rt.model.MasaConfig`), ``augment``
(:class:`~masa_rt.augment.AugmentConfig`), ``loss`` (:class:`~masa_rt.losses.MasaLoss`),
``train`` (:class:`TrainConfig`), and the top-level ``root_mode`` / ``input_kind``. The
resolved config is written beside the outputs as ``RUN/config.yaml``; feeding that file
back with ``--config`` reproduces the run.

Rules that keep one source of truth:

* ``model.num_joints``, ``model.joint_dims``, ``model.feature_dim`` and
  ``model.input_kind`` come from the dataset (:func:`fill_from_dataset`), never by hand.
* ``loss.tau`` and ``loss.stop_gradient`` are aliases of ``model.tau`` and
  ``model.stop_gradient`` (the model config travels with the weights, so it records them).
* ``loss.restrict_to_overlap`` follows ``augment.crop == "independent"`` (METHOD §8: the
  matching loss only counts frames inside the other view's range) unless set explicitly.

Ablation presets (paper Table 4 + METHOD §4), each one switch:

=======================  ==========================================
no self-attention        ``--set model.use_self_attention=false``
no cross-attention       ``--set model.use_cross_attention=false``
no stop-gradient         ``--set model.stop_gradient=false``
no dual augmentation     ``--set augment.dual=false``
no trim                  ``--set augment.crop=off``
no cluster predictor     ``--set model.use_cluster_predictor=false``
tau = 1 (paper as is)    ``--set model.tau=1``
=======================  ==========================================
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from masa_rt.atomic import atomic_write
from masa_rt.augment import AugmentConfig
from masa_rt.losses import MasaLoss
from masa_rt.model import MasaConfig
from masa_rt.preprocess import INPUT_KINDS, ROOT_MODES, InputSpec

__all__ = [
    "ConfigError",
    "RunConfig",
    "TrainAugmentConfig",
    "TrainConfig",
    "check_device",
    "dump_run_config",
    "fill_from_dataset",
    "load_run_config",
    "parse_overrides",
    "run_config_from_dict",
    "run_config_to_dict",
    "save_run_config",
]

# Filled from the dataset by fill_from_dataset (whatever a file says is overwritten).
DATA_KEYS = ("num_joints", "joint_dims", "feature_dim", "input_kind")
LOSS_ALIASES = {"tau": "tau", "stop_gradient": "stop_gradient"}  # loss.X -> model.X


class ConfigError(ValueError):
    """A bad config file or override; the message is one line naming the key."""


_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")  # what train.device may name


@dataclass
class TrainAugmentConfig(AugmentConfig):
    """:class:`~masa_rt.augment.AugmentConfig` plus the trainer's one switch on top of it.

    ``dual=False`` is the "no dual augmentation" ablation (paper Table 4): the second view is
    the unaugmented sequence (every frame, no spatial change), the first is augmented as usual.
    """

    dual: bool = True


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping (METHOD §5 defaults; batch 16 is the H2O value)."""

    lr: float = 3e-3
    lr_halve_every: int = 50  # epochs (StepLR step_size, gamma 0.5)
    epochs: int = 150
    # A budget in optimizer steps instead of epochs (small and large datasets alike): the
    # run takes exactly this many steps, as many epochs as they need (the last one cut
    # short), and halves the lr at the same fractions of the run as lr_halve_every /
    # epochs say (the paper's: at a third and two thirds). None: epochs decide.
    steps: int | None = None
    batch_size: int = 16
    max_len: int = 150  # longer clips are temporally subsampled to <= max_len (METHOD §8)
    # A causal model with window W and L layers sees at most L*(W-1) frames back, so it can
    # be trained on random contiguous windows of its clips at the served frame rate instead of
    # whole clips: attention cost falls with the square of the length. None = whole clips.
    clip_len: int | None = None
    seed: int = 0
    log_every: int = 1  # steps between log.jsonl lines
    ckpt_every_epochs: int = 1
    device: str = "cpu"
    max_minutes: float | None = None  # time budget: stop cleanly and checkpoint
    # Frame positions the encoder sees for an augmented view (PE, causal band, relative
    # offsets). "view": the view's own frame counter, what a live stream gives the served
    # model: a view that dropped frames looks like a user moving faster, as it would live.
    # "source": the original frame indices g', g'' (the first shipped model): the model
    # is told each view's true timeline, learns to lean on it, and its embeddings then
    # shift with the user's speed when served (benchmarks/phase_ceiling.py: 76 % phase
    # accuracy on speed-varied oracle streams, 95 % when given the true timeline).
    positions: str = "view"
    # Fine-tuning: start from this checkpoint's weights (a .pt file or a run folder's
    # last.pt); the optimiser and the lr schedule start fresh. The model config must equal
    # the checkpoint's except ``window``: a causal model's relative-position table is then
    # cut to the new window (or extended with its last entry), so a served model can be
    # re-trained to a shorter cache. Ignored by --resume (the run's own weights win).
    init_from: str | None = None
    # No data-loader workers: building a batch (augment + frame_features, numpy) measured
    # ~2% of a step (benchmarks/train_speed.py), not worth a process pool.

    def __post_init__(self) -> None:
        positive = ("lr", "lr_halve_every", "batch_size", "max_len", "log_every",
                    "ckpt_every_epochs")
        for name in positive:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected > 0, found {value}")
        if self.seed < 0:
            raise ValueError(f"seed: expected >= 0, found {self.seed}")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device: expected cpu, cuda, cuda:N or mps, found {self.device!r}")
        if self.positions not in ("view", "source"):
            raise ValueError(f"positions: expected 'view' or 'source', found {self.positions!r}")
        if self.clip_len is not None and self.clip_len < 8:
            raise ValueError(f"clip_len: expected >= 8 or null, found {self.clip_len}")
        if self.epochs < 0:  # 0 is allowed: the run writes its initial weights
            raise ValueError(f"epochs: expected >= 0, found {self.epochs}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps: expected >= 0 or null, found {self.steps}")
        if self.max_minutes is not None and not 0 <= self.max_minutes < math.inf:
            raise ValueError(f"max_minutes: expected a finite number >= 0 or null, found "
                             f"{self.max_minutes}")


@dataclass
class RunConfig:
    """Everything a training run needs besides the data folder."""

    model: MasaConfig = field(default_factory=MasaConfig)
    augment: TrainAugmentConfig = field(default_factory=TrainAugmentConfig)
    loss: MasaLoss = field(default_factory=MasaLoss)
    train: TrainConfig = field(default_factory=TrainConfig)
    root_mode: str = "per_frame"  # per_frame: a live stream has no first frame
    input_kind: str = "auto"  # auto: "both" if the dataset has features, else "skeleton"


SECTIONS: dict[str, type] = {
    "model": MasaConfig, "augment": TrainAugmentConfig, "loss": MasaLoss, "train": TrainConfig,
}
TOP_LEVEL: dict[str, tuple[str, ...]] = {
    "root_mode": ROOT_MODES, "input_kind": ("auto",) + INPUT_KINDS,
}


# ---------------------------------------------------------------------------- YAML parsing

class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (so ``crop=off`` stays the string
    "off"), and ``3e-3`` is a float (YAML 1.1 wants ``3.0e-3``)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false"
                              r"|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ---------------------------------------------------------------------------- type checks

def _valid_keys(section: str | None) -> list[str]:
    """The keys of ``section``, or the sections and top-level keys if it is not one."""
    if section in SECTIONS:
        return [f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section])]
    return [f"{s}.*" for s in SECTIONS] + list(TOP_LEVEL)


def _unknown(key: str) -> ConfigError:
    valid = _valid_keys(key.split(".")[0] if "." in key else None)
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the field's type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key) if len(inner) == 1 else value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"config key {key!r}: expected {name}, found {value!r}")
    return float(value) if hint is float else value


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown(f"{name}.{key}")
    kwargs = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as exc:
        # The dataclasses' checks start their messages with the field: "tau: expected > 0".
        key, sep, rest = str(exc).partition(":")
        if sep and key in names:
            raise ConfigError(f"config key '{name}.{key}':{rest}") from None
        raise ConfigError(f"config section {name!r}: {exc}") from None


# ---------------------------------------------------------------------------- dict <-> config

def run_config_to_dict(rc: RunConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-serialisable), sections first."""
    out: dict[str, Any] = {s: dataclasses.asdict(getattr(rc, s)) for s in SECTIONS}
    out.update({k: getattr(rc, k) for k in TOP_LEVEL})
    return out


def run_config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a nested dict, applying the rules in the module doc."""
    if not isinstance(d, dict):
        raise ConfigError(f"config: expected a mapping of sections, found {type(d).__name__}")
    for key, value in d.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r}: expected a mapping, found {value!r}")
        elif key not in TOP_LEVEL:
            raise _unknown(key)
    d = {k: dict(v) if k in SECTIONS else v for k, v in d.items()}
    _apply_aliases(d)
    sections = {s: _build_section(s, d.get(s, {})) for s in SECTIONS}
    top = {}
    for key, choices in TOP_LEVEL.items():
        value = d.get(key, getattr(RunConfig, key))
        if value not in choices:
            raise ConfigError(f"config key {key!r}: expected one of {choices}, found {value!r}")
        top[key] = value
    return RunConfig(**sections, **top)


def _apply_aliases(d: dict[str, Any]) -> None:
    """loss.tau/stop_gradient -> model; restrict_to_overlap follows independent crops."""
    model, loss = d.setdefault("model", {}), d.setdefault("loss", {})
    for loss_key, model_key in LOSS_ALIASES.items():
        if loss_key in loss:
            value = loss.pop(loss_key)
            if model_key in model and model[model_key] != value:
                raise ConfigError(f"config keys 'loss.{loss_key}' and 'model.{model_key}' "
                                  f"disagree ({value!r} vs {model[model_key]!r}); set one")
            model[model_key] = value
    defaults = MasaConfig()
    for loss_key, model_key in LOSS_ALIASES.items():
        loss[loss_key] = model.get(model_key, getattr(defaults, model_key))
    crop = d.get("augment", {}).get("crop", getattr(AugmentConfig(), "crop", None))
    if "restrict_to_overlap" not in loss and crop == "independent":
        loss["restrict_to_overlap"] = True


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["model.tau=1", "train.epochs=10"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. model.tau=1")
        try:
            value = _yaml_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: value is not YAML: {exc}") from None
        parts = key.split(".")
        if len(parts) == 1 and key in TOP_LEVEL:
            out[key] = value
        elif len(parts) == 2 and parts[0] in SECTIONS:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise _unknown(key)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_run_config(path: str | os.PathLike[str] | None = None,
                    overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- ``--set`` overrides (see the module docstring)."""
    base: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config: no such file: {p}")
        try:
            base = _yaml_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {p}: not valid YAML: "
                              f"{str(exc).splitlines()[0]}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"config {p}: expected a mapping of sections")
    return run_config_from_dict(_merge(base, parse_overrides(overrides or [])))


# ---------------------------------------------------------------------------- device

def check_device(name: str) -> None:
    """Refuse a ``train.device`` this machine's torch cannot use, before any work is done
    (otherwise: torch's ``AssertionError: Torch not compiled with CUDA enabled`` mid-setup)."""
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"config key 'train.device': {name!r} asked for, but this torch "
                              f"({torch.__version__}) sees no CUDA GPU; use train.device=cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"config key 'train.device': {name!r} asked for, but torch sees "
                              f"{count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config key 'train.device': 'mps' asked for, but this torch has no "
                          "usable Apple MPS device; use train.device=cpu")


# ---------------------------------------------------------------------------- dataset + output

def fill_from_dataset(rc: RunConfig, layout: str, fps: float, feature_dim: int) -> InputSpec:
    """Set the model's data-dependent dims from the dataset; returns the run's InputSpec."""
    kind = rc.input_kind
    if kind == "auto":
        kind = "both" if feature_dim > 0 else "skeleton"
    if kind in ("features", "both") and feature_dim <= 0:
        raise ConfigError(f"input_kind {kind!r}: the dataset has no per-frame features")
    used_features = feature_dim if kind != "skeleton" else 0
    spec = InputSpec(layout=layout, fps=float(fps), root_mode=rc.root_mode, input_kind=kind,
                     feature_dim=used_features)
    rc.input_kind = kind
    rc.model = dataclasses.replace(rc.model, num_joints=spec.num_joints,
                                   joint_dims=spec.joint_dims, feature_dim=used_features,
                                   input_kind=kind)
    return spec


def dump_run_config(rc: RunConfig) -> str:
    return yaml.safe_dump(run_config_to_dict(rc), sort_keys=False, default_flow_style=False)


def save_run_config(rc: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (atomically); ``--config`` on it reproduces the run."""
    with atomic_write(path, "w") as f:
        f.write(dump_run_config(rc))
