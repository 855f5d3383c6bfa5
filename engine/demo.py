"""``masa-rt demo``: the whole system on one machine, scored against exact ground truth.

A server (in-process thread) with the shipped model and the ``examples/pour_milk.npz``
reference; a simulated headset replaying a *held-out* synthetic pour, generated now with a
pause and a repeated phase (so the aligner has to hold still and go back); the dashboard on
the PUB stream. Because the pour is synthetic, every frame's true phase and canonical time
are known, so the demo ends with honest numbers: phase accuracy, progress error, latency.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients.inlet import Estimate, EstimateInlet
from clients.replay import ReplayReport, replay
from engine.server import Server, ServerConfig
from engine.watch import Dashboard, WatchConfig
from masa_rt.metrics import streaming_summary
from masa_rt.sequence import Sequence, save_sequence
from masa_rt.shipped import examples_dir
from masa_rt.synth import Perturbation, generate

__all__ = ["DemoConfig", "DemoScore", "held_out_performance", "run_demo", "score"]

log = logging.getLogger("masa_rt.demo")

EXAMPLES = examples_dir()  # the clone's examples/, or the copy a wheel installs


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; defaults are the README's ``masa-rt demo``."""

    activity: str | None = None  # None: the reference's own (run_demo reads it)
    # The shipped reference, built from examples/demos/pour_milk.npz by the shipped model; a
    # recording (joints) works too and is embedded once for ``model``.
    reference: Path = EXAMPLES / "pour_milk.npz"
    seed: int = 7  # of the held-out performance: not a seed the training or examples use
    pause_phase: int = 3  # hold still halfway through this phase ...
    pause_seconds: float = 1.5
    repeat_phase: int = 1  # ... and redo this one
    duration: float | None = None  # None: until the replay ends
    watch: bool = True
    model: str | None = None  # ONNX or checkpoint; None: the shipped model
    backend: str = "onnxruntime"


@dataclass(frozen=True)
class DemoScore:
    """The demo's verdict, per frame matched by seq against the generator's ground truth."""

    frames: int
    answered: int
    phase_accuracy: float  # reported phase name == true phase name
    progress_mae: float  # |reported overall progress - canonical time|
    latency_p50_ms: float
    latency_p99_ms: float
    lag: int = 0  # lookahead: answers describe the frame this many before theirs
    scored: int = 0  # answered frames with a described frame (all but the first ``lag``)

    def lines(self) -> list[str]:
        lag = ([f"lookahead         {self.lag} frames: each answer scored against the frame "
                f"it describes ({self.scored} scored)"] if self.lag else [])
        return [f"frames answered   {self.answered}/{self.frames}", *lag,
                f"phase accuracy    {self.phase_accuracy * 100:.1f} %",
                f"progress MAE      {self.progress_mae:.3f}",
                f"latency p50/p99   {self.latency_p50_ms:.2f} / {self.latency_p99_ms:.2f} ms "
                "(capture -> estimate received)"]


def reference_activity(path: Path) -> str:
    """The activity a reference (or labelled recording) names: the one the demo performs."""
    with np.load(path, allow_pickle=False) as f:
        if "activity" not in f.files:
            raise ValueError(f"{path}: names no activity, so the demo cannot tell what to "
                             "perform")
        return str(f["activity"])


def held_out_performance(cfg: DemoConfig) -> Sequence:
    """A fresh synthetic performance of ``cfg.activity`` with a pause and a repeated phase
    (both moved inside the activity's phases), exact labels included."""
    from masa_rt.synth import ACTIVITIES

    if cfg.activity not in ACTIVITIES:
        raise ValueError(f"the demo performs synthetic activities ({', '.join(ACTIVITIES)}); "
                         f"the reference is {cfg.activity!r}: score your own recordings "
                         "with `masa-rt score` or stream them with `masa-rt replay`")
    last = len(ACTIVITIES[cfg.activity].phase_names) - 1
    rng = np.random.default_rng([cfg.seed, 0xDE30])
    perturb = Perturbation(pause_phase=min(cfg.pause_phase, last), pause_seconds=cfg.pause_seconds,
                           repeat_phase=min(cfg.repeat_phase, last))
    return generate(cfg.activity, rng, perturb=perturb, subject=f"demo{cfg.seed}")


