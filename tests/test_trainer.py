"""trainer: config resolution, data batching, and tiny end-to-end training runs."""

import contextlib
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

from masa_rt import cli
from masa_rt.checkpoint import load_checkpoint, load_model
from masa_rt.sequence import Sequence, write_dataset_files
from trainer.config import (
    ConfigError,
    RunConfig,
    dump_run_config,
    load_run_config,
    run_config_to_dict,
)
from trainer.data import epoch_batches, subsample_indices
from trainer.train import train

torch.set_num_threads(1)

# A model small enough that a whole run takes about a second on one core.
TINY = ["model.d_model=16", "model.n_heads=2", "model.ffn_dim=32", "model.proj_dim=16",
        "model.window=8", "train.batch_size=4"]


def make_dataset(root, n=10, features=0, seed=0):
    """n short two-activity sequences (mediapipe_hand21) with a few missing joints."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        t = int(rng.integers(20, 36))
        phase = np.linspace(0, 2 * np.pi, t)[:, None, None]
        base = rng.normal(size=(1, 21, 3))
        joints = (base + 0.3 * np.sin(phase * (1 + i % 2) + rng.normal(size=(1, 21, 3))))
        joints = joints.astype(np.float32)
        joints[rng.random((t, 21)) < 0.05] = np.nan
        feats = rng.normal(size=(t, features)).astype(np.float32) if features else None
        seq = Sequence(joints, "mediapipe_hand21", 30.0, features=feats, activity=f"act{i % 2}")
        items.append((f"s{i:02d}.npz", seq, "val" if i >= n - 2 else "train"))
    write_dataset_files(root, items)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _run(data, out, *extra, resume=False, plot=False):
    """Train with the TINY model; curves.png (slowest part of a tiny run) only if asked."""
    rc = load_run_config(None, TINY + list(extra))
    with contextlib.ExitStack() as stack:
        if not plot:
            stack.enter_context(mock.patch("trainer.train.plot_curves"))
        return train(rc, data, out, resume=resume)


def _log(run_dir):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(s).items() if k != "time"} for s in lines]


# ------------------------------------------------------------------------- config

def test_defaults_are_the_papers():
    rc = RunConfig()
    t = rc.train
    assert (t.lr, t.lr_halve_every, t.epochs, t.batch_size, t.max_len) == (3e-3, 50, 150, 16, 150)
    assert rc.model.tau == rc.loss.tau == 0.1 and rc.loss.stop_gradient


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs")
                                         .glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    rc = load_run_config(path)  # unknown keys and bad values raise
    assert rc.model.attention in ("causal", "full")


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {tau: 0.5, d_model: 64}\ntrain: {epochs: 7, lr: 1e-3}\n")
    rc = load_run_config(f, ["model.tau=1", "augment.crop=off", "train.max_minutes=2"])
    assert rc.model.tau == 1.0 and rc.loss.tau == 1.0  # loss.tau follows model.tau
    assert rc.model.d_model == 64 and rc.train.epochs == 7 and rc.train.lr == 1e-3
    assert rc.augment.crop == "off"  # YAML 1.1 would have read this as False
    assert rc.train.max_minutes == 2.0


def test_loss_aliases_and_independent_crop():
    rc = load_run_config(None, ["loss.stop_gradient=false", "augment.crop=independent"])
    assert rc.model.stop_gradient is False and rc.loss.stop_gradient is False
    assert rc.loss.restrict_to_overlap is True
    with pytest.raises(ConfigError, match="disagree"):
        load_run_config(None, ["loss.tau=1", "model.tau=0.1"])


def test_unknown_key_is_one_line_listing_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_run_config(None, ["model.tua=1"])
    msg = str(info.value)
    assert "\n" not in msg and "'model.tua'" in msg and "model.tau" in msg
    with pytest.raises(ConfigError, match=r"'optim.lr'; valid keys: model.\*, augment.\*"):
        load_run_config(None, ["optim.lr=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_run_config(None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="'train.batch_size': expected > 0"):
        load_run_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config(None, ["train.epochs"])


@pytest.mark.parametrize("override, said", [
    ("model.tau=0", "'model.tau': expected a finite number > 0"),
    ("loss.tau=-1", "'model.tau': expected a finite number > 0"),  # loss.tau is an alias
    ("model.n_heads=0", "'model.n_heads': expected an integer >= 1, found 0"),
    ("model.d_model=-4", "'model.d_model': expected an integer >= 1, found -4"),
    ("model.d_model=30", "'model.d_model': expected a multiple of n_heads=4, found 30"),
    ("model.window=0", "'model.window': expected an integer >= 1"),
    ("model.dropout=1", "'model.dropout': expected 0 <= dropout < 1"),
    ("loss.p=0", "'loss.p': expected a finite number > 0"),
    ("train.lr=.inf", "'train.lr': expected > 0, found inf"),
    ("train.epochs=-1", "'train.epochs': expected >= 0"),
    ("train.seed=-1", "'train.seed': expected >= 0"),
    ("train.max_minutes=.nan", "'train.max_minutes': expected a finite number >= 0"),
    ("train.device=gpu", "'train.device': expected cpu, cuda, cuda:N or mps, found 'gpu'"),
])
def test_bad_values_are_refused_naming_the_key(override, said):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [override])
    assert said in str(info.value) and str(info.value).startswith("config key ")


def test_a_device_torch_cannot_use_is_refused_before_training(data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: nothing to refuse")
    code = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "r"),
                     "--set", "train.device=cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'train.device': 'cuda' asked for" in err and "sees no CUDA GPU" in err
    assert not (tmp_path / "r").exists()


def _nan_from_step(monkeypatch, first_bad: int):
    """Make the loss of step ``first_bad`` (0-based) and later NaN."""
    import trainer.train as tt

    real, calls = tt.masa_loss, []

    def loss(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) > first_bad:
            out = {key: v * float("nan") for key, v in out.items()}
        return out

    monkeypatch.setattr(tt, "masa_loss", loss)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    # 8 train clips, batch 4: 2 steps an epoch; epoch 1 is checkpointed, step 3 is NaN.
    _nan_from_step(monkeypatch, 2)
    from trainer.train import TrainingDiverged

    with pytest.raises(TrainingDiverged) as info:
        _run(data, tmp_path / "r", "train.epochs=3")
    msg = str(info.value)
    assert "step 3: the loss is not finite (L=nan" in msg and "train.lr" in msg
    assert "last.pt keeps the last good weights" in msg and "\n" not in msg
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    assert all(torch.isfinite(t).all() for t in ckpt["model_state"].values()
               if t.is_floating_point())
    assert [r["step"] for r in _log(tmp_path / "r")] == [1, 2]  # the NaN step is not logged


def test_non_finite_loss_on_the_cli_is_one_line(data, tmp_path, monkeypatch, capsys):
    _nan_from_step(monkeypatch, 0)
    monkeypatch.setattr("trainer.train.plot_curves", lambda *a, **k: None)
    code = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "r"),
                     *[a for kv in TINY for a in ("--set", kv)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "step 1: the loss is not finite" in err and "\n" not in err
    assert "no checkpoint was written" in err and not (tmp_path / "r" / "last.pt").exists()


def test_non_finite_weights_are_never_checkpointed(data, tmp_path, monkeypatch):
    import trainer.train as tt

    real = tt.train_step

    def step(run, idx, n):
        terms = real(run, idx, n)
        if n == 3:  # epoch 2's last step: a finite loss, but an update that broke weights
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("inf"))
        return terms

    monkeypatch.setattr(tt, "train_step", step)
    with pytest.raises(tt.TrainingDiverged, match="step 4: weights are not finite"):
        _run(data, tmp_path / "r", "train.epochs=2")
    assert load_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 1


def test_resolved_config_round_trips(tmp_path):
    rc = load_run_config(None, ["model.use_cross_attention=false", "augment.crop=off"])
    (tmp_path / "c.yaml").write_text(dump_run_config(rc))
    again = load_run_config(tmp_path / "c.yaml")
    assert run_config_to_dict(again) == run_config_to_dict(rc)


def test_cli_reports_bad_override_in_one_line(data, tmp_path, capsys):
    code = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "r"),
                     "--set", "model.nope=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "unknown config key 'model.nope'" in err


# ------------------------------------------------------------------------- data

def test_subsample_keeps_even_spacing_under_max_len():
    for T in (10, 150, 151, 299, 301, 1000):
        idx = subsample_indices(T, 150)
        assert len(idx) <= 150 and idx[0] == 0 and len(set(np.diff(idx))) <= 1


def test_epoch_batches_shard_evenly_and_deterministically():
    single = epoch_batches(10, 3, epoch=2, seed=5)
    assert sorted(np.concatenate(single)) == list(range(10))
    np.testing.assert_array_equal(np.concatenate(single),
                                  np.concatenate(epoch_batches(10, 3, epoch=2, seed=5)))
    assert not np.array_equal(np.concatenate(single),
                              np.concatenate(epoch_batches(10, 3, epoch=3, seed=5)))
    r0, r1 = (epoch_batches(10, 3, 2, 5, rank=r, world_size=2) for r in (0, 1))
    assert len(r0) == len(r1) == 2  # 4 batches, every rank the same number of steps
    assert not set(np.concatenate(r0)) & set(np.concatenate(r1))
    assert len(epoch_batches(2, 4, 0, 0, rank=1, world_size=2)) == 1  # wraps, never empty


# ------------------------------------------------------------------------- training

def test_end_to_end_outputs(data, tmp_path):
    run = tmp_path / "run"
    ckpt = _run(data, run, "train.epochs=2", plot=True)
    for name in ("last.pt", "log.jsonl", "config.yaml", "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    log = _log(run)
    assert len(log) == 4 and [r["step"] for r in log] == [1, 2, 3, 4]  # 8 train seqs / 4
    assert all(math.isfinite(r[k]) for r in log for k in ("L", "L_m", "L_c"))
    assert all(-1 <= r["L_c"] <= 1 and r["world_size"] == 1 for r in log)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["num_joints"] == 21 and resolved["model"]["d_model"] == 16
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 4
    assert summary["collapse"]["split"] == "val"
    assert 1 <= summary["collapse"]["effective_rank"] <= 16
    model, cfg, spec, meta = load_model(ckpt)
    assert spec.layout == "mediapipe_hand21" and cfg.num_joints == 21 and meta["epoch"] == 2
    assert meta["model_fingerprint"] == summary["model_fingerprint"]


def test_refuses_to_overwrite_a_run(data, tmp_path):
    _run(data, tmp_path / "run", "train.epochs=1")
    with pytest.raises(ConfigError, match="--resume"):
        _run(data, tmp_path / "run", "train.epochs=1")


def test_same_seed_same_log_other_seed_differs(data, tmp_path):
    _run(data, tmp_path / "a", "train.epochs=1", "train.seed=3")
    _run(data, tmp_path / "b", "train.epochs=1", "train.seed=3")
    _run(data, tmp_path / "c", "train.epochs=1", "train.seed=4")
    assert _log(tmp_path / "a") == _log(tmp_path / "b")
    assert _log(tmp_path / "a") != _log(tmp_path / "c")


def _weights(ckpt_path):
    return load_checkpoint(ckpt_path)["model_state"]


def test_resume_equals_straight_run(data, tmp_path):
    straight = _run(data, tmp_path / "straight", "train.epochs=2", "train.lr_halve_every=1")
    _run(data, tmp_path / "resumed", "train.epochs=1", "train.lr_halve_every=1")
    resumed = _run(data, tmp_path / "resumed", "train.epochs=2", "train.lr_halve_every=1",
                   resume=True)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _log(tmp_path / "straight") == _log(tmp_path / "resumed")
    assert load_checkpoint(resumed)["optimizer_state"]["param_groups"][0]["lr"] == 3e-3 / 4


def test_time_budget_stops_mid_epoch_and_resumes_exactly(data, tmp_path):
    run = tmp_path / "run"
    _run(data, run, "train.epochs=2", "train.max_minutes=0")  # stops after the first step
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "time" and summary["steps"] == 1
    assert load_checkpoint(run / "last.pt")["extra"]["position"]["batch"] == 1
    resumed = _run(data, run, "train.epochs=2", resume=True)
    straight = _run(data, tmp_path / "straight", "train.epochs=2")
    a, b = _weights(straight), _weights(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_resume_refuses_a_different_model(data, tmp_path):
    _run(data, tmp_path / "run", "train.epochs=1")
    with pytest.raises(ConfigError, match="window"):
        _run(data, tmp_path / "run", "train.epochs=2", "model.window=4", resume=True)


def test_init_from_loads_weights_and_refits_the_window(data, tmp_path):
    base = _run(data, tmp_path / "base", "train.epochs=1")  # TINY: window 8
    fine = _run(data, tmp_path / "fine", "train.epochs=0", "model.window=4",
                f"train.init_from={tmp_path / 'base'}")  # a run folder: its last.pt
    longer = _run(data, tmp_path / "longer", "train.epochs=0", "model.window=10",
                  f"train.init_from={base}")
    a, b, c = _weights(base), _weights(fine), _weights(longer)
    for k in a:
        if k.endswith("attn.rel_bias"):
            torch.testing.assert_close(b[k], a[k][:, :4], rtol=0, atol=0)
            torch.testing.assert_close(c[k][:, :8], a[k], rtol=0, atol=0)
            torch.testing.assert_close(c[k][:, 8:], a[k][:, -1:].expand(-1, 2), rtol=0, atol=0)
        else:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert load_checkpoint(fine)["model_config"]["window"] == 4


def test_init_from_a_full_model_keeps_its_window(data, tmp_path):
    base = _run(data, tmp_path / "base", "train.epochs=0", "model.attention=full")
    same = _run(data, tmp_path / "same", "train.epochs=0", "model.attention=full",
                f"train.init_from={base}")
    a, b = _weights(base), _weights(same)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    with pytest.raises(ConfigError, match="causal"):
        _run(data, tmp_path / "other", "train.epochs=0", "model.attention=full",
             "model.window=4", f"train.init_from={base}")


def test_init_from_refuses_another_architecture(data, tmp_path):
    base = _run(data, tmp_path / "base", "train.epochs=0")
    with pytest.raises(ConfigError, match="d_model"):
        _run(data, tmp_path / "other", "train.epochs=0", "model.d_model=32",
             f"train.init_from={base}")


@pytest.mark.parametrize("ablation", [
    "model.use_self_attention=false", "model.use_cross_attention=false",
    "model.stop_gradient=false", "augment.dual=false", "augment.crop=independent",
    "model.use_cluster_predictor=false", "model.tau=1",
])
def test_ablation_presets_train(data, tmp_path, ablation):
    _run(data, tmp_path / "run", "train.epochs=1", "train.batch_size=8", ablation)
    (record,) = _log(tmp_path / "run")
    assert math.isfinite(record["L"])


def test_features_input(tmp_path):
    data = make_dataset(tmp_path / "feat", n=6, features=5)
    _run(data, tmp_path / "run", "train.epochs=1")
    _, cfg, spec, _ = load_model(tmp_path / "run" / "last.pt")
    assert cfg.input_kind == spec.input_kind == "both" and cfg.feature_dim == 5
    _run(data, tmp_path / "run2", "train.epochs=1", "input_kind=features")
    _, cfg, spec, _ = load_model(tmp_path / "run2" / "last.pt")
    assert cfg.input_dim == spec.input_dim == 5


@pytest.mark.parametrize("positions", ["view", "source"])
def test_train_positions_option_reaches_the_model(data, tmp_path, positions):
    """'view' (default) gives the encoder each view's own frame counter, as a live stream
    does (None: the model's arange); 'source' the original frame indices g', g''."""
    from masa_rt.model import MasaModel
    from trainer.config import TrainConfig

    assert TrainConfig().positions == "view"
    with pytest.raises(ValueError, match="positions"):
        TrainConfig(positions="original")
    seen = []
    forward = MasaModel.forward

    def spy(self, x1, m1, x2, m2, pos1=None, pos2=None):
        seen.append((pos1, pos2))
        return forward(self, x1, m1, x2, m2, pos1=pos1, pos2=pos2)

    with mock.patch.object(MasaModel, "forward", spy):
        _run(data, tmp_path / "run", "train.epochs=1", f"train.positions={positions}")
    assert seen
    for pos1, pos2 in seen:
        if positions == "view":
            assert pos1 is None and pos2 is None
        else:
            assert pos1 is not None and pos2 is not None and pos1.dtype == torch.long


def test_a_step_budget_trains_exactly_that_many_steps(data, tmp_path):
    # 8 train clips, batch 4: 2 steps an epoch; 5 steps need 3 epochs, the last cut short.
    ckpt = load_checkpoint(_run(data, tmp_path / "r", "train.steps=5", "train.epochs=150",
                                "train.lr_halve_every=50"))
    assert (ckpt["epoch"], ckpt["step"]) == (3, 5)
    steps = [r["step"] for r in _log(tmp_path / "r")]
    assert steps == [1, 2, 3, 4, 5]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 5


def test_the_step_schedule_keeps_the_epoch_schedules_fractions():
    from trainer.config import TrainConfig
    from trainer.train import schedule_for_steps

    cfg = TrainConfig(steps=300, epochs=150, lr_halve_every=50, batch_size=32)
    got = schedule_for_steps(cfg, n=640)  # 20 steps an epoch
    assert (got.epochs, got.lr_halve_every) == (15, 5)  # lr halved at 1/3 and 2/3
    assert schedule_for_steps(got, n=640) == got  # a resumed run derives the same
    assert schedule_for_steps(TrainConfig(), n=640) == TrainConfig()  # no budget: unchanged
