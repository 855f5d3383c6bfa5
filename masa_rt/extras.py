"""The optional extras (pyproject.toml) and what a command says when one is missing.

A serving-only install has no torch; ``[train]`` adds it, ``[gpu]`` TensorRT, and so on.
Commands check with :func:`installed` before work that needs an extra, and the CLI turns a
missing optional module into one line naming the extra to install (masa_rt.cli).
"""

from __future__ import annotations

import importlib.util

__all__ = ["OPTIONAL_MODULES", "installed", "install_hint"]

# Top-level module -> the extra that installs it.
OPTIONAL_MODULES = {"torch": "train", "onnxscript": "train", "tensorrt": "gpu", "cuda": "gpu",
                    "pylsl": "lsl", "starlette": "web", "uvicorn": "web", "aiohttp": "web"}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (torch takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # blocked, or a half-removed package
        return False


def install_hint(module: str) -> str | None:
    """``pip install 'masa-rt[EXTRA]'`` for an optional module, None for any other."""
    extra = OPTIONAL_MODULES.get(module.split(".")[0])
    return None if extra is None else f"pip install 'masa-rt[{extra}]'"
