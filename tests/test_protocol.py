"""Wire protocol: round trips, hostile bytes, and rejection with the right reason."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from masa_rt import protocol as P

sessions = st.from_regex(P.SESSION_PATTERN, fullmatch=True)
texts = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
unit = st.floats(0.0, 1.0)
seqs = st.integers(0, P.MAX_SEQ)
fps = st.floats(P.MIN_FPS, P.MAX_FPS)
joint_arrays = st.tuples(st.integers(1, P.MAX_JOINTS), st.sampled_from(P.JOINT_DIMS)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape,
                             elements=st.floats(allow_infinity=False, width=32)))

MESSAGES = {
    "hello": st.builds(P.hello, sessions, texts, fps, finite, reference=st.none() | texts,
                       resume=st.booleans(), client=st.none() | texts),
    "frame": st.builds(P.frame, sessions, seqs, finite, joint_arrays),
    "bye": st.builds(P.bye, sessions),
    "ping": st.builds(P.ping, finite, st.none() | sessions),
    "stats": st.builds(P.stats, st.none() | sessions),
    "welcome": st.builds(P.welcome, sessions, finite, model=texts,
                         references=st.lists(texts, max_size=5), fps=fps, layout=texts,
                         shape=st.tuples(st.integers(1, 64), st.sampled_from((2, 3))),
                         window=st.integers(1, 512), last_seq=st.integers(-1, P.MAX_SEQ),
                         resumed=st.booleans(), session_timeout=st.none() | finite),
    "error": st.builds(P.error, st.sampled_from(P.REASONS), texts,
                       seq=st.none() | seqs, session=st.none() | sessions),
    "estimate": st.builds(P.estimate, sessions, seqs, finite, finite, finite,
                          phase_id=st.integers(-1, 64), phase_name=st.none() | texts,
                          phase_progress=unit, progress=unit, confidence=unit, state=texts,
                          activity=st.none() | texts),
    "pong": st.builds(P.pong, finite, finite),
    "stats_reply": st.builds(P.stats_reply, finite,
                             st.dictionaries(texts, st.integers(0, 2**40), max_size=8),
                             latency=st.none() | st.dictionaries(texts, finite, max_size=4),
                             session=st.none() | sessions),
}


def _packed(msg: dict) -> bytes:
    """Pack without encode()'s validation, to hand decode() deliberately bad messages."""
    return msgpack.packb(msg, use_bin_type=True)


def _frame_wire(**joints_override) -> dict:
    msg = P.frame("s1", 0, 1.0, np.zeros((21, 3), np.float32))
    msg["joints"].update(joints_override)
    return msg


def test_every_message_type_has_a_strategy():
    assert set(MESSAGES) == set(P.MESSAGE_TYPES)


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(kind, data):
    msg = data.draw(MESSAGES[kind])
    out = P.decode(P.encode(msg))
    assert out["type"] == kind and out["v"] == P.PROTOCOL_VERSION
    for name, value in msg.items():
        if name == "joints":
            np.testing.assert_array_equal(out["joints"], P.joints_from_wire(value))
        elif isinstance(value, tuple | list):
            assert list(out[name]) == list(value)
        else:
            assert out[name] == value, name


@settings(max_examples=100, deadline=None)
@given(joints=joint_arrays)
def test_joints_round_trip_bit_exact_including_nan(joints):
    out = P.decode(P.encode(P.frame("s", 1, 0.0, joints)))["joints"]
    assert out.dtype == np.float32 and out.shape == joints.shape
    assert out.tobytes() == joints.tobytes()  # bit-exact: NaN payloads included


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_error(data):
    try:
        P.decode(data)
    except P.ProtocolError as exc:
        assert exc.reason in P.REASONS


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | finite | texts
    | st.binary(max_size=16),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
    max_leaves=5)


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(P.MESSAGE_TYPES),
       fields=st.dictionaries(st.sampled_from(sorted({f for s in P.SCHEMAS.values() for f in s})),
                              msgpack_values, max_size=8))
def test_mistyped_fields_raise_only_protocol_error(kind, fields):
    """Well-formed msgpack with the right v/type but random field values."""
    try:
        P.decode(_packed({**fields, "v": P.PROTOCOL_VERSION, "type": kind}))
    except P.ProtocolError as exc:
        assert exc.reason in P.REASONS


@pytest.mark.parametrize(("override", "reason"), [
    ({"dtype": "<f8"}, "bad_dtype"),
    ({"dtype": ">f4"}, "bad_dtype"),
    ({"shape": [21]}, "bad_shape"),
    ({"shape": [0, 3]}, "bad_shape"),
    ({"shape": [21, 4]}, "bad_shape"),
    ({"shape": [P.MAX_JOINTS + 1, 3]}, "bad_shape"),
    ({"shape": [21, 2]}, "bad_shape"),  # byte length no longer matches
    ({"data": b"\0" * 7}, "bad_shape"),
    ({"data": "text"}, "malformed"),
    ({"data": np.full((21, 3), np.inf, np.float32).tobytes()}, "non_finite"),
])
def test_bad_joints_rejected_with_reason(override, reason):
    with pytest.raises(P.ProtocolError) as info:
        P.decode(_packed(_frame_wire(**override)))
    assert info.value.reason == reason
    # The error reply still names the frame, so the client counts it and keeps streaming.
    reply = P.decode(P.encode(P.error_from(info.value)))
    assert (reply["reason"], reply["session"], reply["seq"]) == (reason, "s1", 0)


