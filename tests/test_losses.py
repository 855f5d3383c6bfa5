"""Tests for masa_rt.losses (Eq. 2-9)."""

import math

import numpy as np
import pytest
import torch

from masa_rt.losses import (
    MasaLoss,
    clustering_loss,
    masa_loss,
    matching_loss,
    total_loss,
)

torch.set_num_threads(1)


def ones(*shape):
    return torch.ones(*shape, dtype=torch.bool)


def np_direction(za, zb, ga, gb, T, tau, p=1, counted=None):
    """Eq. 2-4 written out in numpy for one sample."""
    za = za / np.linalg.norm(za, axis=1, keepdims=True)
    zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
    e = np.exp(za @ zb.T / tau)
    gamma = e / e.sum(1, keepdims=True)
    err = np.abs(ga - gamma @ gb) / T
    counted = np.ones(len(ga), bool) if counted is None else counted
    return (err**p)[counted].mean()


def test_matching_by_hand_two_by_one():
    # Z1 = [(1,0)], Z2 = [(1,0), (-1,0)], g1 = [0], g2 = [0, 2], T = 2, tau = 1:
    # gamma_0 = (sig(2), 1 - sig(2)) -> j_hat = 2 (1 - sig(2)) -> L12 = 1 - sig(2).
    # Each Z2 frame has a single candidate (the one Z1 frame, g = 0): L21 = (0 + 2/2) / 2.
    Z1 = torch.tensor([[[1.0, 0.0]]])
    Z2 = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    loss = matching_loss(Z1, Z2, torch.tensor([[0]]), torch.tensor([[0, 2]]), ones(1, 1),
                         ones(1, 2), T=2.0, tau=1.0)  # fmt: skip
    sig2 = 1 / (1 + math.exp(-2))
    assert loss.item() == pytest.approx(((1 - sig2) + 0.5) / 2, rel=1e-6)


def test_matching_three_by_two_against_numpy():
    z1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    z2 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g1, g2, T, tau = np.array([0.0, 4.0]), np.array([0.0, 2.0, 4.0]), 5.0, 0.5
    for p in (1, 2):
        expected = (np_direction(z1, z2, g1, g2, T, tau, p)
                    + np_direction(z2, z1, g2, g1, T, tau, p)) / 2  # fmt: skip
        loss = matching_loss(torch.tensor(z1)[None], torch.tensor(z2)[None],
                             torch.tensor(g1)[None], torch.tensor(g2)[None], ones(1, 2),
                             ones(1, 3), torch.tensor([T]), tau=tau, p=p)  # fmt: skip
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_matching_restrict_to_overlap():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(6, 4)), rng.normal(size=(3, 4))
    g1, g2, T = np.arange(6.0), np.array([2.0, 3.0, 5.0]), 6.0
    in1 = (g1 >= 2) & (g1 <= 5)
    expected = (np_direction(z1, z2, g1, g2, T, 0.1, counted=in1)
                + np_direction(z2, z1, g2, g1, T, 0.1)) / 2  # fmt: skip
    args = (torch.tensor(z1)[None], torch.tensor(z2)[None], torch.tensor(g1)[None],
            torch.tensor(g2)[None], ones(1, 6), ones(1, 3), T)  # fmt: skip
    assert matching_loss(*args, restrict_to_overlap=True).item() == pytest.approx(expected)
    assert matching_loss(*args).item() != pytest.approx(expected)


def test_identical_views_sharp_temperature_is_near_zero():
    torch.manual_seed(0)
    Z = torch.randn(3, 10, 16)
    g = torch.arange(10).expand(3, 10)
    loss = matching_loss(Z, Z.clone(), g, g, ones(3, 10), ones(3, 10), T=10.0, tau=0.01)
    assert loss.item() < 1e-3


