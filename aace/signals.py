"""SIGTERM and SIGINT where a run is: SIGTERM raised like Ctrl-C, and both held back while a run writes files that
must agree with each other."""
from __future__ import annotations

import contextlib
import os
import signal
import threading


class Terminated(BaseException):
    """SIGTERM, raised where the run is (like KeyboardInterrupt for SIGINT)."""


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises ``Terminated`` where the program is, as Ctrl-C raises KeyboardInterrupt (main thread only,
    where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM held while the block runs, then handled as they would have been (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got, previous = [], {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if got:
        handler = previous[got[0]]
        if callable(handler):
            handler(got[0], None)  # Python's own: raises KeyboardInterrupt, or Terminated under sigterm_raises
        elif handler != signal.SIG_IGN:
            os.kill(os.getpid(), got[0])  # the default action, now that the handler is back
