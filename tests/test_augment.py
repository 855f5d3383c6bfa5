"""Property tests for masa_rt.augment (dual augmentation and index maps)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masa_rt.augment import AugmentConfig, augment_view, dual_augment, mirror_joints

MIRROR = np.array([3, 4, 2, 0, 1])  # joints 0<->3, 1<->4, 2 on the midline
J = len(MIRROR)


@st.composite
def batches(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 40))
    C = draw(st.sampled_from([2, 3]))
    lengths = np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    seed = draw(st.integers(0, 2**31 - 1))
    x = np.random.default_rng(seed).normal(size=(B, T, J, C)).astype(np.float32)
    x[0, :, 1] = np.where(np.arange(T)[:, None] % 3 == 0, np.nan, x[0, :, 1])  # missing joints
    cfg = AugmentConfig(
        crop=draw(st.sampled_from(["off", "shared", "independent"])),
        min_frames=draw(st.integers(1, 10)),
        keep_ratio=(draw(st.floats(0.1, 0.6)), 1.0),
        joint_noise_std=0.0,
    )
    return x, lengths, cfg, seed, C


def expected_joints(x, view):
    """The documented transform: scale * R @ mirror?(x[g]) + translation (up axis 1)."""
    out = []
    for b, g in enumerate(view["g"]):
        frames = x[b, g[view["mask"][b]]]
        if view["mirrored"][b]:
            frames = mirror_joints(frames, MIRROR, lateral_axis=0)
        out.append(view["scale"][b] * frames @ view["rotation"][b].T + view["translation"][b])
    return out


@settings(max_examples=60, deadline=None)
@given(batches())
def test_views_are_consistent_with_index_maps(data):
    x, lengths, cfg, seed, C = data
    features = np.random.default_rng(seed + 1).normal(size=x.shape[:2] + (4,))
    views = dual_augment(x, lengths, np.random.default_rng(seed), cfg, MIRROR, 1, features)
    single = augment_view(x, lengths, np.random.default_rng(seed), cfg, MIRROR, 1, features)
    B = len(lengths)
    for view in (*views, single):  # the one-view path makes the same kind of view
        g, mask, n = view["g"], view["mask"], view["lengths"]
        M = g.shape[1]
        assert view["joints"].shape == (B, M, J, C) and mask.shape == (B, M)
        assert view["features"].shape == (B, M, 4) and g.dtype == np.int64
        assert np.array_equal(n, mask.sum(1))
        assert np.all(n >= np.minimum(cfg.min_frames, lengths))
        for b in range(B):
            gb = g[b, : n[b]]
            assert mask[b, : n[b]].all() and not mask[b, n[b] :].any()  # real frames first
            assert np.all(g[b, n[b] :] == -1)
            assert np.all(np.diff(gb) > 0)  # strictly increasing
            a, e = view["crop"][b]
            assert 0 <= a and e <= lengths[b] and np.all((gb >= a) & (gb < e))
            if cfg.crop == "off":
                assert (a, e) == (0, lengths[b])
            else:
                assert e - a >= min(np.ceil(cfg.crop_min_ratio * lengths[b]), lengths[b])
            np.testing.assert_allclose(view["features"][b, : n[b]], features[b, gb], rtol=1e-6)
            assert not view["joints"][b, n[b] :].any()  # padding is 0
        for b, want in enumerate(expected_joints(x, view)):
            got = view["joints"][b, : n[b]]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # NaN stays NaN
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    if cfg.crop == "shared" or cfg.crop == "off":
        np.testing.assert_array_equal(views[0]["crop"], views[1]["crop"])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3]), st.integers(0, 1))
def test_mirror_is_an_involution_and_swaps_pairs(seed, C, lateral):
    x = np.random.default_rng(seed).normal(size=(2, 6, J, C))
    once = mirror_joints(x, MIRROR, lateral)
    np.testing.assert_array_equal(mirror_joints(once, MIRROR, lateral), x)
    for i, j in enumerate(MIRROR):
        np.testing.assert_array_equal(once[..., i, lateral], -x[..., j, lateral])
        other = [k for k in range(C) if k != lateral]
        np.testing.assert_array_equal(once[..., i, other], x[..., j, other])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 2]))
def test_rotations_are_proper_and_keep_the_up_axis_without_tilt(seed, up_axis):
    x = np.random.default_rng(seed).normal(size=(4, 10, J, 3))
    cfg = AugmentConfig(tilt_max_deg=0.0, mirror_prob=0.0)
    v1, _ = dual_augment(x, [10] * 4, np.random.default_rng(seed), cfg, None, up_axis)
    R = v1["rotation"]
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)
    np.testing.assert_allclose(R[:, :, up_axis], np.eye(3)[up_axis][None].repeat(4, 0), atol=1e-6)


def test_mirror_only_view_swaps_sides():
    x = np.random.default_rng(0).normal(size=(1, 12, J, 3)).astype(np.float32)
    cfg = AugmentConfig(rotate_max_deg=0, tilt_max_deg=0, mirror_prob=1.0, translate_std=0,
                        scale_range=(1, 1), joint_noise_std=0, keep_ratio=(1, 1))  # fmt: skip
    v1, v2 = dual_augment(x, [12], np.random.default_rng(1), cfg, MIRROR)
    for v in (v1, v2):
        assert v["mirrored"].all() and np.array_equal(v["g"][0], np.arange(12))
        np.testing.assert_allclose(v["joints"][0], mirror_joints(x[0], MIRROR, 0), atol=1e-6)


def test_views_differ_and_seed_is_deterministic():
    x = np.random.default_rng(0).normal(size=(2, 30, J, 3))
    a1, a2 = dual_augment(x, [30, 20], np.random.default_rng(7), mirror_index=MIRROR)
    b1, _ = dual_augment(x, [30, 20], np.random.default_rng(7), mirror_index=MIRROR)
    np.testing.assert_array_equal(a1["joints"], b1["joints"])
    assert a1["g"].shape != a2["g"].shape or not np.array_equal(a1["g"], a2["g"])


def test_torch_in_torch_out():
    x = torch.randn(2, 16, J, 3)
    v1, v2 = dual_augment(x, torch.tensor([16, 9]), np.random.default_rng(0))
    assert isinstance(v1["joints"], torch.Tensor) and v1["joints"].dtype == torch.float32
    assert v1["mask"].dtype == torch.bool and v2["g"].dtype == torch.int64
    assert v1["features"] is None


def test_bad_inputs_raise():
    x = np.zeros((1, 5, J, 3))
    with pytest.raises(ValueError, match="inverse"):
        dual_augment(x, [5], np.random.default_rng(0), mirror_index=np.array([1, 2, 0, 3, 4]))
    with pytest.raises(ValueError, match="lengths"):
        dual_augment(x, [6], np.random.default_rng(0))
    with pytest.raises(ValueError):
        AugmentConfig(crop="random")
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"crop": "off", "vposer": True})
    cfg = AugmentConfig(crop="independent")
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), p=st.floats(0.05, 0.5))
def test_joint_dropout_only_blanks_real_joints(seed, p):
    x = np.random.default_rng(seed).normal(size=(3, 40, J, 3)).astype(np.float32)
    lengths = [40, 25, 9]
    cfg = AugmentConfig(joint_dropout=p)
    for v in dual_augment(x, lengths, np.random.default_rng(seed), cfg, MIRROR):
        nan = np.isnan(v["joints"])
        assert (nan.all(-1) == nan.any(-1)).all()  # a whole joint, never one coordinate
        assert not nan[~v["mask"]].any()  # padding stays exactly 0
        assert (v["joints"][~v["mask"]] == 0).all()
        assert (~nan[v["mask"]]).any()  # not everything is dropped
    # Off by default, and off draws nothing: the default pipeline is unchanged.
    a, _ = dual_augment(x, lengths, np.random.default_rng(seed), AugmentConfig(), MIRROR)
    assert not np.isnan(a["joints"]).any()


def test_joint_dropout_rate_and_whole_hands():
    x = np.ones((8, 200, J, 3), np.float32)
    cfg = AugmentConfig(joint_dropout=0.1, keep_ratio=(1, 1))
    v, _ = dual_augment(x, [200] * 8, np.random.default_rng(0), cfg, MIRROR)
    dropped = np.isnan(v["joints"]).any(-1)  # (B, M, J)
    assert 0.1 < dropped.mean() < 0.3  # single joints plus, per frame, sometimes one side
    side = MIRROR > np.arange(J)
    whole = dropped[..., side].all(-1) | dropped[..., MIRROR < np.arange(J)].all(-1)
    assert whole.mean() > 0.05
    with pytest.raises(ValueError, match="joint_dropout"):
        AugmentConfig(joint_dropout=1.0)


# ----------------------------------------------------------------------------- temporal warp


@st.composite
def warp_configs(draw):
    lo = draw(st.floats(0.25, 1.0))
    return AugmentConfig(
        crop=draw(st.sampled_from(["off", "shared", "independent"])),
        min_frames=draw(st.integers(1, 10)),
        keep_ratio=(draw(st.floats(0.3, 1.0)), 1.0),
        temporal="warp",
        speed_min=lo,
        speed_max=lo * draw(st.floats(1.0, 6.0)),
        warp_segments=draw(st.integers(1, 5)),
        pause_prob=draw(st.sampled_from([0.0, 0.5, 1.0])),
        pause_max_frames=draw(st.integers(0, 40)),
        warp_max_ratio=draw(st.floats(1.0, 3.0)),
        joint_noise_std=0.0,
    )


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 120), min_size=1, max_size=3),
       cfg=warp_configs(), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_warp_index_maps_are_monotone_inside_the_crop_and_capped(lengths, cfg, seed):
    T = max(lengths)
    x = np.random.default_rng(seed).normal(size=(len(lengths), T, J, 3)).astype(np.float32)
    lengths = np.array(lengths)
    views = dual_augment(x, lengths, np.random.default_rng(seed), cfg, MIRROR)
    again = dual_augment(x, lengths, np.random.default_rng(seed), cfg, MIRROR)
    for view, same in zip(views, again, strict=True):
        np.testing.assert_array_equal(view["g"], same["g"])  # deterministic per seed
        np.testing.assert_array_equal(view["joints"], same["joints"])
        for b, n in enumerate(view["lengths"]):
            gb = view["g"][b, :n]
            a, e = view["crop"][b]
            assert np.all(np.diff(gb) >= 0)  # non-decreasing: repeats allowed
            assert np.all((gb >= a) & (gb < e))  # inside the crop, so first and last too
            assert min(cfg.min_frames, e - a) <= n <= max(min(cfg.min_frames, e - a),
                                                          int(cfg.warp_max_ratio * (e - a)))
            assert np.all(view["g"][b, n:] == -1) and not view["mask"][b, n:].any()
        for b, want in enumerate(expected_joints(x, view)):  # joints still read x at g
            np.testing.assert_allclose(view["joints"][b, : view["lengths"][b]], want,
                                       rtol=1e-4, atol=1e-4)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(L=st.integers(2, 400), lo=st.floats(0.25, 2.0), ratio=st.floats(1.0, 4.0),
       segments=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_warp_speeds_stay_within_bounds(L, lo, ratio, segments, seed):
    from masa_rt.augment import _warp_positions

    cfg = AugmentConfig(temporal="warp", speed_min=lo, speed_max=lo * ratio,
                        warp_segments=segments, pause_prob=0.0)  # fmt: skip
    pos = _warp_positions(np.random.default_rng(seed), L, cfg, 1, 10**9)  # no cap
    assert pos[0] == 0 and pos[-1] == L - 1
    steps = np.diff(pos)
    tol = 1e-9
    assert np.all(steps > 0) and np.all(steps <= cfg.speed_max + tol)  # per output frame
    assert np.all(steps[:-1] >= cfg.speed_min - tol)  # the last step may end early
    # in aggregate: source frames per output frame, between the slowest and fastest speed
    assert cfg.speed_min - tol <= (L - 1) / max(len(pos) - 2, 1) or len(pos) <= 2
    assert (L - 1) / (len(pos) - 1) <= cfg.speed_max + tol


def test_warp_slows_down_pauses_and_speeds_up_on_average():
    from masa_rt.augment import _warp_positions

    rng = np.random.default_rng(0)
    cfg = AugmentConfig(temporal="warp", pause_prob=1.0, pause_max_frames=30)
    rates, held = [], []
    for _ in range(2000):
        pos = _warp_positions(rng, 100, cfg, 1, 10**9)
        rates.append(99 / (len(pos) - 1))
        held.append(np.max(np.unique(pos, return_counts=True)[1]))
    rates, held = np.array(rates), np.array(held)
    assert (rates < 1).mean() > 0.2 and (rates > 1).mean() > 0.2  # slower and faster views
    assert 0.5 <= rates.min() and rates.max() <= 2.0 + 1e-9 or (held > 1).all()
    assert (held >= 2).all() and held.max() >= 25  # every view paused, up to ~30 frames
    capped = _warp_positions(rng, 100, AugmentConfig(temporal="warp", speed_max=0.5), 8, 120)
    assert len(capped) == 120 and capped[0] == 0 and capped[-1] == 99  # cap keeps both ends


def test_warp_mode_default_off_and_validated():
    assert AugmentConfig().temporal == "drop"
    x = np.random.default_rng(1).normal(size=(2, 50, J, 3))
    for cfg in (AugmentConfig(), AugmentConfig(crop="independent", joint_dropout=0.1)):
        v, _ = dual_augment(x, [50, 31], np.random.default_rng(3), cfg, MIRROR)
        for b, n in enumerate(v["lengths"]):
            assert np.all(np.diff(v["g"][b, :n]) > 0)  # "drop" stays strictly increasing
    warp = AugmentConfig(temporal="warp", pause_prob=1.0, speed_min=0.5, speed_max=0.5,
                         keep_ratio=(1, 1))  # fmt: skip
    v, _ = dual_augment(x, [50, 31], np.random.default_rng(3), warp, MIRROR)
    assert (np.diff(v["g"][0, : v["lengths"][0]]) == 0).any()  # repeated frames
    for bad in (dict(temporal="stretch"), dict(speed_min=0.0), dict(speed_min=2, speed_max=1),
                dict(warp_segments=0), dict(pause_prob=1.5), dict(warp_max_ratio=0.5)):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)
    assert AugmentConfig.from_dict(warp.to_dict()) == warp


# ---------------------------------------------------------------------- part jitter

def _jitter(x, mirror=MIRROR, **kw):
    from masa_rt.augment import _part_jitter

    cfg = AugmentConfig(**{"part_jitter_std": 0.1, "part_jitter_deg": 5.0, **kw})
    return _part_jitter(np.random.default_rng(0), x, cfg, mirror)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), every=st.integers(1, 20))
def test_part_jitter_moves_each_side_rigidly_and_keeps_missing_joints(seed, every):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 25, J, 3)).astype(np.float32)
    x[0, 4, 0] = np.nan
    y = _jitter(x, part_jitter_every=every)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(x))
    # the midline joint (2) is no side's: it stays; within a side, distances are kept
    np.testing.assert_array_equal(y[..., 2, :], x[..., 2, :])
    pair = (slice(None), slice(None), [3, 4])  # one side's two joints
    np.testing.assert_allclose(np.linalg.norm(np.diff(y[pair], axis=2), axis=-1),
                               np.linalg.norm(np.diff(x[pair], axis=2), axis=-1),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(y[1], x[1])


def test_part_jitter_drifts_slowly():
    x = np.zeros((1, 200, J, 3), np.float32)
    y = _jitter(x, part_jitter_deg=0.0, part_jitter_every=30)
    step = np.abs(np.diff(y[0, :, 0], axis=0)).max()
    spread = np.abs(y[0, :, 0]).max()
    assert step < spread / 5  # linear between knots 30 frames apart, not frame-to-frame noise


def test_part_jitter_off_by_default_and_validated():
    cfg = AugmentConfig()
    assert cfg.part_jitter_std == 0.0 and cfg.part_jitter_deg == 0.0
    with pytest.raises(ValueError, match="part_jitter"):
        AugmentConfig(part_jitter_every=0)
