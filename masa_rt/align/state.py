"""The states a session can be in, and how one frame's state and confidence are decided
(docs/aligner.md, "States")."""

from __future__ import annotations

import numpy as np

from masa_rt.align.config import AlignerConfig

STATES = ("waiting", "tracking", "paused", "off_script", "tracking_lost", "finished")
# State codes: indices into STATES.
WAITING, TRACKING, PAUSED, OFF_SCRIPT, LOST, FINISHED = range(len(STATES))


def decide_state(cfg: AlignerConfig, ok: np.ndarray, seen: np.ndarray, paused: np.ndarray,
                 off: np.ndarray, pos: np.ndarray, length: np.ndarray) -> np.ndarray:
    """(B,) state codes. Later assignments win: ``tracking_lost`` > ``off_script`` >
    ``finished`` > ``paused`` > ``tracking``."""
    state = np.where(paused, PAUSED, TRACKING)
    state[pos >= length - 1 - cfg.finish_tolerance] = FINISHED
    state[off >= cfg.off_script_frames] = OFF_SCRIPT
    state[~ok] = np.where(seen, LOST, WAITING)[~ok]
    return state


def confidence(cfg: AlignerConfig, ok: np.ndarray, sim: np.ndarray,
               gap: np.ndarray) -> np.ndarray:
    """(B,) how similar the tracked frame is (above ``off_script_sim``), halved at most as
    the relocaliser's alternative approaches the jump margin; 0 on lost frames."""
    floor = cfg.off_script_sim
    sim_term = np.clip((sim - floor) / (1.0 - floor), 0.0, 1.0)
    doubt = np.clip(gap / cfg.relocalise_cost_margin, 0.0, 1.0)
    return np.where(ok, sim_term * (1.0 - 0.5 * doubt), 0.0)
