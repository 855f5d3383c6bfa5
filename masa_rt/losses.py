"""MASA losses: matching (Eq. 2-6), clip-level clustering (Eq. 7-8) and their product (Eq. 9).

Paper: "Multi Activity Sequence Alignment via Implicit Clustering", Sec. 3.3; decisions in
``shared/METHOD.md`` §4 (temperature ``tau``, L1 default, indices divided by ``T``, the sign of
``L_c``) and §8 (independent crops: count only frames inside the other view's range).

Shapes: views have M and N frames; ``Z*``/``P*`` (B, M|N, C), index maps ``g*`` (B, M|N) int
(original frame indices; padding arbitrary), masks ``m*`` (B, M|N) bool (True = real frame),
``T`` (B,) original lengths. Every loss is a mean over samples of a per-sample mean; a sample
with nothing to average (no overlap / no shared frame) is left out of the batch mean, and a
batch with no such sample gives 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_FILL = -1e9


def _clean(z: Tensor, mask: Tensor) -> Tensor:
    """Zero padded frames so that whatever padding holds (even NaN) cannot leak in."""
    return torch.where(mask[..., None], z, torch.zeros_like(z))


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Per-sample mean of ``values`` (B, ...) over ``weights`` (bool), then mean over samples
    that have any weight -> scalar."""
    w = weights.to(values.dtype).flatten(1)  # (B, K)
    v = torch.where(weights, values, torch.zeros_like(values)).flatten(1)
    count = w.sum(1)  # (B,)
    per_sample = v.sum(1) / count.clamp(min=1)
    has = (count > 0).to(values.dtype)
    return (per_sample * has).sum() / has.sum().clamp(min=1)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """D(a_j, b_k) for all pairs: (B, M, C), (B, N, C) -> (B, M, N)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


def _matching_direction(
    za: Tensor, zb: Tensor, ga: Tensor, gb: Tensor, ma: Tensor, mb: Tensor,
    T: Tensor, tau: float, p: float, restrict_to_overlap: bool,
) -> Tensor:  # fmt: skip
    """L_{S'->S''} (Eq. 2-4): predict each frame's original index from the other view."""
    logits = _cosine(za, zb) / tau  # (B, M, N)
    gamma = logits.masked_fill(~mb[:, None, :], NEG_FILL).softmax(dim=-1)  # Eq. 2
    j_hat = gamma @ gb.to(za.dtype)[..., None]  # Eq. 3: (B, M, 1)
    err = (ga.to(za.dtype) - j_hat[..., 0]).abs() / T[:, None]  # |g'(j) - j_hat| / T
    err = err.pow(p)  # Eq. 4 (p = 1, the paper's |.|; p = 2 for MSE)
    counted = ma
    if restrict_to_overlap:  # METHOD §8: only frames inside the other view's range
        big = torch.iinfo(torch.int64).max
        lo = torch.where(mb, gb, torch.full_like(gb, big)).amin(1, keepdim=True)  # (B, 1)
        hi = torch.where(mb, gb, torch.full_like(gb, -big)).amax(1, keepdim=True)
        counted = counted & (ga >= lo) & (ga <= hi)
    return _masked_mean(err, counted)


def matching_loss(
    Z1: Tensor, Z2: Tensor, g1: Tensor, g2: Tensor, m1: Tensor, m2: Tensor,
    T: Tensor | float, tau: float = 0.1, p: float = 1, restrict_to_overlap: bool = False,
) -> Tensor:  # fmt: skip
    """Symmetric matching loss L_m (Eq. 2-6) -> scalar.

    gamma_jk = softmax_k(cos(Z1_j, Z2_k) / tau) over real k (Eq. 2); j_hat = sum_k gamma_jk
    g2(k) (Eq. 3); L_{1->2} = mean over real j of |g1(j) - j_hat|^p / T^p (Eq. 4); likewise
    L_{2->1} (Eq. 5); L_m = (L_{1->2} + L_{2->1}) / 2 (Eq. 6). With ``restrict_to_overlap``
    only frames j with min g2 <= g1(j) <= max g2 count (and symmetrically).
    """
    m1, m2 = m1.bool(), m2.bool()
    Z1, Z2 = _clean(Z1, m1), _clean(Z2, m2)
    g1, g2 = g1.long(), g2.long()
    T = torch.as_tensor(T, dtype=Z1.dtype, device=Z1.device).expand(Z1.shape[0])  # (B,)
    l12 = _matching_direction(Z1, Z2, g1, g2, m1, m2, T, tau, p, restrict_to_overlap)
    l21 = _matching_direction(Z2, Z1, g2, g1, m2, m1, T, tau, p, restrict_to_overlap)
    return (l12 + l21) / 2  # Eq. 6


def _agreement(V: Tensor, W: Tensor, gv: Tensor, gw: Tensor, mv: Tensor, mw: Tensor) -> Tensor:
    """F(V, W) (Eq. 8): mean cos(V_j, W_k) over real pairs with gv(j) == gw(k) -> scalar."""
    pairs = (gv[:, :, None] == gw[:, None, :]) & mv[:, :, None] & mw[:, None, :]  # (B, M, N)
    return _masked_mean(_cosine(V, W), pairs)


def clustering_loss(
    Z1: Tensor, Z2: Tensor, P1: Tensor, P2: Tensor, g1: Tensor, g2: Tensor,
    m1: Tensor, m2: Tensor, stop_gradient: bool = True,
) -> Tensor:  # fmt: skip
    """Clip-level clustering agreement L_c (Eq. 7-8) -> scalar in [-1, 1].

    L_c = (F(sg(Z1), P2) + F(sg(Z2), P1)) / 2 with P = H(Z). Read as the positive mean cosine
    similarity (METHOD §4), so higher = the predictor agrees with the other view. F averages
    over pairs of frames from the same original frame (Eq. 8 sums; we take the mean so L_c
    stays in [-1, 1]); samples without a shared frame are left out.
    """
    m1, m2 = m1.bool(), m2.bool()
    Z1, Z2, P1, P2 = _clean(Z1, m1), _clean(Z2, m2), _clean(P1, m1), _clean(P2, m2)
    if stop_gradient:  # Eq. 7: stopgrad on the target branch
        Z1, Z2 = Z1.detach(), Z2.detach()
    g1, g2 = g1.long(), g2.long()
    return (_agreement(Z1, P2, g1, g2, m1, m2) + _agreement(Z2, P1, g2, g1, m2, m1)) / 2


def total_loss(L_m: Tensor, L_c: Tensor, eps: float = 1e-7) -> Tensor:
    """Eq. 9: L = L_m * 2 / ((1 + eps) + L_c); L_c = 1 gives L_m, raising L_c lowers L."""
    return L_m * 2 / ((1 + eps) + L_c)


@dataclass
class MasaLoss:
    """Loss settings. ``restrict_to_overlap`` belongs with independent crops (METHOD §8)."""

    tau: float = 0.1
    p: float = 1
    eps: float = 1e-7
    stop_gradient: bool = True
    restrict_to_overlap: bool = False

    def __post_init__(self) -> None:
        # "field: ..." messages, which trainer.config reports as "config key 'loss.field'".
        for name, lo, open_lo in (("tau", 0.0, True), ("p", 0.0, True), ("eps", 0.0, False)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > lo if open_lo else value >= lo)):
                raise ValueError(f"{name}: expected a finite number {'>' if open_lo else '>='} "
                                 f"{lo:g}, found {value!r}")

    @classmethod
    def from_model_config(cls, model_cfg, **overrides) -> MasaLoss:
        """Take ``tau`` and ``stop_gradient`` from a ``MasaConfig``; keyword overrides win."""
        base = dict(tau=model_cfg.tau, stop_gradient=model_cfg.stop_gradient)
        return cls(**{**base, **overrides})


def masa_loss(
    outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], cfg: MasaLoss
) -> dict[str, Tensor]:
    """All MASA losses from ``MasaModel.forward`` outputs (Z1, Z2, P1, P2).

    ``batch`` holds ``g1``, ``g2`` (index maps), ``m1``, ``m2`` (masks) of the two views and
    ``T`` (B,) the original sequence lengths. Returns ``dict(L, L_m, L_c)``.
    """
    g1, g2, m1, m2 = (torch.as_tensor(batch[k]) for k in ("g1", "g2", "m1", "m2"))
    Z1, Z2 = outputs["Z1"], outputs["Z2"]
    L_m = matching_loss(Z1, Z2, g1, g2, m1, m2, batch["T"], cfg.tau, cfg.p, cfg.restrict_to_overlap)
    L_c = clustering_loss(Z1, Z2, outputs["P1"], outputs["P2"], g1, g2, m1, m2, cfg.stop_gradient)
    return dict(L=total_loss(L_m, L_c, cfg.eps), L_m=L_m, L_c=L_c)