def score(truth: Sequence, estimates: dict[int, Estimate], report: ReplayReport,
          lag: int = 0) -> DemoScore:
    """Compare each answered frame (by seq = frame index) with the generator's labels.

    Unanswered frames are not scored but show in ``answered``; a frame answered while the
    aligner is still ``waiting`` counts as a wrong phase (no free points for silence).
    ``lag``: frames each answer lags (references with lookahead): the answer to frame s
    is scored against frame s - lag's labels.
    """
    names = list(truth.phase_names)
    answered = sum(1 for s in estimates if 0 <= s < truth.num_frames)
    seqs = sorted(s for s in estimates if lag <= s < truth.num_frames)
    if not seqs:
        return DemoScore(report.sent, answered, 0.0, float("nan"), float("nan"),
                         float("nan"), lag, 0)
    # The one scorer (as `masa-rt score` and the harness): phases as ids of the truth's
    # names (a name the truth lacks, or "waiting", is -1: wrong), progress as given.
    ids = {n: i for i, n in enumerate(names)}
    described = np.array(seqs) - lag
    pred = np.array([ids.get(estimates[s].phase_name, -1) for s in seqs])
    prog = np.array([estimates[s].progress for s in seqs], dtype=float)
    r = streaming_summary([np.asarray(truth.phases)[described]], [pred],
                          [np.asarray(truth.canonical_time, dtype=float)[described]], [prog])
    return DemoScore(report.sent, answered, r["phase_acc_pct"] / 100,
                     r["progress_mae_pct"] / 100, report.latency_ms(50),
                     report.latency_ms(99), lag, len(seqs))


def build_pipeline(cfg: DemoConfig):
    """The engine for the demo: shipped (or given) model, one reference, chosen backend."""
    from engine.pipeline import Pipeline
    from engine.serve_commands import backend_options, prepare
    from engine.threads import limit_blas_threads

    limit_blas_threads()  # as `masa-rt serve` runs
    model, refs = prepare(cfg.model, [str(cfg.reference)])
    return Pipeline.from_files(model, refs, backend=cfg.backend,
                               **backend_options(cfg.backend, None, cfg.model))


def run_demo(cfg: DemoConfig, pipeline=None) -> int:
    """Run server, headset and dashboard; print the score. ``pipeline`` overrides the
    shipped engine (tests). Returns the exit status (0)."""
    if not cfg.reference.is_file():
        raise FileNotFoundError(f"reference {cfg.reference} not found (see examples/README.md"
                                " to rebuild the examples)")
    if cfg.activity is None:
        cfg = dataclasses.replace(cfg, activity=reference_activity(cfg.reference))
    truth = held_out_performance(cfg)  # before the pipeline: a refusal costs no export
    pipeline = pipeline if pipeline is not None else build_pipeline(cfg)
    server = Server(pipeline, ServerConfig(bind="tcp://127.0.0.1:0",
                                           pub_bind="tcp://127.0.0.1:0"))
    estimates: dict[int, Estimate] = {}
    with tempfile.TemporaryDirectory() as tmp, server:
        path = Path(tmp) / "held_out_pour.npz"
        save_sequence(path, truth)
        stop = threading.Event()
        dash = _start_dashboard(server.pub_address, stop) if cfg.watch else None
        try:
            report = replay(path, server.address, rate_hz=truth.fps, duration=cfg.duration,
                            reference=cfg.activity, session_prefix="demo",
                            on_estimate=lambda _i, e: estimates.__setitem__(e.seq, e))
        finally:
            stop.set()
            if dash is not None:
                dash.join(5.0)
    # Lookahead references answer each frame with the user of L model frames before.
    lag = round(getattr(pipeline, "lookahead", 0) * truth.fps / pipeline.spec.fps)
    result = score(truth, estimates, report, lag)
    last = len(truth.phase_names) - 1
    print("\n".join([f"masa-rt demo: held-out {cfg.activity} (pause in phase "
                     f"{truth.phase_names[min(cfg.pause_phase, last)]}, "
                     f"{truth.phase_names[min(cfg.repeat_phase, last)]} repeated)",
                     *result.lines(), report.summary()]))
    return 0


def _start_dashboard(address: str, stop: threading.Event) -> threading.Thread:
    """The dashboard in a thread on the PUB stream: what ``masa-rt watch`` would show."""
    def run() -> None:
        with EstimateInlet(address) as inlet:
            Dashboard(WatchConfig(address, clock_offset=0.0)).run(inlet, stop=stop)

    thread = threading.Thread(target=run, name="masa-rt-dashboard", daemon=True)
    thread.start()
    return thread
