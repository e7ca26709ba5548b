"""Run one function in a second process while this one goes on working, its output kept in a log file.

The demo trains its pixel-MIM baseline and measures its baseline rows this way, beside the teacher and the student:
each trains on one torch thread with one loader worker, so a single run leaves most of a 2-core machine's second
core idle. The second process is
started with `spawn` (a fresh interpreter, no copied torch or accelerate state); its stdout and stderr go to
`log_path`, so its progress bars do not mix with the first process's. `result()` waits for the function and returns
what it returned. An expected error in the second process (`errors.EXPECTED_ERRORS`: bad input, a missing file), or
its end before it sent a result (killed), is raised here as a `MimCoError` of one line that names the log, which
the commands print as their one `error:` line; any other exception (a bug) is raised as a `RuntimeError`, its
traceback in the log. Leaving the `with` block stops a second process that is still running (an error or Ctrl-C in
the first one). If the first process is killed outright (SIGKILL, out of memory), the second is killed with it
(`training.orphans.end_with_parent` with SIGKILL): no one is left to read its result, and its loader workers follow
within seconds, as they do whenever their process dies.

As with any `spawn` process, the second one imports the script that started the first again, so a script that uses
this must start its work under `if __name__ == "__main__":` (as `scripts/demo.py` does).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from typing import Any

from modeling_mimco.errors import EXPECTED_ERRORS, MimCoError, one_line
from modeling_mimco.training.orphans import end_with_parent


def _run_with_log(function: Callable, args: tuple, log_path: str, connection, first_pid: int) -> None:
    """The second process: `function(*args)` with stdout and stderr in `log_path`; sends `("ok", result)` or
    `("expected" or "bug", "TypeName: message")` through `connection`. It is killed if the first process
    (`first_pid`) ends before it."""
    end_with_parent(first_pid, getattr(signal, "SIGKILL", signal.SIGTERM))  # Windows has no SIGKILL
    with open(log_path, "w", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            # plain pickle: multiprocessing's own pickler would pass tensors as shared memory, which is gone once
            # this process has ended, possibly before the first process reads them
            message = pickle.dumps(("ok", function(*args)))
        except BaseException as error:  # noqa: BLE001 - every failure goes back to the first process
            traceback.print_exc()
            kind = "expected" if isinstance(error, EXPECTED_ERRORS) else "bug"
            message = pickle.dumps((kind, f"{type(error).__name__}: {one_line(error)}"))
        connection.send_bytes(message)
        connection.close()


class BackgroundRun:
    """`function(*args)` in a spawned process, started on entering the `with` block; see the module docstring.

    `function` and `args` must be picklable (a module-level function; dataclasses, namespaces, strings), and so must
    what `function` returns (tensors are copied).
    """

    def __init__(self, function: Callable, args: tuple, log_path: str, description: str):
        self.function, self.args, self.log_path, self.description = function, args, log_path, description
        self._process = None
        self._connection = None

    def __enter__(self) -> BackgroundRun:
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        context = multiprocessing.get_context("spawn")
        self._connection, child_connection = context.Pipe(duplex=False)
        # not a daemon: the second process starts DataLoader workers of its own, which a daemon may not
        self._process = context.Process(
            target=_run_with_log,
            args=(self.function, self.args, self.log_path, child_connection, os.getpid()),
            daemon=False,
        )
        self._process.start()
        child_connection.close()  # only the second process writes to it now, so `recv` sees its end
        return self

    def result(self) -> Any:
        """Waits for the second process; returns what `function` returned, or raises its error with the log's path."""
        try:
            payload = self._connection.recv_bytes()
        except EOFError:  # it ended without a word: killed, or out of memory
            payload = None
        self._process.join()
        if payload is None:
            kind, text = "expected", f"it stopped with exit code {self._process.exitcode} before it sent a result"
        else:
            kind, *rest = pickle.loads(payload)
            if kind == "ok":
                return rest[0]
            text = rest[0]
        message = f"{self.description} failed ({text}); its log: {self.log_path}"
        raise MimCoError(message) if kind == "expected" else RuntimeError(message)

    def __exit__(self, *exc_info) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        if self._connection is not None:
            self._connection.close()
