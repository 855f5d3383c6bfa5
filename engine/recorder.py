"""Record what headsets send: each session's accepted frames become one sequence file.

``masa-rt serve --record DIR``: the server hands every frame it accepts to a
:class:`SessionRecorder` (joints in the session's own layout, capture stamps in the
client's clock, as received). When the session ends (``bye``, expiry, a restart with the
same id, the server stopping) its frames are written as a sequence file
(``masa_rt.sequence``, atomically) by a background thread, so a slow disk never holds up
the answers of the other sessions. A recording can then be labelled (``masa-rt label``)
and built into a reference (``masa-rt reference build``).

Files: ``DIR/<started>_<session>.npz`` (``started``: when the hello came, UTC, to the
millisecond, so a restarted session id never overwrites its earlier take). With
``--secure`` each client key records into its own folder ``DIR/<key id>/`` (mode 0700;
key id: the first 16 hex digits of the sha256 of its Z85 public key), so tenants never
mix. The file's ``source`` says ``masa-rt serve: session=... key=... closed=<why>
frames_over_cap=N``; ``activity`` is the reference the hello asked for, if any.

Memory is bounded: a session keeps at most ``max_frames`` frames (default 10 min at 90 Hz,
about 27 MB of two-hand joints). Frames past the cap are not recorded: counted
(``record.frames_over_cap``, and in the file's ``source``) and logged once per session.
Finished recordings wait for the writer in a queue of at most ``queue_size`` (default 64);
while serving, one that finds it full (a disk far too slow) is dropped, counted
(``record.dropped_queue_full``) and logged, since the loop must not block; when the server
stops, the sessions still open wait for room and are all written.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from masa_rt.sequence import Sequence, save_sequence

__all__ = ["DEFAULT_MAX_FRAMES", "FrameBuffer", "SessionRecorder", "key_id"]

log = logging.getLogger("masa_rt.recorder")

DEFAULT_MAX_FRAMES = 54_000  # 10 min at 90 Hz: 42 x 3 float32 joints + a stamp = ~27 MB
_BLOCK_FRAMES = 1_024  # memory grows a block at a time, never past the cap


def key_id(public_key: bytes | str) -> str:
    """Folder name of a client key: Z85 keys hold '/', '.' and other path characters."""
    raw = public_key.encode() if isinstance(public_key, str) else public_key
    return hashlib.sha256(raw).hexdigest()[:16]


class FrameBuffer:
    """Capture stamps and (J, C) joints of one session, in blocks, up to ``max_frames``."""

    def __init__(self, shape: tuple[int, int], max_frames: int) -> None:
        self.shape, self.max_frames = tuple(shape), max_frames
        self._joints: list[np.ndarray] = []  # (BLOCK, J, C) float32 blocks
        self._times: list[np.ndarray] = []  # (BLOCK,) float64 blocks
        self.count = 0

    def append(self, t: float, joints: np.ndarray) -> bool:
        """Keep one frame; False (nothing kept) once ``max_frames`` are held."""
        if self.count >= self.max_frames:
            return False
        row = self.count % _BLOCK_FRAMES
        if row == 0:
            size = min(_BLOCK_FRAMES, self.max_frames - self.count)
            self._joints.append(np.empty((size, *self.shape), dtype=np.float32))
            self._times.append(np.empty(size, dtype=np.float64))
        self._joints[-1][row] = joints
        self._times[-1][row] = t
        self.count += 1
        return True

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(times (T,), joints (T, J, C)) of the frames held."""
        if not self.count:
            return np.empty(0), np.empty((0, *self.shape), dtype=np.float32)
        times, joints = np.concatenate(self._times), np.concatenate(self._joints)
        return times[:self.count], joints[:self.count]


@dataclass
class _Take:
    """One session's recording so far."""

    session: str
    layout: str
    fps: float
    started: datetime
    frames: FrameBuffer
    key: str | None = None  # key id under --secure
    activity: str | None = None
    over_cap: int = 0


@dataclass
class _Finished:
    """A take handed to the writer (the server thread no longer touches it)."""

    path: Path
    take: _Take
    why: str


