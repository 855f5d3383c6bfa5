"""Export the causal encoder's one-frame step to ONNX, checked against torch.

The engine never runs the training graph: it runs ``StreamingEncoder`` (``masa_rt.model``),
one frame per stream per call. This module wraps that step, exports it with
``torch.onnx.export(dynamo=True)`` (opset 18, dynamic batch = number of streams in one
call) and writes everything a server needs to use the file alone into ``metadata_props``:
the model config, the input spec (layout, fps, normalisation), the window, the model
fingerprint, the masa-rt version, the opset and the step ABI.

Step ABI 2 (``STEP_ABI``), a **ring buffer** the graph only reads::

    inputs   frame (B, D_in) float32
             k_cache_0 .. k_cache_{L-1}   (B, H, W-1, dh) float32, one per layer
             v_cache_0 .. v_cache_{L-1}   (B, H, W-1, dh) float32
             age   (B, W-1) int64   frames since each ring slot was written, 1..W-1
             valid (B, W-1) bool    the slot holds a frame of this stream
    outputs  embedding (B, d), new_k (B, L, H, dh), new_v (B, L, H, dh)

The backend owns the rings and a write pointer per stream: it writes ``new_k``/``new_v``
into slot ``ptr`` (the oldest), advances ``ptr`` and marks the slot valid; ``age`` follows
from ``ptr`` (slot ``ptr-1`` has age 1). One input per layer because a backend keeps each
layer's cache as its own ``(capacity, H, W-1, dh)`` array: a contiguous range of streams is
then a zero-copy view for every layer, and the graph needs no ``Split`` (a single
``(B, L, ...)`` input would be copied once per step just to take the layers apart). ABI 1
(shift-by-concat caches in and out) copied the cache about four times per step.

An export that ONNX Runtime does not reproduce within ``atol``, or whose outputs are not
finite, is refused: no file is written (the write is atomic, so a previous file stays as it
was).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import masa_rt
from masa_rt.atomic import atomic_write
from masa_rt.checkpoint import load_model, model_fingerprint, non_finite_weights
from masa_rt.cli_types import check_output_path
from masa_rt.model import MasaModel, StreamingEncoder

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "STEP_ABI",
    "SUPPORTED_OPSETS",
    "ExportError",
    "RingStep",
    "export_cached",
    "export_onnx",
    "onnx_bytes",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)

STEP_ABI = 2  # bumped on any change of the step's inputs/outputs; in the metadata
CACHE_LAYOUT = "ring_per_layer"  # (B, H, W-1, dh) per layer, read only; in the metadata
OUTPUT_NAMES = ("embedding", "new_k", "new_v")


def input_names(n_layers: int) -> tuple[str, ...]:
    """frame, k_cache_0.., v_cache_0.., age, valid."""
    return ("frame", *(f"k_cache_{i}" for i in range(n_layers)),
            *(f"v_cache_{i}" for i in range(n_layers)), "age", "valid")


INPUT_NAMES = input_names(4)  # the shipped size; ``input_names(L)`` for others


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph disagrees with torch."""

    # masa_rt.cli prints exceptions of a class with user_facing = True as one line
    # ("masa-rt export: error: ..."), not as a traceback.
    user_facing = True


# The opset the step is exported at and checked in (torch.onnx.export(dynamo=True) writes
# its graph at 18 whatever else it is asked for; the backends are tested on 18).
SUPPORTED_OPSETS = (18,)