def test_padding_values_do_not_change_losses():
    torch.manual_seed(1)
    Z1, Z2, P1, P2 = (torch.randn(1, n, 8) for n in (5, 4, 5, 4))
    g1, g2 = torch.tensor([[0, 2, 3, 5, 7]]), torch.tensor([[1, 2, 5, 6]])
    base_m = matching_loss(Z1, Z2, g1, g2, ones(1, 5), ones(1, 4), T=8.0)
    base_c = clustering_loss(Z1, Z2, P1, P2, g1, g2, ones(1, 5), ones(1, 4))

    def pad(x, n, fill):
        return torch.cat([x, torch.full((1, n) + x.shape[2:], fill, dtype=x.dtype)], 1)

    m1, m2 = pad(ones(1, 5), 3, False), pad(ones(1, 4), 2, False)
    for fill in (0.0, 1e6, float("nan")):
        Z1p, Z2p, P1p, P2p = pad(Z1, 3, fill), pad(Z2, 2, -fill), pad(P1, 3, fill), pad(P2, 2, fill)
        g1p, g2p = pad(g1, 3, 2), pad(g2, 2, -1)  # padded indices collide with real ones
        loss_m = matching_loss(Z1p, Z2p, g1p, g2p, m1, m2, T=8.0)
        loss_c = clustering_loss(Z1p, Z2p, P1p, P2p, g1p, g2p, m1, m2)
        assert loss_m.item() == pytest.approx(base_m.item(), rel=1e-6)
        assert loss_c.item() == pytest.approx(base_c.item(), rel=1e-6)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_clustering_small_example():
    torch.manual_seed(2)
    Z1, Z2, P1, P2 = (torch.randn(1, n, 3) for n in (3, 2, 3, 2))
    g1, g2 = torch.tensor([[0, 3, 5]]), torch.tensor([[3, 5]])
    # shared original frames: g1(1) = g2(0) = 3 and g1(2) = g2(1) = 5
    f12 = (cos(Z1[0, 1], P2[0, 0]) + cos(Z1[0, 2], P2[0, 1])) / 2
    f21 = (cos(Z2[0, 0], P1[0, 1]) + cos(Z2[0, 1], P1[0, 2])) / 2
    loss = clustering_loss(Z1, Z2, P1, P2, g1, g2, ones(1, 3), ones(1, 2))
    assert loss.item() == pytest.approx((f12 + f21) / 2, rel=1e-6)
    Z2 = Z1[:, 1:]  # the same original frames seen identically by both views
    same = clustering_loss(Z1, Z2, Z1, Z2, g1, g2, ones(1, 3), ones(1, 2))
    assert same.item() == pytest.approx(1.0, abs=1e-6)


def test_clustering_excludes_samples_without_shared_frames():
    torch.manual_seed(3)
    Z1, Z2, P1, P2 = (torch.randn(2, 2, 3) for _ in range(4))
    g1 = torch.tensor([[0, 1], [0, 1]])
    g2 = torch.tensor([[0, 1], [5, 6]])  # sample 1 shares nothing
    both = clustering_loss(Z1, Z2, P1, P2, g1, g2, ones(2, 2), ones(2, 2))
    first = clustering_loss(Z1[:1], Z2[:1], P1[:1], P2[:1], g1[:1], g2[:1], ones(1, 2),
                            ones(1, 2))  # fmt: skip
    assert both.item() == pytest.approx(first.item(), rel=1e-6)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_blocks_target_branch(stop_gradient):
    torch.manual_seed(4)
    Z1, Z2 = torch.randn(1, 4, 6, requires_grad=True), torch.randn(1, 4, 6, requires_grad=True)
    P1, P2 = torch.randn(1, 4, 6, requires_grad=True), torch.randn(1, 4, 6, requires_grad=True)
    g = torch.arange(4)[None]
    loss = clustering_loss(Z1, Z2, P1, P2, g, g, ones(1, 4), ones(1, 4), stop_gradient)
    loss.backward()
    assert P1.grad.abs().sum() > 0 and P2.grad.abs().sum() > 0
    for z in (Z1, Z2):
        blocked = z.grad is None or z.grad.abs().sum() == 0
        assert blocked == stop_gradient


