"""masa-rt clients: stream poses to the server and receive estimates (pylsl style).

Depends only on the wire protocol (``masa_rt.protocol``), numpy, pyzmq and msgpack, so a
headset-side install needs nothing of the model or the engine.
"""

from clients._sockets import CurveKeys
from clients.clock import ClockOffset, local_clock
from clients.errors import ConnectionLost, MasaClientError, ServerError
from clients.inlet import Estimate, EstimateInlet
from clients.outlet import PoseOutlet

__all__ = [
    "ClockOffset",
    "ConnectionLost",
    "CurveKeys",
    "Estimate",
    "EstimateInlet",
    "MasaClientError",
    "PoseOutlet",
    "ServerError",
    "local_clock",
]
