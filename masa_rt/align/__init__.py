"""Online alignment of a live embedding stream to recorded references.

The aligner is a stepper: ``Aligner(references).step(embedding, t) -> Estimate``, one call
per frame, ``reset()`` between sessions; ``AlignerBank`` steps many sessions in one call.
Per reference it keeps two dynamic programs over the cosine cost
``c(i) = 1 - cos(q_t, ref_i)``:

- the **tracker** (``tracker.py``): online time warping (Dixon 2005; Arzt & Widmer's score
  followers) -- an accumulated-cost row restricted to a band ``[pos - back, pos + band]``,
  forward steps of up to ``max_step`` reference frames per query frame, re-normalised
  every frame. O(band) per frame; its accumulated (undecayed) cost is what makes it
  steady under noise;
- the **relocaliser** (``relocaliser.py``): the same step pattern over the *whole*
  reference, with exponential forgetting, i.e. a streaming subsequence DTW in the manner
  of SPRING (Sakurai et al. 2007) whose window is a time constant instead of a hard cut.
  When a far-away frame is better than the tracked position by a margin for a few frames,
  the tracker jumps there (restarts, skipped and repeated phases).

With several references every relocaliser runs (its best recent cost scores the activity,
``activity.py``) and only the chosen reference's tracker does. A reference built with a
**phase decoder** adds ``decoder_weight * -log(p(phase) / max p)`` to the cost of each of
its frames (``decoder_term.py``). Pauses come from a speed meter (``pause.py``), states
and confidence from ``state.py``.

The modules, in the order a frame meets them: ``step.py`` (the per-frame path, top to
bottom) calls ``decoder_term``, ``pause``, ``relocaliser``, ``activity``, ``tracker``
and ``state`` on the rows of ``sessions.Sessions`` (every session's state in stacked
arrays) over ``compiled.CompiledReferences`` (the references laid out as columns);
``estimate.py`` reads the answers, which ``phase_filter.py`` (references without a phase
decoder) then moves into its likeliest phase; ``kernels.py`` holds the tracker's and the
relocaliser's loops compiled with numba, when it is installed (the same answers).
``reference.py`` is the reference and its file format, ``config.py`` the parameters,
``aligner.py`` and ``bank.py`` the public steppers, ``offline.py`` the exact batch DTW
(``offline_dtw``, ``online_dtw_index``, ``subsequence_dtw``). States and tuning:
``docs/aligner.md``.
"""

from masa_rt.align.aligner import Aligner
from masa_rt.align.bank import AlignerBank
from masa_rt.align.config import DECODER_FREE, AlignerConfig
from masa_rt.align.estimate import Estimate, EstimateBatch
from masa_rt.align.offline import offline_dtw, online_dtw_index, path_to_index, subsequence_dtw
from masa_rt.align.reference import (
    REFERENCE_FORMAT_VERSION,
    Reference,
    ReferenceFormatError,
    is_reference_file,
)
from masa_rt.align.state import STATES

__all__ = [
    "DECODER_FREE",
    "REFERENCE_FORMAT_VERSION",
    "STATES",
    "Aligner",
    "AlignerBank",
    "AlignerConfig",
    "Estimate",
    "EstimateBatch",
    "Reference",
    "is_reference_file",
    "ReferenceFormatError",
    "offline_dtw",
    "online_dtw_index",
    "path_to_index",
    "subsequence_dtw",
]
