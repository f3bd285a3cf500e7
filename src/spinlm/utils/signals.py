"""SIGTERM / SIGINT: finish the current step, save, exit 0 (a scheduler's pre-emption loses nothing).

Inside `abandonable()` (generation and reference log-probs, whose results are only kept when
complete) a signal abandons the work at once by raising `StopRequested`; elsewhere it only sets
`received`, which the training loop reads after each step. A second SIGINT interrupts at once.

`set_deadline(seconds)` arms SIGALRM for max_time: when it fires inside abandonable work and
`abandon_on_deadline` is set (the run has trained a step, so stopping still makes progress), the
work is abandoned as for a signal; otherwise the loop's own check after each step stops the run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

import torch

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """A stop signal arrived during abandonable work."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class StopSignals:
    """Context manager installing the handlers (main thread only); restores the previous ones on exit."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._abandonable = False
        self._previous: dict[int, object] = {}
        self.abandon_on_deadline = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def set_deadline(self, seconds: float | None) -> None:
        """Abandon generation when `seconds` (max_time left) run out; main thread only, inside `with`."""
        if seconds is None or threading.current_thread() is not threading.main_thread():
            return
        self._previous.setdefault(signal.SIGALRM, signal.signal(signal.SIGALRM, self._handle_deadline))
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))

    def _handle_deadline(self, signum: int, frame) -> None:
        if self._abandonable and self.abandon_on_deadline:
            log.warning("max_time reached: abandoning the generation in progress, then saving")
            raise StopRequested("max_time")

    def __exit__(self, *exc) -> None:
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.received = name
        if self._abandonable:
            log.warning("%s received: abandoning the generation in progress, then saving", name)
            raise StopRequested(name)
        log.warning("%s received: finishing the current step, then saving", name)

    @contextlib.contextmanager
    def abandonable(self) -> Iterator[None]:
        """Work inside may be dropped: a signal (now or already received) raises StopRequested."""
        if self.received is not None:
            raise StopRequested(self.received)
        rng = torch.get_rng_state()
        self._abandonable = True
        try:
            yield
        except StopRequested:
            torch.set_rng_state(rng)  # the work may stop mid-way through a seeded block
            raise
        finally:
            self._abandonable = False
