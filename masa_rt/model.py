"""The MASA network: frame MLP ``f``, context-aware encoder ``A``, projection head ``P`` and
clip-level cluster predictor ``H``.

Paper: "Multi Activity Sequence Alignment via Implicit Clustering" (MASA), Sec. 3.2-3.3 and
4.2, Eq. 1; restated with masa-rt's decisions in ``shared/METHOD.md`` (sections 3-4).
Attention follows "Attention Is All You Need" (Vaswani et al., 2017); the projection head
and predictor follow SimSiam (Chen & He, 2021).

Read top to bottom: positions, small blocks (``FrameMLP``, ``Attention``, ``Block``,
``ProjectionHead``, ``ClusterPredictor``), the config, the model, and the one-frame
``StreamingEncoder`` that the engine exports. Masks are ``(B, T)`` bool, True = real frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

NEG_FILL = -1e9  # finite fill for hidden keys: -inf would give NaN rows (METHOD §8)

# ----------------------------------------------------------------------------- positions


def absolute_sine_positions(pos: Tensor, dim: int) -> Tensor:
    """Sine/cosine encoding of frame positions (Vaswani et al. 2017, Sec. 3.5).

    ``pos`` (B, T) int or float -> (B, T, dim), channels interleaved (sin, cos) per frequency.
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=pos.device, dtype=torch.float32) * (-2.0 * math.log(1e4) / dim)
    )  # (half,)
    angles = pos.to(torch.float32)[..., None] * freqs  # (B, T, half)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, T, 2*half)
    return F.pad(pe, (0, dim - 2 * half))  # (B, T, dim)


def band_geometry(
    pos_q: Tensor, pos_k: Tensor, key_mask: Tensor, causal: bool, window: int
) -> tuple[Tensor, Tensor]:
    """Offsets and visibility of every (query, key) pair.

    ``pos_q`` (B, Tq), ``pos_k`` (B, Tk) frame positions, ``key_mask`` (B, Tk) bool.
    Returns ``offsets`` (B, Tq, Tk) long = pos_q - pos_k, and ``allowed`` (B, Tq, Tk) bool.
    """
    # Positions are whatever the caller passes: arange (a stream's own frame counter) at
    # inference and, by default, in training (TrainConfig.positions = "view"); with
    # "source" the trainer passes the index maps g', g'' (original frame indices), and the
    # causal band and relative offsets are then measured in source frames. Key k is visible
    # to query j iff 0 <= pos_q[j] - pos_k[k] < W. The absolute sine PE uses the same.
    offsets = pos_q[:, :, None].long() - pos_k[:, None, :].long()  # (B, Tq, Tk)
    allowed = key_mask[:, None, :].expand_as(offsets)  # (B, Tq, Tk)
    if causal:
        allowed = allowed & (offsets >= 0) & (offsets < window)  # frames (t-W, t]
    return offsets, allowed


# ----------------------------------------------------------------------------- blocks


