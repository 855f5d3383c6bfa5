"""Tests for masa_rt.model: shapes, masks, causality, gradients, config, streaming exactness."""

import json

import pytest
import torch

from masa_rt.model import (
    MasaConfig,
    MasaModel,
    StreamingEncoder,
    absolute_sine_positions,
    band_geometry,
    model_input,
)

torch.set_num_threads(1)


def small_cfg(**kw) -> MasaConfig:
    base = dict(num_joints=5, joint_dims=3, d_model=16, n_heads=2, ffn_dim=24, window=4,
                proj_dim=8)  # fmt: skip
    return MasaConfig(**{**base, **kw})


def make_model(seed: int = 0, **kw) -> MasaModel:
    torch.manual_seed(seed)
    model = MasaModel(small_cfg(**kw)).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines and position tables
        for name, p in model.named_parameters():
            if "ln" in name or "rel_bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_shapes_and_output_keys():
    model = make_model()
    cfg = model.cfg
    x1, x2 = torch.randn(3, 11, cfg.input_dim), torch.randn(3, 7, cfg.input_dim)
    assert model.encode(x1).shape == (3, 11, cfg.d_model)
    model.train()
    out = model(x1, None, x2, None)
    assert out["U1"].shape == (3, 11, 16) and out["U2"].shape == (3, 7, 16)
    assert out["Z1"].shape == (3, 11, 8) and out["P2"].shape == (3, 7, 8)
    assert out["H1"] is out["P1"]


def test_input_dim_and_model_input():
    assert MasaConfig().input_dim == 126
    assert MasaConfig(input_kind="features", feature_dim=1536).input_dim == 1536
    cfg = MasaConfig(input_kind="both", feature_dim=10)
    assert cfg.input_dim == 136 and cfg.mlp_hidden == 512
    x = model_input(cfg, torch.zeros(2, 5, 42, 3), torch.ones(2, 5, 10))
    assert x.shape == (2, 5, 136) and x[..., 126:].eq(1).all()
    with pytest.raises(ValueError):
        MasaConfig(input_kind="features")


def test_config_round_trip_and_unknown_keys():
    cfg = small_cfg(attention="full", positions="absolute_sine", use_cross_attention=False)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert MasaConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown"):
        MasaConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        small_cfg(attention="sparse")


def test_ablation_layer_kinds():
    assert small_cfg().layer_kinds == ["self", "cross", "self", "cross"]
    assert small_cfg(use_cross_attention=False).layer_kinds == ["self"] * 4
    assert small_cfg(use_self_attention=False).layer_kinds == ["cross"] * 4
    with pytest.raises(ValueError):
        small_cfg(use_self_attention=False, use_cross_attention=False)
    model = make_model(use_cluster_predictor=False).train()
    x = torch.randn(2, 9, model.cfg.input_dim)
    out = model(x, None, x, None)
    assert torch.equal(out["P1"], out["Z1"])


@pytest.mark.parametrize("attention", ["causal", "full"])
@pytest.mark.parametrize("positions", ["relative", "absolute_sine"])
def test_padding_does_not_change_real_frames(attention, positions):
    model = make_model(attention=attention, positions=positions)
    D = model.cfg.input_dim
    a, b = torch.randn(1, 13, D), torch.randn(1, 6, D)
    padded = torch.zeros(2, 13, D)
    padded[0], padded[1, :6] = a[0], b[0]
    padded[1, 6:] = 1e3  # garbage in the padding
    mask = torch.arange(13)[None] < torch.tensor([[13], [6]])
    with torch.no_grad():
        u = model.encode(padded, mask)
        torch.testing.assert_close(u[0], model.encode(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u[1, :6], model.encode(b)[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(u).all()


def test_nan_input_reads_as_zero():
    model = make_model()
    x = torch.randn(1, 8, model.cfg.input_dim)
    x_nan = x.clone()
    x_nan[0, 3, :6] = float("nan")
    x[0, 3, :6] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x_nan), model.encode(x))


def test_causal_output_ignores_future_full_does_not():
    x = torch.randn(1, 15, 15)
    y = x.clone()
    y[0, 9:] = torch.randn(6, 15)
    with torch.no_grad():
        causal = make_model(attention="causal")
        torch.testing.assert_close(causal.encode(x)[0, :9], causal.encode(y)[0, :9])
        full = make_model(attention="full")
        assert not torch.allclose(full.encode(x)[0, :9], full.encode(y)[0, :9])


def test_causal_window_limits_receptive_field():
    # W = 4, 4 layers: frame t depends on frames >= t - 4*(W-1) only
    model = make_model()
    x = torch.randn(1, 30, 15)
    y = x.clone()
    y[0, :5] = torch.randn(5, 15)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[0, 17:], model.encode(y)[0, 17:])


def test_band_geometry_uses_original_indices():
    pos_q, pos_k = torch.tensor([[0, 5, 9]]), torch.tensor([[1, 2, 6, 9]])
    offsets, allowed = band_geometry(pos_q, pos_k, torch.ones(1, 4, dtype=torch.bool), True, 4)
    assert offsets[0, 1].tolist() == [4, 3, -1, -4]
    expected = [[False] * 4, [False, True, False, False], [False, False, True, True]]
    assert allowed[0].tolist() == expected


def test_forward_with_same_view_matches_encode():
    model = make_model()
    x = torch.randn(2, 10, 15)
    with torch.no_grad():
        out = model(x, None, x, None)
        torch.testing.assert_close(out["U1"], model.encode(x))
        torch.testing.assert_close(out["U2"], model.encode(x))


