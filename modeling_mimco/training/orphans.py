"""No orphans: a process whose starter is killed outright (SIGKILL, out of memory) ends with it.

A training process started by a launcher (`accelerate launch`, `torchrun`) whose launcher is killed (`kill -9`, an
out-of-memory kill) would otherwise train on to the end of the run, holding the output folder's lock, so that a
resume at once is refused. The demo's second process (`experiments.background.BackgroundRun`) would go on for minutes
after its first process is killed. `end_with_parent` has such a process sent a signal when its parent ends: SIGTERM
for a training process (`end_with_launcher`), which the training loop takes as preemption (a checkpoint, then exit
code 143); SIGKILL for the demo's second process, whose result no one is left to read.

- On Linux the kernel sends the signal: `prctl(PR_SET_PDEATHSIG)` through libc. It fires when the parent *thread*
  that started the process ends; the launchers and `multiprocessing` start their processes from their main thread.
- Elsewhere (or where `prctl` is unavailable) a daemon thread checks once a second whether the parent has changed.
- A parent that ended before either was set up is caught at once: the parent process of now is compared with the
  expected one (the one given, else the parent when this module was imported): an orphan has init (1) or a
  subreaper for its parent.

Training processes ask for this only when a launcher started them (`end_with_launcher`: torch elastic's
`TORCHELASTIC_RUN_ID`, or an `ACCELERATE_DYNAMO_BACKEND`, which `accelerate launch` always sets): a run started from
a shell keeps the shell's rules, so that `nohup python scripts/run_pretraining.py ... &` survives the logout of the
shell that started it.

It imports nothing of the package.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time


logger = logging.getLogger(__name__)

# The environment a launcher gives the processes it starts: torch elastic (`torchrun`, `accelerate launch` with
# several processes) sets the first, `accelerate launch` sets the second in every process it starts, also a single one.
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")
# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
# How often the watching thread (platforms without `prctl`) looks at the parent, in seconds.
WATCH_INTERVAL = 1.0

# The parent of this process when the package's training code was imported, early in a program's start.
_PARENT_AT_IMPORT = os.getppid()


def started_by_launcher() -> bool:
    """Whether a launcher (`accelerate launch`, `torchrun`) started this process, by the environment it sets."""
    return any(os.environ.get(name) for name in LAUNCHER_VARIABLES)


def end_with_parent(parent_pid: int | None = None, signum: int = signal.SIGTERM) -> str:
    """Has `signum` sent to this process when its parent process ends (see the module docstring).

    `parent_pid` is the parent this process expects (by default its parent when this module was imported); if the
    parent has already changed, the signal is raised at once. Returns how the parent is watched: `"prctl"` or
    `"thread"`, or `"gone"` when the parent had already ended. Call it from the main thread.
    """
    expected = _PARENT_AT_IMPORT if parent_pid is None else parent_pid
    how = "prctl" if _set_parent_death_signal(signum) else "thread"
    if _parent_gone(expected):
        logger.warning("The process that started this one has ended: stopping (signal %d).", signum)
        _signal_self(signum)
        return "gone"
    if how == "thread":
        threading.Thread(target=_watch_parent, args=(expected, signum), name="mimco-parent-watch", daemon=True).start()
    return how


def end_with_launcher() -> str | None:
    """`end_with_parent()` (SIGTERM) when a launcher started this process; `None` (nothing done) otherwise."""
    if not started_by_launcher():
        return None
    return end_with_parent()


def _parent_gone(expected: int) -> bool:
    # an orphan's parent is init (1) or the nearest subreaper, never the process that started it
    return os.getppid() != expected


def _set_parent_death_signal(signum: int) -> bool:
    """`prctl(PR_SET_PDEATHSIG, signum)` on Linux; whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(expected: int, signum: int, interval: float = WATCH_INTERVAL) -> None:
    """The watching thread: raises `signum` in this process once its parent is no longer `expected`."""
    while not _parent_gone(expected):
        time.sleep(interval)
    _signal_self(signum)


def _signal_self(signum: int) -> None:
    """Sends `signum` to this process as another process would. On POSIX a signal to the process (not to the calling
    thread, as `raise` does) also wakes a main thread that waits in a system call, where Python runs the handler."""
    if os.name == "posix":
        os.kill(os.getpid(), signum)
    else:  # Windows: `os.kill` would end the process without running a handler
        signal.raise_signal(signum)


__all__ = ["LAUNCHER_VARIABLES", "end_with_launcher", "end_with_parent", "started_by_launcher"]