class FrameMLP(nn.Module):
    """``f``: three linear layers with ReLU between them (paper Sec. 4.2, METHOD §3).

    Widths in -> hidden -> hidden -> d: hidden = in for skeletons, 512 when RGB features are
    part of the input (the paper's 1536 -> 512 -> 128). The paper lists three widths for
    three layers; we read them as the layers' widths, the last one projecting to d.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, T, in) -> (B, T, d)


class Attention(nn.Module):
    """Multi-head attention: queries from ``x``, keys/values from ``context``.

    With relative positions each head owns a learned bias per offset: ``W`` entries for the
    causal band (offsets 0..W-1), ``2W-1`` for full attention (offsets clipped to +-(W-1)).
    Keys/values carry no position, so a streaming cache of them is position-free.
    """

    def __init__(self, dim: int, n_heads: int, cfg: MasaConfig):
        super().__init__()
        assert dim % n_heads == 0, f"dim {dim} not divisible by n_heads {n_heads}"
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.causal, self.window = cfg.attention == "causal", cfg.window
        self.rel_bias: nn.Parameter | None = None
        if cfg.positions == "relative":
            n_offsets = cfg.window if self.causal else 2 * cfg.window - 1
            self.rel_bias = nn.Parameter(0.02 * torch.randn(n_heads, n_offsets))  # (H, n)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, dh)

    def queries(self, x: Tensor) -> Tensor:
        return self._heads(self.q(x))  # (B, H, Tq, dh)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.k(context)), self._heads(self.v(context))  # 2 x (B, H, Tk, dh)

    def position_bias(self, offsets: Tensor) -> Tensor | float:
        """Learned relative bias, (B, Tq, Tk) offsets -> (B, H, Tq, Tk); 0 without one."""
        if self.rel_bias is None:
            return 0.0
        W = self.window
        idx = offsets.clamp(0, W - 1) if self.causal else offsets.clamp(1 - W, W - 1) + (W - 1)
        return self.rel_bias[:, idx].transpose(0, 1)  # (H, B, Tq, Tk) -> (B, H, Tq, Tk)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, allowed: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(dh) + bias) v over the allowed keys -> (B, Tq, dim)."""
        att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))  # (B, H, Tq, Tk)
        att = att + self.position_bias(offsets)
        att = att.masked_fill(~allowed[:, None], NEG_FILL).softmax(dim=-1)
        # a query that sees no key at all (possible across views) attends to nothing
        att = att * allowed.to(att.dtype).amax(dim=-1)[:, None, :, None]
        y = self.drop(att) @ v  # (B, H, Tq, dh)
        B, H, Tq, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, Tq, H * dh))  # (B, Tq, dim)

    def forward(self, x: Tensor, context: Tensor, offsets: Tensor, allowed: Tensor) -> Tensor:
        k, v = self.keys_values(context)
        return self.attend(self.queries(x), k, v, offsets, allowed)


class Block(nn.Module):
    """Transformer block; self-attention when ``context is x``, cross-attention otherwise.

    Pre-norm: x + attn(ln(x), ln(context)); x + ffn(ln(x)). Post-norm: ln(x + attn(x, context));
    ln(x + ffn(x)).
    """

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, cfg: MasaConfig):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, cfg)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(cfg.dropout)

    def attn_input(self, x: Tensor) -> Tensor:
        """What the attention projects: ln(x) pre-norm, x post-norm (queries and keys alike)."""
        return self.ln1(x) if self.pre_norm else x

    def forward(self, x: Tensor, context: Tensor, offsets: Tensor, allowed: Tensor) -> Tensor:
        k, v = self.attn.keys_values(self.attn_input(context))  # (B, H, Tk, dh)
        return self.forward_kv(x, k, v, offsets, allowed)

    def forward_kv(
        self, x: Tensor, k: Tensor, v: Tensor, offsets: Tensor, allowed: Tensor
    ) -> Tensor:
        """The block given already projected keys/values (shared with ``StreamingEncoder``)."""
        q = self.attn.queries(self.attn_input(x))  # (B, H, Tq, dh)
        return self.finish(x, self.attn.attend(q, k, v, offsets, allowed))

    def finish(self, x: Tensor, a: Tensor) -> Tensor:
        """The block around an attention output ``a`` (B, Tq, dim): residuals, norms, FFN."""
        a = self.drop(a)
        if self.pre_norm:
            x = x + a
            return x + self.drop(self.ffn(self.ln2(x)))
        x = self.ln1(x + a)
        return self.ln2(x + self.drop(self.ffn(x)))


class ProjectionHead(nn.Module):
    """``P``: ``n_layers`` linear layers with BatchNorm1d + ReLU between them (SimSiam).

    BatchNorm statistics come from real frames only: valid frames are gathered into
    (N, C), the whole head runs on them, and the result is scattered back (padding = 0).
    """

    def __init__(self, in_dim: int, dim: int, n_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(in_dim if i == 0 else dim, dim))
            if i < n_layers - 1:
                layers += [nn.BatchNorm1d(dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, u: Tensor, mask: Tensor) -> Tensor:
        z = self.net(u[mask])  # (N, d) -> (N, proj)
        out = u.new_zeros(*mask.shape, self.dim)  # (B, T, proj)
        return out.masked_scatter(mask[..., None], z)  # rows in the order u[mask] read them


class ClusterPredictor(nn.Module):
    """``H``: self-attention blocks over the projected sequence (paper Sec. 4.2, METHOD §4)."""

    def __init__(self, cfg: MasaConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.proj_dim, cfg.n_heads, cfg.ffn_dim, cfg) for _ in range(cfg.predictor_layers)
        )

    def forward(self, z: Tensor, offsets: Tensor, allowed: Tensor) -> Tensor:
        for block in self.blocks:
            z = block(z, z, offsets, allowed)  # (B, T, proj)
        return z


