"""Where a page's training progress goes: never into the notebook, whose outputs must stay free of timings.

`python -m aace book` names a file in ``$AACE_PROGRESS`` for each page and copies what the page's kernel writes
there onto its own standard output while the page runs, so that the runs a page trains are seen in a terminal, in a
log file (``make book > log``) and in CI alike. Outside the book (a notebook opened by hand), progress goes to the
controlling terminal when there is one, else nowhere.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path


def progress_stream():
    """A text stream for progress lines and bars, or None; the caller closes it."""
    path = os.environ.get("AACE_PROGRESS")
    try:
        return open(path, "a", buffering=1) if path else open("/dev/tty", "w")
    except OSError:  # no terminal (a detached job) and no book to follow the file: no progress
        return None


@contextlib.contextmanager
def shown_while_running(path: Path, out=None, every: float = 0.2):
    """Sets ``$AACE_PROGRESS`` to ``path`` (made empty) for the block, and copies what is written there onto
    ``out`` (standard output) as it comes, carriage returns included, so that a bar redraws in a terminal. What
    is left when the block ends is copied before it returns; the file is removed."""
    out = out or sys.stdout
    path.write_text("")
    os.environ["AACE_PROGRESS"] = str(path.resolve())
    done = threading.Event()

    def follow():
        with open(path) as source:
            while True:
                ended = done.is_set()  # read once more after the block ended: nothing written is lost
                chunk = source.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                elif ended:
                    return
                else:
                    done.wait(every)
    follower = threading.Thread(target=follow, name="aace-progress", daemon=True)
    follower.start()
    try:
        yield
    finally:
        done.set()
        follower.join(timeout=10)
        os.environ.pop("AACE_PROGRESS", None)
        path.unlink(missing_ok=True)
