"""Build a reference (``masa_rt.align.Reference``) from demonstration recordings.

A reference is a demonstration embedded by one model, with its phase labels and frame
times. The embeddings come from the offline causal ``MasaModel.encode`` on the demo
resampled to the model's rate exactly as the engine resamples a live stream
(``engine.streams.Resampler``), with the same preprocessing (``frame_features``). Since the
streamed step equals the offline causal encoder (the exactness test), a user performing
the demo live produces the very embeddings stored here. Frames whose joints are all
missing are left out, as the live engine does not encode them either.

Several demos of one activity (policy ``"medoid average"``, the default): every demo is
aligned with offline DTW to every other; the **medoid** (least summed mean-path cost to
the others) gives the timeline, phases and times. Then, DBA-style (Petitjean et al. 2011),
each demo is aligned to the current average, the unit-length embeddings of its frames
mapped onto each timeline frame are averaged (one mean per demo, so a slow demo does not
outweigh a fast one), the demos' means are averaged and renormalised; ``refine`` more
rounds re-align to the new average (default 0: on the synthetic harness one round lost
about a point of phase accuracy). ``meta["demos"]`` has each demo's cost to the medoid
and to the final average. Policy ``"first"`` keeps the first demo as it is and only
compares the others (``meta["other_demos"]``), as before.

torch is imported here (it runs the model); the serving path never imports this module.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import masa_rt
from engine.export import resolve_checkpoint
from engine.self_check import leave_one_out
from engine.streams import Resampler, nearest_index
from masa_rt.align import Reference, is_reference_file, offline_dtw
from masa_rt.checkpoint import default_model_path, load_model, model_fingerprint
from masa_rt.cli_types import check_output_path
from masa_rt.model import MasaModel
from masa_rt.phase_decoder import DecoderEnsemble, PhaseDecoderError
from masa_rt.preprocess import InputSpec, frame_features, raw_embedding
from masa_rt.sequence import Sequence as PoseSequence
from masa_rt.sequence import load_sequence
from masa_rt.skeleton import (
    UnknownLayoutError,
    UnsupportedConversionError,
    apply_map,
    conversion_map,
)

__all__ = ["POLICIES", "ReferenceBuildError", "average_demos", "build_reference",
           "decoder_members_meta", "embed_demo", "ensemble_references", "reference_from_demos",
           "with_raw_baseline"]

log = logging.getLogger(__name__)

POLICIES = ("medoid", "first")  # medoid average of all demos; the first demo as it is


# The shortest procedures users align (a squat repetition, a tap) last about a second; a
# demo under half of that is a clipped or mislabelled file, not a performance (issue 31: a
# 5-frame demo was accepted silently and served as a reference that answered at random).
MIN_DEMO_SECONDS = 0.5


class ReferenceBuildError(ValueError):
    """A demo that cannot become a reference (no phase labels, wrong layout, too short)."""


def _resampled(seq: PoseSequence, spec: InputSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                             np.ndarray | None]:
    """(times, joints, phases, features) on the model-rate grid, as the engine would see it.

    Phases are not interpolated: each model frame takes the label of the capture frame
    nearest in time.
    """
    n = seq.num_frames
    t = np.asarray(seq.timestamps, dtype=np.float64) if seq.timestamps is not None else (
        np.arange(n) / float(seq.fps))
    feats = seq.features if spec.feature_dim else None
    rs = Resampler(spec.fps, max_gap_s=np.inf)  # a recording has no stalls to re-anchor at
    j_shape = seq.joints.shape[1:]
    size = int(np.prod(j_shape))
    times, joints, extra = [], [], []
    for i in range(n):
        sample = seq.joints[i].reshape(-1)
        if feats is not None:
            sample = np.concatenate([sample, feats[i]])
        for tk, x in rs.push(sample, float(t[i])):
            times.append(tk)
            joints.append(x[:size].reshape(j_shape))
            extra.append(x[size:])
    times_a = np.array(times)
    phases = np.asarray(seq.phases)[nearest_index(t, times_a)]
    return times_a, np.stack(joints), phases, (np.stack(extra) if feats is not None else None)


def _in_model_layout(seq: PoseSequence, spec: InputSpec, name: str) -> PoseSequence:
    """The demo in the model's layout: converted where a joint map exists (a declared
    layout's ``convert_to``, OpenXR hands -> h2o_hands, ...), as the server converts a
    live stream of that layout, else refused."""
    if seq.layout == spec.layout:
        return seq
    try:
        m = conversion_map(seq.layout, spec.layout)
    except (UnknownLayoutError, UnsupportedConversionError):
        raise ReferenceBuildError(f"{name}: layout {seq.layout!r}, the model reads "
                                  f"{spec.layout!r} (and no conversion exists)") from None
    return replace(seq, joints=apply_map(seq.joints, m), layout=spec.layout)


def embed_demo(model: MasaModel | None, spec: InputSpec, seq: PoseSequence,
               name: str = "demo",
               embed: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Embeddings (T, d), phases, times of one demo on the model's frame grid.

    ``embed`` (model input (T, D) -> (T, d)) replaces the model's causal encoder, e.g. the
    harness's raw-keypoint baseline; ``model`` is then unused.
    """
    seq = _in_model_layout(seq, spec, name)
    if seq.phases is None or seq.phase_names is None:
        raise ReferenceBuildError(f"{name}: has no phase labels (phases, phase_names); a "
                                  "reference needs them")
    times, joints, phases, feats = _resampled(seq, spec)
    keep = ~np.isnan(joints).reshape(len(joints), -1).all(axis=1)  # tracking lost: skipped
    x = frame_features(joints[keep], spec, feats[keep] if feats is not None else None)
    if len(x) < 2:
        raise ReferenceBuildError(f"{name}: fewer than 2 frames with joints")
    span = float(times[keep][-1] - times[keep][0])
    if span < MIN_DEMO_SECONDS:
        raise ReferenceBuildError(
            f"{name}: {seq.num_frames} frames ({span:.2f} s with joints) is too short for a "
            f"demonstration; a reference needs at least {MIN_DEMO_SECONDS:g} s")
    if embed is not None:
        emb = np.asarray(embed(x), dtype=np.float32)
    else:
        if model is None:
            raise ValueError("embed_demo: needs a model or an embed function")
        with torch.no_grad():
            emb = model.encode(torch.from_numpy(x)[None])[0].numpy()  # (T, d), causal offline
    return {"embeddings": emb, "phases": phases[keep], "times": times[keep],
            "joints": joints[keep], "inputs": x}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _path_cost(query: np.ndarray, reference: np.ndarray,
               path: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(mean cosine cost along the offline DTW path, the path (L, 2) query -> reference)."""
    if path is None:
        path = offline_dtw(query, reference)
    a, b = _unit(query), _unit(reference)
    return float(np.mean(1.0 - np.sum(a[path[:, 0]] * b[path[:, 1]], axis=1))), path


def _average_onto(timeline: np.ndarray, demos: Sequence[np.ndarray]
                  ) -> tuple[np.ndarray, list[float]]:
    """One DBA round: align each demo to ``timeline`` (T, d); per timeline frame, the mean
    of each demo's unit frames mapped there, averaged over demos and renormalised."""
    total = np.zeros((len(timeline), timeline.shape[1]))
    costs = []
    for emb in demos:
        cost, path = _path_cost(emb, timeline)
        costs.append(cost)
        u = _unit(emb)
        sums = np.zeros_like(total)
        np.add.at(sums, path[:, 1], u[path[:, 0]])
        counts = np.bincount(path[:, 1], minlength=len(timeline))  # >= 1: a full DTW path
        total += sums / counts[:, None]
    return _unit(total / len(demos)), costs


def average_demos(demos: Sequence[np.ndarray], refine: int = 0,
                  medoid: int | None = None) -> tuple[np.ndarray, int, dict[str, Any]]:
    """DTW average of several demos' embeddings on the medoid's timeline.

    Returns ``(embeddings (T_medoid, d) unit rows, medoid index, info)``; ``info`` has the
    pairwise mean path costs, each demo's cost to the medoid and to the final average.
    ``refine`` extra rounds re-align every demo to the average and average again.
    ``medoid`` forces the timeline demo (e.g. the one chosen on another embedding).
    """
    if not demos:
        raise ReferenceBuildError("no demo given")
    n = len(demos)
    pair = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            c = _path_cost(demos[i], demos[j])[0]
            pair[i, j] = pair[j, i] = c
    if medoid is None:
        medoid = int(np.argmin(pair.sum(axis=1)))
    avg, to_medoid = _average_onto(np.asarray(demos[medoid]), demos)
    for _ in range(max(refine, 0)):
        avg, _costs = _average_onto(avg, demos)
    to_avg = [_path_cost(d, avg)[0] for d in demos]
    info = {"pairwise_cost": pair.round(6).tolist(), "cost_to_medoid": to_medoid,
            "cost_to_average": to_avg, "refine": int(max(refine, 0))}
    return avg.astype(np.float32), medoid, info


def _compare(first: np.ndarray, other: np.ndarray) -> float:
    """Mean cosine cost along the offline DTW path between two demos' embeddings."""
    return _path_cost(other, first)[0]


def reference_from_demos(demos: Sequence[dict[str, Any]], phase_names: Sequence[str], *,
                         activity: str, name: str, fps: float, labels: Sequence[str],
                         policy: str = "medoid", refine: int = 0, model_fingerprint: str = "",
                         meta: dict[str, Any] | None = None,
                         medoid: int | None = None) -> Reference:
    """A :class:`Reference` from embedded demos (``embed_demo`` dicts) of one activity.

    ``labels`` names each demo in the meta (file paths, seeds). ``policy`` is one of
    :data:`POLICIES`; one demo is used as it is, whatever the policy. ``medoid`` forces
    the timeline demo of the medoid policy; ``meta["medoid_index"]`` says which it was.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, found {policy!r}")
    if not demos:
        raise ReferenceBuildError("no demo given")
    meta = dict(meta or {})
    if policy == "first" or len(demos) == 1:
        base = demos[0]
        embeddings = base["embeddings"]
        meta.update(demo=str(labels[0]), policy="first demo" if len(demos) > 1 else
                    "single demo",
                    other_demos=[{"file": str(lab), "frames": len(d["embeddings"]),
                                  "dtw_cost_to_first": _compare(base["embeddings"],
                                                                d["embeddings"])}
                                 for lab, d in zip(labels[1:], demos[1:], strict=True)])
    else:
        embeddings, medoid, info = average_demos([d["embeddings"] for d in demos], refine,
                                                 medoid)
        base = demos[medoid]
        meta.update(
            demo=str(labels[medoid]), medoid_index=medoid, policy="medoid average",
            policy_detail=(f"DTW average (DBA, {info['refine']} refinement rounds) of "
                           f"{len(demos)} demos on the medoid's timeline"),
            demos=[{"file": str(lab), "frames": len(d["embeddings"]),
                    "medoid": k == medoid,
                    "dtw_cost_to_medoid": info["cost_to_medoid"][k],
                    "dtw_cost_to_average": info["cost_to_average"][k]}
                   for k, (lab, d) in enumerate(zip(labels, demos, strict=True))],
            pairwise_dtw_cost=info["pairwise_cost"])
    return Reference(name=name, activity=activity, embeddings=embeddings,
                     phases=base["phases"], phase_names=list(phase_names), times=base["times"],
                     fps=fps, model_fingerprint=model_fingerprint, meta=meta,
                     **phase_filter_members(demos, len(phase_names)))


def phase_filter_members(demos: Sequence[dict[str, Any]], phases: int) -> dict[str, Any]:
    """What the aligner's phase filter keeps of several demos (masa_rt.align.phase_filter):
    every demo frame as an exemplar, where each demo starts, and each phase's mean length.
    One demo: nothing, its frames are the reference's own."""
    if len(demos) < 2:
        return {}
    lengths = [np.bincount(d["phases"], minlength=phases) for d in demos]
    sizes = [len(d["embeddings"]) for d in demos]
    return {"exemplar_embeddings": np.concatenate([d["embeddings"] for d in demos]),
            "exemplar_phases": np.concatenate([d["phases"] for d in demos]),
            "exemplar_starts": np.cumsum([0, *sizes[:-1]]),
            "phase_frames": np.mean(lengths, axis=0)}


def with_raw_baseline(ref: Reference, demos: Sequence[dict[str, Any]],
                      labels: Sequence[str], policy: str = "medoid",
                      refine: int = 0) -> Reference:
    """``ref`` with ``raw_embeddings``: the same demos' model input rows (``embed_demo``
    dicts), unit length, averaged by the same policy on the same timeline (the learned
    reference's medoid), so ``masa-rt score`` runs the raw-keypoint baseline on exactly
    the reference the engine uses."""
    raw_demos = [{**d, "embeddings": raw_embedding(d["inputs"])} for d in demos]
    raw = reference_from_demos(raw_demos, ref.phase_names, activity=ref.activity, name=ref.name,
                               fps=ref.fps, labels=labels, policy=policy, refine=refine,
                               medoid=ref.meta.get("medoid_index"))
    return replace(ref, raw_embeddings=raw.embeddings)


def with_phase_decoder(ref: Reference, demos: Sequence[dict[str, Any]], spec: InputSpec,
                       options: Mapping[str, Any] | None = None) -> Reference:
    """``ref`` with a phase decoder trained on the labels of ``demos`` (``embed_demo``
    dicts). ``options``: fields of ``trainer.phase_decoder.DecoderConfig`` to change
    (``steps``, ``hidden``, ``edit_prob`` ...; a None value keeps the default);
    ``{"steps": 0}`` returns ``ref`` unchanged.

    Training needs torch and the trainer's augmentation: imported here, so the serving
    path, which only reads the decoder's weights, never imports them.
    """
    from trainer.phase_decoder import decoder_config, train_phase_decoder

    cfg = decoder_config(options)
    if cfg.steps <= 0:
        return ref
    if not spec.uses_joints or spec.feature_dim:
        log.warning("reference %s: no phase decoder (it reads skeletons only; the model's "
                    "input is %s)", ref.name, spec.input_kind)
        return ref

    trained, about = [], []
    for i in range(cfg.members):  # an ensemble's members differ in their seed only
        member = replace(cfg, seed=cfg.seed + i)
        which = f" {i + 1}/{cfg.members}" if cfg.members > 1 else ""
        # A bar with the time left: a decoder takes minutes. On stderr; where that is no
        # terminal (a log file) an update every 30 s instead of every second.
        with tqdm(total=cfg.steps, desc=f"phase decoder{which}", unit="step",
                  mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:

            def report(step: int, loss: float, bar: tqdm = bar) -> None:
                bar.update(step + 1 - bar.n)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

            trained.append(train_phase_decoder([(d["joints"], d["phases"]) for d in demos],
                                               spec, len(ref.phase_names), member,
                                               progress=report))
        about.append({"steps": cfg.steps, "hidden": cfg.hidden, "layers": cfg.layers,
                      "edit_prob": cfg.edit_prob, "lookahead": cfg.lookahead,
                      "demos": len(demos), "retime": cfg.retime is not None,
                      "bone_jitter": cfg.bone_jitter, "finger_jitter": cfg.finger_jitter,
                      "seed": member.seed})
    meta = dict(ref.meta, phase_decoder=about[0] if len(about) == 1 else {"members": about})
    return replace(ref, decoder=DecoderEnsemble(trained), meta=meta)


def decoder_members_meta(ref: Reference) -> list[dict[str, Any]]:
    """How each of ``ref``'s phase decoders was trained (``meta["phase_decoder"]``: one
    dict, or ``{"members": [dict, ...]}`` for an ensemble); [] without a decoder, an
    empty dict per member where the file does not say."""
    about = ref.meta.get("phase_decoder")
    if ref.decoder is None:
        return []
    if not isinstance(about, dict):
        return [{} for _ in range(ref.decoder.size)]
    return list(about["members"]) if "members" in about else [about]


def ensemble_references(paths: Sequence[str | os.PathLike[str]],
                        out_path: str | os.PathLike[str]) -> Reference:
    """One reference whose phase decoder is the ensemble of the decoders of ``paths``:
    references of one demo built apart (``reference build`` with other seeds or decoder
    options, possibly on other machines). They must agree on everything but their
    decoders: model, phases, times, and embeddings to 1e-4 (a model's embeddings of one
    demo differ in the last bits between machines); the first gives the rest."""
    if len(paths) < 2:
        raise ReferenceBuildError("reference ensemble: give two or more references")
    check_output_path(out_path, list(paths), replaceable=("a reference", _replaceable))
    refs = [Reference.load(p) for p in paths]
    first = refs[0]
    for p, r in zip(paths[1:], refs[1:], strict=True):
        same = (r.model_fingerprint == first.model_fingerprint
                and r.phase_names == first.phase_names
                and r.embeddings.shape == first.embeddings.shape
                and np.allclose(r.embeddings, first.embeddings, rtol=0.0, atol=1e-4)
                and np.array_equal(r.phases, first.phases)
                and np.array_equal(r.times, first.times))
        if not same:
            raise ReferenceBuildError(
                f"{p}: not the same reference as {paths[0]} (model, embeddings, phases or "
                "times differ); an ensemble combines decoders of one reference")
    missing = [str(p) for p, r in zip(paths, refs, strict=True) if r.decoder is None]
    if missing:
        raise ReferenceBuildError(f"no phase decoder in {', '.join(missing)}")
    try:
        decoder = DecoderEnsemble([m for r in refs for m in r.decoder.members])
    except PhaseDecoderError as e:
        raise ReferenceBuildError(f"reference ensemble: {e}") from None
    about = [m for r in refs for m in decoder_members_meta(r)]
    meta = dict(first.meta, phase_decoder={"members": about},
                ensemble_of=[str(p) for p in paths])
    ref = replace(first, decoder=decoder, meta=meta)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    ref.save(out_path)
    return ref


def check_same_activity(seqs: Sequence[PoseSequence], labels: Sequence[str],
                        default: str) -> str:
    """The demos' one activity (``default`` where unnamed); refuses a mix."""
    activity = seqs[0].activity or default
    for lab, s in zip(labels[1:], seqs[1:], strict=True):
        if (s.activity or activity) != activity:
            raise ReferenceBuildError(f"{lab}: activity {s.activity!r}, the first demo is "
                                      f"{activity!r}; one reference per activity")
        if None not in (s.phase_names, seqs[0].phase_names) and (
                list(s.phase_names) != list(seqs[0].phase_names)):  # missing: embed_demo says
            raise ReferenceBuildError(f"{lab}: phases {list(s.phase_names or [])}, the "
                                      f"first demo has {list(seqs[0].phase_names or [])}")
    return activity


def _replaceable(path: Path) -> bool:
    try:
        return is_reference_file(path)
    except ValueError:  # not an .npz at all
        return False


def build_reference(demo_paths: Sequence[str | os.PathLike[str]],
                    checkpoint_path: str | os.PathLike[str] | None,
                    out_path: str | os.PathLike[str], *, name: str | None = None,
                    policy: str = "medoid", refine: int = 0,
                    decoder: Mapping[str, Any] | None = None) -> Reference:
    """Embed the demos with the checkpoint's model and save the reference to ``out_path``.

    ``checkpoint_path``: a ``.pt`` file or a run folder; None uses the shipped model that
    reads the demos' layout (``masa_rt.shipped``).
    ``policy``: ``"medoid"`` (average of all demos on the medoid's timeline) or
    ``"first"`` (the first demo; the others are only compared). ``decoder``: how the
    reference's phase decoder is trained on all the demos' labels (``with_phase_decoder``'s
    ``options``; ``{}``: its defaults; None or ``{"steps": 0}``: no decoder, the default:
    on ordinary demos a decoder measured lower than none, see ``engine.commands``).
    """
    if not demo_paths:
        raise ReferenceBuildError("no demo given")
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, found {policy!r}")
    if refine < 0:
        raise ValueError(f"refine: expected >= 0, found {refine}")
    seqs = [load_sequence(p) for p in demo_paths]
    # no model named: the shipped one that reads the demos' layout
    ckpt = resolve_checkpoint(checkpoint_path) or default_model_path(seqs[0].layout)
    # never overwrite a demo (or any file that is not a previous reference) with the result
    check_output_path(out_path, [*demo_paths, ckpt], replaceable=("a reference", _replaceable))
    model, _cfg, spec, meta = load_model(ckpt)
    fingerprint = meta.get("model_fingerprint") or model_fingerprint(meta["path"])
    labels = [str(p) for p in demo_paths]
    activity = check_same_activity(seqs, labels, Path(demo_paths[0]).stem)
    demos = [embed_demo(model, spec, s, lab) for s, lab in zip(seqs, labels, strict=True)]
    ref = reference_from_demos(
        demos, list(seqs[0].phase_names), activity=activity, name=name or Path(out_path).stem,
        fps=spec.fps, labels=labels, policy=policy, refine=refine,
        model_fingerprint=fingerprint,
        meta={"checkpoint": str(meta["path"]), "input_spec": spec.to_dict(),
              "masa_rt_version": masa_rt.__version__})
    ref = with_raw_baseline(ref, demos, labels, policy, refine)
    check = leave_one_out(demos, list(seqs[0].phase_names), labels=labels, activity=activity,
                          fps=spec.fps, policy=policy, refine=refine)
    if check is not None:  # K >= 2: how the reference does on the user's own takes
        ref = replace(ref, meta={**ref.meta, "leave_one_out": check})
    if decoder is not None:
        ref = with_phase_decoder(ref, demos, spec, decoder)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    ref.save(out_path)
    log.info("reference %s: %s, %d frames, %s of %d demos, model %s", out_path, activity,
             len(ref), ref.meta["policy"], len(demos), fingerprint)
    return ref
