"""Runs that build a folder: nothing half-written survives Ctrl-C or SIGTERM, and what a SIGKILL leaves is named.

Commands that write a data set or a folder of files build it in a hidden sibling,
``.<name>.incomplete-<pid>`` (:func:`incomplete_folder`), and rename it to ``<name>`` only when it is
complete; on any exception they delete the sibling. Ctrl-C raises ``KeyboardInterrupt``, so it takes that
path by itself. SIGTERM (what ``kill``, schedulers and container runtimes send) ends Python at once
by default; inside :func:`sigterm_raises` it raises :class:`Terminated` instead, which takes the same
path, and the signal is then delivered again to the previous handler, so the process still ends as
killed by SIGTERM (exit status 143 in a shell). SIGKILL cannot be caught: the sibling stays, and
:func:`stale_incomplete_folders` finds it once its process is gone (``nnunetv2_grcsf doctor`` names them).
"""

import contextlib
import os
import re
import signal
import threading
from pathlib import Path

_INCOMPLETE = re.compile(r"\.(?P<name>.+)\.incomplete-(?P<pid>\d+)")


class Terminated(BaseException):
    """SIGTERM arrived inside :func:`sigterm_raises` (a ``BaseException`` like ``KeyboardInterrupt``, so
    that ``except Exception`` does not swallow it)."""


@contextlib.contextmanager
def sigterm_raises():
    """While inside, SIGTERM raises :class:`Terminated` in the main thread; the previous handler is restored on
    leaving, and a SIGTERM that arrived is then handed to it (by default: the process ends).

    Further SIGTERMs during the clean-up are ignored. Outside the main thread (where Python cannot install
    handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    if previous is None:  # a handler installed outside Python: the default is the closest we can restore
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            signal.raise_signal(signal.SIGTERM)


def incomplete_folder(target) -> Path:
    """The hidden sibling ``.<name>.incomplete-<pid>`` in which this process builds folder ``target``."""
    target = Path(target)
    return target.parent / f".{target.name}.incomplete-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def stale_incomplete_folders(parent, name: str = None) -> list:
    """Folders ``.<name>.incomplete-<pid>`` in ``parent`` whose process is no longer running (any name if None)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = []
    for entry in sorted(parent.iterdir()):
        match = _INCOMPLETE.fullmatch(entry.name)
        if (match and entry.is_dir() and (name is None or match["name"] == name)
                and not _process_alive(int(match["pid"]))):
            found.append(entry)
    return found
