"""The masa-rt wire protocol (version 1): the one place that defines what goes on the wire.

Headsets (``clients/``), the server (``engine.server``) and the C++ client all follow this
module; ``docs/protocol.md`` explains it for humans. It depends on msgpack and numpy only,
so both the serving path and the thin clients can import it without torch.

Every message is one msgpack map with ``v`` (protocol version) and ``type``. :func:`decode`
validates everything a hostile or buggy peer could get wrong (size, msgpack syntax, version,
type, required fields and their types, joint arrays) and raises :class:`ProtocolError` with a
reason from :data:`REASONS`, so the server can answer with a precise ``error`` and count
rejections by reason without ever crashing. :func:`encode` applies the same validation, so
nothing we send fails to decode on the other side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# One cap for everything: the protocol check and ZMQ_MAXMSGSIZE on every socket, so an
# oversized message is cut off by libzmq before it is even buffered in full.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_JOINTS = 128  # 2 x 26 OpenXR hand joints or a 25-joint body fit with room to spare
JOINT_DIMS = (2, 3)
MAX_FPS = 1000.0
# A declared rate below 1 Hz is no pose stream; it also sized a session's frame allowance
# (issue 31: fps 1e-300 still got a burst of 8 frames), so it is refused at hello.
MIN_FPS = 1.0
MAX_SEQ = 2**63 - 1  # seq is an unsigned counter that must also fit an int64 in C++
MAX_TEXT = 256  # names, states, details: long enough to be useful, short enough to log
JOINT_DTYPE = "<f4"
SESSION_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")

# Every reason an ``error`` message (and a ProtocolError) can carry. Fixed, so servers
# can count rejections per reason and clients can switch on them.
REASONS = (
    "malformed",  # not msgpack, not a map, missing or mistyped field
    "bad_version",  # ``v`` is not PROTOCOL_VERSION
    "unknown_type",  # ``type`` is not a message type of this version
    "unknown_session",  # frame/bye/stats for a session the server does not know (send hello)
    "bad_shape",  # joints shape is not (J, C) with 1 <= J <= MAX_JOINTS, C in JOINT_DIMS
    "bad_dtype",  # joints dtype is not little-endian float32
    "non_finite",  # +-inf in joints or a timestamp (NaN joints are allowed: missing joint)
    "too_large",  # message over MAX_MESSAGE_BYTES
    "out_of_order",  # frame seq lower than the last accepted one
    "duplicate",  # frame seq equal to the last accepted one
    "rate_limited",  # session sends faster than the server allows for its declared fps
    "overloaded",  # server shed the frame under load (queue full)
    "unknown_reference",  # hello names a reference activity the server has not loaded
    "wrong_layout",  # layout unknown, or differs from the session's / the model's layout
    "unauthorised",  # client not allowed (CURVE/ZAP allow-list)
    "session_owner",  # --secure: the session belongs to another client key
    "too_many_sessions",  # the client already holds ServerConfig.max_sessions_per_client
    "internal",  # server bug: reported, never silent
)

CLIENT_TYPES = ("hello", "frame", "bye", "ping", "stats")
SERVER_TYPES = ("welcome", "error", "estimate", "pong", "stats_reply")
MESSAGE_TYPES = CLIENT_TYPES + SERVER_TYPES


class ProtocolError(Exception):
    """A message that breaks the protocol; ``reason`` is one of :data:`REASONS`."""

    user_facing = True  # bad input: masa_rt.cli prints it as one line

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown protocol error reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        # Filled in by decode when the rejected message still names them, so the error
        # reply can say which frame was refused (the client then counts, not aborts).
        self.session: str | None = None
        self.seq: int | None = None


# --------------------------------------------------------------------------- field checks
# A check takes the field name and value and returns the (possibly normalised) value or
# raises ProtocolError. Schemas below are tables of checks, so the rules read as a spec.

Check = Callable[[str, Any], Any]


def _fail(name: str, what: str, reason: str = "malformed") -> ProtocolError:
    return ProtocolError(reason, f"field {name!r} {what}")


def _number(name: str, v: Any) -> float:
    """Any finite int or float (msgpack encoders differ in which they emit); not bool.

    numpy scalars pass too, so engine code can hand over ``np.float32`` values as they are.
    """
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        raise _fail(name, "must be a number")
    v = float(v)
    if not math.isfinite(v):
        raise _fail(name, "must be finite", "non_finite")
    return v


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise _fail(name, "must be an integer")
    return int(v)


def _seq(name: str, v: Any) -> int:
    v = _int(name, v)
    if not 0 <= v <= MAX_SEQ:
        raise _fail(name, f"must be in [0, {MAX_SEQ}]")
    return v


def _last_seq(name: str, v: Any) -> int:
    """-1 means 'no frame accepted yet'."""
    v = _int(name, v)
    if not -1 <= v <= MAX_SEQ:
        raise _fail(name, f"must be in [-1, {MAX_SEQ}]")
    return v


def _fps(name: str, v: Any) -> float:
    v = _number(name, v)
    if not MIN_FPS <= v <= MAX_FPS:
        raise _fail(name, f"must be in [{MIN_FPS:g}, {MAX_FPS:g}]")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail(name, "must be a bool")
    return v


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise _fail(name, f"must be a string of at most {MAX_TEXT} characters")
    return v


def _session(name: str, v: Any) -> str:
    if not isinstance(v, str) or not SESSION_PATTERN.fullmatch(v):
        raise _fail(name, "must match [A-Za-z0-9._-]{1,64}")
    return v


def _reason(name: str, v: Any) -> str:
    if v not in REASONS:
        raise _fail(name, f"must be one of {', '.join(REASONS)}")
    return v


def _texts(name: str, v: Any) -> list[str]:
    if not isinstance(v, list | tuple) or len(v) > MAX_TEXT:
        raise _fail(name, "must be a list of strings")
    return [_text(name, x) for x in v]


def _shape(name: str, v: Any) -> list[int]:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise _fail(name, "must be [J, C]", "bad_shape")
    return [_int(name, x) for x in v]


def _map(name: str, v: Any) -> dict:
    """Free-form map (stats): only the keys are checked, the values are data."""
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _fail(name, "must be a map with string keys")
    return v


def _optional(check: Check) -> Check:
    def nullable(name: str, v: Any) -> Any:
        return None if v is None else check(name, v)

    return nullable


def _joints(name: str, v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):  # encode() accepts arrays: a no-copy check of the same rules
        v = joints_to_wire(v)
    return joints_from_wire(v)


# Field -> (check, required). Optional fields missing on the wire decode as None, so
# consumers never need ``.get``. Unknown fields are ignored (see docs: versioning rule).
SCHEMAS: dict[str, dict[str, tuple[Check, bool]]] = {
    "hello": {
        "session": (_session, True),
        "layout": (_text, True),
        "fps": (_fps, True),
        "reference": (_optional(_text), False),  # activity name; None: server recognises
        "client_time": (_number, True),
        "resume": (_bool, True),
        "client": (_optional(_text), False),  # software name/version, for logs
        # A layout the server may not know, declared in full (masa_rt.layout_file's
        # canonical form; the server checks it): docs/protocol.md, "Layouts".
        "layout_declaration": (_optional(_map), False),
    },
    "frame": {
        "session": (_session, True),
        "seq": (_seq, True),
        "t": (_number, True),  # capture time, client clock, seconds
        "joints": (_joints, True),
    },
    "bye": {"session": (_session, True)},
    "ping": {
        "client_time": (_number, True),
        "session": (_optional(_session), False),  # lets the server refresh the session
    },
    "stats": {"session": (_optional(_session), False)},  # None: whole server
    "welcome": {
        "session": (_session, True),
        "server_time": (_number, True),
        "model": (_text, True),
        "references": (_texts, True),
        "fps": (_fps, True),
        "layout": (_text, True),
        "shape": (_shape, True),  # [J, C] the server expects for this layout
        "window": (_int, True),
        "last_seq": (_last_seq, True),  # last accepted seq of a resumed session, else -1
        "resumed": (_bool, True),
        "session_timeout": (_optional(_number), False),  # silence after which it expires
        # Seconds each estimate lags the frame it answers (references whose phase decoders
        # have lookahead; absent or 0: it describes that frame).
        "lookahead_s": (_optional(_number), False),
        # The layout the model reads, where it is not the session's: the server converts
        # each frame's joints to it (docs/protocol.md, "Layouts"); absent: the same.
        "model_layout": (_optional(_text), False),
    },
    "error": {
        "reason": (_reason, True),
        "detail": (_text, True),
        "seq": (_optional(_seq), False),  # set: about that frame; None: about the session
        "session": (_optional(_session), False),
    },
    "estimate": {
        "session": (_session, True),
        "seq": (_seq, True),
        "t_capture": (_number, True),  # echo of frame.t (client clock)
        "t_server_recv": (_number, True),  # server clock
        "t_server_send": (_number, True),  # server clock
        "phase_id": (_int, True),  # -1: no phase yet
        "phase_name": (_optional(_text), False),
        "phase_progress": (_number, True),  # [0, 1] within the phase
        "progress": (_number, True),  # [0, 1] through the whole activity
        "confidence": (_number, True),  # [0, 1]
        "state": (_text, True),  # e.g. warmup, tracking, paused, tracking_lost
        "activity": (_optional(_text), False),
    },
    "pong": {"client_time": (_number, True), "server_time": (_number, True)},
    "stats_reply": {
        "server_time": (_number, True),
        "counters": (_map, True),  # name -> count (frames_in, rejected.<reason>, ...)
        "latency": (_optional(_map), False),  # histogram / percentiles, server-defined
        "session": (_optional(_session), False),
    },
}
assert set(SCHEMAS) == set(MESSAGE_TYPES)


# --------------------------------------------------------------------------- joints


def joints_to_wire(joints: np.ndarray) -> dict:
    """(J, C) array -> the wire map: raw little-endian float32 bytes, never a list of floats."""
    a = np.ascontiguousarray(joints, dtype=JOINT_DTYPE)
    return {"dtype": JOINT_DTYPE, "shape": list(a.shape), "data": a.tobytes()}


def joints_from_wire(d: Any) -> np.ndarray:
    """Validate a wire joints map and view it as a read-only (J, C) float32 array.

    NaN is allowed (a joint the tracker lost); +-inf is rejected as ``non_finite`` because
    it can only come from a broken producer and would poison normalisation.
    """
    if not isinstance(d, dict):
        raise _fail("joints", "must be a map {dtype, shape, data}")
    if d.get("dtype") != JOINT_DTYPE:
        raise _fail("joints.dtype", f"must be {JOINT_DTYPE!r}", "bad_dtype")
    J, C = _shape("joints.shape", d.get("shape"))
    if not (1 <= J <= MAX_JOINTS and C in JOINT_DIMS):
        raise _fail("joints.shape", f"must be [1..{MAX_JOINTS}, {JOINT_DIMS}]", "bad_shape")
    data = d.get("data")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("joints.data", "must be bytes")
    if len(data) != J * C * 4:
        raise _fail("joints.data", f"must be {J * C * 4} bytes for shape [{J}, {C}]", "bad_shape")
    a = np.frombuffer(data, dtype=JOINT_DTYPE).reshape(J, C)
    if np.isinf(a).any():
        raise _fail("joints", "contain +-inf", "non_finite")
    return a


# --------------------------------------------------------------------------- encode/decode


def validate(msg: Any) -> dict:
    """Check a message map against its schema; return a normalised copy (see SCHEMAS)."""
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", "message is not a map")
    v = msg.get("v")
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail("v", "must be an integer protocol version")
    if v != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"got v={v}, this peer speaks v={PROTOCOL_VERSION}")
    kind = msg.get("type")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ProtocolError("unknown_type", f"type {str(kind)[:MAX_TEXT]!r}")
    out = {"v": v, "type": kind}
    try:
        for name, (check, required) in schema.items():
            if name in msg:
                out[name] = check(name, msg[name])
            elif required:
                raise _fail(name, f"is required in {kind!r}")
            else:
                out[name] = None
    except ProtocolError as exc:
        exc.session, exc.seq = _context(msg)
        raise
    return out


def _context(msg: dict) -> tuple[str | None, int | None]:
    """The session and seq of a rejected message, where they are themselves valid."""
    session, seq = msg.get("session"), msg.get("seq")
    ok_session = isinstance(session, str) and SESSION_PATTERN.fullmatch(session)
    ok_seq = type(seq) is int and 0 <= seq <= MAX_SEQ
    return (session if ok_session else None), (seq if ok_seq else None)


def _default(obj: Any) -> Any:
    """msgpack fallback: numpy scalars from the engine encode as plain numbers."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return joints_to_wire(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(msg: Mapping[str, Any]) -> bytes:
    """Validate and pack a message. ndarray joints are packed as raw float32 bytes."""
    clean = validate(dict(msg))
    if clean["type"] == "frame":
        clean["joints"] = joints_to_wire(clean["joints"])
    try:
        data = msgpack.packb(clean, use_bin_type=True, default=_default)
    except (OverflowError, TypeError, ValueError) as exc:  # e.g. a counter over 2**64 - 1
        raise ProtocolError("malformed", f"cannot pack {clean['type']}: {exc}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"{len(data)} > {MAX_MESSAGE_BYTES} bytes")
    return data


def unpack(data: bytes) -> Any:
    """Unpack one message *without* validating it (see :func:`decode`); raise only
    :class:`ProtocolError`. For a server that must look at a frame's header (session, seq,
    stamp) before it spends the full validation on it."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"{len(data)} > {MAX_MESSAGE_BYTES} bytes")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # noqa: BLE001 - hostile bytes trip many msgpack exception types
        raise ProtocolError("malformed", f"not msgpack: {type(exc).__name__}") from None


def decode(data: bytes) -> dict:
    """Unpack and validate one message; raise only :class:`ProtocolError`.

    A ``frame``'s ``joints`` come back as a read-only (J, C) float32 array viewing the
    message buffer (no copy).
    """
    return validate(unpack(data))


# --------------------------------------------------------------------------- builders
# Builders fill v/type and name every field, so call sites read like the spec.


def _msg(kind: str, **fields: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "type": kind, **fields}


def hello(session: str, layout: str, fps: float, client_time: float, *,
          reference: str | None = None, resume: bool = False, client: str | None = None,
          layout_declaration: dict | None = None) -> dict:
    declared = {} if layout_declaration is None else {"layout_declaration": layout_declaration}
    return _msg("hello", session=session, layout=layout, fps=float(fps), reference=reference,
                client_time=float(client_time), resume=resume, client=client, **declared)


def frame(session: str, seq: int, t: float, joints: np.ndarray) -> dict:
    return _msg("frame", session=session, seq=int(seq), t=float(t),
                joints=joints_to_wire(joints))


def bye(session: str) -> dict:
    return _msg("bye", session=session)


def ping(client_time: float, session: str | None = None) -> dict:
    return _msg("ping", client_time=float(client_time), session=session)


def stats(session: str | None = None) -> dict:
    return _msg("stats", session=session)


def welcome(session: str, server_time: float, *, model: str, references: list[str], fps: float,
            layout: str, shape: tuple[int, int], window: int, last_seq: int = -1,
            resumed: bool = False, session_timeout: float | None = None,
            lookahead_s: float = 0.0, model_layout: str | None = None) -> dict:
    return _msg("welcome", session=session, server_time=float(server_time), model=model,
                references=list(references), fps=float(fps), layout=layout,
                shape=[int(shape[0]), int(shape[1])], window=int(window),
                last_seq=int(last_seq), resumed=resumed, session_timeout=session_timeout,
                lookahead_s=float(lookahead_s), model_layout=model_layout)


def error(reason: str, detail: str = "", *, seq: int | None = None,
          session: str | None = None) -> dict:
    return _msg("error", reason=reason, detail=detail[:MAX_TEXT], seq=seq, session=session)


def error_from(exc: ProtocolError) -> dict:
    """The ``error`` reply for a rejected message (naming its frame when it could be read)."""
    return error(exc.reason, exc.detail, seq=exc.seq, session=exc.session)


def estimate(session: str, seq: int, t_capture: float, t_server_recv: float,
             t_server_send: float, *, phase_id: int, phase_name: str | None,
             phase_progress: float, progress: float, confidence: float, state: str,
             activity: str | None) -> dict:
    return _msg("estimate", session=session, seq=int(seq), t_capture=float(t_capture),
                t_server_recv=float(t_server_recv), t_server_send=float(t_server_send),
                phase_id=int(phase_id), phase_name=phase_name,
                phase_progress=float(phase_progress), progress=float(progress),
                confidence=float(confidence), state=state, activity=activity)


def pong(client_time: float, server_time: float) -> dict:
    return _msg("pong", client_time=float(client_time), server_time=float(server_time))


def stats_reply(server_time: float, counters: dict, latency: dict | None = None,
                session: str | None = None) -> dict:
    return _msg("stats_reply", server_time=float(server_time), counters=counters,
                latency=latency, session=session)


# --------------------------------------------------------------------------- typed views


@dataclass(frozen=True, slots=True)
class EstimateMsg:
    """An ``estimate`` as a typed value (what the server sends for one frame)."""

    session: str
    seq: int
    t_capture: float
    t_server_recv: float
    t_server_send: float
    phase_id: int
    phase_name: str | None
    phase_progress: float
    progress: float
    confidence: float
    state: str
    activity: str | None

    @classmethod
    def from_wire(cls, msg: dict) -> EstimateMsg:
        """From a decoded (validated) ``estimate`` map."""
        return cls(**{k: msg[k] for k in SCHEMAS["estimate"]})

    def to_wire(self) -> dict:
        return _msg("estimate", **asdict(self))


def topic(session: str, tenant: bytes | None = None) -> bytes:
    """PUB topic frame for a session's estimates: the session id as ASCII bytes; under
    ``--secure`` prefixed by its owner's Z85 public key and a slash (``tenant``), so a key
    can be held to its own sessions (engine.estimate_feed).

    ZeroMQ filters by prefix, so subscribers must compare exactly (session "a" would
    otherwise also receive "ab"); the payload's ``session`` field serves.
    """
    return session.encode("ascii") if tenant is None else tenant + b"/" + session.encode("ascii")
