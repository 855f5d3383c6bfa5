"""CLI commands of the serving side: ``serve``, ``watch``, ``demo``, ``bench``.

``engine.commands.register`` calls :func:`register`. Every command imports its module
lazily, so ``masa-rt --help`` stays fast, and the serving commands (``serve``, ``watch``)
never import torch: when no ``--model`` is given, the shipped checkpoint is exported to
ONNX (and a demo recording embedded into a reference) in a *child* process, once, cached,
so the serving process itself stays torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from engine import worker_commands
from masa_rt.cli_types import nonnegative_int, positive_float, positive_int
from masa_rt.layout_option import add_layout_file_option

log = logging.getLogger("masa_rt.serve")

DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_PUB = "tcp://127.0.0.1:5556"
BACKENDS = ("onnxruntime", "tensorrt", "torch")
DEVICES = ("cpu", "cuda")


def backend_options(backend: str, device: str | None,
                    model: str | None = None) -> dict[str, object]:
    """What ``get_backend`` needs beyond the model for ``--device`` (None: the backend's
    own device) and ``--model``: only the torch backend has a choice of device (CUDA runs
    with CUDA graphs); ONNX Runtime here is the CPU build and TensorRT is the GPU by
    definition, so asking them for another device is an error. The torch backend runs a
    checkpoint: ``--model`` when it is one, else the shipped model."""
    if backend == "torch":
        device = device or "cpu"
        checkpoint = model if model is not None and not model.endswith(".onnx") else None
        if checkpoint is not None and Path(checkpoint).is_dir():  # a run folder
            checkpoint = str(Path(checkpoint) / "last.pt")
        return {"device": device, "cuda_graphs": device.startswith("cuda"),
                "checkpoint": checkpoint}
    wanted = {"onnxruntime": "cpu", "tensorrt": "cuda"}[backend]
    if device is not None and device != wanted:
        raise ValueError(f"--device {device} does not apply to --backend {backend} (it runs "
                         f"on {wanted}); use --backend torch --device cuda for torch on a GPU")
    return {}


def cache_dir() -> Path:
    """Where exported models are kept (``$MASA_RT_CACHE``, default ``~/.cache/masa-rt``)."""
    return Path(os.environ.get("MASA_RT_CACHE", Path.home() / ".cache" / "masa-rt"))


def shipped_onnx_path(layout: str | None = None) -> Path:
    """A shipped model's ONNX export, beside its checkpoint in masa_rt/assets (None: the
    default hand model)."""
    from masa_rt.shipped import shipped_onnx_path as path

    return path(layout)


def shipped_onnx_for(references: list[str]) -> Path | None:
    """The shipped export that built these references (by model fingerprint), or None."""
    import numpy as np

    from engine.backends import read_model_info
    from masa_rt.shipped import SHIPPED_MODELS

    wanted = set()
    for r in references:  # the fingerprint alone: Pipeline.from_files loads them whole
        with np.load(r, allow_pickle=False) as f:
            wanted.add(str(f["model_fingerprint"]))
    for layout in SHIPPED_MODELS:
        path = shipped_onnx_path(layout)
        if path.is_file() and read_model_info(path).fingerprint in wanted:
            return path
    return None


def prepare(model: str | None, references: list[str]) -> tuple[Path, list[Path]]:
    """The ONNX file and the reference files to serve.

    ``model`` ``.onnx`` is served as is, and every reference must already be built for it
    (``masa-rt reference build``). A checkpoint (``.pt`` or run folder; None = the shipped
    model) is exported to ONNX once, and any *recording* among ``references`` (e.g.
    ``examples/pour_milk.npz``) is embedded into a reference once, both cached in
    :func:`cache_dir`. That needs torch, so it runs in a child process: the serving
    process itself never imports torch.
    """
    for path in references:
        if Path(path).is_dir():
            raise ValueError(f"reference {path} is a directory: pass a reference .npz "
                             "(masa-rt reference build) or a demo recording")
        if not Path(path).is_file():
            raise FileNotFoundError(f"reference {path} not found")
    from masa_rt.align import is_reference_file

    demos = [r for r in references if not is_reference_file(r)]
    if model is None and not demos:  # the shipped export that built them: no torch
        found = shipped_onnx_for(references) or shipped_onnx_path()
        model = str(found) if found.is_file() else None
    if model is not None and model.endswith(".onnx"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"model {model} not found")
        if demos:
            raise ValueError(f"{demos[0]} is a recording, not a reference: build one for this "
                             "model with `masa-rt reference build DEMO --checkpoint CKPT -o "
                             "REF.npz`, or pass the checkpoint as --model")
        return Path(model), [Path(r) for r in references]
    _need_torch(demos[0] if demos else None, model)
    log.info("event=prepare checkpoint=%s demos=%d cache=%s", model or "shipped", len(demos),
             cache_dir())
    from masa_rt.layout_file import declared_layouts

    # the layouts declared here (--layout-file, files read so far) are declared there too
    request = json.dumps({"checkpoint": model, "demos": demos, "cache": str(cache_dir()),
                          "layouts": declared_layouts()})
    code, out, last = _run_child([sys.executable, "-c", "from engine.serve_commands import "
                                  "_prepare_in_child as p; p()", request])
    if code != 0:
        raise FileNotFoundError(f"could not prepare the model: {last or 'unknown error'}")
    answer = json.loads(out.strip().splitlines()[-1])
    built = answer["references"]
    return Path(answer["onnx"]), [Path(built.get(r, r)) for r in references]


def _need_torch(demo: str | None, checkpoint: str | None) -> None:
    """Embedding a recording or exporting a checkpoint runs torch (in the child): on a
    serving-only install say so in one line, before a child fails with an ImportError."""
    from masa_rt.extras import installed

    if installed("torch"):
        return
    what = (f"{demo} is a recording: embedding it into a reference" if demo else
            f"exporting checkpoint {checkpoint}")
    raise ValueError(f"{what} needs torch, which this serving-only install lacks: pip install "
                     "'masa-rt[train]', or build the reference (masa-rt reference build) or "
                     "export (masa-rt export) on a training machine and serve the files")


def _run_child(cmd: list[str]) -> tuple[int, str, str]:
    """Run the preparing child with its progress (stderr: the build's bar and log lines)
    shown as it comes; returns (exit code, stdout, last stderr line). A SIGTERM or
    Ctrl-C to this process stops the child too, rather than leaving it building."""
    import signal
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last: list[str] = []

    def relay() -> None:  # a bar redraws with \r: pass chunks through as they come
        for line in iter(proc.stderr.readline, ""):
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                last[:] = [line.strip().split("\r")[-1]]

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None

    def stop(signum: int, _frame: object) -> None:
        proc.terminate()
        raise SystemExit(128 + signum)

    if main:
        signal.signal(signal.SIGTERM, stop)
    try:
        out = proc.stdout.read()
        code = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM: the child goes with us
        proc.terminate()
        proc.wait()
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    reader.join(timeout=5)
    return code, out, last[0] if last else ""


def _prepare_in_child() -> None:
    """Child side of :func:`prepare` (imports torch): export, build, print JSON paths."""
    import hashlib

    from engine.export import export_cached, resolve_checkpoint
    from engine.reference import build_reference
    from masa_rt.checkpoint import default_model_path
    from masa_rt.layout_file import declare
    from masa_rt.sequence import load_sequence

    req = json.loads(sys.argv[1])
    for declaration in req.get("layouts", []):
        declare(declaration, "serve's layout declarations")
    layout = load_sequence(req["demos"][0]).layout if req["demos"] else None
    ckpt = resolve_checkpoint(req["checkpoint"]) or default_model_path(layout)
    onnx = export_cached(ckpt, req["cache"])
    refs = {}
    for demo in req["demos"]:
        key = hashlib.sha256(Path(demo).read_bytes() + ckpt.read_bytes()).hexdigest()[:24]
        out = Path(req["cache"]) / f"ref-{Path(demo).stem}-{key}.npz"
        if not out.is_file():
            build_reference([demo], ckpt, out)
        refs[demo] = str(out)
    print(json.dumps({"onnx": str(onnx), "references": refs}))


def _serve(args: argparse.Namespace) -> int:
    from engine.server import Server, ServerConfig, install_signal_handlers
    from engine.threads import limit_blas_threads

    _check_record_dir(args)  # before the model: a typo in --record should not wait for it
    metrics_at = _metrics_address(args)
    model, references = prepare(args.model, args.reference)  # refusals before any log line
    limit_blas_threads()
    # --workers N >= 2: a WorkerPool in front of N engine processes (engine/workers.py)
    pipeline, close_engine = worker_commands.serve_engine(args, model, references)
    config = ServerConfig(bind=args.bind, pub_bind=args.pub, max_sessions=args.max_sessions,
                          max_sessions_per_client=args.max_sessions_per_client,
                          idle_timeout_s=args.idle_timeout, keydir=args.secure)
    metrics = _metrics(metrics_at)
    server = Server(pipeline, config, recorder=_recorder(args), metrics=metrics)
    install_signal_handlers(server)
    try:
        server.run()
    finally:
        close_engine()
        if metrics is not None:
            metrics.close()
    print(server.report())
    return 0


def _metrics_address(args: argparse.Namespace) -> tuple[str, int] | None:
    from engine.metrics import parse_address

    return None if args.metrics is None else parse_address(args.metrics)


def _metrics(address: tuple[str, int] | None):
    """``--metrics HOST:PORT``: the Prometheus endpoint (engine.metrics), or None."""
    if address is None:
        return None
    from engine.metrics import MetricsEndpoint

    host, port = address
    endpoint = MetricsEndpoint(host, port)
    log.info("event=metrics url=http://%s:%d/metrics", host, endpoint.port)
    return endpoint


def _recorder(args: argparse.Namespace):
    """``--record DIR``: a SessionRecorder (engine.recorder), or None."""
    if args.record is None:
        return None
    from engine.recorder import SessionRecorder

    return SessionRecorder(args.record, max_frames=args.record_max_frames)


def _check_record_dir(args: argparse.Namespace) -> None:
    """``--record DIR`` must be a folder we can write (not created: a typo would be)."""
    folder = Path(args.record) if args.record is not None else None
    if folder is not None and (not folder.is_dir() or not os.access(folder, os.W_OK)):
        raise ValueError(f"--record {folder}: not a writable folder (create it first)")


def _watch(args: argparse.Namespace) -> int:
    from engine.watch import WatchConfig, watch

    curve = None
    if args.secure is not None:
        from engine.security import load_client_keys

        curve = load_client_keys(args.secure, args.key)
    cfg = WatchConfig(address=args.address, session=args.session,
                      clock_offset=args.clock_offset, curve=curve, operator=args.operator)
    return watch(cfg, duration=args.duration)


def _demo(args: argparse.Namespace) -> int:
    from engine.demo import EXAMPLES, DemoConfig, run_demo

    # The shipped reference was built by the shipped model: another --model gets the demo
    # recording, embedded by that model, unless --reference says otherwise.
    reference = args.reference or (EXAMPLES / "demos" / "pour_milk.npz" if args.model else None)
    return run_demo(DemoConfig(duration=args.duration, watch=not args.no_watch,
                               seed=args.seed, model=args.model, backend=args.backend,
                               **({"reference": reference} if reference else {})))


def _bench(args: argparse.Namespace) -> int:
    from engine.bench import BenchConfig, run_bench

    cfg = BenchConfig(streams=tuple(args.streams), backends=tuple(args.backend or
                      ("onnxruntime",)), iters=args.iters, model=args.model, device=args.device,
                      # None: the recording, embedded by --model (the shipped reference
                      # fits only the shipped model)
                      **({"reference": args.reference} if args.reference or args.model
                         else {}),
                      e2e_clients=args.e2e_clients, rate_hz=args.rate, seconds=args.seconds,
                      casa=not args.no_casa, out=args.out, plot=args.plot,
                      workers=args.workers)
    return run_bench(cfg)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``watch``, ``demo`` and ``bench`` to the masa-rt parser."""
    p = subparsers.add_parser("serve", help="serve pose streams over ZeroMQ")
    p.add_argument("--reference", action="append", required=True, metavar="NPZ",
                   help="reference recording (repeat for several activities)")
    add_layout_file_option(p)
    p.add_argument("--model", help="ONNX file or checkpoint (default: the shipped model)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--device", choices=DEVICES,
                   help="where the torch backend runs (default cpu; cuda: with CUDA graphs)")
    p.add_argument("--bind", default=DEFAULT_BIND, help="ROUTER endpoint for headsets")
    p.add_argument("--pub", default=DEFAULT_PUB, help="PUB endpoint for dashboards")
    p.add_argument("--max-sessions", type=positive_int, default=256)
    p.add_argument("--max-sessions-per-client", type=positive_int, default=16, metavar="N",
                   help="sessions one client may hold (its CURVE key with --secure, "
                        "else its connection)")
    p.add_argument("--idle-timeout", type=positive_float, default=10.0, metavar="S")
    p.add_argument("--secure", metavar="KEYDIR",
                   help="CURVE encryption + client allow-list (docs/security.md)")
    p.add_argument("--record", metavar="DIR",
                   help="write each session's frames to DIR/<started>_<session>.npz when it "
                        "ends (with --secure: DIR/<key id>/...); docs/serving.md")
    p.add_argument("--record-max-frames", type=positive_int, default=54_000, metavar="N",
                   help="frames kept per recorded session (default 54000: 10 min at 90 Hz); "
                        "later ones are counted, not recorded")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve the stats counters and latency for Prometheus at "
                        "http://HOST:PORT/metrics (plain HTTP, no authentication: give a "
                        "loopback address; default: not served)")
    worker_commands.add_serve_options(p)
    p.set_defaults(func=_serve)
    worker_commands.register(subparsers)

    p = subparsers.add_parser("watch", help="live terminal dashboard of the estimates")
    p.add_argument("session", nargs="?", help="one session id (default: all)")
    p.add_argument("--address", default=DEFAULT_PUB, help="the server's PUB endpoint")
    p.add_argument("--duration", type=positive_float, metavar="S", help="stop after S seconds")
    p.add_argument("--clock-offset", type=float, metavar="S",
                   help="server-minus-headset clock offset (0 on one machine): e2e latency")
    p.add_argument("--secure", metavar="KEYDIR",
                   help="the server runs --secure: connect with the CURVE key --key NAME")
    p.add_argument("--key", default="dashboard", metavar="NAME",
                   help="with --secure: KEYDIR/private/NAME.key_secret")
    p.add_argument("--operator", action="store_true",
                   help="with --secure: NAME is an operator key, show every client's "
                        "sessions (else only NAME's own)")
    p.set_defaults(func=_watch)

    p = subparsers.add_parser("demo", help="server + simulated headset + dashboard")
    p.add_argument("--duration", type=positive_float, metavar="S", help="stop after S seconds")
    p.add_argument("--no-watch", action="store_true", help="no dashboard, summary only")
    p.add_argument("--seed", type=int, default=7, help="seed of the held-out performance")
    p.add_argument("--model", help="ONNX file or checkpoint (default: the shipped model)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--reference", type=Path, metavar="NPZ",
                   help="reference or recording (default: the shipped examples/pour_milk.npz)")
    p.set_defaults(func=_demo)

    p = subparsers.add_parser("bench", help="engine, end-to-end and floor latency benchmark")
    p.add_argument("--out", default=None, metavar="JSON",
                   help="also write the results as JSON (default: print only)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw latency against streams (default: none)")
    p.add_argument("--streams", type=positive_int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="backend(s) to bench (repeat; default onnxruntime)")
    p.add_argument("--device", choices=DEVICES,
                   help="where the torch backend runs (default cpu; cuda: with CUDA graphs)")
    p.add_argument("--iters", type=positive_int, default=300, help="engine steps per stream count")
    p.add_argument("--model", help="ONNX file or checkpoint (default: the shipped model)")
    p.add_argument("--reference", metavar="NPZ",
                   help="reference or recording (default: the shipped examples/pour_milk.npz)")
    p.add_argument("--e2e-clients", type=nonnegative_int, default=8, metavar="N")
    p.add_argument("--rate", type=positive_float, default=90.0, metavar="HZ")
    p.add_argument("--seconds", type=positive_float, default=10.0, metavar="T")
    p.add_argument("--no-casa", action="store_true", help="skip the torch baseline")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="run the engine and end-to-end parts against N engine worker "
                        "processes, as serve --workers N (default 1: in this process)")
    p.set_defaults(func=_bench)
