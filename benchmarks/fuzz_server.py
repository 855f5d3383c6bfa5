"""Fuzz a real `masa-rt serve` with >= 100k hostile messages while a good headset streams.

    python benchmarks/fuzz_server.py [--messages 100000] [--rate 1500] [--json fuzz.json]

The server runs in its own process (``python -m masa_rt.cli serve``: the real ONNX
pipeline), with the shipped model when ``masa_rt/assets/masa_hands_causal.pt`` exists, else
a random model of the shipped size (d_model 64, window 16), exported once and cached.
Then, in one run:

1. **baseline**: one good session streams a demo recording at 30 Hz alone;
2. **fuzz**: ``--workers`` processes send ``--messages`` hostile messages in total, paced
   at ``--rate`` msg/s, from a mix of generators (random bytes, truncated msgpack, wrong
   versions/types, mistyped fields, bad dtypes and shapes, inf joints and NaN stamps,
   oversized payloads, duplicate/out-of-order seq, unknown sessions, multipart garbage,
   bad hellos, NaN poses, and one session flooding frames at 30x its declared rate), while
   the good session keeps streaming; a few messages over ``ZMQ_MAXMSGSIZE`` go on side
   sockets (libzmq cuts those links: no reply, not counted by the server);
3. **after**: the good session alone again.

Every hostile message expects exactly one reply; the workers tally what they expected and
what came back, and the script reconciles that with the server's own counters
(``rejected.<reason>``). Output: messages tried, rejections by reason, whether the server is
alive, and the good session's latency p50/p99 per phase. Exit 1 if anything does not add up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients import PoseOutlet  # noqa: E402
from masa_rt import protocol as P  # noqa: E402

DEMO = ROOT / "examples" / "demos" / "pour_milk.npz"
SHIPPED = ROOT / "masa_rt" / "assets" / "masa_hands_causal.pt"
SHAPE = (42, 3)
ZMQ_CAP = 2 * P.MAX_MESSAGE_BYTES  # ServerConfig.zmq_size_factor * the protocol cap


# --------------------------------------------------------------------------- the server


def prepare_model(cache: Path | None = None) -> tuple[Path, Path, str]:
    """(onnx, reference, description): the shipped model, else a random one of its size."""
    from engine.serve_commands import prepare

    if SHIPPED.is_file():
        onnx, refs = prepare(None, [str(DEMO)])
        return onnx, refs[0], "shipped masa_hands_causal.pt"
    cache = cache or Path(os.environ.get("MASA_RT_CACHE", Path.home() / ".cache" / "masa-rt"))
    ckpt = cache / "bench-random-hands-d64-w16.pt"
    if not ckpt.is_file():
        code = ("import sys, torch; from masa_rt.checkpoint import save_checkpoint; "
                "from masa_rt.model import MasaConfig, MasaModel; "
                "from masa_rt.preprocess import InputSpec; torch.manual_seed(0); "
                "cfg = MasaConfig(d_model=64, n_heads=4, ffn_dim=128, proj_dim=64, window=16); "
                "save_checkpoint(sys.argv[1], MasaModel(cfg).eval(), cfg, "
                "InputSpec('h2o_hands', 30.0))")
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code, str(ckpt)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    onnx, refs = prepare(str(ckpt), [str(DEMO)])
    return onnx, refs[0], "random model, shipped size (d_model 64, window 16)"


class ServerProcess:
    """``python -m masa_rt.cli serve`` on free loopback ports; logs go to a file."""

    def __init__(self, onnx: Path, ref: Path, *extra: str) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="masa-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "masa_rt.cli", "serve", "--model", str(onnx),
               "--reference", str(ref), "--bind", "tcp://127.0.0.1:0",
               "--pub", "tcp://127.0.0.1:0", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=ROOT)
        self.address = self._wait_for_bind()

    def _wait_for_bind(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"event=serving bind=(\S+)", self.log_path.read_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError("server did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        """The process runs and answers a ping within a second."""
        if self.proc.poll() is not None:
            return False
        return request(self.address, P.ping(1.0), "pong") is not None

    def stats(self) -> dict:
        reply = request(self.address, P.stats(), "stats_reply")
        if reply is None:
            raise RuntimeError("no stats_reply from the server")
        return reply

    def stop(self) -> str:
        """SIGTERM, wait, return the exit report (stdout)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self._log.close()
        return out


