"""A tiny protocol-conformant stand-in for engine.server, for client tests.

It speaks masa_rt.protocol over a real ROUTER + PUB on loopback, answers every frame with
an estimate derived from the frame (so tests can check what arrived), applies the session
rules of docs/protocol.md (resume, duplicate/out_of_order) and can shift its clock or
refuse sessions. It runs in a thread and never sleeps: it polls with a short timeout.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from masa_rt import protocol as P


class FakeServer:
    """Fake masa-rt server on 127.0.0.1; ``port`` reuses an address (restart tests)."""

    def __init__(self, *, port: int | None = None, clock_offset: float = 0.0,
                 refuse: str | None = None, answer_frames: bool = True,
                 shape: tuple[int, int] = (42, 3), lookahead_s: float = 0.0) -> None:
        self.clock_offset, self.refuse, self.answer_frames = clock_offset, refuse, answer_frames
        self.shape, self.lookahead_s = shape, lookahead_s
        self.frames: list[dict] = []  # decoded frames, joints copied
        self.hellos: list[dict] = []
        self.byes: list[str] = []
        self.rejected: list[str] = []
        self.sessions: dict[str, int] = {}  # session -> last accepted seq
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        if port is None:
            port = self._router.bind_to_random_port("tcp://127.0.0.1")
        else:
            self._router.bind(f"tcp://127.0.0.1:{port}")
        self.port = port
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self.pub_port = self._pub.bind_to_random_port("tcp://127.0.0.1")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def pub_address(self) -> str:
        return f"tcp://127.0.0.1:{self.pub_port}"

    def now(self) -> float:
        return time.perf_counter() + self.clock_offset

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop answering and close the sockets (a crashed server, as seen by clients)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=5.0)
        self._router.close()
        self._pub.close()
        self._ctx.term()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._router.poll(20):
                continue
            ident, data = self._router.recv_multipart()
            t_recv = self.now()
            for reply in self._answer(data, t_recv):
                self._router.send_multipart([ident, P.encode(reply)])

    def _answer(self, data: bytes, t_recv: float) -> list[dict]:
        try:
            msg = P.decode(data)
        except P.ProtocolError as exc:
            self.rejected.append(exc.reason)
            return [P.error_from(exc)]
        handler = getattr(self, "_on_" + msg["type"], None)
        return handler(msg, t_recv) if handler else [P.error("unknown_type", msg["type"])]

    def _on_hello(self, msg: dict, t_recv: float) -> list[dict]:
        self.hellos.append(msg)
        if self.refuse:
            return [P.error(self.refuse, "refused by test", session=msg["session"])]
        resumed = msg["resume"] and msg["session"] in self.sessions
        if not resumed:
            self.sessions[msg["session"]] = -1
        return [P.welcome(msg["session"], self.now(), model="fake", references=["pour_milk"],
                          fps=msg["fps"], layout=msg["layout"], shape=self.shape, window=32,
                          last_seq=self.sessions[msg["session"]], resumed=resumed,
                          lookahead_s=self.lookahead_s)]

    def _on_frame(self, msg: dict, t_recv: float) -> list[dict]:
        session, seq = msg["session"], msg["seq"]
        if session not in self.sessions:
            self.rejected.append("unknown_session")
            return [P.error("unknown_session", session=session)]
        last = self.sessions[session]
        if seq <= last:
            reason = "duplicate" if seq == last else "out_of_order"
            self.rejected.append(reason)
            return [P.error(reason, f"seq {seq} <= {last}", seq=seq, session=session)]
        self.sessions[session] = seq
        self.frames.append({**msg, "joints": np.array(msg["joints"])})
        if not self.answer_frames:
            return []
        est = self._estimate(msg, t_recv)
        self._pub.send_multipart([P.topic(session), P.encode(est)])
        return [est]

    def _estimate(self, msg: dict, t_recv: float) -> dict:
        """Progress = mean of the first joint's coordinates, so tests can check the data."""
        first = float(np.nan_to_num(msg["joints"][0]).mean())
        return P.estimate(msg["session"], msg["seq"], msg["t"], t_recv, self.now(),
                          phase_id=msg["seq"] % 4, phase_name=f"phase{msg['seq'] % 4}",
                          phase_progress=0.5, progress=first, confidence=0.9,
                          state="tracking", activity="pour_milk")

    def _on_ping(self, msg: dict, t_recv: float) -> list[dict]:
        return [P.pong(msg["client_time"], self.now())]

    def _on_bye(self, msg: dict, t_recv: float) -> list[dict]:
        self.byes.append(msg["session"])
        self.sessions.pop(msg["session"], None)
        return []

    def _on_stats(self, msg: dict, t_recv: float) -> list[dict]:
        counters = {"frames_in": len(self.frames), "rejected": len(self.rejected)}
        return [P.stats_reply(self.now(), counters, session=msg["session"])]