class RingStep(nn.Module):
    """``StreamingEncoder`` with flat inputs, as exported:
    ``(frame, k_cache_0.., v_cache_0.., age, valid) -> (embedding, new_k, new_v)``."""

    def __init__(self, model: MasaModel):
        super().__init__()
        self.encoder = StreamingEncoder(model)
        self.n_layers = len(model.blocks)

    def forward(self, frame: Tensor, *caches_age_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        L = self.n_layers
        k, v = caches_age_valid[:L], caches_age_valid[L:2 * L]
        age, valid = caches_age_valid[2 * L], caches_age_valid[2 * L + 1]
        return self.encoder(frame, k, v, age, valid)

    def initial_state(self, batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """k, v (L, B, H, W-1, dh), ptr (B,), valid (B, W-1): see ``StreamingEncoder``."""
        return self.encoder.initial_state(batch)

    def inputs(self, frame: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The flat graph inputs for ``frame`` and a ring ``state``."""
        k, v, ptr, valid = state
        return (frame, *k.unbind(0), *v.unbind(0), self.encoder.ages(ptr), valid)


def _check_exportable(model: MasaModel) -> None:
    cfg = model.cfg
    if cfg.attention != "causal":
        raise ExportError(f"only causal models stream; this one has attention={cfg.attention!r}")
    if cfg.positions != "relative":
        # Absolute positions would need a per-stream frame counter in the step; the served
        # model uses relative positions so a stream's output does not depend on its start.
        raise ExportError("only positions='relative' models are exported (METHOD.md §3); "
                          f"this one has positions={cfg.positions!r}")


def _export_program(step: RingStep, opset: int) -> Any:
    """torch.export + ONNX translation with a dynamic batch axis on every input."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    state = step.initial_state(2)  # 2, not 1: a size-1 example would be specialised
    args = step.inputs(torch.zeros(2, step.encoder.model.cfg.input_dim), state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        return torch.onnx.export(
            step,
            args,
            None,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names(step.n_layers)),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch}, tuple({0: batch} for _ in args[1:])),
            verbose=False,
        )


def _check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset: expected one of {', '.join(map(str, SUPPORTED_OPSETS))} "
                         f"(the opset the step is exported and checked at), found {opset}")


def _written_opset(proto: Any) -> int:
    """The default-domain opset the graph really imports (what the metadata records)."""
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ExportError("the exported graph imports no ai.onnx opset")
    return int(versions[0])


def _metadata(model: MasaModel, spec: Any, fingerprint: str, opset: int) -> dict[str, str]:
    cfg = model.cfg
    return {
        "masa_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "input_spec": json.dumps(spec.to_dict(), sort_keys=True),
        "window": str(cfg.window),
        "model_fingerprint": fingerprint,
        "masa_rt_version": masa_rt.__version__,
        "opset": str(opset),
        "cache_layout": CACHE_LAYOUT,
        "step_abi": str(STEP_ABI),
        "torch_version": torch.__version__,
    }


def onnx_bytes(model: MasaModel, spec: Any, fingerprint: str, opset: int = 18) -> bytes:
    """The serialised ONNX step model with metadata (no check, nothing written)."""
    import onnx

    _check_opset(opset)
    _check_exportable(model)
    step = RingStep(model).eval()
    program = _export_program(step, opset)
    proto = program.model_proto
    written = _written_opset(proto)
    if written != opset:
        raise ExportError(f"asked for opset {opset}, the exporter wrote opset {written}")
    onnx.helper.set_model_props(proto, _metadata(model, spec, fingerprint, written))
    return proto.SerializeToString()


def _run_both(step: RingStep, session: Any, batch: int, steps: int,
              rng: np.random.Generator) -> float:
    """Feed ``steps`` random frames through torch and ORT, each keeping its own ring (ORT's
    written with ORT's outputs, in numpy, the way the backends do it)."""
    names = input_names(step.n_layers)
    torch_state = step.initial_state(batch)
    k, v, ptr, valid = (t.numpy().copy() for t in torch_state)
    S, rows = valid.shape[1], np.arange(batch)
    worst = 0.0
    for _ in range(steps):
        frame = rng.standard_normal((batch, step.encoder.model.cfg.input_dim)).astype(np.float32)
        with torch.no_grad():
            t_out = step(*step.inputs(torch.from_numpy(frame), torch_state))
            torch_state = step.encoder.write(torch_state, *t_out[1:])
        age = step.encoder.ages(torch.from_numpy(ptr)).numpy()
        feed = (frame, *k, *v, age, valid)
        o_out = session.run(list(OUTPUT_NAMES), dict(zip(names, feed, strict=True)))
        for name, a, b in zip(OUTPUT_NAMES, t_out, o_out, strict=True):
            a = a.numpy()
            # max() would drop a NaN difference (max(0.0, nan) is 0.0): a NaN model would
            # then pass the check with a difference of 0.
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                who = "torch" if not np.isfinite(a).all() else "ONNX Runtime"
                raise ExportError(f"{who} gives non-finite values (NaN/inf) in {name!r} for "
                                  "finite input; refusing to write the model")
            worst = max(worst, float(np.abs(a - b).max()))
        if S:
            k[:, rows, :, ptr], v[:, rows, :, ptr] = o_out[1], o_out[2]
            valid[rows, ptr] = True
            ptr = (ptr + 1) % S
    return worst


