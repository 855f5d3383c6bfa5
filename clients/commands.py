"""CLI commands contributed by clients (see masa_rt.cli): ``replay``, ``export-raw``, ``web``.

Handlers import their modules lazily so ``masa-rt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from masa_rt.cli_types import check_output_path, positive_float, positive_int
from masa_rt.layout_option import add_layout_file_option, layout_files


def _replay(args: argparse.Namespace) -> int:
    from clients.replay import replay, write_report

    if args.json:  # before the replay, not after a minute of it
        folder = check_output_path(args.json, [args.file]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"--json {args.json}: cannot write into {folder}")
    report = replay(args.file, address=args.address, rate_hz=args.rate, clients=args.clients,
                    loop=args.loop, duration=args.duration, reference=args.reference,
                    layout_declaration=_declared_layout(args))
    print(report.summary())
    if args.json:
        write_report(report, args.json)
    return 0 if report.unanswered == 0 else 1


def _declared_layout(args: argparse.Namespace) -> dict | None:
    """The declaration (--layout-file) of the recording's layout, sent in each hello; None:
    the file's own, if it carries one."""
    if not layout_files(args):
        return None
    from clients.replay import load_recording
    from masa_rt.layout_file import declaration_of

    return declaration_of(load_recording(args.file).layout)


def _export_raw(args: argparse.Namespace) -> int:
    from clients.export_raw import export_raw

    print(export_raw(args.file, args.out))
    return 0


def _add_replay(subparsers) -> None:
    p = subparsers.add_parser("replay", help="simulated headsets: stream a recording in real time")
    p.add_argument("file", help="a .npz sequence (joints, layout, fps)")
    p.add_argument("--address", default="tcp://127.0.0.1:5555", help="server ROUTER endpoint")
    p.add_argument("--rate", type=positive_float, default=None, metavar="HZ",
                   help="frames per second per client (default: the file's fps)")
    p.add_argument("--clients", type=positive_int, default=1, metavar="N",
                   help="simultaneous headsets")
    p.add_argument("--loop", action="store_true", help="repeat the recording (needs --duration)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S s")
    p.add_argument("--reference", default=None, help="reference activity to align against")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the report")
    add_layout_file_option(p)
    p.set_defaults(func=_replay)


def _add_export_raw(subparsers) -> None:
    p = subparsers.add_parser("export-raw", help="write a .npz sequence as .masaraw for C++")
    p.add_argument("file", help="a .npz sequence")
    p.add_argument("out", help="output .masaraw file")
    p.set_defaults(func=_export_raw)


def _web(args: argparse.Namespace) -> int:
    try:
        from clients.web.serve import serve
    except ImportError as exc:  # the [web] extra is not installed
        raise ValueError(f"masa-rt web needs the web extra: pip install 'masa-rt[web]' "
                         f"({exc})") from None
    from clients.web.config import GatewayConfig

    cfg = GatewayConfig(server=args.server, pub=args.pub, host=args.host, port=args.port,
                        token_file=args.token_file, keydir=args.secure, key_name=args.key_name,
                        certfile=args.certfile, keyfile=args.keyfile,
                        **({"recordings": args.recordings} if args.recordings else {}))
    return serve(cfg)


def _add_web(subparsers) -> None:
    p = subparsers.add_parser("web", help="browser gateway: operator dashboard and WebXR "
                                          "headset page on a running server")
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="server ROUTER endpoint")
    p.add_argument("--pub", default="tcp://127.0.0.1:5556", help="server PUB endpoint")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free one)")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="browsers must present a token listed here ('NAME TOKEN' lines)")
    p.add_argument("--secure", type=Path, metavar="KEYDIR",
                   help="the server runs --secure: connect with the gateway's CURVE key "
                        "(an operator key: masa-rt keys new web --operator)")
    p.add_argument("--key-name", default="web",
                   help="the gateway's key, KEYDIR/private/NAME.key_secret (default web)")
    p.add_argument("--recordings", type=Path, metavar="DIR",
                   help="recordings the headset page may replay (default examples/demos)")
    p.add_argument("--certfile", type=Path, help="HTTPS certificate (WebXR off localhost)")
    p.add_argument("--keyfile", type=Path, help="HTTPS private key")
    p.set_defaults(func=_web)


def _lsl(args: argparse.Namespace) -> int:
    import signal
    import threading

    from clients.lsl_bridge import LslBridge

    prop, value = next((k, v) for k, v in (("name", args.name), ("type", args.type),
                                           ("source_id", args.source_id)) if v is not None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, say bye, report
        signal.signal(sig, lambda *_: stop.set())
    curve = None
    if args.secure is not None:  # read as any client's keys are (docs/security.md)
        from clients.web.keys import load_gateway_keys

        curve = load_gateway_keys(args.secure, args.key_name)
    bridge = LslBridge(prop, value, args.address, layout=args.layout, fps=args.fps,
                       reference=args.reference, session=args.session, curve=curve,
                       resolve_timeout=args.resolve_timeout)
    with bridge:
        report = bridge.run(duration=args.duration, stop=stop)
    print(report.summary(bridge.outlet))
    return 0


def _add_lsl(subparsers) -> None:
    p = subparsers.add_parser("lsl", help="bridge an LSL pose stream to the server; estimates "
                                          "back out as LSL streams (needs masa-rt[lsl])")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", help="the LSL pose stream's name")
    which.add_argument("--type", help="... or its type (e.g. Mocap), if only one has it")
    which.add_argument("--source-id", help="... or its source id")
    p.add_argument("--address", default="tcp://127.0.0.1:5555", help="server ROUTER endpoint")
    p.add_argument("--layout", default=None,
                   help="masa-rt layout of the channels (default: from the channel labels, "
                        "e.g. l_wrist_x; required for unlabelled channels)")
    p.add_argument("--fps", type=positive_float, default=None, metavar="HZ",
                   help="frame rate (default: the stream's nominal rate)")
    p.add_argument("--reference", default=None, help="reference activity to align against")
    p.add_argument("--session", default=None, help="session id (default: a random one)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S s (default: until Ctrl-C)")
    p.add_argument("--resolve-timeout", type=positive_float, default=5.0, metavar="S",
                   help="how long to look for the LSL stream (default 5 s)")
    p.add_argument("--secure", type=Path, metavar="KEYDIR",
                   help="the server runs --secure: connect with the client key --key-name")
    p.add_argument("--key-name", default="lsl",
                   help="this bridge's key, KEYDIR/private/NAME.key_secret (default lsl)")
    p.set_defaults(func=_lsl)


# ---- watch: the live terminal dashboard (``masa-rt watch [SESSION]``) goes here, as
# ---- ``_add_watch(subparsers)`` built on clients.inlet.EstimateInlet, and is called below.


def register(subparsers) -> None:
    """Add this package's subcommands to the masa-rt parser."""
    _add_replay(subparsers)
    _add_export_raw(subparsers)
    _add_lsl(subparsers)
    _add_web(subparsers)
