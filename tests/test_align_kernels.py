"""The compiled dynamic programs (masa_rt/align/kernels.py) give the numpy path's answers
bit for bit: the same streams through a bank built with numba and one built without."""

from __future__ import annotations

import numpy as np
import pytest

from masa_rt.align import AlignerBank, AlignerConfig, Reference, kernels
from masa_rt.shipped import examples_dir

pytest.importorskip("numba")

FIELDS = ("phase_id", "phase_progress", "progress", "ref_index", "confidence", "state",
          "ref", "t")


def _bank(refs: list[Reference], monkeypatch, numba: bool,
          config: AlignerConfig | None = None) -> AlignerBank:
    monkeypatch.setenv("MASA_RT_NUMBA", "1" if numba else "0")
    bank = AlignerBank(refs, config)
    assert (bank._model.kernels is not None) == numba
    return bank


def _streams(refs: list[Reference], sessions: int, frames: int, seed: int):
    """Per frame: (B, d) embeddings near the references' frames (each session wandering
    forwards at its own speed, with restarts, jumps, unrelated and lost frames), model
    inputs (B, D) and validity (B,)."""
    rng = np.random.default_rng(seed)
    which = rng.integers(len(refs), size=sessions)
    pos = np.zeros(sessions)
    speed = rng.uniform(0.4, 2.5, sessions)
    d = refs[0].dim
    in_dim = refs[0].decoder.input_dim if refs[0].decoder is not None else 1
    for _ in range(frames):
        pos += speed * rng.uniform(0.0, 1.5, sessions)
        restart = rng.random(sessions) < 0.02
        pos[restart] = rng.uniform(0, 50, restart.sum())
        q = np.stack([refs[k].embeddings[min(int(p), len(refs[k]) - 1)]
                      for k, p in zip(which, pos, strict=True)])
        q = q + 0.3 * rng.standard_normal(q.shape).astype(np.float32)
        odd = rng.random(sessions) < 0.03  # unrelated motion
        q[odd] = rng.standard_normal((odd.sum(), d))
        valid = rng.random(sessions) > 0.05
        x = rng.standard_normal((sessions, in_dim)).astype(np.float32)
        yield q.astype(np.float32), x, valid


def _same(a, b) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("config", [None, AlignerConfig(max_step=1, back=0, smoothing=0.5),
                                    AlignerConfig(max_step=5, back=3, stay_penalty=0.01)])
def test_compiled_bank_equals_numpy_bank(monkeypatch, config) -> None:
    refs = [Reference.load(p) for p in sorted(examples_dir().glob("*.npz"))[:3]]
    fast = _bank(refs, monkeypatch, True, config)
    slow = _bank(refs, monkeypatch, False, config)
    ids = list(range(12))
    for k, (q, x, valid) in enumerate(_streams(refs, len(ids), 150, seed=len(str(config)))):
        step = ids if k % 5 else ids[::-2]  # some steps cover a subset, in another order
        rows = np.array(step)
        t = np.full(len(step), k / 30.0)
        _same(fast.step_many(step, q[rows], t, valid[rows], x[rows]),
              slow.step_many(step, q[rows], t, valid[rows], x[rows]))
        if k == 70:
            for bank in (fast, slow):
                bank.reset(3)
                bank.remove(5)
            ids.remove(5)


def test_without_numba_load_gives_none(monkeypatch) -> None:
    monkeypatch.setenv("MASA_RT_NUMBA", "0")
    assert kernels.load() is None