def test_nan_joints_allowed_inf_rejected_on_encode():
    joints = np.zeros((21, 3), np.float32)
    joints[3] = np.nan
    assert np.isnan(P.decode(P.encode(P.frame("s", 0, 0.0, joints)))["joints"][3]).all()
    joints[4, 0] = -np.inf
    with pytest.raises(P.ProtocolError, match="non_finite"):
        P.encode(P.frame("s", 0, 0.0, joints))


@settings(max_examples=50, deadline=None)
@given(v=st.integers(-(2**31), 2**31).filter(lambda v: v != P.PROTOCOL_VERSION))
def test_wrong_version_rejected(v):
    with pytest.raises(P.ProtocolError) as info:
        P.decode(_packed({**P.bye("s"), "v": v}))
    assert info.value.reason == "bad_version"


@pytest.mark.parametrize(("msg", "reason"), [
    ({"v": 1, "type": "teleport"}, "unknown_type"),
    ({"v": 1}, "unknown_type"),
    ({"type": "bye", "session": "s"}, "malformed"),
    ({"v": True, "type": "bye", "session": "s"}, "malformed"),
    ([1, "bye"], "malformed"),
    ({"v": 1, "type": "bye"}, "malformed"),  # missing field
    ({"v": 1, "type": "bye", "session": "has space"}, "malformed"),
    ({"v": 1, "type": "bye", "session": "x" * 65}, "malformed"),
    ({**P.frame("s", 0, 1.0, np.zeros((2, 3), np.float32)), "seq": -1}, "malformed"),
    ({**P.frame("s", 0, 1.0, np.zeros((2, 3), np.float32)), "seq": True}, "malformed"),
    ({**P.frame("s", 0, 1.0, np.zeros((2, 3), np.float32)), "t": math.inf}, "non_finite"),
    ({**P.hello("s", "h2o_hands", 30.0, 0.0), "fps": 0.0}, "malformed"),
    ({**P.hello("s", "h2o_hands", 30.0, 0.0), "fps": 1e-300}, "malformed"),  # issue 31
    ({**P.hello("s", "h2o_hands", 30.0, 0.0), "fps": 0.99}, "malformed"),
    ({**P.hello("s", "h2o_hands", 30.0, 0.0), "resume": 1}, "malformed"),
    ({**P.error("internal"), "reason": "bored"}, "malformed"),
])
def test_invalid_messages_rejected_with_reason(msg, reason):
    with pytest.raises(P.ProtocolError) as info:
        P.decode(_packed(msg))
    assert info.value.reason == reason


def test_oversize_rejected_both_ways():
    with pytest.raises(P.ProtocolError) as info:
        P.decode(b"\x80" + b"\0" * P.MAX_MESSAGE_BYTES)
    assert info.value.reason == "too_large"
    with pytest.raises(P.ProtocolError) as info:
        P.encode(P.stats_reply(0.0, {f"c{i}": i for i in range(P.MAX_MESSAGE_BYTES // 8)}))
    assert info.value.reason == "too_large"


def test_unknown_fields_ignored_and_optional_fields_default_to_none():
    out = P.decode(_packed({**P.bye("s"), "future_field": [1, 2]}))
    assert "future_field" not in out
    hello = P.decode(_packed({"v": 1, "type": "hello", "session": "s", "layout": "h2o_hands",
                              "fps": 30, "client_time": 0, "resume": False}))
    assert hello["reference"] is None and hello["fps"] == 30.0


def test_estimate_dataclass_round_trip_and_topic():
    msg = P.estimate("s-1", 7, 1.0, 2.0, 2.5, phase_id=2, phase_name="pour", phase_progress=0.5,
                     progress=0.25, confidence=0.75, state="tracking", activity="pour_milk")
    typed = P.EstimateMsg.from_wire(P.decode(P.encode(msg)))
    assert typed.phase_name == "pour" and typed.seq == 7
    assert P.decode(P.encode(typed.to_wire())) == P.decode(P.encode(msg))
    assert P.topic("s-1") == b"s-1"


def test_numpy_scalars_encode_as_numbers():
    msg = P.pong(1.5, 2.0)
    msg["client_time"], msg["server_time"] = np.float32(1.5), np.int64(2)  # as an engine might
    assert P.decode(P.encode(msg))["client_time"] == 1.5


def test_encode_refuses_what_msgpack_cannot_pack():
    """A counter over 2**64 - 1 is a ProtocolError (the server answers it), not a crash."""
    with pytest.raises(P.ProtocolError) as info:
        P.encode(P.stats_reply(1.0, {"frames_lost": 2**64}, None, None))
    assert info.value.reason == "malformed" and "cannot pack" in info.value.detail