class SessionRecorder:
    """Per-session frame recording with a background writer (see the module docstring).

    Called from the server's thread only (``opened`` / ``frame`` / ``closed`` / ``stop``);
    none of them raises on a session it does not know, so a recording problem never
    costs a headset its answers.
    """

    def __init__(self, folder: str | Path, max_frames: int = DEFAULT_MAX_FRAMES,
                 queue_size: int = 64) -> None:
        self.folder = Path(folder)
        self.max_frames = max_frames
        self._takes: dict[str, _Take] = {}
        self._counts: Counter = Counter()  # server thread only
        # Writer thread's counts, read by the server thread for stats: behind a lock.
        self._written: Counter = Counter()
        self._written_lock = threading.Lock()
        self._queue: queue.Queue[_Finished | None] = queue.Queue(maxsize=queue_size)
        self._writer = threading.Thread(target=self._write_loop, name="masa-rt-recorder",
                                        daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ server side

    def opened(self, session: str, layout: str, fps: float, shape: tuple[int, int],
               owner_key: bytes | None = None, activity: str | None = None) -> None:
        """A new session (or a restart of one: the old take was closed first)."""
        self._takes[session] = _Take(
            session, layout, float(fps), datetime.now(timezone.utc),
            FrameBuffer(shape, self.max_frames),
            key=key_id(owner_key) if owner_key is not None else None, activity=activity)

    def frame(self, session: str, t: float, joints: np.ndarray) -> None:
        """One accepted frame of ``session``."""
        take = self._takes.get(session)
        if take is None:
            return
        if take.frames.append(t, joints):
            self._counts["record.frames"] += 1
            return
        take.over_cap += 1
        self._counts["record.frames_over_cap"] += 1
        if take.over_cap == 1:  # once per session: the count says how many followed
            log.warning("event=record_cap session=%s max_frames=%d detail=%r", session,
                        self.max_frames, "later frames of this session are not recorded")

    def closed(self, session: str, why: str, wait_s: float = 0.0) -> None:
        """The session ended (bye, expired, restarted, shutdown): queue its file, waiting
        up to ``wait_s`` for room (0 while serving: the loop must not block)."""
        take = self._takes.pop(session, None)
        if take is None:
            return
        if take.frames.count == 0:
            self._counts["record.empty_sessions"] += 1  # nothing to write
            return
        try:
            self._queue.put(_Finished(self._path_of(take), take, why), timeout=wait_s or None,
                            block=wait_s > 0)
        except queue.Full:
            self._counts["record.dropped_queue_full"] += 1
            log.error("event=record_dropped session=%s frames=%d detail=%r", session,
                      take.frames.count, "writer queue full (disk too slow?)")

    def stop(self, timeout: float = 60.0) -> None:
        """Write every open take (``closed=shutdown``) and wait for the writer, at most
        ``timeout`` s for each take's room in the queue and for the last write."""
        for session in list(self._takes):  # the server is stopping: these may wait
            self.closed(session, "shutdown", wait_s=timeout)
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # the writer is stuck (a hung disk): do not hang the exit too
            log.error("event=record_stop_timeout pending=%d", self._queue.qsize())
            return
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.error("event=record_stop_timeout pending=%d", self._queue.qsize())

    def counters(self) -> dict[str, int]:
        """``record.*`` counts for the server's stats: frames, files, failures, drops."""
        out = Counter(self._counts)
        with self._written_lock:
            out.update(self._written)
        out["record.sessions_open"] = len(self._takes)
        return dict(out)

    # ------------------------------------------------------------------ files

    def _path_of(self, take: _Take) -> Path:
        folder = self.folder / take.key if take.key else self.folder
        stamp = take.started.strftime("%Y%m%dT%H%M%S.") + f"{take.started.microsecond // 1000:03d}Z"
        return folder / f"{stamp}_{take.session}.npz"

    @staticmethod
    def _sequence_of(take: _Take, why: str) -> Sequence:
        """The take as a sequence (on the writer thread: concatenating ~27 MB takes ms)."""
        times, joints = take.frames.arrays()
        source = (f"masa-rt serve: session={take.session} key={take.key or '-'} "
                  f"closed={why} frames_over_cap={take.over_cap}")
        return Sequence(joints=joints, layout=take.layout, fps=take.fps, timestamps=times,
                        activity=take.activity, source=source)

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(item)
            except Exception:  # noqa: BLE001 - a bug must not stop every later recording
                self._count_written("record.write_failed")
                log.exception("event=record_failed session=%s", item.take.session)

    def _write(self, item: _Finished) -> None:
        """Write one take; a bad take or a full disk is counted and logged, never raised."""
        session = item.take.session
        try:
            sequence = self._sequence_of(item.take, item.why)
            item.path.parent.mkdir(mode=0o700, exist_ok=True)  # a tenant's folder: theirs
            path = _free_name(item.path)
            save_sequence(path, sequence)
        except (OSError, ValueError) as exc:  # disk full, a take of all-NaN frames, ...
            self._count_written("record.write_failed")
            log.error("event=record_failed session=%s file=%s detail=%r", session, item.path,
                      str(exc))
            return
        self._count_written("record.files_written")
        log.info("event=recorded session=%s frames=%d file=%s", session, sequence.num_frames,
                 path)

    def _count_written(self, name: str) -> None:
        with self._written_lock:
            self._written[name] += 1


def _free_name(path: Path) -> Path:
    """``path``, or ``stem-1.npz``, ``stem-2.npz``... if taken: a take never replaces one."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
