"""masa-rt: real-time multi-activity sequence alignment (MASA) for AR/VR pose streams.

The core package: skeleton layouts, the sequence format, the MASA model, losses and
augmentation, metrics, the online aligner and the wire protocol. It never imports from
``trainer``, ``engine`` or ``clients``; those build on it.
"""

__version__ = "0.1.0"
