"""Export the causal encoder's one-frame step to ONNX, checked against torch.

The engine never runs the training graph: it runs ``StreamingEncoder`` (``masa_rt.model``),
one frame per stream per call, with the per-layer key/value caches passed in and out.
This module wraps that step, exports it with ``torch.onnx.export(dynamo=True)`` (opset 18,
dynamic batch = number of streams in one call) and writes everything a server needs to use
the file alone into ``metadata_props``: the model config, the input spec (layout, fps,
normalisation), the window, the model fingerprint, the masa-rt version and the opset.

Cache layout on the wire is **slot-major**: ``k_cache (B, L, H, W-1, dh)``. ``StreamingEncoder``
works layer-major ``(L, B, ...)``; the wrapper transposes at the graph boundary. Why: the
backends keep every stream's state in one ``(capacity, L, H, W-1, dh)`` array, so a stream is
one contiguous row and any contiguous range of streams is a zero-copy view that ONNX Runtime
(or TensorRT) can read and write directly. Layer-major storage would make every call a
gather/scatter of the whole cache. The transposes cost nothing measurable inside the graph
(the step already splits and concatenates the cache per layer).

An export that ONNX Runtime does not reproduce within ``atol`` is refused: no file is
written (the write is atomic, so a previous file stays as it was).
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
from masa_rt.checkpoint import load_model, model_fingerprint
from masa_rt.model import MasaModel, StreamingEncoder

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportError",
    "SlotMajorStep",
    "export_cached",
    "export_onnx",
    "onnx_bytes",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)

INPUT_NAMES = ("frame", "k_cache", "v_cache", "valid")
OUTPUT_NAMES = ("embedding", "k_cache_out", "v_cache_out", "valid_out")
CACHE_LAYOUT = "slot_major"  # (B, L, H, W-1, dh); recorded in the metadata


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph disagrees with torch."""


class SlotMajorStep(nn.Module):
    """``StreamingEncoder`` with slot-major caches: (B, L, H, W-1, dh) in and out."""

    def __init__(self, model: MasaModel):
        super().__init__()
        self.encoder = StreamingEncoder(model)

    def forward(
        self, frame: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        u, k, v, valid_out = self.encoder(
            frame, k_cache.transpose(0, 1), v_cache.transpose(0, 1), valid
        )  # caches (L, B, H, W-1, dh) inside
        return u, k.transpose(0, 1), v.transpose(0, 1), valid_out

    def initial_state(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        k, v, valid = self.encoder.initial_state(batch)  # (L, B, ...)
        return k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(), valid


def _check_exportable(model: MasaModel) -> None:
    cfg = model.cfg
    if cfg.attention != "causal":
        raise ExportError(f"only causal models stream; this one has attention={cfg.attention!r}")
    if cfg.positions != "relative":
        # Absolute positions would need a per-stream frame counter in the step; the served
        # model uses relative positions so a stream's output does not depend on its start.
        raise ExportError("only positions='relative' models are exported (METHOD.md §3); "
                          f"this one has positions={cfg.positions!r}")


def _export_program(step: SlotMajorStep, opset: int) -> Any:
    """torch.export + ONNX translation with a dynamic batch axis on every input."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    k, v, valid = step.initial_state(2)  # 2, not 1: a size-1 example would be specialised
    frame = torch.zeros(2, step.encoder.model.cfg.input_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        return torch.onnx.export(
            step,
            (frame, k, v, valid),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}),
            verbose=False,
        )


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
        "torch_version": torch.__version__,
    }


def onnx_bytes(model: MasaModel, spec: Any, fingerprint: str, opset: int = 18) -> bytes:
    """The serialised ONNX step model with metadata (no check, nothing written)."""
    import onnx

    _check_exportable(model)
    step = SlotMajorStep(model).eval()
    program = _export_program(step, opset)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, _metadata(model, spec, fingerprint, opset))
    return proto.SerializeToString()


def _run_both(step: SlotMajorStep, session: Any, batch: int, steps: int,
              rng: np.random.Generator) -> float:
    """Feed ``steps`` random frames through torch and ORT, each fed its own caches back."""
    k, v, valid = (t.numpy() for t in step.initial_state(batch))
    ort_state = (k, v, valid)
    torch_state = tuple(torch.from_numpy(x.copy()) for x in ort_state)
    worst = 0.0
    for _ in range(steps):
        frame = rng.standard_normal((batch, step.encoder.model.cfg.input_dim)).astype(np.float32)
        with torch.no_grad():
            t_out = step(torch.from_numpy(frame), *torch_state)
        o_out = session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, (frame, *ort_state),
                                                         strict=True)))
        for a, b in zip(t_out[:3], o_out[:3], strict=True):
            worst = max(worst, float(np.abs(a.numpy() - b).max()))
        if not np.array_equal(t_out[3].numpy(), o_out[3]):
            return float("inf")
        torch_state, ort_state = t_out[1:], tuple(o_out[1:])
    return worst


def check_against_torch(model: MasaModel, data: bytes, *, batches: tuple[int, ...] = (1, 5),
                        steps: int | None = None, seed: int = 0) -> float:
    """Max abs difference ORT vs torch over several steps at each batch size."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    step = SlotMajorStep(model).eval()
    steps = steps if steps is not None else model.cfg.window + 3  # fill and shift the window
    rng = np.random.default_rng(seed)
    return max(_run_both(step, session, b, steps, rng) for b in batches)


def resolve_checkpoint(path: str | os.PathLike[str] | None) -> Path | None:
    """A checkpoint file from a ``.pt`` path or a training run folder (its ``last.pt``);
    None stays None (the shipped model)."""
    if path is None:
        return None
    p = Path(path)
    return p / "last.pt" if p.is_dir() else p


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
    ``W + 3`` steps (caches fed back); a max abs difference above ``atol`` raises
    :class:`ExportError` and nothing is written.
    """
    model, _cfg, spec, meta = load_model(resolve_checkpoint(checkpoint_path))
    fingerprint = meta.get("model_fingerprint") or model_fingerprint(meta["path"])
    data = onnx_bytes(model, spec, fingerprint, opset)
    if check:
        diff = check_against_torch(model, data)
        if not diff <= atol:
            raise ExportError(f"ONNX Runtime differs from torch by {diff:.3g} > atol {atol:g}; "
                              "refusing to write the model")
        log.info("export check: max |ORT - torch| = %.2e (atol %.0e)", diff, atol)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        f.write(data)
    log.info("wrote %s (%d bytes, model %s)", out, len(data), fingerprint)
    return out


def _cache_key(checkpoint_path: Path, opset: int) -> str:
    """Checkpoint bytes + the code that turns them into a graph + the exporter's version."""
    h = hashlib.sha256(checkpoint_path.read_bytes())
    for module in (StreamingEncoder, SlotMajorStep):
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