def request(address: str, msg: dict, kind: str, timeout: float = 2.0) -> dict | None:
    """One request on a fresh DEALER; the first reply of type ``kind`` or None."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(P.encode(msg))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if sock.poll(int(left * 1000) + 1):
                reply = P.decode(sock.recv())
                if reply["type"] == kind:
                    return reply
        return None
    finally:
        sock.close()


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- the good session


class GoodSession:
    """A PoseOutlet streaming the demo at 30 Hz; latencies per phase."""

    def __init__(self, address: str, session: str = "good", rate: float = 30.0) -> None:
        with np.load(DEMO) as f:
            self.poses = f["joints"].astype(np.float32)
        self.outlet = PoseOutlet(address, session=session, fps=rate, reference="pour_milk")
        self.outlet.open(timeout=10.0)
        self.rate, self.k, self.t0 = rate, 0, time.perf_counter()
        self.latency: dict[str, list[float]] = {}
        self.sent: Counter[str] = Counter()

    def run(self, phase: str, until) -> None:
        """Stream until ``until()`` is true; latencies go to ``phase``."""
        lat = self.latency.setdefault(phase, [])
        while not until():
            due = self.t0 + self.k / self.rate
            while (now := time.perf_counter()) < due:
                est = self.outlet.pull(timeout=due - now)
                if est is not None:
                    lat.append(est.latency)
            if self.outlet.push(self.poses[self.k % len(self.poses)]) is not None:
                self.sent[phase] += 1
            self.k += 1
        end = time.monotonic() + 2.0
        while sum(len(v) for v in self.latency.values()) < self.sent.total() and \
                time.monotonic() < end:
            est = self.outlet.pull(timeout=0.05)
            if est is not None:
                lat.append(est.latency)

    def summary(self) -> dict:
        out = {}
        for phase, lat in self.latency.items():
            a = np.array(lat) * 1e3
            out[phase] = {"frames": self.sent[phase], "answered": len(a),
                          "p50_ms": round(float(np.percentile(a, 50)), 2) if len(a) else None,
                          "p99_ms": round(float(np.percentile(a, 99)), 2) if len(a) else None,
                          "max_ms": round(float(a.max()), 2) if len(a) else None}
        out["rejected"] = dict(self.outlet.rejected)
        out["dropped"] = dict(self.outlet.dropped)
        return out


# --------------------------------------------------------------------------- hostile generators


def _raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _joints(a: np.ndarray, dtype: str = "<f4") -> dict:
    return {"dtype": dtype, "shape": list(a.shape), "data": a.astype(dtype).tobytes()}


class Hostile:
    """Hostile messages with the reply each must get (``"estimate|rate_limited"``: either).

    A worker owns three sessions: ``seq`` (declared 1000 fps, for duplicate/out-of-order),
    ``nan`` (NaN poses) and ``flood`` (declared 30 fps, flooded: rate limited).
    """

    def __init__(self, worker: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.sid = {k: f"fuzz{worker}-{k}" for k in ("seq", "nan", "flood")}
        self.seq = {k: 0 for k in self.sid}  # last seq used per session
        self.last_ok = -1  # last seq the 'seq' session had accepted
        self.zero = np.zeros(SHAPE, np.float32)
        self.gens = [  # (weight, generator)
            (10, self.random_bytes), (6, self.truncated), (5, self.wrong_version),
            (5, self.unknown_type), (6, self.mistyped), (6, self.bad_dtype),
            (6, self.bad_shape), (4, self.session_shape), (5, self.inf_joints),
            (4, self.nan_stamp), (8, self.dup_or_old), (8, self.unknown_session),
            (5, self.multipart), (4, self.bad_hello), (4, self.nan_pose), (14, self.flood),
            (0.2, self.too_large),
        ]
        w = np.array([g[0] for g in self.gens], float)
        self.p = w / w.sum()
        self.tried: Counter[str] = Counter()

    def hellos(self) -> list[tuple[bytes, str]]:
        fps = {"seq": 1000.0, "nan": 1000.0, "flood": 30.0}
        return [(P.encode(P.hello(s, "h2o_hands", fps[k], 0.0)), "welcome")
                for k, s in self.sid.items()]

    def next(self) -> tuple[bytes | list[bytes], str]:
        gen = self.gens[self.rng.choice(len(self.gens), p=self.p)][1]
        self.tried[gen.__name__] += 1
        return gen()

    def _frame(self, kind: str, joints: np.ndarray, *, t: float = 1.0) -> bytes:
        self.seq[kind] += 1
        return _raw({"v": 1, "type": "frame", "session": self.sid[kind], "seq": self.seq[kind],
                     "t": t + self.seq[kind] / 30.0, "joints": _joints(joints)})

    def random_bytes(self):
        data = self.rng.bytes(int(self.rng.integers(0, 300)))
        if data[:1] and 0x80 <= data[0] <= 0x8F or data[:1] in (b"\xde", b"\xdf"):
            data = b"\xc1" + data  # never a map by chance: 0xc1 is never valid msgpack
        return data, "malformed"

    def truncated(self):
        full = self._frame("seq", self.zero)
        self.seq["seq"] -= 1
        return full[: int(self.rng.integers(1, len(full) - 1))], "malformed"

    def wrong_version(self):
        v = int(self.rng.choice([0, 2, 99, -1, 2**40]))
        return _raw({"v": v, "type": "frame", "session": "x"}), "bad_version"

    def unknown_type(self):
        kind = ["teleport", "", "HELLO", "frames", "welcome2"][int(self.rng.integers(5))]
        return _raw({"v": 1, "type": kind}), "unknown_type"

    def mistyped(self):
        msg = {"v": 1, "type": "frame", "session": self.sid["seq"], "seq": 10**9, "t": 1.0,
               "joints": _joints(self.zero)}
        field, junk = [("t", "now"), ("seq", -5), ("seq", 1.5), ("session", "bad id!"),
                       ("joints", [1.0, 2.0]), ("session", 7)][int(self.rng.integers(6))]
        msg[field] = junk
        # Junk joints leave a valid frame header (and t = 1.0 reads as long queued): a
        # backlogged server sheds such a frame from its header ('overloaded') unvalidated.
        return _raw(msg), ("malformed|overloaded" if field == "joints" else "malformed")

    def bad_dtype(self):
        dtype = ["<f8", ">f4", "float32", "<i4"][int(self.rng.integers(4))]
        j = _joints(self.zero, dtype if dtype != "float32" else "<f4")
        j["dtype"] = dtype
        return _raw({"v": 1, "type": "frame", "session": self.sid["seq"], "seq": 1, "t": 1.0,
                     "joints": j}), "bad_dtype"

    def bad_shape(self):
        case = int(self.rng.integers(3))
        j = _joints(self.zero)
        if case == 0:
            j["shape"] = [200, 3]
        elif case == 1:
            j["shape"] = [42, 4]
        else:
            j["data"] = j["data"][:-4]
        return _raw({"v": 1, "type": "frame", "session": self.sid["seq"], "seq": 1, "t": 1.0,
                     "joints": j}), "bad_shape"

    def session_shape(self):  # valid on the wire, not the session's [42, 3]
        j = np.zeros((21, 3), np.float32)
        return self._frame("seq", j), "bad_shape"

    def inf_joints(self):
        j = self.zero.copy()
        j[int(self.rng.integers(42)), 0] = np.inf
        return _raw({"v": 1, "type": "frame", "session": self.sid["seq"], "seq": 1, "t": 1.0,
                     "joints": _joints(j)}), "non_finite"

    def nan_stamp(self):
        t = float(self.rng.choice([np.nan, np.inf, -np.inf]))
        return _raw({"v": 1, "type": "frame", "session": self.sid["seq"], "seq": 1, "t": t,
                     "joints": _joints(self.zero)}), "non_finite"

    def dup_or_old(self):
        last = self.last_ok
        if last < 2 or self.rng.integers(3) == 0:  # a valid frame moves the session on
            data = self._frame("seq", self.zero)
            self.last_ok = self.seq["seq"]
            return data, "estimate"
        dup = bool(self.rng.integers(2))
        seq = last if dup else int(self.rng.integers(0, last))
        # The stamp its seq had: a replayed frame. (With t = 1.0, a repeat of a valid frame
        # the server had refused, e.g. rate_limited, is 'out_of_order' by its capture time.)
        return _raw({"v": 1, "type": "frame", "session": self.sid["seq"], "seq": seq,
                     "t": 1.0 + seq / 30.0, "joints": _joints(self.zero)}), \
            ("duplicate" if dup else "out_of_order")

    def unknown_session(self):
        sid = f"ghost-{int(self.rng.integers(1 << 30))}"
        msg = [P.frame(sid, 0, 1.0, self.zero), P.bye(sid), P.stats(sid)][
            int(self.rng.integers(3))]
        return P.encode(msg), "unknown_session"

    def multipart(self):
        n = int(self.rng.integers(2, 5))
        return [self.rng.bytes(int(self.rng.integers(0, 40))) for _ in range(n)], "malformed"

    def bad_hello(self):
        # Hellos are limited per client (10/s, bursts of 20): past that, rate_limited.
        if self.rng.integers(2):
            return (P.encode(P.hello("fuzz-bad", "penn13", 30.0, 0.0)),
                    "wrong_layout|rate_limited")
        return (P.encode(P.hello("fuzz-bad", "h2o_hands", 30.0, 0.0, reference="juggle")),
                "unknown_reference|rate_limited")

    def nan_pose(self):
        j = self.zero.copy()
        if self.rng.integers(2):
            j[:] = np.nan  # tracking lost
        else:
            j[::2] = np.nan  # some joints lost
        return self._frame("nan", j), "estimate"

    def flood(self):  # answered, rate_limited or overloaded
        return self._frame("flood", self.zero), "estimate|rate_limited"

    def too_large(self):
        size = int(self.rng.integers(P.MAX_MESSAGE_BYTES + 1, ZMQ_CAP))
        return self.rng.bytes(size), "too_large"


def worker(address: str, index: int, n: int, rate: float, out: mp.Queue) -> None:
    """Send ``n`` hostile messages at ``rate``/s; read every reply; report the tallies."""
    gen = Hostile(index, seed=index)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    expected, got = Counter(), Counter()

    def collect(wait_ms: int = 0) -> None:
        if not sock.poll(wait_ms):
            return
        while sock.poll(0):
            msg = P.decode(sock.recv())
            got[msg["reason"] if msg["type"] == "error" else msg["type"]] += 1

    for data, want in gen.hellos():
        sock.send(data)
        expected[want] += 1
    t0, sent = time.perf_counter(), 0
    while sent < n:
        due = t0 + sent / rate
        now = time.perf_counter()
        if now < due:
            collect(max(1, int((due - now) * 1000)))
            continue
        for _ in range(min(50, n - sent)):  # small bursts, on schedule
            data, want = gen.next()
            if isinstance(data, list):
                sock.send_multipart(data)
            else:
                sock.send(data)
            expected[want] += 1
            sent += 1
        collect()
    total = expected.total()
    deadline = time.monotonic() + 10.0
    while got.total() < total and time.monotonic() < deadline:
        collect(50)
    cut = oversize(ctx, address, 5 if index == 0 else 0)
    sock.close()
    ctx.term()
    out.put({"worker": index, "sent": sent + len(gen.hellos()), "tried": dict(gen.tried),
             "expected": dict(expected), "got": dict(got), "cut": cut,
             "seconds": time.perf_counter() - t0})


def oversize(ctx: zmq.Context, address: str, n: int) -> int:
    """Messages over ZMQ_MAXMSGSIZE, each on its own socket: libzmq cuts the link."""
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
        s.send(b"\0" * (ZMQ_CAP + 1024))
        assert not s.poll(200), "a reply to a message over ZMQ_MAXMSGSIZE"
        s.close()
    return n


# --------------------------------------------------------------------------- the run


def reconcile(results: list[dict], counters: dict, good: dict) -> dict:
    """Compare what the workers expected and got with the server's counters.

    Every hostile message gets one reply, except accepted frames the server dropped (it
    counts them in ``dropped.<reason>``; the good session had none, checked separately)."""
    expected, got = Counter(), Counter()
    for r in results:
        expected.update(r["expected"])
        got.update(r["got"])
    server = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("rejected.")}
    dropped = counters["dropped"]
    # "a|b": either reply is right (the flood: answered or refused; junk joints behind a
    # valid header: malformed, or shed as overloaded by a backlogged server).
    alternatives = {k: expected.pop(k) for k in list(expected) if "|" in k}
    either = sum(alternatives.values())
    replies_ok = ("welcome", "estimate", "pong", "stats_reply")
    client_errors = Counter({k: v for k, v in got.items() if k not in replies_ok})
    client_errors.update(good["rejected"])  # the good session's, if the server shed any
    # Duplicate / out-of-order expectations assume the worker's fresh frames were accepted;
    # under overload some are shed, which turns a later "duplicate" into a fresh frame.
    load_dependent = ("estimate", "duplicate", "out_of_order")
    fixed = {k: v for k, v in expected.items() if k not in load_dependent}
    flood_refused = sum(got[k] - fixed.get(k, 0) for k in ("rate_limited", "overloaded"))

    def within(k: str, v: int) -> bool:  # a fixed reason may also take alternatives naming it
        extra = sum(n for alt, n in alternatives.items() if k in alt.split("|"))
        return v <= got[k] <= v + extra

    return {
        "replies_expected": expected.total() + either, "replies_received": got.total(),
        "accepted_then_dropped_by_server": dropped,
        "all_accounted": got.total() + dropped == expected.total() + either,
        "fixed_reasons_match": all(within(k, v) for k, v in fixed.items()),
        "seq_rules": {k: (expected[k], got[k]) for k in ("duplicate", "out_of_order")},
        "seq_rules_ok": all(got[k] <= expected[k] for k in ("duplicate", "out_of_order")),
        "flood_frames": alternatives.get("estimate|rate_limited", 0),
        "flood_refused": flood_refused,
        "server_rejections_equal_error_replies": server == dict(client_errors),
        "mismatches": {k: (v, got.get(k)) for k, v in fixed.items() if not within(k, v)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=100_000, help="hostile messages in total")
    ap.add_argument("--rate", type=float, default=1500.0, help="hostile messages/s in total")
    ap.add_argument("--workers", type=int, default=1, help="hostile client processes")
    ap.add_argument("--baseline", type=float, default=20.0, help="s of good session alone")
    ap.add_argument("--after", type=float, default=10.0, help="s alone after the fuzz")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)

    onnx, ref, model = prepare_model()
    server = ServerProcess(onnx, ref)
    print(f"server pid {server.pid} at {server.address} ({model})", flush=True)
    rss0 = rss_kib(server.pid)
    good = GoodSession(server.address)
    t_end = time.perf_counter() + args.baseline
    good.run("alone", lambda: time.perf_counter() >= t_end)
    print(f"baseline done: {good.summary()['alone']}", flush=True)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    per = args.messages // args.workers
    procs = [ctx.Process(target=worker, args=(server.address, i, per, args.rate / args.workers,
                                              queue)) for i in range(args.workers)]
    t_fuzz = time.perf_counter()
    for p in procs:
        p.start()
    good.run("fuzz", lambda: not any(p.is_alive() for p in procs))
    fuzz_s = time.perf_counter() - t_fuzz
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    t_end = time.perf_counter() + args.after
    good.run("after", lambda: time.perf_counter() >= t_end)

    alive = server.alive()
    stats = server.stats()
    counters = stats["counters"]
    rss1 = rss_kib(server.pid)
    g = good.summary()
    good.outlet.close()
    report = server.stop()
    tried = sum(r["sent"] for r in results) + sum(r["cut"] for r in results)
    check = reconcile(results, counters, g)
    out = {
        "model": model, "server_alive": alive, "server_exit_code": server.proc.returncode,
        "messages_tried": tried, "fuzz_seconds": round(fuzz_s, 1),
        "cut_by_zmq_maxmsgsize": sum(r["cut"] for r in results),
        "generators": dict(sum((Counter(r["tried"]) for r in results), Counter())),
        "rejected": {k.split(".", 1)[1]: v for k, v in counters.items()
                     if k.startswith("rejected.")},
        "server_counters": {k: counters[k] for k in ("messages_in", "frames_in",
                                                     "estimates_out", "rejected", "dropped",
                                                     "loop_errors", "sessions_opened")},
        "good_session": g, "reconcile": check,
        "server_rss_mib": [round(rss0 / 1024, 1), round(rss1 / 1024, 1)],
        "load_average": os.getloadavg(),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    ok = (alive and server.proc.returncode == 0 and check["fixed_reasons_match"]
          and check["server_rejections_equal_error_replies"] and check["all_accounted"]
          and check["seq_rules_ok"]
          and g["fuzz"]["answered"] + sum(g["rejected"].values()) == g["fuzz"]["frames"]
          and counters["loop_errors"] == 0)
    print("server exit report:\n" + report)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