def test_gradient_reaches_every_parameter():
    model = make_model().train()
    D = model.cfg.input_dim
    x1, x2 = torch.randn(2, 12, D), torch.randn(2, 9, D)
    m1 = torch.ones(2, 12, dtype=torch.bool)
    m1[1, 10:] = False
    g1 = torch.arange(12).expand(2, 12)
    g2 = torch.arange(0, 18, 2).expand(2, 9)
    out = model(x1, m1, x2, None, g1, g2)
    loss = sum((v * torch.randn_like(v)).sum() for k, v in out.items() if k[0] != "H")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sine_positions():
    pe = absolute_sine_positions(torch.tensor([[0, 1, 2]]), 6)
    assert pe.shape == (1, 3, 6)
    torch.testing.assert_close(pe[0, 0], torch.tensor([0.0, 1.0] * 3))
    two = torch.tensor(2.0)
    torch.testing.assert_close(pe[0, 2, :2], torch.stack([two.sin(), two.cos()]))


def run_stream(stream: StreamingEncoder, x: torch.Tensor, positions: bool = False):
    state = stream.initial_state(x.shape[0])
    outs = []
    for t in range(x.shape[1]):
        pos = torch.full((x.shape[0],), t) if positions else None
        u, state = stream.step(x[:, t], state, pos)
        outs.append(u)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("positions", ["relative", "absolute_sine"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_streaming_equals_encode(positions, norm):
    model = make_model(seed=1, positions=positions, norm=norm)
    W = model.cfg.window
    x = torch.randn(2, 3 * W + 5, model.cfg.input_dim)
    with torch.no_grad():
        stream = StreamingEncoder(model)
        u_stream, (k, v, ptr, valid) = run_stream(stream, x, positions == "absolute_sine")
        u_full = model.encode(x)
    torch.testing.assert_close(u_stream, u_full, atol=1e-5, rtol=1e-5)
    L, dh = len(model.blocks), model.cfg.d_model // model.cfg.n_heads
    assert k.shape == v.shape == (L, 2, model.cfg.n_heads, W - 1, dh)
    assert valid.all() and ptr.tolist() == [(3 * W + 5) % (W - 1)] * 2


def test_streaming_ring_reads_cache_only_and_returns_new_keys():
    """forward returns only the new frame's keys/values; the ring write and ages agree
    with a cache kept oldest-first by shifting (the previous contract)."""
    model = make_model(seed=3)
    stream = StreamingEncoder(model)
    W, (L, H, S, dh) = model.cfg.window, stream.cache_shape
    assert S == W - 1
    state = stream.initial_state(2)
    x = torch.randn(2, W + 4, model.cfg.input_dim)
    shifted_k = torch.zeros(L, 2, H, S, dh)
    with torch.no_grad():
        for t in range(W + 4):
            k, v, ptr, valid = state
            before = k.clone()
            u, k_new, v_new = stream(x[:, t], k, v, stream.ages(ptr), valid)
            assert u.shape == (2, model.cfg.d_model) and k_new.shape == (2, L, H, dh)
            assert torch.equal(k, before)  # read only
            state = stream.write(state, k_new, v_new)
            shifted_k = torch.cat([shifted_k[:, :, :, 1:], k_new.transpose(0, 1)[:, :, :, None]],
                                  dim=3)
            # slot order by age (oldest first) reproduces the shift-by-concat cache
            order = stream.ages(state[2])[0].argsort(descending=True)
            n = min(t + 1, S)
            torch.testing.assert_close(state[0][:, :, :, order][:, :, :, S - n:],
                                       shifted_k[:, :, :, S - n:])
    a0, a1 = stream.ages(torch.tensor([0, 1])).tolist()
    assert a0 == list(range(S, 0, -1)) and a1[:2] == [1, S]  # slot ptr is the oldest


def test_streaming_shares_modules_and_reset():
    model = make_model(seed=2)
    stream = StreamingEncoder(model)
    assert stream.model is model
    assert {id(p) for p in stream.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(1, 20, model.cfg.input_dim)
    with torch.no_grad():
        _, (k, v, ptr, valid) = run_stream(stream, x[:, :12])
        u, _ = stream.step(x[:, 12], (k, v, ptr, torch.zeros_like(valid)))  # reset = zero valid
        torch.testing.assert_close(u, model.encode(x[:, 12:13])[:, 0], atol=1e-5, rtol=1e-5)


def test_streaming_refuses_full_and_missing_position():
    with pytest.raises(ValueError, match="causal"):
        StreamingEncoder(make_model(attention="full"))
    stream = StreamingEncoder(make_model(positions="absolute_sine"))
    k, v, ptr, valid = stream.initial_state(1)
    with pytest.raises(ValueError, match="position"):
        stream(torch.zeros(1, 15), k, v, stream.ages(ptr), valid)


@pytest.mark.parametrize("kw, said", [
    (dict(tau=0.0), "tau: expected a finite number > 0"),
    (dict(tau=float("nan")), "tau: expected a finite number > 0"),
    (dict(n_heads=0), "n_heads: expected an integer >= 1, found 0"),
    (dict(d_model=-4), "d_model: expected an integer >= 1, found -4"),
    (dict(d_model=18, n_heads=4), "d_model: expected a multiple of n_heads=4, found 18"),
    (dict(ffn_dim=0), "ffn_dim: expected an integer >= 1"),
    (dict(dropout=-0.1), "dropout: expected 0 <= dropout < 1"),
])
def test_config_refuses_values_that_cannot_train(kw, said):
    """Refused when built, not as a ZeroDivisionError or a NaN loss later on."""
    with pytest.raises(ValueError) as info:
        MasaConfig(**kw)
    assert str(info.value).startswith(said)