# ----------------------------------------------------------------------------- config

_CHOICES = {
    "input_kind": ("skeleton", "features", "both"),
    "attention": ("causal", "full"),
    "positions": ("relative", "absolute_sine"),
    "norm": ("pre", "post"),
}
# Smallest value of each integer field (dims 0 would build empty layers or divide by zero).
_MIN_INT = {"num_joints": 1, "joint_dims": 1, "feature_dim": 0, "d_model": 1, "n_heads": 1,
            "ffn_dim": 1, "n_layers": 1, "window": 1, "proj_dim": 1, "proj_layers": 1,
            "predictor_layers": 0}


@dataclass
class MasaConfig:
    """Everything needed to rebuild a model; stored in checkpoints and ONNX metadata.

    Ablations (paper Table 4): a disabled attention kind is *replaced* by the other kind, so
    depth and parameter count stay fixed (``use_cross_attention=False``: all layers are
    self-attention; ``use_self_attention=False``: all are cross-attention; both off is an
    error). ``use_cluster_predictor=False`` makes H the identity. ``stop_gradient`` and
    ``tau`` are read by the losses.
    """

    input_kind: str = "skeleton"
    num_joints: int = 42
    joint_dims: int = 3
    feature_dim: int = 0
    d_model: int = 128
    n_heads: int = 4
    ffn_dim: int = 256
    n_layers: int = 4  # alternating self, cross, self, cross
    attention: str = "causal"
    window: int = 32
    positions: str = "relative"
    proj_dim: int = 128
    proj_layers: int = 4
    predictor_layers: int = 2
    tau: float = 0.1
    dropout: float = 0.0
    norm: str = "pre"
    use_self_attention: bool = True
    use_cross_attention: bool = True
    use_cluster_predictor: bool = True
    stop_gradient: bool = True

    def __post_init__(self) -> None:
        # Messages start with the field name ("tau: ..."): trainer.config turns that into
        # "config key 'model.tau': ...". Checked here, not where the value is used: tau=0
        # trains every step with a NaN loss, n_heads=0 ends in ZeroDivisionError.
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, found "
                                 f"{getattr(self, name)!r}")
        for name, lo in _MIN_INT.items():
            value = getattr(self, name)
            if not value >= lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, found {value!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau: expected a finite number > 0 (the softmax temperature, "
                             f"Eq. 2), found {self.tau!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected 0 <= dropout < 1, found {self.dropout!r}")
        if self.input_kind != "skeleton" and self.feature_dim <= 0:
            raise ValueError(f"input_kind={self.input_kind!r} needs feature_dim > 0")
        if not (self.use_self_attention or self.use_cross_attention):
            raise ValueError("at least one of use_self_attention/use_cross_attention is needed")
        for name in ("d_model", "proj_dim"):
            if getattr(self, name) % self.n_heads:
                raise ValueError(f"{name}: expected a multiple of n_heads={self.n_heads}, "
                                 f"found {getattr(self, name)}")

    @property
    def input_dim(self) -> int:
        """Per-frame input width: flattened joints, features, or both concatenated."""
        skeleton = self.num_joints * self.joint_dims
        return {"skeleton": skeleton, "features": self.feature_dim,
                "both": skeleton + self.feature_dim}[self.input_kind]  # fmt: skip

    @property
    def mlp_hidden(self) -> int:
        return self.input_dim if self.input_kind == "skeleton" else 512

    @property
    def layer_kinds(self) -> list[str]:
        """ "self"/"cross" per encoder layer, after the ablation switches."""
        kinds = ["self" if i % 2 == 0 else "cross" for i in range(self.n_layers)]
        if not self.use_cross_attention:
            return ["self"] * self.n_layers
        if not self.use_self_attention:
            return ["cross"] * self.n_layers
        return kinds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MasaConfig:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``, missing keys default."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown MasaConfig keys: {sorted(unknown)}")
        return cls(**d)


