"""The models that ship inside the package, one per layout they read.

``reference build``, ``serve``, ``score`` and ``demo`` use the shipped model that reads a
demo's layout (two hands: the hand model; penn13 2D bodies: the body model trained on Penn
Action; body25 3D bodies: a body model trained on synthetic bodies only) when no model
is named, and serve a reference with the shipped model that built it. No torch here: the
serving commands import this module.
"""

from __future__ import annotations

import site
import sysconfig
from pathlib import Path

__all__ = ["ASSETS", "SHIPPED_MODELS", "NoShippedModelError", "examples_dir",
           "shipped_model_path", "shipped_onnx_path"]

ASSETS = Path(__file__).resolve().parent / "assets"
# layout -> file stem in ASSETS (``.pt`` checkpoint, ``.onnx`` its checked export); the
# first is the default where no layout is known.
SHIPPED_MODELS = {"h2o_hands": "masa_hands_causal", "penn13": "masa_penn13_causal",
                  "body25": "masa_body25_causal"}


def examples_dir() -> Path:
    """The shipped examples (references, demos): the clone's ``examples/`` where the package
    runs from a clone, else the copy a wheel installs under ``<prefix>/share/masa-rt``
    (pyproject's data-files; a ``--user`` install puts it under the user base)."""
    clone = Path(__file__).resolve().parents[1] / "examples"
    installed = [Path(base) / "share" / "masa-rt" / "examples"
                 for base in (sysconfig.get_path("data"), site.USER_BASE) if base]
    return next((p for p in [clone, *installed] if p.is_dir()), clone)


class NoShippedModelError(ValueError):
    """No model in the package reads this layout."""


def _stem(layout: str | None) -> str:
    if layout is None:
        return next(iter(SHIPPED_MODELS.values()))
    try:
        return SHIPPED_MODELS[layout]
    except KeyError:
        raise NoShippedModelError(
            f"no shipped model reads layout {layout!r} (shipped: "
            f"{', '.join(SHIPPED_MODELS)}): train one with masa-rt train and pass its "
            "checkpoint") from None


def shipped_model_path(layout: str | None = None) -> Path:
    """The shipped checkpoint that reads ``layout`` (None: the default, the hand model)."""
    return ASSETS / f"{_stem(layout)}.pt"


def shipped_onnx_path(layout: str | None = None) -> Path:
    """Its ONNX export, beside it (exported by scripts/build_shipped_model.sh)."""
    return ASSETS / f"{_stem(layout)}.onnx"