def check_against_torch(model: MasaModel, data: bytes, *, batches: tuple[int, ...] = (1, 5),
                        steps: int | None = None, seed: int = 0) -> float:
    """Max abs difference ORT vs torch over several steps at each batch size."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    step = RingStep(model).eval()
    steps = steps if steps is not None else model.cfg.window + 3  # fill and wrap the ring
    rng = np.random.default_rng(seed)
    return max(_run_both(step, session, b, steps, rng) for b in batches)


def resolve_checkpoint(path: str | os.PathLike[str] | None) -> Path | None:
    """A checkpoint file from a ``.pt`` path or a training run folder (its ``last.pt``);
    None stays None (the shipped model)."""
    if path is None:
        return None
    p = Path(path)
    return p / "last.pt" if p.is_dir() else p


def _is_onnx_model(path: Path) -> bool:
    """A previous export (any ONNX graph), which ``export_onnx`` may replace."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError and others
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


def export_onnx(
    checkpoint_path: str | os.PathLike[str] | None,
    out_path: str | os.PathLike[str],
    *,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Export ``checkpoint_path`` (None = the shipped model) to ``out_path``; returns it.

    With ``check`` the graph is run in ONNX Runtime against torch for batch 1 and 5 over
    ``W + 3`` steps (caches fed back); a max abs difference above ``atol``, or any NaN/inf
    output, raises :class:`ExportError` and nothing is written. So does a checkpoint with
    non-finite weights. ``out_path`` must not be a directory or the checkpoint itself, and
    an existing file there is replaced only if it is an ONNX model (ValueError otherwise).
    """
    _check_opset(opset)
    ckpt = resolve_checkpoint(checkpoint_path)
    out = check_output_path(out_path, [ckpt], replaceable=("an ONNX model", _is_onnx_model))
    model, _cfg, spec, meta = load_model(ckpt)
    if bad := non_finite_weights(model):
        raise ExportError(f"checkpoint {meta['path']}: weights are not finite (NaN/inf in "
                          f"{bad}); a diverged training run? Export an earlier checkpoint")
    fingerprint = meta.get("model_fingerprint") or model_fingerprint(meta["path"])
    data = onnx_bytes(model, spec, fingerprint, opset)
    if check:
        diff = check_against_torch(model, data)
        if not diff <= atol:
            raise ExportError(f"ONNX Runtime differs from torch by {diff:.3g} > atol {atol:g}; "
                              "refusing to write the model")
        log.info("export check: max |ORT - torch| = %.2e (atol %.0e)", diff, atol)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        f.write(data)
    log.info("wrote %s (%d bytes, model %s)", out, len(data), fingerprint)
    return out


def _cache_key(checkpoint_path: Path, opset: int) -> str:
    """Checkpoint bytes + the code that turns them into a graph + the exporter's version."""
    h = hashlib.sha256(checkpoint_path.read_bytes())
    for module in (StreamingEncoder, RingStep):
        h.update(Path(__import__(module.__module__, fromlist=["_"]).__file__).read_bytes())
    h.update(f"{torch.__version__}|{masa_rt.__version__}|{opset}".encode())
    return h.hexdigest()[:24]


def export_cached(checkpoint_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str],
                  *, opset: int = 18) -> Path:
    """``export_onnx`` once per (checkpoint, model code, torch, opset); later calls reuse it.

    The dynamo export takes tens of seconds on a small CPU, so a server started from a
    checkpoint, and the test suite, export each model once and keep the checked file.
    """
    ckpt = Path(checkpoint_path)
    out = Path(cache_dir) / f"step-{_cache_key(ckpt, opset)}.onnx"
    if not out.is_file():
        export_onnx(ckpt, out, opset=opset)
    return out