def model_input(
    cfg: MasaConfig, joints: Tensor | None = None, features: Tensor | None = None
) -> Tensor:
    """Frames as the model reads them: joints (..., T, J, C) flattened, features appended.

    NaN is kept here; the model maps NaN -> 0 on entry.
    """
    parts = []
    if cfg.input_kind in ("skeleton", "both"):
        assert joints is not None, f"input_kind={cfg.input_kind!r} needs joints"
        parts.append(torch.as_tensor(joints, dtype=torch.float32).flatten(-2))  # (..., T, J*C)
    if cfg.input_kind in ("features", "both"):
        assert features is not None, f"input_kind={cfg.input_kind!r} needs features"
        parts.append(torch.as_tensor(features, dtype=torch.float32))  # (..., T, F)
    x = torch.cat(parts, dim=-1)
    assert x.shape[-1] == cfg.input_dim, f"input width {x.shape[-1]} != {cfg.input_dim}"
    return x


# ----------------------------------------------------------------------------- model


class MasaModel(nn.Module):
    """MASA: U = A(f(S) + PE) (Eq. 1), Z = P(U), H(Z) for the clustering loss (Eq. 7)."""

    def __init__(self, cfg: MasaConfig):
        super().__init__()
        self.cfg = cfg
        self.f = FrameMLP(cfg.input_dim, cfg.mlp_hidden, cfg.d_model)
        self.kinds = cfg.layer_kinds
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg) for _ in self.kinds
        )
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.head = ProjectionHead(cfg.d_model, cfg.proj_dim, cfg.proj_layers)
        self.predictor = ClusterPredictor(cfg) if cfg.use_cluster_predictor else None

    # -- pieces
    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        """f(S) + PE_S (Eq. 1): (B, T, D_in) -> (B, T, d); missing values (NaN) read as 0."""
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        h = self.f(x)  # (B, T, d)
        if self.cfg.positions == "absolute_sine":
            h = h + absolute_sine_positions(pos, self.cfg.d_model)
        return h

    def geometry(self, pos_q: Tensor, pos_k: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        return band_geometry(
            pos_q, pos_k, key_mask, self.cfg.attention == "causal", self.cfg.window
        )

    @staticmethod
    def _defaults(x: Tensor, mask: Tensor | None, pos: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T = x.shape[:2]
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if pos is None:
            pos = torch.arange(T, device=x.device).expand(B, T)
        return mask.bool(), pos

    # -- inference
    def encode(self, x: Tensor, mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """Inference embeddings U (B, T, d) of x (B, T, D_in).

        No augmentation; the same sequence sits on both sides, so cross-attention attends to
        the sequence itself (METHOD §3) and every layer is attention over one sequence.
        """
        mask, pos = self._defaults(x, mask, pos)
        offsets, allowed = self.geometry(pos, pos, mask)  # (B, T, T)
        h = self.embed(x, pos)  # (B, T, d)
        for block in self.blocks:
            h = block(h, h, offsets, allowed)
        return self.ln_f(h)  # (B, T, d)

    # -- training
    def project(self, u: Tensor, mask: Tensor) -> Tensor:
        return self.head(u, mask)  # Z = P(U): (B, T, proj)

    def predict(self, z: Tensor, offsets: Tensor, allowed: Tensor) -> Tensor:
        """H(Z) (B, T, proj); the identity when the cluster predictor is ablated."""
        return z if self.predictor is None else self.predictor(z, offsets, allowed)

    def forward(
        self,
        x1: Tensor,
        m1: Tensor | None,
        x2: Tensor,
        m2: Tensor | None,
        pos1: Tensor | None = None,
        pos2: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Two views x1 (B, M, D_in), x2 (B, N, D_in) -> U, Z = P(U) and P = H(Z) per view.

        ``pos1``/``pos2`` (B, M)/(B, N): frame positions, default arange (each view's own
        frame counter, as served); the trainer passes the index maps g', g'' (original frame
        indices) only with ``TrainConfig.positions = "source"``. Self layers attend within a
        view; cross layers take queries from the view and keys/values from the other view's
        current hidden states (Eq. 1).
        """
        m1, pos1 = self._defaults(x1, m1, pos1)
        m2, pos2 = self._defaults(x2, m2, pos2)
        g11, g22 = self.geometry(pos1, pos1, m1), self.geometry(pos2, pos2, m2)
        g12, g21 = self.geometry(pos1, pos2, m2), self.geometry(pos2, pos1, m1)
        h1, h2 = self.embed(x1, pos1), self.embed(x2, pos2)  # (B, M, d), (B, N, d)
        for kind, block in zip(self.kinds, self.blocks, strict=True):
            if kind == "self":
                h1, h2 = block(h1, h1, *g11), block(h2, h2, *g22)
            else:  # both views read the other's hidden states from before this layer
                h1, h2 = block(h1, h2, *g12), block(h2, h1, *g21)
        u1, u2 = self.ln_f(h1), self.ln_f(h2)
        z1, z2 = self.project(u1, m1), self.project(u2, m2)
        p1, p2 = self.predict(z1, *g11), self.predict(z2, *g22)
        # architecture.md calls the predictor outputs H1/H2: same tensors under both names
        return dict(U1=u1, U2=u2, Z1=z1, Z2=z2, P1=p1, P2=p2, H1=p1, H2=p2)


# ----------------------------------------------------------------------------- streaming


class StreamingEncoder(nn.Module):
    """One frame at a time through a causal ``MasaModel``, with per-layer key/value rings.

    ``forward(frame (B, D_in), k_cache, v_cache, age (B, S), valid (B, S))
    -> (u (B, d), k_new (B, L, H, dh), v_new (B, L, H, dh))`` with ``S = W-1`` ring slots.
    ``k_cache``/``v_cache`` are sequences of L tensors (B, H, S, dh), one per layer, and are
    only read; ``age[b, j]`` is how many frames ago slot j was written (1..W-1; the new frame
    has age 0), ``valid[b, j]`` whether it holds a frame of this stream. The caller writes
    ``k_new``/``v_new`` into the slot the stream will overwrite next (its oldest) and
    advances its write pointer (:meth:`write`, :meth:`ages` do that for torch tensors).
    So frame t attends to (t-W, t], as the offline banded causal mask does. At inference
    self and cross layers attend to the same sequence, so every layer caches the
    keys/values of its own input. Equals ``MasaModel.encode`` on the whole stream (float
    tolerance). Static shapes, no data-dependent control flow, no in-place op: it exports
    to ONNX. One stream per batch row; resetting a stream = zeroing its ``valid`` row.

    With ``positions="absolute_sine"`` the caller passes ``position (B,)``, the frame's index
    in its stream; with relative positions ``position`` must be None.
    """

    def __init__(self, model: MasaModel):
        super().__init__()
        cfg = model.cfg
        if cfg.attention != "causal":
            raise ValueError(
                f"StreamingEncoder needs a causal model; this one has attention={cfg.attention!r}"
                " (full attention sees future frames and cannot stream)"
            )
        self.model = model  # shared modules, not copies
        self.slots = cfg.window - 1  # S
        self.register_buffer("_slot_ids", torch.arange(self.slots), persistent=False)  # (S,)

    @property
    def cache_shape(self) -> tuple[int, int, int, int]:
        """One stream's ring over all layers: (L, H, S, dh)."""
        cfg = self.model.cfg
        return (len(self.model.blocks), cfg.n_heads, self.slots, cfg.d_model // cfg.n_heads)

    def initial_state(self, batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Empty rings: k, v zeros (L, B, H, S, dh) (``k[i]`` is layer i's cache), the
        write pointers ptr zeros (B,) long and valid all False (B, S)."""
        L, H, S, dh = self.cache_shape
        device = self._slot_ids.device
        k = torch.zeros(L, batch, H, S, dh, device=device)
        ptr = torch.zeros(batch, dtype=torch.long, device=device)
        valid = torch.zeros(batch, S, dtype=torch.bool, device=device)
        return k, torch.zeros_like(k), ptr, valid

    def ages(self, ptr: Tensor) -> Tensor:
        """(B,) write pointers -> (B, S) ages: slot ptr-1 was written 1 frame ago, slot ptr
        (the next to be overwritten) W-1 frames ago."""
        S = max(self.slots, 1)
        return (ptr[:, None] - self._slot_ids - 1).remainder(S) + 1

    def write(self, state: tuple[Tensor, Tensor, Tensor, Tensor], k_new: Tensor,
              v_new: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ring after a step (new tensors; ``state`` is left as it was): ``k_new``,
        ``v_new`` (B, L, H, dh) into slot ``ptr`` of each row, ptr advanced, slot valid."""
        k, v, ptr, valid = state
        if self.slots == 0:
            return k, v, ptr, valid
        rows = torch.arange(len(ptr), device=ptr.device)
        k, v, valid = k.clone(), v.clone(), valid.clone()
        k[:, rows, :, ptr] = k_new  # advanced indices first: (B, L, H, dh)
        v[:, rows, :, ptr] = v_new
        valid[rows, ptr] = True
        return k, v, (ptr + 1) % self.slots, valid

    def step(self, frame: Tensor, state: tuple[Tensor, Tensor, Tensor, Tensor],
             position: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``forward`` plus the ring write: (u (B, d), the next state)."""
        k, v, ptr, valid = state
        u, k_new, v_new = self(frame, k, v, self.ages(ptr), valid, position)
        return u, self.write(state, k_new, v_new)

    def forward(
        self,
        frame: Tensor,
        k_cache: Sequence[Tensor] | Tensor,
        v_cache: Sequence[Tensor] | Tensor,
        age: Tensor,
        valid: Tensor,
        position: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # Written for an exported graph with few, small nodes (per-node overhead is most of
        # a one-stream step): activations stay (B, d), the q/k/v projections are one matmul
        # against weights concatenated here (constants, folded by ONNX Runtime) with the
        # 1/sqrt(dh) scale folded into q, and the position bias and the valid mask of all
        # layers are gathered once. The cache is only read, by two matmuls per layer.
        m, cfg = self.model, self.model.cfg
        if (cfg.positions == "absolute_sine") != (position is not None):
            raise ValueError("pass position (B,) exactly when positions='absolute_sine'")
        B, d = frame.shape[0], cfg.d_model
        L, H, S, dh = self.cache_shape
        x = m.f(torch.where(torch.isnan(frame), 0.0, frame))  # embed(): f(S), NaN read as 0
        if position is not None:
            x = x + absolute_sine_positions(position[:, None], d)[:, 0]
        # additive score bias over the ring slots, all layers: (L, B, H, 1, S). The bias
        # of layer l, head h, age a is rel[l, h, a]: one gather from the flattened tables
        # with index (l*H + h)*W + age, laid out as the scores are (no transpose).
        keep = torch.where(valid, 0.0, NEG_FILL)[None, :, None, None, :]  # (1, B, 1, 1, S)
        rel = self._rel_bias()  # (L, H, W) or None
        if rel is not None:
            W = rel.shape[-1]
            rows = (torch.arange(L * H, device=age.device) * W).reshape(L, 1, H, 1, 1)
            bias = rel.reshape(-1)[rows + age[None, :, None, None, :]] + keep
        else:
            bias = keep.expand(L, B, H, 1, S)
        ks, vs = [], []
        for i, block in enumerate(m.blocks):
            attn = block.attn
            scale = 1.0 / math.sqrt(dh)
            w = torch.cat([attn.q.weight * scale, attn.k.weight, attn.v.weight])  # (3d, d)
            b = torch.cat([attn.q.bias * scale, attn.k.bias, attn.v.bias])
            q2, k2, v2 = F.linear(block.attn_input(x), w, b).split(d, dim=-1)  # 3 x (B, d)
            q, k_new, v_new = (t.reshape(B, H, 1, dh) for t in (q2, k2, v2))
            s_cache = q @ k_cache[i].transpose(-2, -1) + bias[i]  # (B, H, 1, S)
            s_self = (q * k_new).sum(dim=-1, keepdim=True)  # (B, H, 1, 1)
            if rel is not None:
                s_self = s_self + rel[i, :, 0][None, :, None, None]  # offset 0
            att = attn.drop(torch.cat([s_cache, s_self], dim=-1).softmax(dim=-1))
            w_cache, w_self = att.split([S, 1], dim=-1)
            y = w_cache @ v_cache[i] + w_self * v_new  # (B, H, 1, dh)
            x = block.finish(x, attn.out(y.reshape(B, d)))  # (B, d)
            ks.append(k2)
            vs.append(v2)
        u = m.ln_f(x)  # (B, d)
        return u, torch.stack(ks, dim=1).reshape(B, L, H, dh), torch.stack(vs, dim=1).reshape(
            B, L, H, dh)

    def _rel_bias(self) -> Tensor | None:
        """Every layer's learned relative bias stacked: (L, H, W), or None without one."""
        tables = [block.attn.rel_bias for block in self.model.blocks]
        return None if tables[0] is None else torch.stack(tables)