def test_total_loss_sign():
    L_m = torch.tensor(0.2)
    assert total_loss(L_m, torch.tensor(1.0)).item() == pytest.approx(0.2, rel=1e-6)
    values = [total_loss(L_m, torch.tensor(c)).item() for c in (-0.5, 0.0, 0.5, 1.0)]
    assert values == sorted(values, reverse=True)  # more agreement, lower loss
    assert total_loss(L_m, torch.tensor(0.0)).item() == pytest.approx(0.4, rel=1e-6)


def test_masa_loss_end_to_end_gradients():
    torch.manual_seed(5)
    Z1, Z2 = torch.randn(2, 6, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    outputs = dict(Z1=Z1, Z2=Z2, P1=Z1 * 2 + 1, P2=Z2 * 2 + 1)
    batch = dict(g1=torch.arange(6).expand(2, 6), g2=torch.tensor([[0, 1, 3, 4, 5]] * 2),
                 m1=ones(2, 6), m2=ones(2, 5), T=torch.tensor([6.0, 7.0]))  # fmt: skip
    out = masa_loss(outputs, batch, MasaLoss(tau=0.2))
    assert set(out) == {"L", "L_m", "L_c"}
    expected = out["L_m"] * 2 / (1 + 1e-7 + out["L_c"])
    assert out["L"].item() == pytest.approx(expected.item())
    out["L"].backward()
    assert Z1.grad.abs().sum() > 0 and Z2.grad.abs().sum() > 0


def test_masa_loss_config_from_model_config():
    from masa_rt.model import MasaConfig

    cfg = MasaLoss.from_model_config(MasaConfig(tau=1.0, stop_gradient=False), p=2)
    assert (cfg.tau, cfg.stop_gradient, cfg.p) == (1.0, False, 2)


def test_losses_accept_repeated_indices():
    """Warped views (augment temporal="warp") repeat original frames: a slowed segment or a
    pause reads one frame several times. Eq. 3 regresses the original index and Eq. 8 pairs
    equal indices, so both stay finite and their gradients flow."""
    torch.manual_seed(6)
    Z1, Z2 = torch.randn(2, 7, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    P1, P2 = Z1 * 2 + 1, Z2 * 2 + 1
    g1 = torch.tensor([[0, 1, 1, 1, 2, 4, 4], [3, 3, 3, 3, 3, 3, 5]])  # pause, slow-down
    g2 = torch.tensor([[0, 2, 4, -1, -1], [1, 3, 5, 5, 6]])  # skip (speed-up), padding
    m2 = g2 >= 0
    batch = dict(g1=g1, g2=g2, m1=ones(2, 7), m2=m2, T=torch.tensor([5.0, 7.0]))
    out = masa_loss(dict(Z1=Z1, Z2=Z2, P1=P1, P2=P2), batch, MasaLoss(restrict_to_overlap=True))
    assert all(torch.isfinite(v) for v in out.values())
    out["L"].backward()
    for z in (Z1, Z2):
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # A repeated frame is one more pair per copy in Eq. 8: three copies of frame 3 in view 1
    # meet one frame 3 in view 2 three times.
    V, W = torch.randn(1, 4, 3), torch.randn(1, 2, 3)
    gv, gw = torch.tensor([[3, 3, 3, 4]]), torch.tensor([[3, 9]])
    got = clustering_loss(V, W, V, W, gv, gw, ones(1, 4), ones(1, 2), stop_gradient=False)
    f_vw = sum(cos(V[0, j], W[0, 0]) for j in range(3)) / 3
    assert got.item() == pytest.approx(f_vw, rel=1e-5)
    # Identical views that repeat frames still give a near-zero matching loss.
    Z = torch.eye(4)[None].repeat_interleave(torch.tensor([2, 1, 3, 1]), dim=1)
    g = torch.tensor([[0, 0, 1, 2, 2, 2, 3]])
    lm = matching_loss(Z, Z, g, g, ones(1, 7), ones(1, 7), 4.0, tau=0.01)
    assert lm.item() < 1e-6
