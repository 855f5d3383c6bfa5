"""What a client that opens and closes sessions as fast as it can costs everyone else.

    python benchmarks/hello_churn.py                 # 20 s: 10 quiet, 10 under churn
    python benchmarks/hello_churn.py --pairs-per-s 700   # the rate issue 31 measured

A real ``masa-rt serve`` (its own process, the shipped model and pour_milk reference); one
good headset (``clients.replay``, 30 Hz, in a second process) streams throughout; a churner
sends hello/bye pairs back to back from one connection for the second half. Printed: the
good headset's capture -> estimate latency p50/p99 without and with the churn, and what the
server did with the churner's hellos (accepted, refused by reason). Prints only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_server import DEMO, ServerProcess, prepare_model  # noqa: E402

from masa_rt import protocol as P  # noqa: E402


def good_headset(address: str, seconds: float, out: mp.Queue) -> None:
    """30 Hz replay; (received time, latency) of every answer."""
    from clients.replay import replay

    seen: list[tuple[float, float]] = []
    replay(DEMO, address, rate_hz=30.0, loop=True, duration=seconds, reference="pour_milk",
           session_prefix="good", on_estimate=lambda _i, e: seen.append((e.t_received,
                                                                         e.latency)))
    out.put(seen)


def churn(address: str, seconds: float, pairs_per_s: float | None) -> Counter:
    """hello/bye pairs from one connection, fresh session ids: ``pairs_per_s`` (None: as
    fast as this process can send)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    answers: Counter = Counter()
    start = time.perf_counter()
    end, k = start + seconds, 0
    while time.perf_counter() < end:
        if pairs_per_s is not None and time.perf_counter() < start + k / pairs_per_s:
            time.sleep(0.0005)
            continue
        sid = f"churn-{k}"
        sock.send(P.encode(P.hello(sid, "h2o_hands", 30.0, time.perf_counter())))
        sock.send(P.encode(P.bye(sid)))
        k += 1
        while sock.poll(0):
            msg = P.decode(sock.recv())
            answers[msg["type"] if msg["type"] != "error" else f"error:{msg['reason']}"] += 1
    time.sleep(0.5)
    while sock.poll(100):
        msg = P.decode(sock.recv())
        answers[msg["type"] if msg["type"] != "error" else f"error:{msg['reason']}"] += 1
    answers["hellos_sent"] = k
    sock.close()
    return answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quiet-seconds", type=float, default=10.0)
    ap.add_argument("--churn-seconds", type=float, default=10.0)
    ap.add_argument("--pairs-per-s", type=float, default=None,
                    help="pace the churn (default: flat out; 700 is the rate issue 31 saw)")
    args = ap.parse_args()
    onnx, ref, what = prepare_model()
    server = ServerProcess(onnx, ref)
    try:
        total = args.quiet_seconds + args.churn_seconds
        out: mp.Queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=good_headset,
                                               args=(server.address, total, out))
        proc.start()
        time.sleep(args.quiet_seconds + 1.0)  # +1: the headset's start-up
        t_churn = time.perf_counter()
        answers = churn(server.address, args.churn_seconds, args.pairs_per_s)
        seen = out.get(timeout=total + 60)
        proc.join()
    finally:
        server.stop()
    if not seen:
        raise SystemExit("the good headset got no answers")
    quiet = np.array([lat for t, lat in seen if t < t_churn]) * 1e3
    busy = np.array([lat for t, lat in seen if t_churn <= t < t_churn + args.churn_seconds])
    busy *= 1e3
    print(f"model: {what}")
    for name, lat in (("quiet", quiet), ("under churn", busy)):
        print(f"good headset, {name:<11}: {len(lat)} answers, latency p50 "
              f"{np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms")
    rate = answers["hellos_sent"] / args.churn_seconds
    print(f"churner: {answers['hellos_sent']} hello/bye pairs ({rate:.0f}/s); answers "
          f"{dict(sorted((k, v) for k, v in answers.items() if k != 'hellos_sent'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
