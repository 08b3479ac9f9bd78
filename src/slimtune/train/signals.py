"""Stop requests (Ctrl-C, `docker stop`, SLURM preemption, a closed terminal) turned into a clean stop.

SIGINT, SIGTERM and SIGHUP only raise a flag; the training loop looks at it between steps and saves
the checkpoint of that step boundary, RNG state included, so a resumed `--deterministic` run ends
bit-identical to an uninterrupted one. A second signal of any of them stops at once, without saving
(the previous checkpoint stays intact: saves never leave half-written files).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class TrainingInterrupted(KeyboardInterrupt):
    """A stop request: `signum` says which signal; `immediate` when it came twice (no save)."""

    def __init__(self, signum: int, immediate: bool = False) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum
        self.immediate = immediate


class StopRequests:
    """Flag-raising handlers for STOP_SIGNALS (main thread only), between `install` and `restore`."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            # Asked twice: the user wants out now; no save (the last saved checkpoint is intact).
            raise TrainingInterrupted(signum, immediate=True)
        self.signum = signum

    def install(self) -> "StopRequests":
        """Replace the handlers of STOP_SIGNALS with the flag-raising one."""
        # Signal handlers can only be set from the main thread; elsewhere (a notebook's worker
        # thread) the default behaviour stays.
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
